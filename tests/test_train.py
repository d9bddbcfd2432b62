"""End-to-end runs on scikit-learn's digits: what every run leaves, determinism, resume, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, run_training

SHORT = ["dataset=digits", "trainer.max_epochs=3", "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false", "seed=1"]

RESULT_FIELDS = {
    "val", "test", "best_epoch", "wall_time_s", "seconds_per_epoch", "peak_memory_mb", "parameters", "seed",
    "config", "git", "versions", "data", "choices", "epochs_completed", "status",
}  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The documented smoke command, `python scripts/train.py dataset=digits` (default epochs), in-process."""
    out = tmp_path_factory.mktemp("digits_run")
    return run_training(["dataset=digits", "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false"], out), out


def test_digits_default_run_reaches_95_percent(digits_run):
    results, _ = digits_run
    assert results["test"]["acc"] >= 0.95
    assert results["epochs_completed"] == results["config"]["trainer"]["max_epochs"]


def test_run_leaves_config_metrics_checkpoints_and_results(digits_run):
    results, out = digits_run
    on_disk = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(on_disk)
    assert on_disk["test"] == results["test"]
    for metric in ("acc", "acc_top5", "nll", "ece", "loss"):
        assert metric in on_disk["test"] and metric in on_disk["val"]
    assert on_disk["git"]["commit"] is None or len(on_disk["git"]["commit"]) == 40
    assert {"torch", "lightning", "hydra-core", "python"} <= set(on_disk["versions"])
    assert on_disk["parameters"]["total"] > on_disk["parameters"]["backbone"] > 0
    assert on_disk["data"]["split"]["n_val"] > 0 and on_disk["data"]["files_sha256"]
    assert on_disk["choices"]["dataset"] == "digits" and on_disk["choices"]["loss"] == "ce"
    assert on_disk["peak_memory_mb"]["host_rss"] > 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(results["epochs_completed"]))
    assert {"train/loss", "train/acc", "val/acc", "val/ece", "lr", "epoch_time_s"} <= set(metrics.columns)
    assert 0 <= on_disk["best_epoch"] < len(metrics)
    assert metrics["val/acc"].max() == pytest.approx(metrics["val/acc"][on_disk["best_epoch"]])
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "config.yaml").is_file()
    assert not list(out.glob("**/*.tmp")), "no temporary files may be left behind"


def test_same_seed_gives_identical_metrics(tmp_path):
    first = run_training(SHORT, tmp_path / "a")
    second = run_training(SHORT, tmp_path / "b")
    assert first["test"] == second["test"] and first["val"] == second["val"]
    assert pd.read_csv(tmp_path / "a" / "metrics.csv").drop(columns="epoch_time_s").equals(
        pd.read_csv(tmp_path / "b" / "metrics.csv").drop(columns="epoch_time_s")
    )
    different = run_training([*SHORT[:-1], "seed=2"], tmp_path / "c")
    assert different["val"] != first["val"]


def test_resume_continues_a_crashed_run_to_the_same_result(tmp_path):
    reference = run_training([*SHORT, "eval_checkpoint=last"], tmp_path / "reference")
    crashing = [*SHORT, "eval_checkpoint=last", "+callbacks.crash._target_=fault_callbacks.CrashAfterEpoch",
                "+callbacks.crash.epoch=1"]  # fmt: skip
    with pytest.raises(RuntimeError, match="injected crash"):
        run_training(crashing, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    resumed = run_training([*SHORT, "eval_checkpoint=last", "resume=true"], tmp_path / "run")
    assert resumed["epochs_completed"] == 3
    assert resumed["test"] == reference["test"]
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 3


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    done = _cli("--cfg", "job", "loss=supcon", f"paths.log_dir={tmp_path}")
    assert done.returncode == 0
    assert "_target_: losslab.losses.SupCon" in done.stdout and "temperature: 0.1" in done.stdout
    assert not any(tmp_path.iterdir())


def test_missing_data_is_one_clear_error_without_traceback(tmp_path):
    done = _cli("dataset=cifar10", "dataset.download=false", f"paths.data_dir={tmp_path / 'empty'}",
                f"paths.log_dir={tmp_path / 'out'}", env={"LOSSLAB_DATA_DIR": ""})  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cifar10" in done.stderr and str(tmp_path / "empty") in done.stderr
    assert "download" in done.stderr


def test_console_script_is_installed_and_shares_the_entry_point():
    script = Path(sys.executable).parent / "losslab-train"
    assert script.exists()
    done = subprocess.run([str(script), "--cfg", "job", "dataset=digits"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "name: digits" in done.stdout


def test_multirun_gives_one_run_directory_per_job(tmp_path):
    done = _cli("-m", "loss=ce,label_smoothing", "dataset=digits", "debug=fdr", "trainer.enable_progress_bar=false",
                f"paths.log_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(runs) == 2
    assert {json.loads(r.read_text())["choices"]["loss"] for r in runs} == {"ce", "label_smoothing"}
