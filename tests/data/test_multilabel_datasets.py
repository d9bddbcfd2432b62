"""Multi-label datasets: Fashion-MNIST mosaics built from the real IDX files, and image folders with a labels CSV."""

from pathlib import Path

import numpy as np
import pytest
import torch

import fake_formats
from losslab.data import MosaicDataModule, MultiLabelFolderDataModule
from losslab.data.multilabel import mosaic
from losslab.data.sources import load_fashion_mnist
from losslab.errors import ConfigError, DataFormatError, DataNotFoundError


def test_mosaic_lays_tiles_out_row_by_row_and_labels_them_with_the_union():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 3).contiguous()
    images[:, :, 0, 0] += 100  # mark each tile's own top-left pixel: a transposed tile would move it
    labels = torch.tensor([0, 1, 2, 2, 3])
    generator = torch.Generator().manual_seed(0)
    pixels, targets = mosaic(images, labels, num_classes=5, n=50, grid=2, generator=generator)
    assert pixels.shape == (50, 1, 4, 6) and pixels.dtype == torch.uint8 and targets.shape == (50, 5)
    tiles = torch.randint(5, (50, 4), generator=torch.Generator().manual_seed(0))  # the draws it made
    for i in range(50):
        top_left, top_right, bottom_left, bottom_right = (images[t] for t in tiles[i])
        expected = torch.cat([torch.cat([top_left, top_right], -1), torch.cat([bottom_left, bottom_right], -1)], -2)
        assert torch.equal(pixels[i], expected)
        assert targets[i].nonzero().flatten().tolist() == sorted(set(labels[tiles[i]].tolist()))


def mosaic_module(data_dir: Path, **overrides) -> MosaicDataModule:
    options = {"name": "fashion_mnist_mosaic", "data_dir": str(data_dir), "download": False, "n_train": 40,
               "n_test": 12, "val_fraction": 0.25, "batch_size": 4, "eval_batch_size": 8, **overrides}  # fmt: skip
    module = MosaicDataModule(**options)
    module.setup("fit")
    return module


def find_tiles(mosaics: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` index in ``sources`` of each quadrant of each 56x56 mosaic (top-left, top-right, bottom-left,
    bottom-right), -1 where the quadrant is none of them."""
    quadrants = [mosaics[:, :, :28, :28], mosaics[:, :, :28, 28:], mosaics[:, :, 28:, :28], mosaics[:, :, 28:, 28:]]
    found = torch.full((len(mosaics), 4), -1)
    for q, quadrant in enumerate(quadrants):
        equal = (quadrant[:, None] == sources[None]).flatten(2).all(dim=2)  # [N, M]
        hit = equal.any(dim=1)
        found[hit, q] = equal[hit].float().argmax(dim=1)
    return found


def test_mosaics_are_real_fashion_mnist_images_in_a_2x2_grid_labelled_with_their_classes(fake_data_dir):
    module = mosaic_module(fake_data_dir)
    arrays = load_fashion_mnist(fake_data_dir, download=False)
    assert module.multi_label and module.num_classes == 10 and module.num_channels == 1 and module.image_size == 56
    val_sources = set()
    for split, sources, labels in ((module.train_split, arrays.train_images, arrays.train_labels),
                                   (module.val_split, arrays.train_images, arrays.train_labels),
                                   (module.test_split, arrays.test_images, arrays.test_labels)):  # fmt: skip
        tiles = find_tiles(split.images, sources)
        assert (tiles >= 0).all(), "every quadrant is one of the split's source images"
        union = torch.zeros(len(tiles), 10).scatter_(1, labels[tiles], 1.0)
        assert split.labels.dtype == torch.float32 and torch.equal(split.labels, union)
        if split is module.val_split:
            val_sources = set(tiles.flatten().tolist())
        if split is module.train_split:
            train_sources = set(tiles.flatten().tolist())
    assert val_sources and not val_sources & train_sources, "no source image in both train and val mosaics"
    assert (len(module.train_split.labels), len(module.val_split.labels), len(module.test_split.labels)) == (30, 10, 12)
    torch.testing.assert_close(module.class_counts, module.train_split.labels.sum(0).long())


def test_mosaics_are_fixed_by_the_split_seed(fake_data_dir):
    first, again = mosaic_module(fake_data_dir), mosaic_module(fake_data_dir)
    other = mosaic_module(fake_data_dir, split_seed=1)
    assert torch.equal(first.train_split.images, again.train_split.images)
    assert torch.equal(first.test_split.labels, again.test_split.labels)
    assert not torch.equal(first.train_split.images, other.train_split.images)
    assert first.info.split["mosaic"] == {"source": "fashion_mnist", "grid": 2, "seed": 0}


def test_mosaic_batches_carry_float_multi_hot_targets(fake_data_dir):
    module = mosaic_module(fake_data_dir)
    images, targets = next(iter(module.train_dataloader()))
    assert images.shape == (4, 1, 56, 56) and images.dtype == torch.uint8
    assert targets.shape == (4, 10) and targets.dtype == torch.float32
    assert ((targets.sum(1) >= 1) & (targets.sum(1) <= 4)).all()
    normalised, same_targets = module.on_after_batch_transfer(next(iter(module.test_dataloader())), 0)
    assert normalised.dtype == torch.float32 and torch.isfinite(normalised).all()
    assert same_targets.shape == (8, 10)


def test_mosaic_refuses_settings_it_cannot_honour(fake_data_dir):
    with pytest.raises(ConfigError, match="val_fraction"):
        mosaic_module(fake_data_dir, val_fraction=0.1)  # 4 images per class: none set aside
    with pytest.raises(ConfigError, match="label_noise"):
        mosaic_module(fake_data_dir, label_noise={"kind": "symmetric", "rate": 0.2})
    with pytest.raises(ConfigError, match="dataset.source"):
        mosaic_module(fake_data_dir, source="voc")


# ---- Folder + labels CSV ----------------------------------------------------------------------------------


def folder_module(root: Path, **overrides) -> MultiLabelFolderDataModule:
    options = {"name": "multilabel_folder", "root": str(root), "image_size": 16, "num_workers": 0, "batch_size": 2,
               "eval_batch_size": 4, "val_fraction": 0.25, **overrides}  # fmt: skip
    module = MultiLabelFolderDataModule(**options)
    module.setup("fit")
    return module


def test_labels_csv_gives_classes_splits_and_targets_and_the_loader_decodes_its_images(tmp_path):
    fake = fake_formats.write_multilabel_folder(tmp_path, classes=("person", "traffic light", "dog"),
                                                sizes=(8, 3, 5))  # fmt: skip
    module = folder_module(tmp_path)
    assert module.multi_label and module.classes == ["person", "traffic light", "dog"]
    assert module.info.split["n_train"] == 8 and module.info.split["n_val"] == 3  # the CSV's val rows
    torch.testing.assert_close(module.class_counts, torch.from_numpy(fake.splits["train"][1]).sum(0).long())
    for loader, split in ((module.val_dataloader(), "val"), (module.test_dataloader(), "test")):
        images, targets = (torch.cat(parts) for parts in zip(*loader))
        _, expected_targets, expected_images = fake.splits[split]
        assert targets.dtype == torch.float32 and torch.equal(targets, torch.from_numpy(expected_targets).float())
        assert images.shape == (len(expected_images), 3, 16, 16) and images.dtype == torch.uint8
        png = [i for i in range(len(expected_images)) if i % 3 != 2]  # every third image is a JPEG
        assert torch.equal(images[png], torch.from_numpy(expected_images[png]))
        jpeg_error = (images.int() - torch.from_numpy(expected_images).int()).abs().max()
        assert jpeg_error <= 4
    images, targets = next(iter(module.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and targets.shape == (2, 3)


def test_without_val_rows_validation_is_carved_from_train_rows_by_seed(fake_multilabel_folder):
    module = folder_module(fake_multilabel_folder.root)
    again, other = folder_module(fake_multilabel_folder.root), folder_module(fake_multilabel_folder.root, split_seed=1)
    assert module.info.split["n_train"] == 9 and module.info.split["n_val"] == 3
    assert not set(module._train_index.tolist()) & set(module._val_index.tolist())
    assert torch.equal(module._val_index, again._val_index) and not torch.equal(module._val_index, other._val_index)
    assert module.info.split["stratified"] is False


def write_csv(root: Path, text: str) -> None:
    (root / "images").mkdir(exist_ok=True)
    fake_formats.write_multilabel_folder(root, sizes=(2, 0, 1), csv_name="unused.csv")
    (root / "labels.csv").write_text(text)


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (None, DataNotFoundError, r"labels file .*labels.csv does not exist"),
        ("path,split,cat\n", DataFormatError, r"labels.csv line 1: the header must be image,split"),
        ("image,split,cat,dog\nimages/train_0.png,train,1,0\nimages/test_0.png,test\n", DataFormatError,
         r"labels.csv line 3: 2 fields, expected 4"),
        ("image,split,cat,dog\nimages/train_0.png,train,1,yes\nimages/test_0.png,test,0,1\n", DataFormatError,
         r"labels.csv line 2: column 'dog' holds 'yes'"),
        ("image,split,cat\nimages/train_0.png,training,1\nimages/test_0.png,test,0\n", DataFormatError,
         r"labels.csv line 2: split 'training'"),
        ("image,split,cat\nimages/train_0.png,train,1\nimages/nowhere.png,test,0\n", DataNotFoundError,
         r"labels.csv: 1 listed images not found under .*line 3: images/nowhere.png"),
        ("image,split,cat\nimages/train_0.png,train,1\n", DataFormatError, r"labels.csv: no row has split test"),
    ],
)  # fmt: skip
def test_labels_csv_errors_name_the_file_and_the_line(tmp_path, text, error, message):
    if text is not None:
        write_csv(tmp_path, text)
    with pytest.raises(error, match=message):
        folder_module(tmp_path)


def test_labels_csv_may_live_outside_the_root(tmp_path, fake_multilabel_folder):
    elsewhere = tmp_path / "lists" / "voc2007.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((fake_multilabel_folder.root / "labels.csv").read_bytes())
    module = folder_module(fake_multilabel_folder.root, labels_csv=str(elsewhere))
    assert "voc2007.csv" in module.info.files and len(module.info.files["voc2007.csv"]) == 64
    assert np.array_equal(module._test.targets.numpy(), fake_multilabel_folder.splits["test"][1])


def test_mosaic_without_validation_split(fake_data_dir):
    module = mosaic_module(fake_data_dir, val_fraction=0.0)
    assert len(module.train_split.labels) == 40 and len(module.val_split.labels) == 0
    assert module.val_dataloader() == []
