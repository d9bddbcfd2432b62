"""Class-disjoint datasets: the metric-learning protocol (Oh Song et al. 2016; Musgrave et al. 2020, "A metric
learning reality check"). Training sees the first half of the classes; the test split holds the other half,
never seen, so it is judged by retrieval (MAP@R, R-precision, precision@1, Recall@K) and has no accuracy.

Validation is carved from the training classes, in one of two ways (``val_holdout``):

- ``images``: a stratified ``val_fraction`` of the training classes' images. The probe and kNN accuracy stay
  meaningful on it; retrieval on it measures seen classes.
- ``classes``: ``val_fraction`` of the training classes held out whole (the reality check's class-disjoint
  validation), so validation behaves like the test split: retrieval only. It needs enough classes to hold
  out two or more, and suits datasets with few images per class (Stanford Online Products).

Labels index the split's own class list: training labels ``datamodule.classes`` (the model's classes),
validation labels ``val_classes`` (the same list with ``val_holdout=images``), test labels ``test_classes``.

- :class:`ClassDisjointDataModule` (``dataset=fashion_mnist_disjoint``): an in-memory dataset of
  :data:`losslab.data.sources.LOADERS`, found where ``dataset=<source>`` finds it.
- :class:`CUB200DataModule`, :class:`Cars196DataModule`, :class:`StanfordOnlineProductsDataModule`: the
  metric-learning benchmarks, read from their own annotation files and decoded by DataLoader workers, as
  :class:`losslab.data.folder.FolderDataModule` does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

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
from losslab.data.multilabel import _Samples
from losslab.errors import ConfigError, DataFormatError, DataNotFoundError

VAL_HOLDOUTS = ("images", "classes")


def hold_out_validation(
    labels: torch.Tensor, num_classes: int, fraction: float, seed: int, by: str
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Split the training classes' samples into (training indices, validation indices, the classes training
    keeps, the validation classes): by ``images`` (stratified, every class on both sides) or by ``classes``
    (``round(fraction * n)`` of the ``n`` classes present drawn at random, whole, for validation). Seeded."""
    if by not in VAL_HOLDOUTS:
        raise ConfigError(f"dataset.val_holdout={by!r}: allowed values are {', '.join(VAL_HOLDOUTS)}")
    if by == "images":
        train_index, val_index = stratified_split(labels, fraction, seed)
        return train_index, val_index, list(range(num_classes)), list(range(num_classes))
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={fraction}: must be in [0, 1)")
    present = torch.unique(labels)
    n_val = round(fraction * len(present))
    if fraction > 0 and n_val < 2:
        raise ConfigError(
            f"dataset.val_fraction={fraction} with dataset.val_holdout=classes holds out {n_val} of the "
            f"{len(present)} training classes, and retrieval needs at least 2: raise val_fraction, use "
            "val_holdout=images, or 0 for no validation"
        )
    order = present[torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))]
    val_classes = sorted(order[:n_val].tolist())
    train_classes = sorted(set(range(num_classes)) - set(val_classes))
    is_val = torch.isin(labels, torch.tensor(val_classes, dtype=labels.dtype))
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten(), train_classes, val_classes


def relabel(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Labels drawn from ``classes`` (sorted) renumbered ``0 .. len(classes) - 1`` in that order."""
    lookup = torch.full((max(classes, default=0) + 1,), -1, dtype=torch.int64)
    lookup[classes] = torch.arange(len(classes))
    return lookup[labels]


def unseen_stages(by: str) -> tuple[str, ...]:
    """The evaluation stages whose classes training never sees: test, and val when it holds out classes."""
    if by not in VAL_HOLDOUTS:
        raise ConfigError(f"dataset.val_holdout={by!r}: allowed values are {', '.join(VAL_HOLDOUTS)}")
    return ("val", "test") if by == "classes" else ("test",)


def _split_record(by: str, train: list[str], val: list[str], test: list[str]) -> dict[str, Any]:
    return {
        "protocol": "class-disjoint (train on some classes, test on the others)",
        "val_holdout": by,
        "stratified": by == "images",
        "classes": {"train": train, "val": val, "test": test},
    }


# ---- In memory ----------------------------------------------------------------------------------------------


class ClassDisjointDataModule(InMemoryDataModule):
    """A single-label in-memory dataset (``source``, a key of :data:`losslab.data.sources.LOADERS`) split by
    class: the official training images of its first ``train_classes`` classes train (and validate), the
    official test images of the remaining classes test."""

    class_disjoint = True

    def __init__(
        self,
        name: str,
        source: str = "fashion_mnist",
        train_classes: int = 5,
        val_holdout: str = "images",
        label_noise: dict[str, Any] | None = None,
        imbalance_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        if source not in sources.LOADERS:
            raise ConfigError(f"dataset.source={source!r}: allowed values are {', '.join(sorted(sources.LOADERS))}")
        if label_noise and label_noise.get("rate", 0) > 0:
            raise ConfigError(f"dataset={name} is class-disjoint; dataset.label_noise is not supported there")
        if imbalance_factor and imbalance_factor > 1:
            raise ConfigError(f"dataset={name} is class-disjoint; dataset.imbalance_factor is not supported there")
        if not isinstance(train_classes, int) or train_classes < 2:
            raise ConfigError(f"dataset.train_classes={train_classes!r}: must be an integer >= 2")
        super().__init__(name=source, **kwargs)
        self.name, self.source = name, source
        self.train_classes = train_classes
        self.val_holdout = val_holdout
        self.unseen_class_stages = unseen_stages(val_holdout)
        self.val_classes: list[str] = []
        self.test_classes: list[str] = []

    def _load(self, download: bool) -> None:
        arrays = sources.LOADERS[self.source](self.data_dir, download=download)
        first = self.train_classes
        if first >= arrays.num_classes:
            raise ConfigError(
                f"dataset.train_classes={first}: {self.source} has {arrays.num_classes} classes, and the test "
                "split needs the classes after the training ones"
            )
        pool = torch.nonzero(arrays.train_labels < first).flatten()
        test = torch.nonzero(arrays.test_labels >= first).flatten()
        train_images, test_images = arrays.train_images[pool], arrays.test_images[test]
        if self.requested_image_size and self.requested_image_size != train_images.shape[-1]:
            train_images = _resize(train_images, self.requested_image_size)
            test_images = _resize(test_images, self.requested_image_size)
        pool_labels = arrays.train_labels[pool]
        train_index, val_index, train_kept, val_kept = hold_out_validation(
            pool_labels, first, self.val_fraction, self.split_seed, self.val_holdout
        )
        self.train_split = Split(train_images[train_index].contiguous(), relabel(pool_labels[train_index], train_kept))
        self.val_split = Split(train_images[val_index].contiguous(), relabel(pool_labels[val_index], val_kept))
        self.test_split = Split(test_images.contiguous(), arrays.test_labels[test] - first)
        self.classes = [arrays.classes[c] for c in train_kept]
        self.val_classes = [arrays.classes[c] for c in val_kept]
        self.test_classes = list(arrays.classes[first:])
        self.num_channels = train_images.shape[1]
        self.image_size = train_images.shape[-1]
        self.class_counts = torch.bincount(self.train_split.labels, minlength=self.num_classes)
        pixels = self.train_split.images.to(torch.float64) / 255.0
        self.mean = pixels.mean(dim=(0, 2, 3)).float()
        self.std = pixels.std(dim=(0, 2, 3)).float().clamp_min(1e-3)
        split = self._record_split(train_index, val_index, len(test))
        split.update(_split_record(self.val_holdout, self.classes, self.val_classes, self.test_classes),
                     source=self.source, train_class_counts=self.class_counts.tolist())  # fmt: skip
        self.info = DataInfo(
            name=self.name,
            source=arrays.source,
            files=arrays.files,
            split=split,
            normalization={"mean": self.mean.tolist(), "std": self.std.tolist()},
        )


# ---- The metric-learning benchmarks (image files and annotation files) ---------------------------------------


class Listing(NamedTuple):
    """A benchmark's images and labels as its annotation files give them."""

    paths: list[str]  # absolute image paths, in annotation order
    labels: torch.Tensor  # int64 indices into ``classes``
    classes: list[str]  # every class, training classes first
    train_classes: int  # classes[:train_classes] train, the rest test
    files: dict[str, str]  # annotation file -> sha256


def locate(name: str, root: str | os.PathLike, subdirs: tuple[str, ...], required: tuple[tuple[str, ...], ...],
           how_to: str) -> Path:  # fmt: skip
    """The first of ``<root>/<subdir>``, ``<root>``, then the same below ``$LOSSLAB_DATA_DIR``, holding every
    ``required`` file; else DataNotFoundError listing each place and what it lacked."""
    searched = []
    for base in sources._data_dirs(root):
        for directory in dict.fromkeys(base / sub for sub in (*subdirs, "")):
            problem = sources._problem(directory, required)
            if problem is None:
                return directory
            searched.append(problem)
    lines = [f"Dataset '{name}' was not found. Searched, in order:", *(f"  - {s}" for s in searched),
             f"To get it: {how_to}, then run with dataset.root=/path/to/the/folder/above/it"]  # fmt: skip
    raise DataNotFoundError("\n".join(lines))


def _rows(path: Path, fields: int, header: bool = False) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line of a whitespace-separated annotation file; the last field
    may hold spaces. DataFormatError names a line with too few fields."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or (header and number == 1):
            continue
        parts = line.split(maxsplit=fields - 1)
        if len(parts) != fields:
            raise DataFormatError(f"{path}:{number}: expected {fields} fields, found {line!r}")
        rows.append((number, parts))
    return rows


def _integer(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(f"{path}:{number}: {text!r} is not an integer id") from None


def image_listing_digest(paths: list[str], labels: torch.Tensor, directory: Path) -> str:
    """sha256 over every image's (path relative to ``directory``, label, size); DataNotFoundError naming the
    missing images, if any."""
    digest, missing = hashlib.sha256(), []
    for path, label in zip(paths, labels.tolist()):
        try:
            size = os.stat(path).st_size
        except OSError:
            missing.append(os.path.relpath(path, directory))
            continue
        digest.update(f"{os.path.relpath(path, directory)}\t{label}\t{size}\n".encode())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataNotFoundError(f"{directory}: {len(missing)} listed images do not exist: {shown}")
    return digest.hexdigest()


def read_cub200(directory: Path, train_classes: int = 100) -> Listing:
    """CUB-200-2011 (Wah et al. 2011): ``classes.txt`` (``<class id> <name>``), ``images.txt`` (``<image id>
    <path below images/>``) and ``image_class_labels.txt`` (``<image id> <class id>``). Classes in id order;
    the split of ``train_test_split.txt`` is not used (the protocol splits by class)."""
    classes_path, images_path, labels_path = (directory / f for f in ("classes.txt", "images.txt",
                                                                      "image_class_labels.txt"))  # fmt: skip
    named = {_integer(classes_path, n, parts[0]): parts[1] for n, parts in _rows(classes_path, 2)}
    class_ids = sorted(named)
    index = {class_id: i for i, class_id in enumerate(class_ids)}
    image_class = {}
    for number, (image_id, class_id) in _rows(labels_path, 2):
        class_id = _integer(labels_path, number, class_id)
        if class_id not in index:
            raise DataFormatError(f"{labels_path}:{number}: class {class_id} is not in {classes_path.name}")
        image_class[_integer(labels_path, number, image_id)] = index[class_id]
    paths, labels = [], []
    for number, (image_id, relative) in _rows(images_path, 2):
        image_id = _integer(images_path, number, image_id)
        if image_id not in image_class:
            raise DataFormatError(f"{images_path}:{number}: image {image_id} has no line in {labels_path.name}")
        paths.append(str(directory / "images" / relative))
        labels.append(image_class[image_id])
    files = sources._hash_files(directory, [classes_path, images_path, labels_path])
    return Listing(paths, torch.tensor(labels, dtype=torch.int64), [named[c] for c in class_ids], train_classes, files)


def read_cars196(directory: Path, train_classes: int = 98) -> Listing:
    """Cars196 (Krause et al. 2013) as metric-learning code reads it: ``cars_annos.mat`` holds ``annotations``
    (a struct per image: ``relative_im_path`` such as ``car_ims/000001.jpg``, bounding box, ``class`` 1..196 and
    a ``test`` flag, unused: the protocol splits by class) and ``class_names``."""
    from scipy.io import loadmat

    mat_path = directory / "cars_annos.mat"
    try:
        mat = loadmat(mat_path)
    except Exception as error:  # scipy raises many types for a damaged file
        raise DataFormatError(f"{mat_path}: not a readable .mat file ({sources._short(error)})") from error
    if "annotations" not in mat or "class_names" not in mat:
        raise DataFormatError(f"{mat_path}: expected the variables annotations and class_names, found "
                              f"{sorted(k for k in mat if not k.startswith('__'))}")  # fmt: skip
    annotations = mat["annotations"].reshape(-1)
    fields = annotations.dtype.names or ()
    if not {"relative_im_path", "class"} <= set(fields):
        raise DataFormatError(f"{mat_path}: annotations lack relative_im_path or class (fields: {fields})")
    classes = [str(np.squeeze(name)) for name in mat["class_names"].reshape(-1)]
    paths, labels = [], []
    for number, annotation in enumerate(annotations, 1):
        label = int(np.squeeze(annotation["class"])) - 1
        if not 0 <= label < len(classes):
            raise DataFormatError(f"{mat_path}: annotation {number} has class {label + 1}, expected 1..{len(classes)}")
        paths.append(str(directory / str(np.squeeze(annotation["relative_im_path"]))))
        labels.append(label)
    return Listing(paths, torch.tensor(labels, dtype=torch.int64), classes, train_classes,
                   sources._hash_files(directory, [mat_path]))  # fmt: skip


def read_stanford_online_products(directory: Path) -> Listing:
    """Stanford Online Products (Oh Song et al. 2016): ``Ebay_train.txt`` and ``Ebay_test.txt``, each with the
    header ``image_id class_id super_class_id path`` and paths relative to the folder; the files define the
    split (11318 training products, 11316 test products). A class is named by its product id."""
    paths, class_ids, per_file = [], [], []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        listing = directory / name
        ids = []
        for number, (_, class_id, _, relative) in _rows(listing, 4, header=True):
            ids.append(_integer(listing, number, class_id))
            paths.append(str(directory / relative))
        class_ids += ids
        per_file.append(sorted(set(ids)))
    shared = set(per_file[0]) & set(per_file[1])
    if shared:
        raise DataFormatError(f"{directory}: classes {sorted(shared)[:5]} are in both Ebay_train.txt and "
                              "Ebay_test.txt; the protocol needs disjoint classes")  # fmt: skip
    ordered = per_file[0] + per_file[1]
    index = {class_id: i for i, class_id in enumerate(ordered)}
    labels = torch.tensor([index[c] for c in class_ids], dtype=torch.int64)
    files = sources._hash_files(directory, [directory / "Ebay_train.txt", directory / "Ebay_test.txt"])
    return Listing(paths, labels, [str(c) for c in ordered], len(per_file[0]), files)


class _ClassDisjointFolder(FolderDataModule):
    """Shared by the benchmark datamodules: find the folder, read its listing, split it by class, and load
    images with the folder datasets' workers and transforms (``RandomResizedCrop`` and flips for training,
    resize and centre crop for evaluation: the usual 224 protocol)."""

    class_disjoint = True
    # Set by each benchmark.
    folder_names: ClassVar[tuple[str, ...]]  # the dataset's folder, looked for below dataset.root
    required: ClassVar[tuple[tuple[str, ...], ...]]
    how_to: ClassVar[str]

    def __init__(self, name: str, root: str, val_holdout: str = "classes", **kwargs: Any) -> None:
        super().__init__(name=name, root=root, **kwargs)
        self.val_holdout = val_holdout
        self.unseen_class_stages = unseen_stages(val_holdout)
        self.val_classes: list[str] = []
        self.test_classes: list[str] = []

    def read_listing(self, directory: Path) -> Listing:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        directory = locate(self.name, self.root, self.folder_names, self.required, self.how_to)
        listing = self.read_listing(directory)
        first = listing.train_classes
        pool = torch.nonzero(listing.labels < first).flatten()
        test = torch.nonzero(listing.labels >= first).flatten()
        if len(pool) == 0 or len(test) == 0:
            raise DataFormatError(f"{directory}: the listing has no image of the {'training' if len(pool) == 0 else 'test'} "
                                  f"classes (training classes: the first {first} of {len(listing.classes)})")  # fmt: skip
        pool_labels = listing.labels[pool]
        train_index, val_index, train_kept, val_kept = hold_out_validation(
            pool_labels, first, self.val_fraction, self.split_seed, self.val_holdout
        )

        def samples(index: torch.Tensor, labels: torch.Tensor) -> _Samples:
            return _Samples([listing.paths[i] for i in index.tolist()], labels)

        self._train = samples(pool[train_index], relabel(pool_labels[train_index], train_kept))
        self._val = samples(pool[val_index], relabel(pool_labels[val_index], val_kept))
        self._test = samples(test, listing.labels[test] - first)
        self._train_index, self._train_labels = torch.arange(len(self._train)), self._train.targets
        self.classes = [listing.classes[c] for c in train_kept]
        self.val_classes = [listing.classes[c] for c in val_kept]
        self.test_classes = listing.classes[first:]
        self.class_counts = torch.bincount(self._train_labels, minlength=self.num_classes)
        split = self._record_split(train_index, val_index, len(self._test))
        split.update(_split_record(self.val_holdout, self.classes, self.val_classes, self.test_classes),
                     train_class_counts=self.class_counts.tolist())  # fmt: skip
        split["val_indices_sha256"] = index_digest(pool[val_index])
        files = dict(listing.files)
        files["images (path, label, size list)"] = image_listing_digest(listing.paths, listing.labels, directory)
        self.info = DataInfo(
            name=self.name,
            source=str(directory),
            files=files,
            split=split,
            normalization={"mean": self.mean.tolist(), "std": self.std.tolist()},
        )

    def val_dataloader(self) -> Any:
        if len(self._val) == 0:
            return []
        return self._loader(self._val, torch.arange(len(self._val)), self._val.targets, training=False)

    def test_dataloader(self) -> Any:
        return self._loader(self._test, torch.arange(len(self._test)), self._test.targets, training=False)


class CUB200DataModule(_ClassDisjointFolder):
    """CUB-200-2011 (11,788 bird images, 200 species): classes 1-100 train, 101-200 test."""

    folder_names = ("CUB_200_2011", "cub200/CUB_200_2011")
    required = (("classes.txt",), ("images.txt",), ("image_class_labels.txt",), ("images/",))
    how_to = ("download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and extract it "
              "(giving CUB_200_2011/images.txt)")  # fmt: skip

    def __init__(self, name: str, root: str, train_classes: int = 100, **kwargs: Any) -> None:
        super().__init__(name=name, root=root, **kwargs)
        self.train_classes = train_classes

    def read_listing(self, directory: Path) -> Listing:
        return read_cub200(directory, self.train_classes)


class Cars196DataModule(_ClassDisjointFolder):
    """Cars196 (16,185 car images, 196 models): classes 1-98 train, 99-196 test."""

    folder_names = ("cars196", "CARS196", "stanford_cars", "cars")
    required = (("cars_annos.mat",), ("car_ims/",))
    how_to = ("download car_ims.tgz and cars_annos.mat (http://ai.stanford.edu/~jkrause/car196/) into one folder "
              "named cars196 and extract car_ims.tgz there (giving cars196/car_ims/000001.jpg)")  # fmt: skip

    def __init__(self, name: str, root: str, train_classes: int = 98, **kwargs: Any) -> None:
        super().__init__(name=name, root=root, **kwargs)
        self.train_classes = train_classes

    def read_listing(self, directory: Path) -> Listing:
        return read_cars196(directory, self.train_classes)


class StanfordOnlineProductsDataModule(_ClassDisjointFolder):
    """Stanford Online Products (120,053 images of 22,634 products): Ebay_train.txt's 11,318 products train,
    Ebay_test.txt's 11,316 test."""

    folder_names = ("Stanford_Online_Products",)
    required = (("Ebay_train.txt",), ("Ebay_test.txt",))
    how_to = ("download Stanford_Online_Products.zip (https://cvgl.stanford.edu/projects/lifted_struct/) and "
              "unzip it (giving Stanford_Online_Products/Ebay_train.txt)")  # fmt: skip

    def read_listing(self, directory: Path) -> Listing:
        return read_stanford_online_products(directory)
