"""``sweep=tuned_comparison`` on digits, for real: the same Optuna budget per loss, the best trial chosen on
validation, that trial's setting run again over seeds, and a relaunch that trains nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hydra_plugins.losslab_tuned_comparison.tuned_comparison_sweeper import (
    TunedComparisonConf,
    TunedComparisonSweeper,
)
from losslab.errors import ConfigError

# Hydra's plugin scan executes plugin modules anew, so the sweeper may raise a SweepConfigError class other
# than the one imported here; its base ConfigError (from losslab, imported once) is what tests match.
SweepConfigError = ConfigError

LOSSES = ["ce", "label_smoothing"]
SEEDS = [0, 1]
N_TRIALS = 2
QUIET = [
    "dataset=digits",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
]
SWEEP = [
    "sweep=tuned_comparison",
    f"hydra.sweeper.losses=[{','.join(LOSSES)}]",
    f"hydra.sweeper.n_trials={N_TRIALS}",
    f"hydra.sweeper.seeds=[{','.join(map(str, SEEDS))}]",
    *QUIET,
]
# Each loss's own searched key, besides the shared learning rate and weight decay.
OWN_KEYS = {"ce": [], "label_smoothing": ["loss.epsilon"]}


def train_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *args]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        command, check=False, capture_output=True, text=True, cwd=REPO, timeout=300, env=environment
    )


def dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def results(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def keys_anywhere(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {key for value in tree.values() for key in keys_anywhere(value)}
    if isinstance(tree, list):
        return {key for value in tree for key in keys_anywhere(value)}
    return set()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """The sweep, run once: (sweep dir, tuned_comparison.json, the command's arguments)."""
    log_dir = tmp_path_factory.mktemp("tuned")
    arguments = [*SWEEP, f"paths.log_dir={log_dir}"]
    done = train_cli(*arguments)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    sweep_dir = log_dir / "multirun" / "tuned_comparison"
    record = json.loads((sweep_dir / "tuned_comparison.json").read_text())
    assert f"losslab-compare {sweep_dir / 'final'} --by loss" in done.stdout
    return sweep_dir, record, arguments


def test_every_loss_gets_the_same_budget_of_trials_on_its_own_search_space(sweep):
    sweep_dir, record, _ = sweep
    assert sorted(record["losses"]) == sorted(LOSSES)
    for loss in LOSSES:
        entry = record["losses"][loss]
        assert entry["budget"] == N_TRIALS and len(entry["trials"]) == N_TRIALS
        assert sorted(entry["search_space"]) == sorted(
            ["optimizer.lr", "optimizer.weight_decay", *OWN_KEYS[loss]]
        )
        trial_dirs = sorted(p for p in (sweep_dir / "tune" / loss).iterdir() if p.is_dir())
        assert trial_dirs == sorted(Path(trial["dir"]) for trial in entry["trials"])
        for trial in entry["trials"]:
            run = results(trial["dir"])
            assert trial["state"] == "COMPLETE" and run["status"] == "completed"
            assert run["choices"]["loss"] == loss and run["val"]["acc"] == pytest.approx(trial["value"])
            for key, value in trial["params"].items():
                assert dotted(run["config"], key) == pytest.approx(value, rel=1e-12)


def test_best_trial_is_chosen_on_the_validation_metric_only(sweep):
    _, record, _ = sweep
    assert record["optimized_metric"] == "val/acc" and record["direction"] == "maximize"
    for loss in LOSSES:
        entry = record["losses"][loss]
        values = [trial["value"] for trial in entry["trials"]]
        assert entry["best_value"] == max(values)
        best = entry["trials"][entry["best_trial"]]
        assert best["value"] == max(values) and best["params"] == entry["best_params"]
    assert not any("test" in key for key in keys_anywhere(record)), "the sweeper must never read test metrics"


def test_final_runs_repeat_each_best_setting_once_per_seed(sweep):
    sweep_dir, record, _ = sweep
    final_dirs = sorted(p for p in (sweep_dir / "final").iterdir() if p.is_dir())
    assert len(final_dirs) == len(LOSSES) * len(SEEDS)
    recorded = []
    for loss in LOSSES:
        entry = record["losses"][loss]
        assert sorted(run["seed"] for run in entry["final_runs"]) == SEEDS
        for final in entry["final_runs"]:
            run = results(final["dir"])
            recorded.append(Path(final["dir"]))
            assert final["state"] == "COMPLETE" and run["status"] == "completed"
            assert run["choices"]["loss"] == loss and run["seed"] == final["seed"] == run["config"]["seed"]
            for key, value in entry["best_params"].items():
                assert dotted(run["config"], key) == pytest.approx(value, rel=1e-12), key
            assert "acc" in run["test"]
    assert sorted(recorded) == final_dirs


def test_relaunching_the_same_command_skips_every_run(sweep):
    sweep_dir, record, arguments = sweep
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("**/results.json")}
    assert len(stamps) == len(LOSSES) * (N_TRIALS + len(SEEDS))
    done = train_cli(*arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("identical run already completed, skipping") == len(stamps)
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("**/results.json")} == stamps
    assert json.loads((sweep_dir / "tuned_comparison.json").read_text()) == record


def test_failed_trials_are_told_to_optuna_and_the_sweep_goes_on(tmp_path):
    # With sampler_seed=0 the crash choice comes out -1 (crash as training starts), 99 (never), -1.
    done = train_cli(
        "sweep=tuned_comparison", "hydra.sweeper.losses=[ce]", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.seeds=[0]",
        '+hydra.sweeper.search_spaces.ce={callbacks.crash.epoch:"choice(-1,99)"}',
        "+callbacks.crash={_target_:fault_callbacks.CrashAfterEpoch,epoch:99}",
        *QUIET, f"paths.log_dir={tmp_path}", "sweep_name=failing",
        env={"PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    entry = json.loads((tmp_path / "multirun" / "failing" / "tuned_comparison.json").read_text())["losses"][
        "ce"
    ]
    states = [trial["state"] for trial in entry["trials"]]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 3
    for trial in entry["trials"]:
        crashed = trial["params"]["callbacks.crash.epoch"] == -1
        assert (trial["state"] == "FAIL") == crashed
        assert ("injected crash" in trial["error"]) if crashed else trial["error"] is None
    assert entry["best_params"]["callbacks.crash.epoch"] == 99
    assert [run["state"] for run in entry["final_runs"]] == ["COMPLETE"]


def test_preset_composes_the_sweeper_with_its_search_spaces(tmp_path):
    done = train_cli("--cfg", "hydra", "sweep=tuned_comparison", f"paths.log_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    hydra_cfg = yaml.safe_load(done.stdout)["hydra"]
    sweeper = hydra_cfg["sweeper"]
    assert sweeper["_target_"].endswith(
        "losslab_tuned_comparison.tuned_comparison_sweeper.TunedComparisonSweeper"
    )
    assert sweeper["losses"] == ["ce", "label_smoothing", "supcon"] and sweeper["seeds"] == [0, 1, 2]
    assert sweeper["n_trials"] == 10 and sweeper["n_jobs"] == 1 and sweeper["direction"] == "maximize"
    assert sweeper["shared"] == {"optimizer.lr": "tag(log, interval(1e-4, 3e-2))",
                                 "optimizer.weight_decay": "tag(log, interval(1e-6, 1e-2))"}  # fmt: skip
    assert sweeper["search_spaces"]["label_smoothing"] == {"loss.epsilon": "interval(0.0, 0.3)"}
    assert sweeper["search_spaces"]["supcon"] == {"loss.temperature": "tag(log, interval(0.03, 1.0))"}
    assert (
        hydra_cfg["mode"] == "MULTIRUN"
        and hydra_cfg["runtime"]["choices"]["hydra/sweeper"] == "tuned_comparison"
    )
    assert not any(tmp_path.iterdir())


def test_preset_names_its_sweep_directory(tmp_path):
    done = train_cli("--cfg", "job", "sweep=tuned_comparison", f"paths.log_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load(done.stdout)["sweep_name"] == "tuned_comparison"


def test_unknown_loss_is_named_with_the_available_choices_before_any_run(tmp_path):
    done = train_cli("sweep=tuned_comparison", "hydra.sweeper.losses=[ce,focal_typo]", *QUIET,
                     f"paths.log_dir={tmp_path}")  # fmt: skip
    assert done.returncode != 0
    available = sorted(
        p.stem for p in (REPO / "configs" / "loss").glob("*.yaml") if not p.stem.startswith("_")
    )
    assert "hydra.sweeper.losses" in done.stderr and "focal_typo" in done.stderr
    assert f"available: {', '.join(available)}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("**/results.json"))


def sweeper(**changes) -> TunedComparisonSweeper:
    fields = TunedComparisonConf.__dataclass_fields__.values()
    defaults = {field.name: field.default_factory() if callable(field.default_factory) else field.default
                for field in fields if field.name != "_target_"}  # fmt: skip
    return TunedComparisonSweeper(**{**defaults, "losses": ["ce"], **changes})


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_trials": 0}, "hydra.sweeper.n_trials=0"),
    ({"seeds": []}, "hydra.sweeper.seeds=[]"),
    ({"losses": ["ce", "ce"]}, "list each loss to compare once"),
    ({"direction": "up"}, "hydra.sweeper.direction='up'"),
])  # fmt: skip
def test_invalid_sweeper_settings_are_rejected(changes, message):
    with pytest.raises(SweepConfigError, match=re.escape(message)):
        sweeper(**changes)._validate(["ce", "label_smoothing"])


def test_a_key_fixed_on_the_command_line_is_not_searched():
    space = sweeper(search_spaces={"ce": {"loss.x": "interval(0.0, 1.0)"}})._search_space(
        "ce", {"optimizer.weight_decay"}
    )
    assert sorted(space.distributions) == ["loss.x", "optimizer.lr"]


def test_a_single_value_is_not_a_search_space():
    with pytest.raises(
        SweepConfigError, match=r"hydra.sweeper.search_spaces.ce.loss.x='0.1' is a single value"
    ):
        sweeper(search_spaces={"ce": {"loss.x": "0.1"}})._search_space("ce", set())


@pytest.mark.parametrize("argument", ["loss=supcon", "optimizer.lr=0.1,0.2"])
def test_command_line_may_not_choose_the_loss_or_sweep_values(argument):
    with pytest.raises(SweepConfigError, match="hydra.sweeper"):
        sweeper()._command_line([argument])
