"""Dataset readers: whole image benchmarks as in-memory uint8 tensors, read from their original file formats.

Every ``load_<name>(data_dir, download=True)`` searches a fixed list of directories, parses the files itself
(so local copies whose archives differ from torchvision's checksums, such as Debian's, still load), falls back
to torchvision's downloader, and otherwise raises :class:`DataNotFoundError` listing every place it looked.
A file that is present but damaged raises :class:`DataFormatError` naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from losslab.errors import ConfigError, DataFormatError, DataNotFoundError

DataDir = str | os.PathLike | None

ENV_VAR = "LOSSLAB_DATA_DIR"
"""An extra data directory, searched after the one passed explicitly."""

SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),  # Debian/Ubuntu package dataset-fashion-mnist
}
"""System-wide locations searched last, per dataset (looked up at call time, so tests can patch it)."""

TINY_IMAGENET_CACHE = "losslab_cache.npz"
TINY_IMAGENET_LISTING_KEY = "train/*/images/*.JPEG + val/images/*.JPEG (path, size list)"
_TINY_CACHE_VERSION = 1  # bump when the decoded layout or label order changes, to invalidate old caches

_CHUNK = 1 << 20


@dataclass
class ImageArrays:
    """A whole labelled dataset in memory, plus where it came from."""

    train_images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, C, H, W], contiguous
    test_labels: torch.Tensor  # int64 [M]
    classes: list[str]  # class names, index = label
    source: str  # the directory the files were read from
    files: dict[str, str]  # every file read (path relative to source) -> sha256 hex digest

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(directory: Path, paths: list[Path]) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in paths}


def _check_split(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataFormatError unless images and labels agree in length and labels lie in [0, num_classes)."""
    if len(images) != len(labels):
        raise DataFormatError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataFormatError(f"{where}: contains no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataFormatError(f"{where}: labels span {low}..{high}, expected 0..{num_classes - 1}")


def _arrays(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    source: Path | str,
    files: dict[str, str],
) -> ImageArrays:
    # np.require copies read-only (frombuffer) or strided (transposed) arrays; torch wants writable C-order.
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.uint8, ["C", "W"]))

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.int64, ["C", "W"]))

    return ImageArrays(
        train_images=images(train[0]),
        train_labels=labels(train[1]),
        test_images=images(test[0]),
        test_labels=labels(test[1]),
        classes=list(classes),
        source=str(source),
        files=files,
    )


# ----------------------------------------------------------------------------------------------------------
# Searching, downloading and the not-found report


@dataclass(frozen=True)
class _Download:
    """How torchvision fetches a dataset: which class, which constructor calls, and where the files land."""

    class_name: str  # attribute of torchvision.datasets
    calls: tuple[dict, ...]  # constructor kwargs (besides root/download); one call per file set it fetches
    root_subdir: str = ""  # torchvision's root, relative to data_dir
    result_subdir: str = ""  # where the raw files end up, relative to data_dir

    def run(self, data_dir: Path) -> Path:
        import torchvision.datasets as tv_datasets  # slow import, only needed on this path

        cls = getattr(tv_datasets, self.class_name)  # looked up at call time so tests can patch it
        for kwargs in self.calls:
            cls(root=str(data_dir / self.root_subdir), download=True, **kwargs)
        return data_dir / self.result_subdir


@dataclass(frozen=True)
class _Spec:
    name: str
    subdirs: tuple[str, ...]  # tried below each data dir, before the data dir itself
    required: tuple[tuple[str, ...], ...]  # per needed file, its accepted names (first existing one is read)
    read: Callable[[Path], ImageArrays]
    download: _Download | None
    how_to: tuple[str, ...]  # lines on getting the data; "{data_dir}" is filled in


def _data_dirs(data_dir: DataDir) -> list[Path]:
    dirs: list[Path] = []
    for d in (data_dir, os.environ.get(ENV_VAR)):
        if d is not None and str(d) != "":
            p = Path(d).expanduser().absolute()
            if p not in dirs:
                dirs.append(p)
    return dirs


def _candidates(spec: _Spec, data_dirs: list[Path]) -> list[Path]:
    found: list[Path] = []
    for d in data_dirs:
        for sub in (*spec.subdirs, ""):
            found.append(d / sub)
    found += [Path(s) for s in SYSTEM_DIRS.get(spec.name, ())]
    return list(dict.fromkeys(found))


def _pick(directory: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` present in ``directory``; names ending in "/" must be folders, others files."""
    for name in names:
        path = directory / name
        if path.is_dir() if name.endswith("/") else path.is_file():
            return path
    return None


def _problem(directory: Path, required: tuple[tuple[str, ...], ...]) -> str | None:
    """Why ``directory`` does not hold the dataset, or None if it does."""
    if not directory.is_dir():
        return f"{directory}: no such directory"
    missing = [names[0] for names in required if _pick(directory, names) is None]
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return f"{directory}: missing {shown}"


def _short(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    out = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return out if len(out) <= 200 else out[:197] + "..."


def _load(spec: _Spec, data_dir: DataDir, download: bool) -> ImageArrays:
    data_dirs = _data_dirs(data_dir)
    searched: list[str] = []
    for candidate in _candidates(spec, data_dirs):
        problem = _problem(candidate, spec.required)
        if problem is None:
            # A present-but-corrupt file raises here rather than falling through: hiding it would be worse.
            return spec.read(candidate)
        searched.append(problem)

    if not download:
        searched.append("download disabled (download=False)")
    elif spec.download is None:
        searched.append(f"no automatic download: torchvision cannot fetch {spec.name}")
    elif not data_dirs:
        searched.append(f"torchvision download skipped: no data_dir given and {ENV_VAR} unset")
    else:
        target_root = data_dirs[0] / spec.download.root_subdir
        try:
            target = spec.download.run(data_dirs[0])
        except Exception as err:  # no network, HTTP errors, bad archives...: each is one line of the report
            searched.append(f"torchvision download into {target_root}: {_short(err)}")
        else:
            problem = _problem(target, spec.required)
            if problem is None:
                return spec.read(target)
            searched.append(f"torchvision download into {target_root}: finished, but {problem}")

    shown_dir = str(data_dirs[0]) if data_dirs else "/path/to/data"
    lines = [f"Dataset '{spec.name}' was not found. Searched, in order:"]
    lines += [f"  - {s}" for s in searched]
    lines.append("To get it:")
    lines += [f"  - {h.format(data_dir=shown_dir)}" for h in spec.how_to]
    raise DataNotFoundError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST, MNIST, KMNIST)

_IDX_PREFIXES = ("train", "t10k")


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped if named *.gz) with ``ndim`` dimensions."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # truncated/corrupt gzip streams surface as these
        raise DataFormatError(f"{path}: cannot read ({_short(err)})") from err
    magic = bytes((0, 0, 0x08, ndim))
    if raw[:4] != magic:
        raise DataFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x{magic.hex()}: unsigned bytes, {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: wrong size: IDX header truncated ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        shape = "x".join(map(str, dims))
        raise DataFormatError(
            f"{path}: wrong size: header says {shape} = {expected} data bytes, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_names(stem: str) -> tuple[str, ...]:
    # The uncompressed copy (torchvision keeps both) is faster to read.
    return (stem, f"{stem}.gz")


def _idx_required() -> tuple[tuple[str, ...], ...]:
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    return tuple(_idx_names(f"{prefix}-{kind}") for prefix in _IDX_PREFIXES for kind in kinds)


def _idx_reader(classes: tuple[str, ...]) -> Callable[[Path], ImageArrays]:
    def read(directory: Path) -> ImageArrays:
        splits, paths = [], []
        for prefix in _IDX_PREFIXES:
            image_path = _pick(directory, _idx_names(f"{prefix}-images-idx3-ubyte"))
            label_path = _pick(directory, _idx_names(f"{prefix}-labels-idx1-ubyte"))
            assert image_path is not None and label_path is not None  # _problem() checked they exist
            images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
            if images.shape[1:] != (28, 28):  # every IDX dataset read here is the MNIST family's 28x28 grayscale
                raise DataFormatError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
            _check_split(images, labels, len(classes), f"{image_path} / {label_path}")
            splits.append((images[:, None], labels))
            paths += [image_path, label_path]
        return _arrays(splits[0], splits[1], list(classes), directory, _hash_files(directory, paths))

    return read


_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_DIGIT_CLASSES = tuple(str(i) for i in range(10))

_TORCHVISION_HOW_TO = (
    "let torchvision download it: run with download=True and internet access, and paths.data_dir={data_dir}"
)
_IDX_FILES = "the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"


def _idx_how_to(dirname: str, url: str) -> tuple[str, ...]:
    return (
        _TORCHVISION_HOW_TO,
        f"or download {_IDX_FILES} from {url} into {{data_dir}}/{dirname}/ "
        "and run with paths.data_dir={data_dir}",
    )


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle version)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")  # the files were written by Python 2
    except Exception as err:  # a damaged pickle can fail with almost any exception type
        raise DataFormatError(f"{path}: not a readable pickle ({_short(err)})") from err
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _key(obj: dict, key: bytes, path: Path):
    if key not in obj:
        raise DataFormatError(f"{path}: missing key {key!r} (has {sorted(map(repr, obj))})")
    return obj[key]


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path)
    data = _key(obj, b"data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: b'data' is {got}, expected a uint8 array [N, 3072]")
    labels = np.asarray(_key(obj, label_key, path), dtype=np.int64).reshape(-1)
    return data.reshape(-1, 3, 32, 32), labels


def _names(obj: dict, key: bytes, path: Path, expected: int) -> list[str]:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(obj, key, path)]
    if len(names) != expected:
        raise DataFormatError(f"{path}: {key!r} has {len(names)} names, expected {expected}")
    return names


def _cifar_reader(
    train_files: tuple[str, ...], test_file: str, meta_file: str, label_key: bytes, names_key: bytes, n: int
) -> Callable[[Path], ImageArrays]:
    def read(directory: Path) -> ImageArrays:
        meta_path = directory / meta_file
        classes = _names(_unpickle(meta_path), names_key, meta_path, n)
        parts = [_cifar_batch(directory / f, label_key) for f in train_files]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _cifar_batch(directory / test_file, label_key)
        _check_split(*train, n, f"{directory}/{{{','.join(train_files)}}}")
        _check_split(*test, n, str(directory / test_file))
        paths = [directory / f for f in (*train_files, test_file, meta_file)]
        return _arrays(train, test, classes, directory, _hash_files(directory, paths))

    return read


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

# ----------------------------------------------------------------------------------------------------------
# SVHN (cropped digits, .mat)


def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as err:  # scipy raises ValueError/TypeError/MatReadError... on damaged files
        raise DataFormatError(f"{path}: not a readable .mat file ({_short(err)})") from err
    for key in ("X", "y"):
        if key not in mat:
            raise DataFormatError(f"{path}: missing variable {key!r}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFormatError(f"{path}: X is {x.dtype} {list(x.shape)}, expected uint8 [32, 32, 3, N]")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataFormatError(f"{path}: y spans {labels.min()}..{labels.max()}, expected 1..10")
    # [H, W, C, N] -> [N, C, H, W]; SVHN stores digit 0 as label 10.
    return x.transpose(3, 2, 0, 1), labels % 10


def _read_svhn(directory: Path) -> ImageArrays:
    paths = [directory / "train_32x32.mat", directory / "test_32x32.mat"]
    splits = [_svhn_split(p) for p in paths]
    for p, split in zip(paths, splits, strict=True):
        _check_split(*split, 10, str(p))
    return _arrays(splits[0], splits[1], list(_DIGIT_CLASSES), directory, _hash_files(directory, paths))


# ----------------------------------------------------------------------------------------------------------
# STL-10 (binary version, labelled splits)

_STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
_STL_IMAGE_BYTES = 3 * 96 * 96


def _stl_split(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(x_path, np.uint8)
    if raw.size % _STL_IMAGE_BYTES:
        raise DataFormatError(
            f"{x_path}: wrong size: {raw.size} bytes is not a whole number of 3x96x96 images"
        )
    # Each channel is stored column-major (x outer, y inner): swap the last two axes to get [C, H, W].
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    labels = np.fromfile(y_path, np.uint8).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataFormatError(f"{y_path}: labels span {labels.min()}..{labels.max()}, expected 1..10")
    return images, labels - 1


def _read_stl10(directory: Path) -> ImageArrays:
    splits, paths = [], []
    for split in ("train", "test"):
        x_path, y_path = directory / f"{split}_X.bin", directory / f"{split}_y.bin"
        images, labels = _stl_split(x_path, y_path)
        _check_split(images, labels, 10, f"{x_path} / {y_path}")
        splits.append((images, labels))
        paths += [x_path, y_path]
    classes = list(_STL_CLASSES)
    names_path = directory / "class_names.txt"
    if names_path.is_file():
        classes = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise DataFormatError(f"{names_path}: {len(classes)} class names, expected 10")
        paths.append(names_path)
    return _arrays(splits[0], splits[1], classes, directory, _hash_files(directory, paths))


# ----------------------------------------------------------------------------------------------------------
# Tiny-ImageNet-200 (JPEG folders; the labelled val split is the test split)

_JPEG_SUFFIXES = (".jpeg", ".jpg")


class _TinyIndex(NamedTuple):
    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    files: dict[str, str]


def _tiny_index(directory: Path) -> _TinyIndex:
    """List the images and labels, and compute the checksums (cheap: no image is opened)."""
    wnids_path = directory / "wnids.txt"
    wnids = [w.strip() for w in wnids_path.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataFormatError(f"{wnids_path}: expected a list of distinct WordNet ids, one per line")
    index = {w: i for i, w in enumerate(wnids)}

    listing: list[tuple[str, int]] = []  # (relative path, size), for the checksum
    train_paths: list[str] = []
    train_labels: list[int] = []
    for label, wnid in enumerate(wnids):
        image_dir = directory / "train" / wnid / "images"
        if not image_dir.is_dir():
            raise DataFormatError(f"{image_dir}: missing (class {wnid} is listed in wnids.txt)")
        entries = [e for e in os.scandir(image_dir) if e.name.lower().endswith(_JPEG_SUFFIXES)]
        entries.sort(key=lambda e: e.name)
        if not entries:
            raise DataFormatError(f"{image_dir}: no JPEG images")
        for e in entries:
            train_paths.append(e.path)
            listing.append((f"train/{wnid}/images/{e.name}", e.stat().st_size))
        train_labels += [label] * len(entries)

    annotations = directory / "val" / "val_annotations.txt"
    test_paths: list[str] = []
    test_labels: list[int] = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataFormatError(
                f"{annotations}:{lineno}: expected 'file<TAB>wnid...' with a wnid listed in wnids.txt"
            )
        path = directory / "val" / "images" / fields[0]
        try:
            size = path.stat().st_size
        except OSError:
            raise DataFormatError(f"{annotations}:{lineno}: image {path} does not exist") from None
        test_paths.append(str(path))
        test_labels.append(index[fields[1]])
        listing.append((f"val/images/{fields[0]}", size))
    if not test_paths:
        raise DataFormatError(f"{annotations}: no annotations")

    words_path = directory / "words.txt"
    classes = list(wnids)
    hashed = [wnids_path, annotations]
    if words_path.is_file():
        words = dict(line.split("\t", 1) for line in words_path.read_text().splitlines() if "\t" in line)
        classes = [words[w].split(",")[0].strip() if w in words else w for w in wnids]
        hashed.append(words_path)
    files = _hash_files(directory, hashed)
    listing_text = "".join(f"{p}\t{s}\n" for p, s in sorted(listing))
    files[TINY_IMAGENET_LISTING_KEY] = hashlib.sha256(listing_text.encode()).hexdigest()
    return _TinyIndex(classes, train_paths, np.array(train_labels), test_paths, np.array(test_labels), files)


def _decode_jpegs(paths: list[str]) -> np.ndarray:
    """Decode 64x64 images to uint8 [N, 3, 64, 64], in threads: Pillow releases the GIL while decoding."""
    from PIL import Image

    out = np.empty((len(paths), 3, 64, 64), np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(paths[i]) as image:
                rgb = image.convert("RGB")  # a few Tiny-ImageNet images are greyscale
        except OSError as err:
            raise DataFormatError(f"{paths[i]}: cannot decode image ({_short(err)})") from err
        if rgb.size != (64, 64):
            raise DataFormatError(f"{paths[i]}: image is {rgb.size[0]}x{rgb.size[1]}, expected 64x64")
        out[i] = np.asarray(rgb).transpose(2, 0, 1)

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(decode, range(len(paths))):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad image, don't decode the remaining 100k first
    return out


_CACHED_ARRAYS = ("train_images", "test_images")


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in _CACHED_ARRAYS}
    except Exception:  # a damaged or foreign cache is only a lost speed-up: decode again
        return None


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a cache; skip if read-only."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".losslab_cache.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; others sharing the dataset should be able to read it
        os.replace(tmp, path)
        done = True
    except OSError:  # disk full etc.: caching is optional
        pass
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _read_tiny_imagenet(directory: Path) -> ImageArrays:
    index = _tiny_index(directory)
    key = json.dumps({"version": _TINY_CACHE_VERSION, "files": index.files}, sort_keys=True)
    cache = directory / TINY_IMAGENET_CACHE
    arrays = _read_cache(cache, key)
    if arrays is None:
        arrays = {
            "train_images": _decode_jpegs(index.train_paths),
            "test_images": _decode_jpegs(index.test_paths),
        }
        _write_cache(cache, key, arrays)
    train, test = (arrays["train_images"], index.train_labels), (arrays["test_images"], index.test_labels)
    _check_split(*train, len(index.classes), f"{directory}/train")
    _check_split(*test, len(index.classes), f"{directory}/val")
    return _arrays(train, test, index.classes, directory, index.files)


# ----------------------------------------------------------------------------------------------------------
# Specs and public loaders

_SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec(
        name="fashion_mnist",
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        required=_idx_required(),
        read=_idx_reader(_FASHION_CLASSES),
        download=_Download("FashionMNIST", ({"train": False},), result_subdir="FashionMNIST/raw"),
        how_to=(
            "apt-get install dataset-fashion-mnist (Debian/Ubuntu; it installs to "
            "/usr/share/datasets/fashion-mnist), or",
            *_idx_how_to("fashion-mnist", "https://github.com/zalandoresearch/fashion-mnist"),
        ),
    ),
    "mnist": _Spec(
        name="mnist",
        subdirs=("mnist", "MNIST/raw"),
        required=_idx_required(),
        read=_idx_reader(_DIGIT_CLASSES),
        download=_Download("MNIST", ({"train": False},), result_subdir="MNIST/raw"),
        how_to=_idx_how_to("mnist", "https://yann.lecun.com/exdb/mnist/"),
    ),
    "kmnist": _Spec(
        name="kmnist",
        subdirs=("kmnist", "KMNIST/raw"),
        required=_idx_required(),
        read=_idx_reader(_KMNIST_CLASSES),
        download=_Download("KMNIST", ({"train": False},), result_subdir="KMNIST/raw"),
        how_to=_idx_how_to("kmnist", "https://github.com/rois-codh/kmnist"),
    ),
    "cifar10": _Spec(
        name="cifar10",
        subdirs=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        required=tuple((f,) for f in (*_CIFAR10_TRAIN, "test_batch", "batches.meta")),
        read=_cifar_reader(_CIFAR10_TRAIN, "test_batch", "batches.meta", b"labels", b"label_names", 10),
        download=_Download("CIFAR10", ({"train": False},), result_subdir="cifar-10-batches-py"),
        how_to=(
            _TORCHVISION_HOW_TO,
            "or download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it into {data_dir} "
            "(giving {data_dir}/cifar-10-batches-py/) and run with paths.data_dir={data_dir}",
        ),
    ),
    "cifar100": _Spec(
        name="cifar100",
        subdirs=("cifar-100-python", "cifar100/cifar-100-python", "cifar100"),
        required=(("train",), ("test",), ("meta",)),
        read=_cifar_reader(("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100),
        download=_Download("CIFAR100", ({"train": False},), result_subdir="cifar-100-python"),
        how_to=(
            _TORCHVISION_HOW_TO,
            "or download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it into "
            "{data_dir} (giving {data_dir}/cifar-100-python/) and run with paths.data_dir={data_dir}",
        ),
    ),
    "svhn": _Spec(
        name="svhn",
        subdirs=("svhn", "SVHN"),
        required=(("train_32x32.mat",), ("test_32x32.mat",)),
        read=_read_svhn,
        download=_Download("SVHN", ({"split": "train"}, {"split": "test"}), "svhn", "svhn"),
        how_to=(
            _TORCHVISION_HOW_TO,
            "or download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
            "into {data_dir}/svhn/ and run with paths.data_dir={data_dir}",
        ),
    ),
    "stl10": _Spec(
        name="stl10",
        subdirs=("stl10_binary", "stl10/stl10_binary"),
        required=tuple((f"{s}_{k}.bin",) for s in ("train", "test") for k in ("X", "y")),
        read=_read_stl10,
        download=_Download("STL10", ({"split": "test"},), result_subdir="stl10_binary"),
        how_to=(
            "let torchvision download it (2.5 GB): run with download=True and internet access, "
            "and paths.data_dir={data_dir}",
            "or download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz, extract it into "
            "{data_dir} (giving {data_dir}/stl10_binary/) and run with paths.data_dir={data_dir}",
        ),
    ),
    "tiny_imagenet": _Spec(
        name="tiny_imagenet",
        subdirs=("tiny-imagenet-200", "tiny_imagenet/tiny-imagenet-200"),
        required=(("wnids.txt",), ("train/",), ("val/images/",), ("val/val_annotations.txt",)),
        read=_read_tiny_imagenet,
        download=None,
        how_to=(
            "download http://cs231n.stanford.edu/tiny-imagenet-200.zip (about 240 MB) and unzip it into "
            "{data_dir} (giving {data_dir}/tiny-imagenet-200/wnids.txt), "
            "then run with paths.data_dir={data_dir}",
            "the first load decodes all 110k JPEGs once and caches them as "
            f"tiny-imagenet-200/{TINY_IMAGENET_CACHE} when that folder is writable",
        ),
    ),
}


def load_fashion_mnist(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """Fashion-MNIST (IDX files): 60k/10k grayscale 28x28, 10 classes; also looks in Debian's system copy."""
    return _load(_SPECS["fashion_mnist"], data_dir, download)


def load_mnist(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """MNIST (IDX files): 60k/10k grayscale 28x28 digits."""
    return _load(_SPECS["mnist"], data_dir, download)


def load_kmnist(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """Kuzushiji-MNIST (IDX files): 60k/10k grayscale 28x28 cursive Japanese characters."""
    return _load(_SPECS["kmnist"], data_dir, download)


def load_cifar10(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """CIFAR-10 (python pickles in cifar-10-batches-py/): 50k/10k colour 32x32, 10 classes."""
    return _load(_SPECS["cifar10"], data_dir, download)


def load_cifar100(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """CIFAR-100 (python pickles in cifar-100-python/): 50k/10k colour 32x32, 100 fine labels."""
    return _load(_SPECS["cifar100"], data_dir, download)


def load_svhn(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """SVHN cropped digits (train/test_32x32.mat): 73k/26k colour 32x32; the extra split is not used."""
    return _load(_SPECS["svhn"], data_dir, download)


def load_stl10(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """STL-10 labelled splits (stl10_binary/): 5k/8k colour 96x96, 10 classes; unlabelled split skipped."""
    return _load(_SPECS["stl10"], data_dir, download)


def load_tiny_imagenet(data_dir: DataDir, download: bool = True) -> ImageArrays:
    """Tiny-ImageNet-200: 100k train / 10k labelled val (used as test) colour 64x64; labels follow wnids.txt.

    There is no automatic download. Decoded arrays are cached in ``<source>/losslab_cache.npz``; ``files``
    holds the sha256 of the text files plus one digest over every image's (path, size).
    """
    return _load(_SPECS["tiny_imagenet"], data_dir, download)


def load_digits(data_dir: DataDir = None, download: bool = True) -> ImageArrays:
    """scikit-learn's bundled 8x8 digits (1797; 0..16 scaled to 0..255), fixed stratified 20% test split.

    ``data_dir`` and ``download`` are ignored: the data ships inside scikit-learn.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    return _arrays(
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        list(_DIGIT_CLASSES),
        "sklearn.datasets.load_digits",
        {"digits": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()},
    )


LOADERS: dict[str, Callable[[DataDir, bool], ImageArrays]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "kmnist": load_kmnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "stl10": load_stl10,
    "tiny_imagenet": load_tiny_imagenet,
    "digits": load_digits,
}


def load_arrays(name: str, data_dir: DataDir, download: bool = True) -> ImageArrays:
    """Load dataset ``name`` (a key of LOADERS); an unknown name is a ConfigError listing the known ones."""
    if name not in LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(LOADERS)}")
    return LOADERS[name](data_dir, download)
