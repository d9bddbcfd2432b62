"""Dataset readers against tiny files in the real on-disk formats (nothing is downloaded)."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

import fake_formats as ff  # tests/ is on sys.path: pytest prepends the rootdir conftest.py's folder
from losslab.data import sources
from losslab.data.sources import LOADERS, ImageArrays
from losslab.errors import ConfigError, DataFormatError, DataNotFoundError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SHA256 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(sources.ENV_VAR, raising=False)


def assert_matches(got: ImageArrays, fake: ff.Fake, atol: int = 0) -> None:
    for split in ("train", "test"):
        images, labels = getattr(got, f"{split}_images"), getattr(got, f"{split}_labels")
        want_images, want_labels = getattr(fake, f"{split}_images"), getattr(fake, f"{split}_labels")
        assert images.dtype == torch.uint8 and images.is_contiguous()
        assert labels.dtype == torch.int64
        assert tuple(images.shape) == want_images.shape
        assert torch.equal(labels, torch.from_numpy(want_labels))
        diff = (images.numpy().astype(int) - want_images.astype(int)).__abs__().max()
        assert diff <= atol, f"{split} images differ by up to {diff}"
    assert got.classes == fake.classes
    assert Path(got.source) == fake.directory
    assert got.files and all(SHA256.fullmatch(v) for v in got.files.values())


def assert_hashes_files(got: ImageArrays, names: list[str]) -> None:
    assert sorted(got.files) == sorted(names)
    for name in names:
        assert got.files[name] == hashlib.sha256((Path(got.source) / name).read_bytes()).hexdigest()


IDX_FILES = [f"{p}-{k}-idx{n}-ubyte.gz" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]


# ---- IDX ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "kmnist"])
def test_idx_datasets_read_exactly(tmp_path, name):
    fake = ff.WRITERS[name](tmp_path)
    got = LOADERS[name](tmp_path, download=False)
    assert_matches(got, fake)
    assert got.train_images.shape == (20, 1, 28, 28) and got.test_images.shape == (10, 1, 28, 28)
    assert_hashes_files(got, IDX_FILES)


def test_idx_accepts_torchvision_layout_with_plain_files(tmp_path):
    fake = ff.write_idx_dataset(tmp_path / "FashionMNIST" / "raw", gz=False, classes=ff.FASHION_CLASSES)
    got = sources.load_fashion_mnist(str(tmp_path), download=False)
    assert_matches(got, fake)
    assert "train-images-idx3-ubyte" in got.files


def test_idx_accepts_files_directly_in_data_dir(tmp_path):
    fake = ff.write_idx_dataset(tmp_path)
    assert_matches(sources.load_mnist(tmp_path, download=False), fake)


def test_env_var_is_searched_after_explicit_dir(tmp_path, monkeypatch):
    fake = ff.write_kmnist(tmp_path / "shared")
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "shared"))
    assert_matches(sources.load_kmnist(tmp_path / "empty", download=False), fake)
    # The explicit directory wins when both have the data.
    mine = ff.write_idx_dataset(tmp_path / "mine" / "kmnist", seed=42, classes=fake.classes)
    assert_matches(sources.load_kmnist(tmp_path / "mine", download=False), mine)


def test_truncated_gzip_names_the_file(tmp_path):
    fake = ff.write_mnist(tmp_path)
    path = fake.directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        sources.load_mnist(tmp_path, download=False)


def test_short_idx_payload_is_wrong_size(tmp_path):
    fake = ff.write_mnist(tmp_path)
    path = fake.directory / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*wrong size"):
        sources.load_mnist(tmp_path, download=False)


def test_bad_idx_magic(tmp_path):
    fake = ff.write_mnist(tmp_path)
    labels = fake.directory / "train-labels-idx1-ubyte.gz"
    images = fake.directory / "train-images-idx3-ubyte.gz"
    labels.write_bytes(images.read_bytes())  # an images file where labels belong
    with pytest.raises(DataFormatError, match=re.escape(str(labels)) + ".*bad IDX magic"):
        sources.load_mnist(tmp_path, download=False)


def test_idx_label_count_mismatch(tmp_path):
    fake = ff.write_mnist(tmp_path)
    ff.write_idx(fake.directory / "t10k-labels-idx1-ubyte.gz", fake.test_labels[:-1])
    with pytest.raises(DataFormatError, match="10 images but 9 labels"):
        sources.load_mnist(tmp_path, download=False)


def test_real_fashion_mnist():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FASHION_DIR})")
    got = sources.load_fashion_mnist(None, download=False)  # found in the system location
    assert Path(got.source) == FASHION_DIR
    assert got.train_images.shape == (60000, 1, 28, 28) and got.test_images.shape == (10000, 1, 28, 28)
    assert got.train_images.dtype == torch.uint8 and got.train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(got.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(got.test_labels), torch.full((10,), 1000))
    assert got.classes[0] == "T-shirt/top" and got.classes[9] == "Ankle boot"
    assert 0 < got.train_images.float().mean() < 255
    assert_hashes_files(got, IDX_FILES)


# ---- CIFAR -------------------------------------------------------------------------------------------------


def test_cifar10(tmp_path):
    fake = ff.write_cifar10(tmp_path)
    got = sources.load_cifar10(tmp_path, download=False)
    assert_matches(got, fake)
    assert got.train_images.shape == (20, 3, 32, 32)
    assert_hashes_files(got, [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"])


def test_cifar100(tmp_path):
    fake = ff.write_cifar100(tmp_path)
    got = sources.load_cifar100(tmp_path, download=False)
    assert_matches(got, fake)
    assert len(got.classes) == 100
    assert_hashes_files(got, ["train", "test", "meta"])


def test_cifar_missing_key(tmp_path):
    import pickle

    fake = ff.write_cifar10(tmp_path)
    path = fake.directory / "data_batch_3"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    del batch[b"labels"]
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*missing key b'labels'"):
        sources.load_cifar10(tmp_path, download=False)


def test_cifar_truncated_pickle(tmp_path):
    fake = ff.write_cifar10(tmp_path)
    path = fake.directory / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        sources.load_cifar10(tmp_path, download=False)


# ---- SVHN / STL-10 -----------------------------------------------------------------------------------------


def test_svhn(tmp_path):
    fake = ff.write_svhn(tmp_path)
    got = sources.load_svhn(tmp_path, download=False)
    assert_matches(got, fake)
    # Label 10 in the file is digit 0, and it is present.
    assert (got.train_labels == 0).any() and got.train_labels.max() == 9
    # Axis order: X[h, w, c, n] must land at images[n, c, h, w].
    from scipy.io import loadmat

    x = loadmat(fake.directory / "train_32x32.mat")["X"]
    assert got.train_images[4, 2, 1, 30] == x[1, 30, 2, 4]
    assert_hashes_files(got, ["train_32x32.mat", "test_32x32.mat"])


def test_stl10_transposes_column_major_images(tmp_path):
    fake = ff.write_stl10(tmp_path)
    got = sources.load_stl10(tmp_path, download=False)
    assert_matches(got, fake)
    assert got.train_images.shape == (20, 3, 96, 96)
    # The file holds channel 0 of image 0 column by column: its second byte is pixel (row 1, column 0).
    raw = (fake.directory / "train_X.bin").read_bytes()
    assert got.train_images[0, 0, 1, 0] == raw[1] and got.train_images[0, 0, 0, 1] == raw[96]
    assert got.classes == ff.STL10_CLASSES
    assert_hashes_files(got, ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"])


def test_stl10_wrong_size(tmp_path):
    fake = ff.write_stl10(tmp_path, class_names=False)
    path = fake.directory / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*wrong size"):
        sources.load_stl10(tmp_path, download=False)


# ---- Tiny-ImageNet -----------------------------------------------------------------------------------------


def test_tiny_imagenet_and_its_cache(tmp_path, monkeypatch):
    from PIL import Image

    fake = ff.write_tiny_imagenet(tmp_path)
    got = sources.load_tiny_imagenet(tmp_path, download=False)
    assert_matches(got, fake, atol=4)  # JPEG
    assert got.train_images.shape == (20, 3, 64, 64) and got.test_images.shape == (10, 3, 64, 64)
    assert got.classes == ["Egyptian cat", "goldfish", "reel"]
    assert set(got.files) == {
        "wnids.txt", "words.txt", "val/val_annotations.txt", sources.TINY_IMAGENET_LISTING_KEY,
    }  # fmt: skip
    cache = fake.directory / sources.TINY_IMAGENET_CACHE
    assert cache.is_file()
    assert not list(fake.directory.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a JPEG although the cache is valid")

    monkeypatch.setattr(Image, "open", no_decoding)
    again = sources.load_tiny_imagenet(tmp_path, download=False)
    assert torch.equal(again.train_images, got.train_images) and torch.equal(
        again.test_images, got.test_images
    )
    assert torch.equal(again.train_labels, got.train_labels) and again.files == got.files

    # Adding an image changes the listing digest, so the stale cache is not used.
    (fake.directory / "val" / "images" / "val_0.JPEG").rename(
        fake.directory / "val" / "images" / "moved.JPEG"
    )
    annotations = fake.directory / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("val_0.JPEG", "moved.JPEG"))
    with pytest.raises(AssertionError, match="decoded a JPEG"):
        sources.load_tiny_imagenet(tmp_path, download=False)


def test_tiny_imagenet_without_writable_dir_skips_cache(tmp_path, monkeypatch):
    fake = ff.write_tiny_imagenet(tmp_path, n_train=3, n_test=2)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(sources.tempfile, "mkstemp", read_only)
    assert_matches(sources.load_tiny_imagenet(tmp_path, download=False), fake, atol=4)
    assert not (fake.directory / sources.TINY_IMAGENET_CACHE).exists()


def test_tiny_imagenet_unknown_wnid_in_annotations(tmp_path):
    fake = ff.write_tiny_imagenet(tmp_path, n_train=3, n_test=2)
    annotations = fake.directory / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_1.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{annotations}:3")):
        sources.load_tiny_imagenet(tmp_path, download=False)


# ---- digits ------------------------------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    got = sources.load_digits(None)
    assert got.train_images.shape == (1437, 1, 8, 8) and got.test_images.shape == (360, 1, 8, 8)
    assert got.train_images.dtype == torch.uint8 and int(got.train_images.max()) == 255
    assert got.source == "sklearn.datasets.load_digits" and SHA256.fullmatch(got.files["digits"])
    counts = torch.bincount(got.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (~180 per class)
    again = sources.load_digits("/ignored", download=False)
    assert torch.equal(again.test_images, got.test_images) and torch.equal(
        again.train_labels, got.train_labels
    )


# ---- missing data and downloads ----------------------------------------------------------------------------


def test_missing_cifar10_lists_every_place(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as info:
        sources.load_cifar10(empty, download=False)
    message = str(info.value)
    assert "cifar10" in message.splitlines()[0]
    for place in ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"):
        assert f"  - {empty / place}: no such directory" in message
    assert f"  - {empty}: no such directory" in message
    assert "download disabled" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"paths.data_dir={empty}" in message


def test_incomplete_directory_names_missing_files(tmp_path):
    fake = ff.write_cifar10(tmp_path)
    (fake.directory / "data_batch_4").unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(f"{fake.directory}: missing data_batch_4")):
        sources.load_cifar10(tmp_path, download=False)


def test_failed_download_is_reported(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    empty = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as info:
        sources.load_cifar10(empty, download=True)
    assert f"torchvision download into {empty}: OSError: [Errno 101] Network is unreachable" in str(
        info.value
    )
    assert f"  - {empty / 'cifar-10-batches-py'}: no such directory" in str(info.value)


def test_missing_fashion_mnist_explains_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", (str(tmp_path / "usr-share"),))
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataNotFoundError) as info:
        sources.load_fashion_mnist(tmp_path / "data")
    message = str(info.value)
    assert f"{tmp_path / 'usr-share'}: no such directory" in message
    assert f"{tmp_path / 'data' / 'FashionMNIST' / 'raw'}: no such directory" in message
    assert "torchvision download into" in message and "Error downloading" in message
    assert "apt-get install dataset-fashion-mnist" in message and "paths.data_dir=" in message


def test_missing_tiny_imagenet_says_where_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        sources.load_tiny_imagenet(tmp_path, download=True)
    message = str(info.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    assert f"{tmp_path}/tiny-imagenet-200" in message
    assert "no automatic download" in message


def test_download_without_any_data_dir_is_skipped(monkeypatch):
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", ())
    with pytest.raises(DataNotFoundError, match="no data_dir given"):
        sources.load_fashion_mnist(None, download=True)


@pytest.mark.parametrize("name", ["mnist", "cifar100", "svhn", "stl10"])
def test_successful_download_is_read_from_torchvision_layout(tmp_path, monkeypatch, name):
    """A stand-in torchvision class writes the files where the real one would; the loader must find them."""
    import torchvision.datasets

    calls = []

    def fake_download(root, download, **kwargs):
        calls.append(kwargs)
        root = Path(root)
        if name == "mnist":
            ff.write_mnist(root, subdir="MNIST/raw")
        elif name == "svhn":
            ff.write_svhn(root.parent, subdir=root.name)
        else:
            ff.WRITERS[name](root)

    class_name = {"mnist": "MNIST", "cifar100": "CIFAR100", "svhn": "SVHN", "stl10": "STL10"}[name]
    monkeypatch.setattr(torchvision.datasets, class_name, fake_download)
    got = LOADERS[name](tmp_path / "data", download=True)
    assert calls and len(got.train_labels) == 20
    assert Path(got.source).is_relative_to(tmp_path / "data")
    if name == "svhn":
        assert (
            calls == [{"split": "train"}, {"split": "test"}]
            and Path(got.source) == tmp_path / "data" / "svhn"
        )


# ---- API ---------------------------------------------------------------------------------------------------


def test_loaders_share_one_signature():
    assert set(LOADERS) == {
        "fashion_mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn", "stl10", "tiny_imagenet", "digits",
    }  # fmt: skip
    for loader in LOADERS.values():
        params = list(inspect.signature(loader).parameters.values())
        assert [p.name for p in params] == ["data_dir", "download"]
        assert params[1].default is True


def test_load_arrays_unknown_name():
    with pytest.raises(ConfigError, match="known datasets: fashion_mnist"):
        sources.load_arrays("imagenet", None)


def test_env_var_ignored_when_empty(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.ENV_VAR, "")
    with pytest.raises(DataNotFoundError) as info:
        sources.load_svhn(tmp_path, download=False)
    assert os.getcwd() + ":" not in str(info.value)
