"""Multi-label datasets: every image has a set of classes, given as a ``[C]`` float multi-hot target.

- :class:`MosaicDataModule` (``dataset=fashion_mnist_mosaic``): grid x grid mosaics of a single-label
  in-memory dataset's real images, labelled with the union of their classes (the multi-MNIST construction),
  built once in memory as uint8 tensors.
- :class:`MultiLabelFolderDataModule` (``dataset=multilabel_folder``): images under a root folder listed in a
  labels CSV, for real multi-label sets (PASCAL VOC, MS-COCO), read by the folder datasets' DataLoader workers.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from losslab.data import sources
from losslab.data.datamodule import (
    DataInfo,
    InMemoryDataModule,
    Split,
    _resize,
    index_digest,
    stratified_split,
)
from losslab.data.folder import FolderDataModule
from losslab.errors import ConfigError, DataFormatError, DataNotFoundError

SPLITS = ("train", "val", "test")


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N, K]`` class indices -> ``[N, C]`` float 0/1 targets, 1 for every class among the K."""
    return torch.zeros(len(labels), num_classes).scatter_(1, labels, 1.0)


def mosaic(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, n: int, grid: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` mosaics of ``grid x grid`` source images drawn uniformly with replacement, laid out row by row
    (for grid 2: top-left, top-right, bottom-left, bottom-right), and their multi-hot label sets.

    ``images`` uint8 ``[M, C, H, W]``, ``labels`` int64 ``[M]``; returns uint8 ``[n, C, grid H, grid W]`` and
    float ``[n, num_classes]``.
    """
    _, channels, height, width = images.shape
    if n == 0:  # e.g. validation with val_fraction = 0, which has no source image to draw from either
        return images.new_empty((0, channels, grid * height, grid * width)), torch.zeros(0, num_classes)
    tiles = torch.randint(len(images), (n, grid * grid), generator=generator)
    pixels = images[tiles].view(n, grid, grid, channels, height, width)
    pixels = pixels.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, grid * height, grid * width)
    return pixels.contiguous(), multi_hot(labels[tiles], num_classes)


def pixel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images in [0, 1], accumulated in float64 a chunk at a time."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        pixels = part.to(torch.float64) / 255.0
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    variance = (squares - count * mean.square()) / max(1.0, count - 1)
    return mean.float(), variance.clamp_min(0).sqrt().float().clamp_min(1e-3)


class MosaicDataModule(InMemoryDataModule):
    """Multi-label images made of a single-label dataset's real images (the multi-MNIST construction).

    Each image is a ``grid x grid`` mosaic of source images drawn uniformly with replacement, its target the
    union of their classes (multi-hot). Training mosaics come from the official training split, test mosaics
    from the test split. Validation follows the other datasets: ``val_fraction`` of the training split's
    *source images* (stratified, ``split_seed``) is set aside, and ``round(val_fraction * n_train)`` of the
    ``n_train`` mosaics are built from those, the others from the rest, so no source image appears in both
    training and validation mosaics. Everything is seeded by ``split_seed``; ``source`` names the dataset in
    :data:`losslab.data.sources.LOADERS` (found and checked as ``dataset=<source>`` would be).
    """

    multi_label = True

    def __init__(
        self,
        name: str,
        source: str = "fashion_mnist",
        n_train: int = 60000,
        n_test: int = 10000,
        grid: int = 2,
        label_noise: dict[str, Any] | None = None,
        imbalance_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        if source not in sources.LOADERS:
            allowed = ", ".join(sorted(sources.LOADERS))
            raise ConfigError(f"dataset.source={source!r}: allowed values are {allowed}")
        if label_noise and label_noise.get("rate", 0) > 0:
            raise ConfigError(f"dataset={name} is multi-label; dataset.label_noise is for single-label datasets")
        if imbalance_factor and imbalance_factor > 1:
            raise ConfigError(f"dataset={name} is multi-label; dataset.imbalance_factor is for single-label datasets")
        for key, value in (("n_train", n_train), ("n_test", n_test), ("grid", grid)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.{key}={value!r}: must be an integer >= 1")
        super().__init__(name=source, **kwargs)
        self.name = name
        self.source = source
        self.n_train, self.n_test, self.grid = n_train, n_test, grid

    def _load(self, download: bool) -> None:
        arrays = sources.LOADERS[self.source](self.data_dir, download=download)
        train_sources, val_sources = stratified_split(arrays.train_labels, self.val_fraction, self.split_seed)
        n_val = round(self.val_fraction * self.n_train)
        if n_val and len(val_sources) == 0:
            raise ConfigError(
                f"dataset.val_fraction={self.val_fraction} sets aside no {self.source} training image for the "
                f"validation mosaics ({len(arrays.train_labels)} images): raise it, or use 0 for no validation"
            )
        num_classes = len(arrays.classes)

        def build(images: torch.Tensor, labels: torch.Tensor, n: int, stream: int) -> Split:
            generator = torch.Generator().manual_seed(self.split_seed * 1_000_003 + stream)
            pixels, targets = mosaic(images, labels, num_classes, n, self.grid, generator)
            if self.requested_image_size and self.requested_image_size != pixels.shape[-1]:
                pixels = _resize(pixels, self.requested_image_size)
            return Split(pixels, targets)

        self.train_split = build(arrays.train_images[train_sources], arrays.train_labels[train_sources],
                                 self.n_train - n_val, 0)  # fmt: skip
        self.val_split = build(arrays.train_images[val_sources], arrays.train_labels[val_sources], n_val, 1)
        self.test_split = build(arrays.test_images, arrays.test_labels, self.n_test, 2)
        self.classes = list(arrays.classes)
        self.num_channels = self.train_split.images.shape[1]
        self.image_size = self.train_split.images.shape[-1]
        self.class_counts = self.train_split.labels.sum(dim=0).long()
        self.mean, self.std = pixel_statistics(self.train_split.images)
        self.info = DataInfo(
            name=self.name,
            source=arrays.source,
            files=arrays.files,
            split={
                "mosaic": {"source": self.source, "grid": self.grid, "seed": self.split_seed},
                "val_fraction": self.val_fraction,
                "split_seed": self.split_seed,
                "stratified": True,  # the source images; mosaics are drawn at random within each side
                "n_train": len(self.train_split.labels),
                "n_val": n_val,
                "n_test": self.n_test,
                "val_source_indices_sha256": index_digest(val_sources),
                "train_class_counts": self.class_counts.tolist(),
                "mean_labels_per_image": float(self.train_split.labels.sum(dim=1).mean()),
            },
            normalization={"mean": self.mean.tolist(), "std": self.std.tolist()},
        )


# ---- A folder of images with a labels CSV ------------------------------------------------------------------


class _Samples:
    """(image path, multi-hot target) pairs, laid out as an ImageFolder's ``samples`` for the folder loader."""

    def __init__(self, paths: list[str], targets: torch.Tensor) -> None:
        self.samples = list(zip(paths, targets))
        self.targets = targets

    def __len__(self) -> int:
        return len(self.samples)


def read_labels_csv(path: Path, root: Path) -> tuple[list[str], dict[str, tuple[list[str], torch.Tensor]], str]:
    """Parse a labels CSV (format in :class:`MultiLabelFolderDataModule`); check every listed image exists.

    Returns the class names, per split the image paths and their ``[N, C]`` targets, and a sha256 over every
    image's (path, split, labels, size). Raises DataNotFoundError for a missing CSV or image, DataFormatError
    naming the line for anything malformed.
    """
    if not path.is_file():
        raise DataNotFoundError(
            f"labels file {path} does not exist.\n"
            "  expected a CSV with the header image,split,<class 1>,...,<class C> and one row per image: its path "
            "relative to dataset.root, train/val/test, then 0 or 1 per class;\n"
            "  set dataset.root=/path/to/images and dataset.labels_csv=<file> (relative to root, or absolute)"
        )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = [name.strip() for name in rows[0]] if rows else []
    if header[:2] != ["image", "split"] or len(header) < 3:
        raise DataFormatError(
            f"{path} line 1: the header must be image,split,<class 1>,...,<class C>; found {','.join(header[:5])!r}"
        )
    classes = header[2:]
    if len(set(classes)) != len(classes):
        repeated = sorted({name for name in classes if classes.count(name) > 1})
        raise DataFormatError(f"{path} line 1: class columns repeated: {', '.join(repeated)}")
    by_split: dict[str, tuple[list[str], list[list[float]]]] = {split: ([], []) for split in SPLITS}
    listing = hashlib.sha256()
    missing: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(
                f"{path} line {line}: {len(row)} fields, expected {len(header)} (image, split and a 0/1 label for "
                f"each of the {len(classes)} classes)"
            )
        image, split, values = row[0].strip(), row[1].strip(), [value.strip() for value in row[2:]]
        if split not in SPLITS:
            raise DataFormatError(f"{path} line {line}: split {split!r}; allowed values are {', '.join(SPLITS)}")
        wrong = next((i for i, value in enumerate(values) if value not in ("0", "1")), None)
        if wrong is not None:
            raise DataFormatError(
                f"{path} line {line}: column {classes[wrong]!r} holds {values[wrong]!r}; labels must be 0 or 1"
            )
        full = root / image
        try:
            size = os.stat(full).st_size
        except OSError:
            missing.append(f"line {line}: {image}")
            continue
        listing.update(f"{image}\t{split}\t{''.join(values)}\t{size}\n".encode())
        by_split[split][0].append(str(full))
        by_split[split][1].append([float(value) for value in values])
    if missing:
        shown = "; ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataNotFoundError(f"{path}: {len(missing)} listed images not found under {root}: {shown}")
    for split in ("train", "test"):
        if not by_split[split][0]:
            raise DataFormatError(f"{path}: no row has split {split}; train and test rows are both needed")
    splits = {split: (paths, torch.tensor(targets, dtype=torch.float32).reshape(-1, len(classes)))
              for split, (paths, targets) in by_split.items()}  # fmt: skip
    return classes, splits, listing.hexdigest()


def random_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of ``range(n)`` into (train indices, validation indices), each sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={fraction}: must be in [0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(fraction * n)
    return order[n_val:].sort().values, order[:n_val].sort().values


class MultiLabelFolderDataModule(FolderDataModule):
    """A multi-label image set: images below ``root`` and a labels CSV (``labels_csv``, relative to root).

    The CSV has the header ``image,split,<class 1>,...,<class C>`` and one row per image: its path relative to
    ``root``, its split (``train``, ``val`` or ``test``) and 0 or 1 per class (the column order is the class
    order), e.g. ``JPEGImages/000005.jpg,train,0,0,1,...``. It is what a VOC converter writes from the
    ``ImageSets/Main/<class>_<split>.txt`` files (count "difficult" 0 entries as 1 or 0, and say which) and a
    COCO converter from ``instances_<split>.json`` (an image is positive for every category it has an
    annotation of). With ``val`` rows those are the validation split; without any, ``val_fraction`` of the
    train rows are set aside (seeded by ``split_seed``, not stratified: label sets have no single class).

    Images are resized to ``image_size`` squared without cropping (a crop can remove a labelled object), with
    random horizontal flips for training; decoding and resizing run in the DataLoader workers.
    """

    multi_label = True

    def __init__(self, name: str, root: str, labels_csv: str = "labels.csv", **kwargs: Any) -> None:
        super().__init__(name=name, root=root, **kwargs)
        self.labels_csv = self.root / labels_csv

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        classes, splits, listing = read_labels_csv(self.labels_csv, self.root)
        (train_paths, train_targets), (val_paths, val_targets) = splits["train"], splits["val"]
        self._train = _Samples(train_paths + val_paths, torch.cat([train_targets, val_targets]))
        self._test = _Samples(*splits["test"])
        if val_paths:
            self._train_index = torch.arange(len(train_paths))
            self._val_index = torch.arange(len(train_paths), len(self._train))
        else:
            self._train_index, self._val_index = random_split(len(train_paths), self.val_fraction, self.split_seed)
        self._train_labels = self._train.targets[self._train_index]
        self.classes = classes
        self.class_counts = self._train_labels.sum(dim=0).long()
        split = self._record_split(self._train_index, self._val_index, len(self._test))
        split.update(stratified=False, val_from="the val rows of the CSV" if val_paths else "the train rows",
                     train_class_counts=self.class_counts.tolist())  # fmt: skip
        self.info = DataInfo(
            name=self.name,
            source=str(self.root),
            files={
                self.labels_csv.name: sources.sha256_file(self.labels_csv),
                "images (path, split, labels, size list)": listing,
            },
            split=split,
            normalization={"mean": self.mean.tolist(), "std": self.std.tolist()},
        )

    def _train_transform(self) -> v2.Transform:
        size = (self.image_size, self.image_size)
        return v2.Compose([v2.Resize(size, antialias=True), v2.RandomHorizontalFlip()])

    def _eval_transform(self) -> v2.Transform:
        return v2.Resize((self.image_size, self.image_size), antialias=True)

    def val_dataloader(self) -> DataLoader | list:
        if len(self._val_index) == 0:
            return []
        return self._loader(self._train, self._val_index, self._train.targets[self._val_index], training=False)

    def test_dataloader(self) -> DataLoader:
        index = torch.arange(len(self._test))
        return self._loader(self._test, index, self._test.targets, training=False)
