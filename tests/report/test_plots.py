"""Figures: reliability bins pooled over seeds, and figures skipped when their data is absent."""

import json

import pytest
from synthetic_runs import write_run

from losslab.report.collect import load_runs
from losslab.report.plots import learning_curves, reliability_bins, reliability_diagrams
from losslab.report.table import group_runs


def test_reliability_bins_add_counts_and_weight_means_by_count(tmp_path):
    write_run(tmp_path / "a")
    second = write_run(tmp_path / "b", seed=1)
    results = json.loads((second / "results.json").read_text())
    bins = results["calibration"]["test"]
    bins["count"][-1], bins["accuracy"][-1], bins["mean_confidence"][-1] = 300.0, 0.99, 0.98
    (second / "results.json").write_text(json.dumps(results))
    (group,) = group_runs(load_runs([str(tmp_path)])[0], ["loss"])
    top = reliability_bins(group).iloc[-1]
    # First run: 100 samples at accuracy 0.95, confidence 0.97; second: 300 at 0.99, 0.98.
    assert top["count"] == 400
    assert top["accuracy"] == pytest.approx((100 * 0.95 + 300 * 0.99) / 400)
    assert top["mean_confidence"] == pytest.approx((100 * 0.97 + 300 * 0.98) / 400)


def test_figures_without_data_are_skipped(tmp_path):
    run = write_run(tmp_path / "a", calibration=False)
    (run / "metrics.csv").unlink()
    groups = group_runs(load_runs([str(tmp_path)])[0], ["loss"])
    assert reliability_diagrams(groups) is None and learning_curves(groups) is None
