"""Batches per second of LossLab's in-memory training pipeline against a torchvision per-sample DataLoader.

Both produce the same training batches: normalised float images ``[B, C, H, W]`` on the device, with the dataset
config's augmentation (Fashion-MNIST: zero-padded random crop of 2 and horizontal flip), and int64 labels, from the
same uint8 training split.

- LossLab: the datamodule's ``train_dataloader()`` (one gather per batch from the uint8 tensor) and its
  ``on_after_batch_transfer``, the hook Lightning calls on every training batch once on the device (crop and flip of
  the whole batch, then normalisation), with the datamodule told it is training as the trainer would.
- torchvision: a Dataset over the same uint8 tensor returning one image at a time through ``transforms.v2``
  (``RandomCrop(size, padding)``, ``RandomHorizontalFlip()``, ``ToDtype(float32, scale=True)``,
  ``Normalize(mean, std)``), batched by a ``DataLoader`` (shuffled, last batch dropped, ``--workers`` worker
  processes), then moved to the device. Its images are tensors, the fast path of v2; ``--pil`` makes each one a PIL
  image first, as ``torchvision.datasets.FashionMNIST`` does (with ``ToImage()`` in front of the transforms).

Each pass draws ``--batches`` batches from a fresh iterator (a new epoch); after one untimed pass each, the table
gives the median over ``--repeats`` passes, run in the order LossLab, torchvision, torchvision, LossLab, ... (ABBA:
a linear drift in the machine's load hits both alike).

    python scripts/bench_data.py --threads 1
    python scripts/bench_data.py --workers 2 --batches 200
    python scripts/bench_data.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from losslab.train import config_dir

GOAL = 20.0
NAME_WIDTH = 52


class TrainingTrainer:
    """What the datamodule reads from its trainer while training (epoch, rank, training flag): set as
    ``datamodule.trainer`` so that ``on_after_batch_transfer`` augments, as in ``trainer.fit``."""

    training = True
    current_epoch = 0
    global_rank = 0
    world_size = 1


def datamodule_of(dataset: str, batch_size: int | None, overrides: list[str]) -> Any:
    """The dataset config's datamodule, set up for training."""
    GlobalHydra.instance().clear()
    extra = [f"dataset.batch_size={batch_size}"] if batch_size else []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset={dataset}", *extra, *overrides])
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.trainer = TrainingTrainer()
    return datamodule


def losslab_batches(datamodule: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """LossLab's training batches as the LightningModule receives them."""
    for images, labels in datamodule.train_dataloader():
        yield datamodule.on_after_batch_transfer((images.to(device), labels.to(device)), 0)


class PerSampleImages(Dataset):
    """torchvision.datasets-style: one ``(image, label)`` at a time from the uint8 arrays, through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable, pil: bool = False) -> None:
        self.images, self.labels, self.transform, self.pil = images, labels, transform, pil

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if self.pil:  # as torchvision.datasets.MNIST/FashionMNIST: a greyscale PIL image per sample
            image = Image.fromarray(image[0].numpy(), mode="L")
        return self.transform(image), int(self.labels[index])


def per_sample_transform(datamodule: Any, pil: bool = False) -> v2.Compose:
    """The datamodule's augmentation and normalisation, as per-sample torchvision v2 transforms."""
    augment = datamodule.augment
    if augment.cutout_size:
        raise SystemExit("bench_data: cutout has no per-sample twin here; use dataset.augment.cutout_size=0")
    steps: list[Any] = [v2.ToImage()] if pil else []
    if augment.crop_padding:
        steps.append(v2.RandomCrop(datamodule.image_size, padding=augment.crop_padding))
    if augment.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(datamodule.mean.tolist(), datamodule.std.tolist())]
    return v2.Compose(steps)


def torchvision_loader(datamodule: Any, workers: int, pil: bool = False) -> DataLoader:
    split = datamodule.train_split
    dataset = PerSampleImages(split.images, split.labels, per_sample_transform(datamodule, pil), pil)
    return DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=False)  # fmt: skip


def torchvision_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield images.to(device), labels.to(device)


def timed_pass(batches: Callable[[], Iterator[Any]], count: int, device: torch.device) -> float:
    """Seconds to draw ``count`` batches from a fresh iterator of ``batches``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in itertools.islice(batches(), count):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", help="an in-memory dataset config")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the dataset config's)")
    parser.add_argument("--batches", type=int, default=100, help="batches per timed pass (at most one epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline; the median is reported")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the torchvision side")
    parser.add_argument("--pil", action="store_true", help="torchvision side: a PIL image per sample, then ToImage()")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where batches end up (and LossLab augments)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, from OMP_NUM_THREADS)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the dataset (dataset.augment.crop_padding=4)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.batches < 1:
        raise SystemExit("bench_data: --repeats and --batches must be >= 1")
    device = torch.device(args.device)
    torch.manual_seed(0)
    datamodule = datamodule_of(args.dataset, args.batch_size, args.overrides)
    loader = torchvision_loader(datamodule, args.workers, args.pil)
    count = min(args.batches, len(loader), len(datamodule.train_dataloader()))
    pipelines = {
        "losslab": lambda: losslab_batches(datamodule, device),
        "torchvision": lambda: torchvision_batches(loader, device),
    }
    for batches in pipelines.values():
        timed_pass(batches, count, device)  # warm-up: first-call costs, worker start-up
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for repeat in range(args.repeats):
        for name in (pipelines if repeat % 2 == 0 else reversed(pipelines)):
            seconds[name].append(timed_pass(pipelines[name], count, device))

    split = datamodule.train_split
    augment = datamodule.augment
    augmentation = " + ".join([f"crop {augment.crop_padding}"] * bool(augment.crop_padding) +
                              ["flip"] * augment.horizontal_flip) or "no augmentation"  # fmt: skip
    threads = torch.get_num_threads()
    print(f"bench_data: {datamodule.name} training split ({len(split.labels)} images "
          f"{'x'.join(map(str, split.images.shape[1:]))} uint8), batch {datamodule.batch_size}, {augmentation}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, {device}, {threads} "
          f"thread{'s' if threads > 1 else ''}")  # fmt: skip
    print(f"{count} batches per pass, median of {args.repeats} passes after 1 warm-up pass each, order LossLab, "
          "torchvision, torchvision, LossLab, ...")  # fmt: skip
    labels = {
        "losslab": "LossLab in-memory loader + batched augmentation",
        "torchvision": f"torchvision DataLoader, per-sample v2{' from PIL' if args.pil else ''}, "
                       f"{args.workers} worker{'s' if args.workers != 1 else ''}",
    }  # fmt: skip
    header = f"{'pipeline':<{NAME_WIDTH}} {'batches/s':>10} {'ms/batch':>9} {'images/s':>10} {'min-max batches/s':>18}"
    print(header)
    print("-" * len(header))
    rates = {}
    for name, values in seconds.items():
        rates[name] = count / statistics.median(values)
        spread = f"{count / max(values):.1f}-{count / min(values):.1f}"
        print(f"{labels[name]:<{NAME_WIDTH}} {rates[name]:>10.1f} {1e3 / rates[name]:>9.2f} "
              f"{rates[name] * datamodule.batch_size:>10.0f} {spread:>18}")  # fmt: skip
    ratio = rates["losslab"] / rates["torchvision"]
    print(f"ratio LossLab / torchvision: {ratio:.1f}x (goal >= {GOAL:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
