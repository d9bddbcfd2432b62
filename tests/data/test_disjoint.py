"""Class-disjoint datasets: Fashion-MNIST split by class from the real IDX files, and CUB-200-2011, Cars196 and
Stanford Online Products read from tiny copies of their own layouts (real JPEGs, a real .mat)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import fake_formats
from losslab.data import (
    Cars196DataModule,
    ClassDisjointDataModule,
    CUB200DataModule,
    StanfordOnlineProductsDataModule,
)
from losslab.data.disjoint import hold_out_validation, relabel
from losslab.data.sources import load_fashion_mnist
from losslab.errors import ConfigError, DataFormatError, DataNotFoundError


def test_hold_out_by_images_is_stratified_and_by_classes_keeps_classes_whole():
    labels = torch.arange(6).repeat_interleave(10)
    train, val, train_classes, val_classes = hold_out_validation(labels, 6, 0.2, seed=0, by="images")
    assert train_classes == val_classes == list(range(6))
    assert torch.bincount(labels[val]).tolist() == [2] * 6 and len(train) == 48
    train, val, train_classes, val_classes = hold_out_validation(labels, 8, 0.5, seed=0, by="classes")
    assert len(val_classes) == 3 and set(val_classes) <= set(range(6))  # classes 6, 7 have no sample
    assert train_classes == sorted(set(range(8)) - set(val_classes))
    assert set(labels[val].tolist()) == set(val_classes) and not set(labels[train].tolist()) & set(val_classes)
    assert (hold_out_validation(labels, 8, 0.5, seed=0, by="classes")[3]) == val_classes  # seeded
    assert relabel(torch.tensor([7, 2, 7, 4]), [2, 4, 7]).tolist() == [2, 0, 2, 1]


@pytest.mark.parametrize(("by", "fraction", "message"), [
    ("species", 0.2, "dataset.val_holdout='species': allowed values are images, classes"),
    ("classes", 0.2, "holds out 1 of the 6 training classes, and retrieval needs at least 2"),
])  # fmt: skip
def test_hold_out_refuses_what_it_cannot_do(by, fraction, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hold_out_validation(torch.arange(6).repeat_interleave(3), 6, fraction, seed=0, by=by)


# ---- Fashion-MNIST by class -----------------------------------------------------------------------------------


def fashion_module(data_dir: Path, **overrides) -> ClassDisjointDataModule:
    options = {"name": "fashion_mnist_disjoint", "data_dir": str(data_dir), "download": False, "val_fraction": 0.5,
               "batch_size": 4, "eval_batch_size": 64, **overrides}  # fmt: skip
    module = ClassDisjointDataModule(**options)
    module.setup("fit")
    return module


def rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_fashion_mnist_disjoint_trains_on_classes_0_to_4_and_tests_on_5_to_9(fake_data_dir):
    module = fashion_module(fake_data_dir)
    arrays = load_fashion_mnist(fake_data_dir, download=False)
    assert module.class_disjoint and module.unseen_class_stages == ("test",)
    assert module.classes == module.val_classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert module.test_classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    seen = arrays.train_labels < 5
    train_and_val = torch.cat([module.train_split.images, module.val_split.images])
    assert rows(train_and_val) == rows(arrays.train_images[seen]) and len(train_and_val) == int(seen.sum())
    assert not rows(module.train_split.images) & rows(module.val_split.images)
    unseen = arrays.test_labels >= 5
    assert torch.equal(module.test_split.images, arrays.test_images[unseen])  # official test images, in order
    assert torch.equal(module.test_split.labels, arrays.test_labels[unseen] - 5)
    for split in (module.train_split, module.val_split):
        originals = [int(arrays.train_labels[(arrays.train_images == image).flatten(1).all(1)][0]) for image in split.images]
        assert split.labels.tolist() == originals  # training classes keep their numbers
    assert module.num_classes == 5 and module.class_counts.sum() == len(module.train_split.labels)
    assert module.info.split["classes"]["test"] == module.test_classes and module.info.split["val_holdout"] == "images"
    bank = torch.cat([labels for _, labels in module.train_eval_dataloader()])
    assert torch.equal(bank, module.train_split.labels)  # the kNN bank: every training image, in order


def test_fashion_mnist_disjoint_can_hold_out_whole_classes_for_validation(fake_data_dir):
    module = fashion_module(fake_data_dir, val_holdout="classes", val_fraction=0.4)
    assert module.unseen_class_stages == ("val", "test")
    assert len(module.val_classes) == 2 and module.num_classes == 3
    assert not set(module.val_classes) & set(module.classes)
    assert set(module.train_split.labels.tolist()) == {0, 1, 2} and set(module.val_split.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train_classes": 10}, "dataset.train_classes=10: fashion_mnist has 10 classes"),
    ({"train_classes": 1}, "dataset.train_classes=1: must be an integer >= 2"),
    ({"label_noise": {"rate": 0.2}}, "class-disjoint; dataset.label_noise is not supported"),
    ({"source": "imagenet"}, "dataset.source='imagenet': allowed values are"),
])  # fmt: skip
def test_fashion_mnist_disjoint_refuses_settings_it_cannot_honour(overrides, message, fake_data_dir):
    with pytest.raises(ConfigError, match=message):
        fashion_module(fake_data_dir, **overrides)


# ---- CUB-200-2011, Cars196, Stanford Online Products ------------------------------------------------------------

# name -> (fake writer, datamodule, how many of the classes train, val_fraction holding out 2 training classes)
BENCHMARKS = {
    "cub200": (fake_formats.write_cub200, CUB200DataModule, 100, 0.4),
    "cars196": (fake_formats.write_cars196, Cars196DataModule, 98, 0.4),
    "sop": (fake_formats.write_stanford_online_products, StanfordOnlineProductsDataModule, 3, 0.67),
}
TEST_CLASSES = {"cub200": 100, "cars196": 98, "sop": 4}


def benchmark(name: str, root: Path, **overrides):
    write, module_class, _, _ = BENCHMARKS[name]
    fake = write(root)
    options = {"name": name, "root": str(root), "image_size": 20, "resize_ratio": 1.0, "num_workers": 0,
               "batch_size": 4, "eval_batch_size": 64, "val_holdout": "images", "val_fraction": 0.25, **overrides}  # fmt: skip
    module = module_class(**options)
    module.setup("fit")
    return fake, module


def relative(module_samples, directory: Path) -> list[tuple[str, int]]:
    return [(Path(path).relative_to(directory).as_posix(), int(label)) for path, label in module_samples]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_reads_its_layout_and_tests_on_the_second_half_of_the_classes(name, tmp_path):
    fake, module = benchmark(name, tmp_path)
    first = BENCHMARKS[name][2]
    listing = list(zip(fake.paths, fake.labels.tolist()))
    assert module.class_disjoint and module.unseen_class_stages == ("test",) and module.num_classes == first
    assert len(module.test_classes) == TEST_CLASSES[name] and module.classes == module.val_classes
    assert relative(module._test.samples, fake.directory) == [(p, c - first) for p, c in listing if c >= first]
    training = relative(module._train.samples, fake.directory) + relative(module._val.samples, fake.directory)
    assert sorted(training) == sorted((p, c) for p, c in listing if c < first)
    assert module.info.split["n_val"] == len(module._val) > 0 and module.info.source == str(fake.directory)
    assert len(module.info.files) >= 2 and all(len(digest) == 64 for digest in module.info.files.values())

    images, labels = (torch.cat(parts) for parts in zip(*module.test_dataloader()))
    in_test = fake.labels >= first
    assert labels.tolist() == (fake.labels[in_test] - first).tolist()
    expected = torch.from_numpy(fake.images[in_test][:, :, :, 2:22])  # 20x24 centre-cropped to 20x20
    assert images.shape == expected.shape and (images.int() - expected.int()).abs().max() <= 6
    train_images, _ = next(iter(module.train_dataloader()))
    assert train_images.shape == (4, 3, 20, 20)
    bank = torch.cat([labels for _, labels in module.train_eval_dataloader()])
    assert torch.equal(bank, module._train.targets)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_validation_can_hold_out_whole_training_classes(name, tmp_path):
    fraction = BENCHMARKS[name][3]
    fake, module = benchmark(name, tmp_path, val_holdout="classes", val_fraction=fraction)
    original = dict(zip(fake.paths, fake.labels.tolist()))
    train_classes = {original[p] for p, _ in relative(module._train.samples, fake.directory)}
    val_classes = {original[p] for p, _ in relative(module._val.samples, fake.directory)}
    assert len(val_classes) == 2 and not train_classes & val_classes
    assert module.unseen_class_stages == ("val", "test") and module.num_classes == BENCHMARKS[name][2] - 2
    assert not set(module.val_classes) & set(module.classes)
    assert sorted(set(module._val.targets.tolist())) == [0, 1]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_is_found_below_root_or_at_it(name, tmp_path):
    fake, _ = benchmark(name, tmp_path)
    _, module_class, _, _ = BENCHMARKS[name]
    module = module_class(name=name, root=str(fake.directory), num_workers=0, val_holdout="images")
    module.setup()
    assert module.info.source == str(fake.directory)


@pytest.mark.parametrize(("name", "folder", "missing"), [
    ("cub200", "CUB_200_2011", "classes.txt"), ("cars196", "cars196", "cars_annos.mat"),
    ("sop", "Stanford_Online_Products", "Ebay_train.txt"),
])  # fmt: skip
def test_missing_benchmark_lists_every_place_searched(name, folder, missing, tmp_path, monkeypatch):
    monkeypatch.delenv("LOSSLAB_DATA_DIR", raising=False)
    _, module_class, _, _ = BENCHMARKS[name]
    with pytest.raises(DataNotFoundError) as error:
        module_class(name=name, root=str(tmp_path), num_workers=0).setup()
    text = str(error.value)
    assert f"Dataset '{name}' was not found" in text and f"{tmp_path / folder}: no such directory" in text
    assert f"{tmp_path}: missing {missing}" in text and "dataset.root" in text


def test_missing_image_and_malformed_annotation_name_the_file(tmp_path):
    fake = fake_formats.write_cub200(tmp_path)
    (fake.directory / fake.paths[3]).unlink()
    with pytest.raises(DataNotFoundError, match=r"1 listed images do not exist: images/"):
        CUB200DataModule(name="cub200", root=str(tmp_path), num_workers=0, val_holdout="images").setup()
    (fake.directory / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(DataFormatError, match=r"image_class_labels.txt:2: expected 2 fields"):
        CUB200DataModule(name="cub200", root=str(tmp_path), num_workers=0).setup()


def test_sop_refuses_a_product_in_both_halves(tmp_path):
    fake = fake_formats.write_stanford_online_products(tmp_path)
    test_file = fake.directory / "Ebay_test.txt"
    lines = test_file.read_text().splitlines()
    image_id, _, super_class, path = lines[1].split()
    lines[1] = f"{image_id} 1 {super_class} {path}"  # product 1 is a training product
    test_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"classes \[1\] are in both Ebay_train.txt and Ebay_test.txt"):
        StanfordOnlineProductsDataModule(name="sop", root=str(tmp_path), num_workers=0).setup()


def test_cars196_reads_class_names_from_the_mat_file(tmp_path):
    fake, module = benchmark("cars196", tmp_path)
    assert module.classes[:2] == ["Make1 Model 2000", "Make2 Model 2001"] and len(module.test_classes) == 98
    assert np.array_equal(np.sort(np.unique(fake.labels)), [0, 1, 2, 3, 97, 98, 149, 195])
