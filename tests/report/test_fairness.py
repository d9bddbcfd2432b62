"""Runs may differ only in the grouping keys, the seed and bookkeeping, unless a difference is allowed."""

import pytest
from synthetic_runs import write_run

from losslab.report import ReportError
from losslab.report.collect import load_runs
from losslab.report.fairness import check_fair


def load(root):
    return load_runs([str(root)])[0]


def test_seeds_names_paths_and_progress_bars_may_differ(tmp_path):
    write_run(tmp_path / "a", seed=0)
    # Another seed, name, directory (so checkpoint dirpath, default_root_dir, logger dir), thread count, bar.
    write_run(tmp_path / "elsewhere" / "b", seed=1, config={
        "num_threads": 2, "trainer.enable_progress_bar": False, "callbacks.rich_progress_bar.refresh_rate": 1,
        "tags": ["rerun"], "paths.root_dir": "/other_checkout", "dataset.seed": 1, "sweep_name": "again",
        "skip_completed": False, "resume": True,
    })
    assert check_fair(load(tmp_path), ["loss"], []) == []


def test_a_differing_learning_rate_is_refused_with_both_values(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", config={"optimizer.lr": 0.01})
    with pytest.raises(ReportError, match=r"optimizer\.lr: 0\.003 \(a\), 0\.01 \(b\)"):
        check_fair(load(tmp_path), ["loss"], [])


def test_an_allowed_difference_is_accepted_and_noted(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", config={"optimizer.lr": 0.01, "optimizer.weight_decay": 0.1})
    notes = check_fair(load(tmp_path), ["loss"], ["optimizer"])
    assert [note.split()[0] for note in notes] == ["optimizer.lr", "optimizer.weight_decay"]


def test_grouping_by_a_choice_ignores_its_config_group(tmp_path):
    write_run(tmp_path / "a", loss="ce")
    write_run(tmp_path / "b", loss="supcon", config={"loss.temperature": 0.1})
    assert check_fair(load(tmp_path), ["loss"], []) == []
    with pytest.raises(ReportError, match="loss._target_"):
        check_fair(load(tmp_path), ["optimizer"], [])


def test_grouping_by_a_config_key_ignores_only_that_key(tmp_path):
    write_run(tmp_path / "a", loss="supcon", config={"loss.temperature": 0.1})
    write_run(tmp_path / "b", loss="supcon", config={"loss.temperature": 0.5})
    write_run(tmp_path / "c", loss="supcon", config={"loss.temperature": 0.5, "loss.base_temperature": 0.07})
    with pytest.raises(ReportError, match="loss.base_temperature") as refused:
        check_fair(load(tmp_path), ["loss.temperature"], [])
    assert "loss.temperature:" not in str(refused.value)


def test_a_block_absent_from_some_runs_is_named_once(tmp_path):
    write_run(tmp_path / "a", config={"callbacks.early_stopping": {"patience": 3, "monitor": "val/acc"}})
    write_run(tmp_path / "b")
    with pytest.raises(ReportError) as refused:
        check_fair(load(tmp_path), ["loss"], [])
    message = str(refused.value)
    assert "callbacks.early_stopping: present (a), <missing> (b)" in message
    assert "patience" not in message and "\n" not in message
