"""The datamodules on files in each dataset's real format: splits, batches, views, recorded checksums."""

import os
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from losslab.data import FolderDataModule, InMemoryDataModule
from losslab.data.datamodule import stratified_split
from losslab.errors import ConfigError, DataNotFoundError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dataset"
# The single-label in-memory datasets (the multi-label ones: test_multilabel_datasets.py; the class-disjoint
# folder benchmarks: test_disjoint.py).
IN_MEMORY = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("_") and p.stem not in
                   ("image_folder", "imagenet", "fashion_mnist_mosaic", "multilabel_folder", "cub200", "cars196",
                    "sop"))  # fmt: skip


def datamodule_from_config(name: str, data_dir: Path, **overrides) -> InMemoryDataModule:
    base = OmegaConf.load(CONFIGS / "_in_memory.yaml")
    cfg = OmegaConf.merge(base, OmegaConf.load(CONFIGS / f"{name}.yaml"), overrides)
    cfg.pop("defaults", None)
    cfg.data_dir, cfg.seed, cfg.download = str(data_dir), 0, False
    return hydra.utils.instantiate(cfg)


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(val) == 100 and torch.bincount(labels[val]).tolist() == [10] * 10
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(stratified_split(labels, 0.1, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 0.1, seed=1)[1], val)
    with pytest.raises(ConfigError, match="dataset.val_fraction"):
        stratified_split(labels, 1.0, seed=0)


@pytest.mark.parametrize("name", IN_MEMORY)
def test_every_in_memory_dataset_config_loads_its_real_format(name, fake_data_dir):
    dm = datamodule_from_config(name, fake_data_dir, batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert dm.num_classes >= 3
    assert dm.info.split["n_val"] > 0 and dm.info.split["n_train"] + dm.info.split["n_val"] > 0
    assert dm.info.files
    assert all(len(digest) == 64 for digest in dm.info.files.values())
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (dm.num_channels, dm.image_size, dm.image_size)
    assert labels.dtype == torch.int64 and len(labels) == 4
    normalised, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert normalised.dtype == torch.float32 and torch.isfinite(normalised).all()


def test_normalisation_statistics_come_from_the_training_split(fake_data_dir):
    dm = datamodule_from_config("cifar10", fake_data_dir, val_fraction=0.25)
    dm.setup()
    pixels = dm.train_split.images.double() / 255
    torch.testing.assert_close(dm.mean, pixels.mean(dim=(0, 2, 3)).float())
    x, _ = dm.on_after_batch_transfer((dm.train_split.images, dm.train_split.labels), 0)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


def test_training_batches_carry_independent_views(fake_data_dir):
    dm = datamodule_from_config("cifar10", fake_data_dir, batch_size=8, augment={"crop_padding": 4,
                                "horizontal_flip": True})  # fmt: skip
    dm.n_views = 2
    dm.setup()

    class Training:
        training, current_epoch, global_rank, world_size = True, 0, 0, 1

    dm.trainer = Training()
    views, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert views.shape == (8, 2, 3, 32, 32) and len(labels) == 8
    assert not torch.equal(views[:, 0], views[:, 1])


def test_resize_option_resizes_every_split(fake_data_dir):
    dm = datamodule_from_config("fashion_mnist", fake_data_dir, image_size=32)
    dm.setup()
    assert dm.image_size == 32 and dm.test_split.images.shape[-2:] == (32, 32)


def test_missing_dataset_error_names_the_places_searched(tmp_path):
    dm = datamodule_from_config("cifar10", tmp_path / "nothing_here")
    with pytest.raises(DataNotFoundError) as error:
        dm.setup()
    assert "nothing_here" in str(error.value) and "cifar" in str(error.value).lower()


def test_unknown_dataset_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="dataset.name='cifar11'.*cifar10"):
        InMemoryDataModule(name="cifar11")


def test_folder_datamodule_reads_an_image_folder_tree(fake_image_folder):
    dm = FolderDataModule(name="image_folder", root=str(fake_image_folder), test_dir="val", image_size=16,
                          num_workers=0, batch_size=4, val_fraction=0.2)  # fmt: skip
    dm.setup()
    assert dm.classes == ["cat", "dog", "fox"] and dm.info.split["n_val"] == 3
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    x, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
    dm.n_views = 2
    views, _ = next(iter(dm.train_dataloader()))
    assert views.shape == (4, 2, 3, 16, 16)


def test_folder_datamodule_missing_root_says_which_folder(tmp_path):
    dm = FolderDataModule(name="imagenet", root=str(tmp_path / "imagenet"), num_workers=0)
    with pytest.raises(DataNotFoundError, match="imagenet.*does not exist"):
        dm.setup()


def test_decoded_arrays_are_reused_until_a_file_changes(fake_data_dir, monkeypatch):
    from losslab.data import datamodule as module
    from losslab.data import sources

    calls = []
    real = sources.LOADERS["mnist"]
    monkeypatch.setitem(sources.LOADERS, "mnist", lambda *a, **k: calls.append(1) or real(*a, **k))
    module._DECODED.clear()
    first = module._read_arrays("mnist", fake_data_dir, download=False)
    assert module._read_arrays("mnist", fake_data_dir, download=False) is first and len(calls) == 1
    touched = next(Path(first.source) / name for name in first.files)
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert module._read_arrays("mnist", fake_data_dir, download=False) is not first and len(calls) == 2
