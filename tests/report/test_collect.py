"""Finding results.json under directories and globs, and reading values out of a run."""

from pathlib import Path

import pytest
from synthetic_runs import write_run

from losslab.report import ReportError
from losslab.report.collect import MISSING, default_output_dir, load_runs


def test_finds_runs_recursively_under_a_directory(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "sweep" / "lr_0.1" / "b")
    runs, skipped = load_runs([str(tmp_path)])
    assert sorted(run.directory.name for run in runs) == ["a", "b"] and skipped == 0


def test_glob_selects_only_matching_runs(tmp_path):
    for name in ("focal_0", "focal_1", "ce_0"):
        write_run(tmp_path / name)
    runs, _ = load_runs([f"{tmp_path}/focal_*", str(tmp_path / "focal_0" / "results.json")])
    assert sorted(run.directory.name for run in runs) == ["focal_0", "focal_1"]


def test_unfinished_runs_are_skipped_and_counted(tmp_path):
    write_run(tmp_path / "done")
    write_run(tmp_path / "crashed", status="failed")
    runs, skipped = load_runs([str(tmp_path)])
    assert [run.directory.name for run in runs] == ["done"] and skipped == 1


def test_nothing_found_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="no completed runs"):
        load_runs([str(tmp_path)])
    with pytest.raises(ReportError, match="no such file"):
        load_runs([str(tmp_path / "typo*")])


def test_lookup_reads_choices_first_then_the_dotted_config(tmp_path):
    write_run(tmp_path / "a", loss="supcon", config={"loss.temperature": 0.1})
    run = load_runs([str(tmp_path)])[0][0]
    assert run.lookup("loss") == "supcon"
    assert run.lookup("loss.temperature") == 0.1
    assert run.lookup("optimizer.lr") == 0.003
    assert run.lookup("optimizer.momentum") is MISSING
    assert run.metric("val/ece") == 0.05


def test_peak_memory_prefers_device_memory(tmp_path):
    write_run(tmp_path / "gpu", peak_memory_mb={"host_rss": 3000.0, "cuda_allocated": 900.0})
    assert load_runs([str(tmp_path)])[0][0].peak_memory_mb == 900.0


@pytest.mark.parametrize(
    "first, expected", [("runs", "runs/report"), ("runs/focal_*", "runs/report"), ("runs/*/results.json", "runs/report")]
)
def test_default_output_dir_is_under_the_first_input(first, expected):
    assert default_output_dir([first, "elsewhere"]) == Path(expected)
