"""Sweeps: presets, relaunching a killed sweep, parallel jobs sharing the cores, SLURM and Optuna presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose_config, run_training
from losslab.errors import ConfigError
from losslab.sweep import comparable_config, same_run

QUIET = ["dataset=digits", "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def train_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, **kwargs)  # fmt: skip


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "manifest.json").read_text())


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "sweep").glob("*.yaml")))
def test_sweep_presets_compose_into_multirun_sweeps(preset, tmp_path):
    cfg = compose_config([f"sweep={preset}"], tmp_path)
    text = (REPO / "configs" / "sweep" / f"{preset}.yaml").read_text()
    if "sweep_name:" in text:  # a fixed name, so launching it again finds the same directory
        assert cfg.sweep_name == yaml.safe_load(text)["sweep_name"]
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    assert str(hydra_cfg.mode).endswith("MULTIRUN")


def test_comparable_config_ignores_bookkeeping_only():
    base = {"seed": 0, "run_name": "a", "paths": {"output_dir": "/x"}, "resume": "auto",
            "trainer": {"max_epochs": 3, "default_root_dir": "/x", "enable_progress_bar": True},
            "callbacks": {"rich_progress_bar": {}, "last_checkpoint": {"dirpath": "/x"}}}  # fmt: skip
    renamed = {**base, "run_name": "b", "paths": {"output_dir": "/y"}, "resume": True,
               "trainer": {**base["trainer"], "default_root_dir": "/y", "enable_progress_bar": False},
               "callbacks": {"last_checkpoint": {"dirpath": "/y"}}}  # fmt: skip
    assert same_run(base, renamed)
    assert not same_run(base, {**base, "seed": 1})
    assert not same_run(base, {**base, "trainer": {**base["trainer"], "max_epochs": 4}})
    assert "rich_progress_bar" not in comparable_config(base)["callbacks"]
    moved = {**base, "paths": {"output_dir": "/elsewhere"}, "callbacks": {"last_checkpoint": {"dirpath": "/elsewhere"}}}
    assert same_run(base, moved)


def test_completed_run_is_returned_not_retrained(tmp_path):
    overrides = [*QUIET, "trainer.max_epochs=1"]
    first = run_training(overrides, tmp_path / "run")
    stamp = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    again = run_training(overrides, tmp_path / "run")
    assert again == json.loads((tmp_path / "run" / "results.json").read_text()) and again["test"] == first["test"]
    assert (tmp_path / "run" / "results.json").stat().st_mtime_ns == stamp
    changed = run_training([*QUIET, "trainer.max_epochs=2"], tmp_path / "run")  # another config: trains again
    assert changed["epochs_completed"] == 2


def test_sweeps_select_on_validation_metrics_only(tmp_path):
    with pytest.raises(ConfigError, match="optimized_metric='test/acc'"):
        run_training([*QUIET, "optimized_metric=test/acc"], tmp_path / "run")


def test_killed_sweep_relaunched_finishes_only_the_missing_runs(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", "loss=ce,label_smoothing", "seed=0,1",
               "trainer.max_epochs=2", *QUIET, f"paths.log_dir={tmp_path}", "sweep_name=killed"]  # fmt: skip
    sweep_dir = tmp_path / "multirun" / "killed"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while len(list(sweep_dir.glob("*/results.json"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/results.json")}
    assert 2 <= len(done_before) < 4, "the sweep must be killed half-way for this test to mean anything"

    relaunch = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/results.json")}
    assert len(finished) == 4
    assert all(finished[name] == stamp for name, stamp in done_before.items()), "completed runs were re-run"
    runs = manifest(sweep_dir)["runs"]
    assert {runs[name]["state"] for name in done_before} == {"skipped"}
    assert sorted(run["state"] for name, run in runs.items() if name not in done_before) == ["completed"] * (
        4 - len(done_before)
    )
    assert manifest(sweep_dir)["launches"] == 2


def test_parallel_joblib_jobs_share_the_cores(tmp_path):
    done = train_cli("sweep=seeds", "seed=0,1", "debug=fdr", *QUIET, "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", f"paths.log_dir={tmp_path}", "sweep_name=parallel")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    sweep_dir = tmp_path / "multirun" / "parallel"
    devices = [json.loads(p.read_text())["device"] for p in sweep_dir.glob("*/results.json")]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert devices == [f"cpu ({threads} threads) x1"] * 2
    assert manifest(sweep_dir)["counts"] == {"completed": 2}


def test_slurm_preset_composes_and_submitit_runs_jobs_locally(tmp_path):
    shown = train_cli("--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert shown.returncode == 0
    launcher = yaml.safe_load(shown.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] >= 1 and launcher["array_parallelism"] >= 1
    done = train_cli("-m", "seed=0,1", "debug=fdr", *QUIET, "hydra/launcher=submitit_local",
                     f"paths.log_dir={tmp_path}", "sweep_name=local")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "multirun" / "local").glob("*/results.json"))) == 2


def test_optuna_preset_tunes_on_the_validation_metric(tmp_path):
    done = train_cli("hparams_search=label_smoothing", "hydra.sweeper.n_trials=3",
                     "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=1", *QUIET,
                     f"paths.log_dir={tmp_path}", "sweep_name=optuna")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    sweep_dir = tmp_path / "multirun" / "optuna"
    trials = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    assert len(trials) == 3
    assert len({t["config"]["loss"]["epsilon"] for t in trials}) == 3
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t["val"]["acc"] for t in trials))


def test_a_sweep_with_a_failing_job_finishes_the_others_and_lists_the_failure(tmp_path):
    done = train_cli("-m", "loss=focal", "loss.gamma=-1,2", "debug=fdr", *QUIET, f"paths.log_dir={tmp_path}",
                     "sweep_name=one_fails")  # fmt: skip
    assert done.returncode != 0  # the sweep as a whole reports the failure ...
    runs = manifest(tmp_path / "multirun" / "one_fails")["runs"]
    states = {name.split("loss.gamma=")[1].split(",")[0]: run for name, run in runs.items()}
    assert states["2"]["state"] == "completed"  # ... after running the job that can run
    assert (tmp_path / "multirun" / "one_fails" / next(n for n in runs if "gamma=2" in n) / "results.json").is_file()
    assert states["-1"]["state"] == "failed" and "loss.gamma=-1: must be >= 0" in states["-1"]["error"]
