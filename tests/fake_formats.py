"""Writers of tiny datasets in the real on-disk formats, for tests that must not download anything.

Each ``write_<dataset>(root, n_train=20, n_test=10)`` creates the dataset's usual folder below ``root`` (so
``root`` is what you pass as ``data_dir``) and returns a :class:`Fake` holding exactly what a correct reader
returns: images as uint8 [N, C, H, W] and labels as int64, in file order. Pixel values are random (seeded), so
a reader that mixes up axes, orientation or image order gets different arrays. Tiny-ImageNet is JPEG, hence
lossy: compare with a tolerance of a few grey levels.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip


class Fake(NamedTuple):
    train_images: np.ndarray  # uint8 [N, C, H, W]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    directory: Path  # the folder holding the files


def _split(rng: np.random.Generator, n: int, shape: tuple[int, ...], num_classes: int):
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # every class when n >= num_classes
    return images, labels


# ---- IDX: Fashion-MNIST, MNIST, KMNIST ---------------------------------------------------------------------


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """One IDX file of unsigned bytes; gzipped when the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_idx_dataset(
    directory: str | Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0,
    classes: list[str] | None = None,
) -> Fake:  # fmt: skip
    """The four MNIST-style IDX files directly in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train, test = _split(rng, n_train, (1, 28, 28), 10), _split(rng, n_test, (1, 28, 28), 10)
    suffix = ".gz" if gz else ""
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images[:, 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return Fake(*train, *test, classes or [str(i) for i in range(10)], directory)


def write_fashion_mnist(
    root: str | Path, n_train: int = 20, n_test: int = 10, subdir: str = "fashion-mnist"
) -> Fake:
    return write_idx_dataset(Path(root) / subdir, n_train, n_test, seed=1, classes=FASHION_CLASSES)


def write_mnist(root: str | Path, n_train: int = 20, n_test: int = 10, subdir: str = "mnist") -> Fake:
    return write_idx_dataset(Path(root) / subdir, n_train, n_test, seed=2)


def write_kmnist(root: str | Path, n_train: int = 20, n_test: int = 10, subdir: str = "kmnist") -> Fake:
    kmnist = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    return write_idx_dataset(Path(root) / subdir, n_train, n_test, seed=3, classes=kmnist)


# ---- CIFAR (python pickles, as written by Python 2: bytes keys and names, protocol 2) ----------------------


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str | Path, n_train: int = 20, n_test: int = 10) -> Fake:
    """cifar-10-batches-py/ with five training batches, test_batch and batches.meta."""
    directory = Path(root) / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10)
    train, test = _split(rng, n_train, (3, 32, 32), 10), _split(rng, n_test, (3, 32, 32), 10)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(batches, 1):
        _pickle(directory / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in train[1][idx]],
            b"data": train[0][idx].reshape(len(idx), 3072),
            b"filenames": [f"img_{j}.png".encode() for j in idx],
        })  # fmt: skip
    _pickle(directory / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in test[1]],
        b"data": test[0].reshape(n_test, 3072),
        b"filenames": [f"test_{j}.png".encode() for j in range(n_test)],
    })  # fmt: skip
    _pickle(directory / "batches.meta", {
        b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in classes], b"num_vis": 3072,
    })  # fmt: skip
    return Fake(*train, *test, classes, directory)


def write_cifar100(root: str | Path, n_train: int = 20, n_test: int = 10) -> Fake:
    """cifar-100-python/ with train, test and meta (fine and coarse labels)."""
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100)
    train, test = _split(rng, n_train, (3, 32, 32), 100), _split(rng, n_test, (3, 32, 32), 100)
    fine = [f"fine_{i:02d}" for i in range(100)]
    for name, (images, labels) in (("train", train), ("test", test)):
        _pickle(directory / name, {
            b"filenames": [f"{name}_{j}.png".encode() for j in range(len(labels))],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": images.reshape(len(images), 3072),
        })  # fmt: skip
    _pickle(directory / "meta", {
        b"fine_label_names": [c.encode() for c in fine],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    })  # fmt: skip
    return Fake(*train, *test, fine, directory)


# ---- SVHN (.mat, X as [32, 32, 3, N], digit 0 stored as label 10) ------------------------------------------


def write_svhn(root: str | Path, n_train: int = 20, n_test: int = 10, subdir: str = "svhn") -> Fake:
    from scipy.io import savemat

    directory = Path(root) / subdir
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    train, test = _split(rng, n_train, (3, 32, 32), 10), _split(rng, n_test, (3, 32, 32), 10)
    for name, (images, labels) in (("train", train), ("test", test)):
        stored = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        savemat(directory / f"{name}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": stored})
    return Fake(*train, *test, [str(i) for i in range(10)], directory)


# ---- STL-10 (binary; each channel column-major, labels 1..10) ----------------------------------------------

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_stl10(root: str | Path, n_train: int = 20, n_test: int = 10, class_names: bool = True) -> Fake:
    directory = Path(root) / "stl10_binary"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(96)
    train, test = _split(rng, n_train, (3, 96, 96), 10), _split(rng, n_test, (3, 96, 96), 10)
    for name, (images, labels) in (("train", train), ("test", test)):
        (directory / f"{name}_X.bin").write_bytes(
            np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()
        )
        (directory / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    if class_names:
        (directory / "class_names.txt").write_text("".join(f"{c}\n" for c in STL10_CLASSES))
    return Fake(*train, *test, list(STL10_CLASSES), directory)


# ---- Tiny-ImageNet-200 (JPEG folders) ----------------------------------------------------------------------

TINY_WNIDS = ["n02124075", "n01443537", "n04067472"]  # deliberately unsorted: labels follow wnids.txt order
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n04067472": "reel",
              "n09999999": "unused entry"}  # fmt: skip


def _two_tone(rng: np.random.Generator, grey: bool) -> np.ndarray:
    """64x64 RGB image, top half one colour and bottom half another: JPEG keeps flat blocks nearly exact and
    the halves catch a transposed or flipped decode."""
    top, bottom = rng.integers(16, 240, size=(2, 1 if grey else 3))
    image = np.empty((3, 64, 64), np.uint8)
    image[:, :32], image[:, 32:] = top[:, None, None], bottom[:, None, None]
    return image


def _save_jpeg(path: Path, image: np.ndarray, grey: bool) -> None:
    from PIL import Image

    if grey:
        Image.fromarray(image[0]).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(
            path, format="JPEG", quality=95, subsampling=0
        )


def write_tiny_imagenet(root: str | Path, n_train: int = 20, n_test: int = 10) -> Fake:
    """tiny-imagenet-200/ with wnids.txt, words.txt, train/<wnid>/images, val/images with
    val_annotations.txt, and an unlabelled test/ folder. Training images go to the classes in turn; the first
    is greyscale, as some real ones are. Expected training order is the reader's: by wnids.txt, then by file
    name (so _10 before _2). Needs n_train >= 3 (one image per class)."""
    directory = Path(root) / "tiny-imagenet-200"
    rng = np.random.default_rng(200)
    (directory / "val" / "images").mkdir(parents=True, exist_ok=True)
    (directory / "test" / "images").mkdir(parents=True, exist_ok=True)
    (directory / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (directory / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in TINY_WORDS.items()))

    assert n_train >= len(TINY_WNIDS), "the reader rejects a class without training images"
    for wnid in TINY_WNIDS:
        (directory / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
    train: dict[str, np.ndarray] = {}  # "label/file name" -> image
    for i in range(n_train):
        label = i % len(TINY_WNIDS)
        wnid = TINY_WNIDS[label]
        image_dir = directory / "train" / wnid / "images"
        name = f"{wnid}_{i // len(TINY_WNIDS)}.JPEG"
        train[f"{label}/{name}"] = image = _two_tone(rng, grey=i == 0)
        _save_jpeg(image_dir / name, image, grey=i == 0)
    for wnid in TINY_WNIDS:
        names = sorted(p.name for p in (directory / "train" / wnid / "images").glob("*.JPEG"))
        boxes = "".join(f"{n}\t0\t0\t63\t63\n" for n in names)
        (directory / "train" / wnid / f"{wnid}_boxes.txt").write_text(boxes)
    order = sorted(train, key=lambda k: (int(k.split("/")[0]), k.split("/")[1]))

    test_images, test_labels, annotations = [], [], []
    for j in range(n_test):
        label = int(rng.integers(0, len(TINY_WNIDS)))
        image = _two_tone(rng, False)
        _save_jpeg(directory / "val" / "images" / f"val_{j}.JPEG", image, False)
        test_images.append(image)
        test_labels.append(label)
        annotations.append(f"val_{j}.JPEG\t{TINY_WNIDS[label]}\t1\t2\t60\t61\n")
    (directory / "val" / "val_annotations.txt").write_text("".join(annotations))
    _save_jpeg(directory / "test" / "images" / "test_0.JPEG", _two_tone(rng, False), False)

    classes = [TINY_WORDS[w].split(",")[0] for w in TINY_WNIDS]
    return Fake(
        np.stack([train[k] for k in order]), np.array([int(k.split("/")[0]) for k in order], np.int64),
        np.stack(test_images), np.array(test_labels, np.int64),
        classes, directory,
    )  # fmt: skip


WRITERS = {
    "fashion_mnist": write_fashion_mnist,
    "mnist": write_mnist,
    "kmnist": write_kmnist,
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "svhn": write_svhn,
    "stl10": write_stl10,
    "tiny_imagenet": write_tiny_imagenet,
}
"""Dataset name -> writer(root); every dataset except digits, which ships inside scikit-learn."""


def write_image_folder(
    root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6, test_dir: str = "test",
    size: int = 20,
) -> Path:  # fmt: skip
    """``root/{train,<test_dir>}/<class>/<i>.png``: an ImageFolder tree of random RGB PNGs."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), (test_dir, max(2, per_class // 2))):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# ---- A multi-label image folder with a labels CSV (MultiLabelFolderDataModule's format) --------------------


class MultiLabelFake(NamedTuple):
    root: Path
    classes: list[str]
    # split -> (image paths relative to root, targets uint8 [N, C], images uint8 [N, 3, H, W]) in CSV order
    splits: dict[str, tuple[list[str], np.ndarray, np.ndarray]]


def write_multilabel_folder(
    root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), sizes: tuple[int, int, int] = (8, 0, 4),
    size: int = 16, csv_name: str = "labels.csv",
) -> MultiLabelFake:  # fmt: skip
    """``root/images/<split>_<i>.png`` (every third one a JPEG, with flat two-tone pixels JPEG keeps nearly
    exact) and ``root/<csv_name>``: header ``image,split,<classes>``, one row per image, rows of the splits in
    turn; ``sizes`` = rows of (train, val, test). Targets are random label sets, the first row of each split
    empty (an image without any class is valid) and every class present in train."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    lines = [",".join(["image", "split", *classes])]
    splits = {}
    for split, count in zip(("train", "val", "test"), sizes):
        targets = rng.integers(0, 2, size=(count, len(classes)), dtype=np.uint8)
        if count:
            targets[0] = 0
        if split == "train":
            targets[1 : 1 + len(classes)] |= np.eye(len(classes), dtype=np.uint8)[: max(0, count - 1)]
        paths, images = [], []
        for i in range(count):
            jpeg = i % 3 == 2
            name = f"images/{split}_{i}.{'jpg' if jpeg else 'png'}"
            if jpeg:
                image = np.empty((3, size, size), np.uint8)
                image[:, : size // 2], image[:, size // 2 :] = rng.integers(16, 240, size=(2, 3, 1, 1))
                _save_jpeg(root / name, image, grey=False)
            else:
                image = rng.integers(0, 256, size=(3, size, size), dtype=np.uint8)
                Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(root / name)
            paths.append(name)
            images.append(image)
            lines.append(",".join([name, split, *(str(int(v)) for v in targets[i])]))
        splits[split] = (paths, targets, np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8))
    (root / csv_name).write_text("\n".join(lines) + "\n")
    return MultiLabelFake(root, list(classes), splits)


# ---- Class-disjoint metric-learning benchmarks (CUB-200-2011, Cars196, Stanford Online Products) -------------


class ListingFake(NamedTuple):
    directory: Path  # the dataset's folder (CUB_200_2011/, cars196/, Stanford_Online_Products/)
    paths: list[str]  # image paths relative to ``directory``, in annotation order
    labels: np.ndarray  # int64 class index (position in the dataset's full class list), in annotation order
    images: np.ndarray  # uint8 [N, 3, H, W] as written (JPEG: compare with a tolerance)


def _jpeg_images(rng: np.random.Generator, n: int, height: int, width: int, grey_first: bool = True) -> np.ndarray:
    """Flat two-tone RGB images (top and bottom halves), which JPEG keeps nearly exact; the first is grey."""
    images = np.empty((n, 3, height, width), np.uint8)
    for i in range(n):
        top, bottom = rng.integers(16, 240, size=(2, 1 if grey_first and i == 0 else 3))
        images[i, :, : height // 2], images[i, :, height // 2 :] = top[:, None, None], bottom[:, None, None]
    return images


def _save_rgb_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_jpeg(path, image, grey=bool((image[0] == image[1]).all() and (image[1] == image[2]).all()))


def write_cub200(root: str | Path, class_ids: tuple[int, ...] = (1, 2, 3, 4, 5, 101, 102, 103), per_class: int = 4,
                 size: tuple[int, int] = (20, 24)) -> ListingFake:  # fmt: skip
    """CUB_200_2011/ with classes.txt (all 200 classes), images.txt, image_class_labels.txt,
    train_test_split.txt and images/<class>/<name>.jpg for ``per_class`` images of each of ``class_ids``.
    Image ids are shuffled against the class order, as nothing in the format promises grouping."""
    directory = Path(root) / "CUB_200_2011"
    rng = np.random.default_rng(2011)
    names = {i: f"{i:03d}.Species_{i}" for i in range(1, 201)}
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "classes.txt").write_text("".join(f"{i} {names[i]}\n" for i in range(1, 201)))
    owners = rng.permutation(np.repeat(np.array(class_ids), per_class))
    images = _jpeg_images(rng, len(owners), *size)
    paths, listing, labels, split = [], [], [], []
    for image_id, (class_id, image) in enumerate(zip(owners, images), 1):
        relative = f"{names[class_id]}/Species_{class_id}_{image_id:04d}_{image_id}.jpg"
        _save_rgb_jpeg(directory / "images" / relative, image)
        paths.append(f"images/{relative}")
        listing.append(f"{image_id} {relative}\n")
        labels.append(f"{image_id} {class_id}\n")
        split.append(f"{image_id} {image_id % 2}\n")
    (directory / "images.txt").write_text("".join(listing))
    (directory / "image_class_labels.txt").write_text("".join(labels))
    (directory / "train_test_split.txt").write_text("".join(split))
    return ListingFake(directory, paths, owners.astype(np.int64) - 1, images)


def write_cars196(root: str | Path, class_ids: tuple[int, ...] = (1, 2, 3, 4, 98, 99, 150, 196), per_class: int = 4,
                  size: tuple[int, int] = (20, 24)) -> ListingFake:  # fmt: skip
    """cars196/ with cars_annos.mat (``annotations``: a struct per image with relative_im_path, bbox_x1..y2,
    class and test, as MATLAB stores them; ``class_names``: all 196) and car_ims/<6 digits>.jpg."""
    from scipy.io import savemat

    directory = Path(root) / "cars196"
    rng = np.random.default_rng(196)
    owners = rng.permutation(np.repeat(np.array(class_ids), per_class))
    images = _jpeg_images(rng, len(owners), *size)
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.empty((1, len(owners)), dtype=[(field, "O") for field in fields])
    paths = []
    for i, (class_id, image) in enumerate(zip(owners, images)):
        relative = f"car_ims/{i + 1:06d}.jpg"
        _save_rgb_jpeg(directory / relative, image)
        paths.append(relative)
        box = [np.array([[value]], np.uint16) for value in (1, 2, size[1] - 1, size[0] - 1)]
        annotations[0, i] = (np.array([relative]), *box, np.array([[class_id]], np.uint8), np.array([[i % 2]], np.uint8))
    class_names = np.empty((1, 196), dtype=object)
    for i in range(196):
        class_names[0, i] = f"Make{i + 1} Model {2000 + i % 13}"
    savemat(directory / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return ListingFake(directory, paths, owners.astype(np.int64) - 1, images)


def write_stanford_online_products(root: str | Path, train_products: tuple[int, ...] = (3, 2, 4),
                                   test_products: tuple[int, ...] = (2, 3, 1, 2),
                                   size: tuple[int, int] = (20, 24)) -> ListingFake:  # fmt: skip
    """Stanford_Online_Products/ with Ebay_train.txt and Ebay_test.txt (header ``image_id class_id super_class_id
    path``) and <category>_final/<product>_<k>.JPG; ``train_products`` / ``test_products`` give each product's
    image count (class ids 1.. for training products, then the test ones, as in the real files). Labels are
    positions in the training products followed by the test products."""
    directory = Path(root) / "Stanford_Online_Products"
    rng = np.random.default_rng(22634)
    categories = ("bicycle", "chair", "toaster")
    paths, labels, rows = [], [], {"Ebay_train.txt": [], "Ebay_test.txt": []}
    counts = [("Ebay_train.txt", n) for n in train_products] + [("Ebay_test.txt", n) for n in test_products]
    image_id = 0
    for class_index, (file, count) in enumerate(counts):
        class_id, super_class = class_index + 1, class_index % len(categories) + 1
        product = 111085122000 + class_id
        for k in range(count):
            image_id += 1
            relative = f"{categories[super_class - 1]}_final/{product}_{k}.JPG"
            paths.append(relative)
            labels.append(class_index)
            rows[file].append(f"{image_id} {class_id} {super_class} {relative}\n")
    images = _jpeg_images(rng, len(paths), *size)
    for relative, image in zip(paths, images):
        _save_rgb_jpeg(directory / relative, image)
    for file, lines in rows.items():
        (directory / file).write_text("image_id class_id super_class_id path\n" + "".join(lines))
    return ListingFake(directory, paths, np.array(labels, np.int64), images)
