"""scripts/bench_train.py and scripts/bench_data.py on digits: their tables, and that each side of a comparison does
the work of the other (never their timings)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
import sys
from types import ModuleType

import pytest
import torch

from conftest import REPO
from losslab.data.augment import BatchAugment

NUMBER = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"  # unsigned: "0.03-0.04" is a min-max pair


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train() -> ModuleType:
    return load_script("bench_train")


@pytest.fixture(scope="module")
def bench_data() -> ModuleType:
    return load_script("bench_data")


def run_main(module: ModuleType, argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert module.main(argv) == 0
    return stdout.getvalue()


def numbers(line: str) -> list[float]:
    return [float(value) for value in re.findall(NUMBER, line)]


def row(output: str, label: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(label)]
    return line


@pytest.fixture(scope="module")
def train_table(bench_train) -> str:
    return run_main(bench_train, ["--dataset", "digits", "--epochs", "3", "--repeats", "1", "--limit-batches", "10",
                                  "--threads", "1", "trainer.enable_progress_bar=false"])  # fmt: skip


def test_bench_train_prints_both_paths_and_their_ratio(train_table):
    assert "epoch 1 warm-up, epochs 2-3 timed" in train_table
    header = row(train_table, "path")
    for column in ("warm-up s", "train s/epoch", "steps/s", "epoch s", "loss epoch 1", "loss epoch 3"):
        assert column in header
    for label in ("plain PyTorch", "LossLab"):
        values = numbers(row(train_table, label))
        assert len(values) == 8  # warm-up, train, min and max ("min-max"), steps/s, epoch, two losses
        assert all(math.isfinite(value) and value > 0 for value in values)
    ratios = numbers(row(train_table, "ratio LossLab / plain"))
    assert len(ratios) == 2 and all(math.isfinite(value) and value > 0 for value in ratios)


def test_bench_train_plain_loop_trains_and_matches_losslab(train_table):
    """The plain loop learns (its loss falls over 30 steps), and it is the same training as LossLab's: same initial
    weights, batches, augmentation and dropout draws, so the trained weights agree."""
    plain = numbers(row(train_table, "plain PyTorch"))
    losslab = numbers(row(train_table, "LossLab"))
    assert plain[-1] < 0.7 * plain[-2]
    assert plain[-2:] == pytest.approx(losslab[-2:], rel=1e-4)
    difference = numbers(row(train_table, "weights after training").split("=", 1)[1])[0]
    assert difference < 1e-4


def test_plain_crop_and_flip_draws_the_augmentation_losslab_draws(bench_train):
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    ours = bench_train.crop_and_flip(images, 2, True, torch.Generator().manual_seed(3))
    losslab = BatchAugment(crop_padding=2, horizontal_flip=True).geometric(images, torch.Generator().manual_seed(3))
    assert torch.equal(ours, losslab)
    assert not torch.equal(ours, images)
    centred = bench_train.crop_and_flip(images, 0, False, torch.Generator().manual_seed(3))
    assert torch.equal(centred, images)


def test_time_to_accuracy_reports_the_epoch_and_wall_seconds(bench_train):
    output = run_main(bench_train, ["--dataset", "digits", "--time-to-accuracy", "0.3", "--epochs", "2",
                                    "--limit-batches", "10", "--threads", "1", "trainer.enable_progress_bar=false"])
    epochs = [numbers(line) for line in output.splitlines() if re.fullmatch(rf"\s*\d+\s+{NUMBER}\s+{NUMBER}", line)]
    assert [int(values[0]) for values in epochs] == [1, 2]
    assert all(0 <= values[1] <= 1 and values[2] > 0 for values in epochs)
    assert epochs[1][2] > epochs[0][2]
    reached = row(output, "reached 30.00% test accuracy after epoch")
    assert math.isfinite(numbers(reached.split(" at ", 1)[1])[0])

    never = run_main(bench_train, ["--dataset", "digits", "--time-to-accuracy", "1.0", "--epochs", "1",
                                   "--limit-batches", "1", "--threads", "1", "trainer.enable_progress_bar=false"])
    assert "not reached: 100.00% test accuracy in 1 epoch (best" in never


def test_bench_data_prints_both_pipelines_and_their_ratio(bench_data):
    output = run_main(bench_data, ["--dataset", "digits", "--batches", "5", "--repeats", "2", "--threads", "1"])
    assert "5 batches per pass, median of 2 passes" in output
    for label in ("LossLab in-memory loader", "torchvision DataLoader, per-sample v2, 0 workers"):
        values = numbers(row(output, label)[len(label):])
        assert len(values) == 5  # batches/s, ms/batch, images/s, min and max batches/s
        assert all(math.isfinite(value) and value > 0 for value in values)
    ratio = numbers(row(output, "ratio LossLab / torchvision"))[0]
    assert math.isfinite(ratio) and ratio > 0


@pytest.mark.parametrize("pil", [False, True])
def test_bench_data_pipelines_deliver_the_same_batches(bench_data, pil):
    """Without augmentation the per-sample torchvision pipeline and LossLab's give the same normalised images;
    with Fashion-MNIST's crop and flip, the same shapes, dtype and value range."""
    datamodule = bench_data.datamodule_of("digits", 16, [])
    index = torch.arange(16)
    loader = bench_data.torchvision_loader(datamodule, workers=0, pil=pil)
    theirs = torch.stack([loader.dataset[int(i)][0] for i in index])
    split = datamodule.train_split
    ours, labels = datamodule.on_after_batch_transfer((split.images[index], split.labels[index]), 0)
    assert theirs.dtype == ours.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    augmented = bench_data.datamodule_of("digits", 16, ["dataset.augment.crop_padding=2",
                                                        "dataset.augment.horizontal_flip=true"])
    loader = bench_data.torchvision_loader(augmented, workers=0, pil=pil)
    images, labels = next(iter(loader))
    ours, _ = next(bench_data.losslab_batches(augmented, torch.device("cpu")))
    assert images.shape == ours.shape == (16, 1, 8, 8) and images.dtype == ours.dtype and labels.dtype == torch.int64
    black, white = [float((value - augmented.mean) / augmented.std) for value in (0.0, 1.0)]
    for batch in (images, ours):
        assert black - 1e-5 <= batch.min() and batch.max() <= white + 1e-5
