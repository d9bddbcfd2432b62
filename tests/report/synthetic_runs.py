"""Synthetic run directories shaped like ``train.py``'s: results.json and metrics.csv with fixed numbers.

Not a conftest.py: tests elsewhere import ``conftest`` by name, and a second one would shadow theirs.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

LOSS_TARGETS = {"ce": "losslab.losses.CrossEntropy", "focal": "losslab.losses.Focal",
                "supcon": "losslab.losses.SupervisedContrastive"}


def base_config(run_dir: Path, loss: str, seed: int) -> dict:
    """A trimmed resolved config, with the path-derived values a real one has."""
    return {
        "dataset": {"_target_": "losslab.data.InMemoryDataModule", "name": "fashion_mnist", "batch_size": 256,
                    "seed": seed, "data_dir": "/data", "augment": {"crop_padding": 2}},
        "backbone": {"_target_": "losslab.models.small_cnn.SmallCNN", "channels": [32, 64]},
        "loss": {"_target_": LOSS_TARGETS[loss]},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.003},
        "scheduler": {"_target_": "losslab.optim.onecycle", "_partial_": True},
        "trainer": {"_target_": "lightning.Trainer", "max_epochs": 3, "default_root_dir": str(run_dir),
                    "enable_progress_bar": True},
        "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run_dir)}},
        "callbacks": {
            "best_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                                "dirpath": f"{run_dir}/checkpoints", "monitor": "val/acc"},
            "rich_progress_bar": {"_target_": "lightning.pytorch.callbacks.RichProgressBar", "refresh_rate": 10},
        },
        "paths": {"root_dir": "/repo", "data_dir": "/data", "log_dir": str(run_dir.parent), "output_dir": str(run_dir)},
        "seed": seed,
        "tags": [],
        "run_name": run_dir.name,
        "resume": False,
        "eval_checkpoint": "best",
        "num_threads": None,
        "debug_traceback": False,
        "objective": {"projection_dim": 128},
    }


def set_dotted(tree: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def write_run(
    run_dir: Path,
    *,
    loss: str = "ce",
    seed: int = 0,
    test: dict | None = None,
    val: dict | None = None,
    config: dict | None = None,
    status: str = "completed",
    calibration: bool = True,
    seconds_per_epoch: float = 2.0,
    peak_memory_mb: dict | None = None,
) -> Path:
    """One run directory; ``config`` sets dotted keys of the resolved config (``{"optimizer.lr": 0.01}``)."""
    run_dir.mkdir(parents=True)
    resolved = base_config(run_dir, loss, seed)
    for key, value in (config or {}).items():
        set_dotted(resolved, key, value)
    test = {"acc": 0.9, "ece": 0.05, "nll": 0.3, **(test or {})}
    bins = {
        "bin_upper_edges": [(b + 1) / 15 for b in range(15)],
        "count": [0.0] * 10 + [10.0, 20.0, 30.0, 40.0, 100.0],
        "mean_confidence": [0.0] * 10 + [0.7, 0.77, 0.83, 0.9, 0.97],
        "accuracy": [0.0] * 10 + [0.6, 0.7, 0.8, 0.9, 0.95],
    }
    results = {
        "status": status,
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "seed": seed,
        "tags": [],
        "choices": {"dataset": "fashion_mnist", "backbone": "small_cnn", "loss": loss, "optimizer": "adamw",
                    "scheduler": "onecycle", "trainer": "default", "logger": "csv", "callbacks": "default"},
        "val": {"acc": 0.9, "ece": 0.05, "nll": 0.3, **(val or {})},
        "test": test,
        "calibration": {"val": copy.deepcopy(bins), "test": bins} if calibration else {},
        "best_epoch": 2,
        "epochs_completed": 3,
        "wall_time_s": 3 * seconds_per_epoch + 1.0,
        "fit_time_s": 3 * seconds_per_epoch,
        "seconds_per_epoch": seconds_per_epoch,
        "peak_memory_mb": peak_memory_mb or {"host_rss": 1000.0},
        "parameters": {"total": 824810, "trainable": 824810, "backbone": 822240},
        "config": resolved,
        "device": "cpu (2 threads) x1",
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    with open(run_dir / "metrics.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["epoch", "step", "lr", "epoch_time_s", "train/loss", "val/acc"])
        writer.writeheader()
        for epoch in range(3):
            writer.writerow({"epoch": epoch, "step": 10 * (epoch + 1), "lr": 0.003, "epoch_time_s": seconds_per_epoch,
                             "train/loss": 1.0 / (epoch + 1) + 0.01 * seed, "val/acc": test["acc"] - 0.1 / (epoch + 1)})
    return run_dir


def write_two_losses(root: Path) -> Path:
    """ce and focal on seeds 0, 1, 2 with fixed test accuracies."""
    for seed, (ce, focal) in enumerate([(0.90, 0.93), (0.92, 0.95), (0.94, 0.96)]):
        write_run(root / f"ce_{seed}", loss="ce", seed=seed, test={"acc": ce})
        write_run(root / f"focal_{seed}", loss="focal", seed=seed, test={"acc": focal})
    return root
