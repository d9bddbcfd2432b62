"""The comparison table against hand-computed statistics, and how it prints."""

import math

import pytest
from scipy import stats
from synthetic_runs import write_run, write_two_losses

from losslab.report import ReportError
from losslab.report.collect import load_runs
from losslab.report.table import build_table, display_table, group_runs, pick_baseline, to_latex, to_markdown

CE, FOCAL = [0.90, 0.92, 0.94], [0.93, 0.95, 0.96]


def tabulate(root, by=("loss",), metric="test/acc", baseline=None, higher=True):
    groups = group_runs(load_runs([str(root)])[0], list(by))
    chosen = pick_baseline(groups, baseline)
    return build_table(groups, list(by), metric, chosen, higher), chosen.label


def test_rows_hold_hand_computed_statistics(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    table, baseline = tabulate(two_losses)
    ce, focal = table.set_index("group").loc["ce"], table.set_index("group").loc["focal"]
    assert baseline == "ce"
    assert (ce["n"], ce["mean"], ce["std"]) == (3, pytest.approx(0.92), pytest.approx(0.02))
    assert ce["ci95"] == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert focal["delta"] == pytest.approx(sum(FOCAL) / 3 - 0.92)
    assert focal["p_welch"] == pytest.approx(stats.ttest_ind(FOCAL, CE, equal_var=False).pvalue)
    assert focal["p_paired"] == pytest.approx(stats.ttest_rel(FOCAL, CE).pvalue)
    assert math.isnan(ce["p_welch"]) and math.isnan(ce["p_paired"]) and ce["delta"] == 0
    assert (focal["rank"], ce["rank"]) == (1, 2)
    assert (focal["seconds_per_epoch"], focal["wall_time_s"], focal["parameters"]) == (2.0, 7.0, 824810)


def test_paired_p_is_absent_when_seeds_differ(tmp_path):
    for seed, value in enumerate(CE):
        write_run(tmp_path / f"ce_{seed}", seed=seed, test={"acc": value})
        write_run(tmp_path / f"focal_{seed}", loss="focal", seed=seed + 10, test={"acc": FOCAL[seed]})
    focal = tabulate(tmp_path)[0].set_index("group").loc["focal"]
    assert math.isnan(focal["p_paired"]) and not math.isnan(focal["p_welch"])


def test_ece_ranks_the_lower_mean_first(tmp_path):
    write_run(tmp_path / "ce", test={"ece": 0.02})
    write_run(tmp_path / "focal", loss="focal", test={"ece": 0.05})
    ranks = tabulate(tmp_path, metric="test/ece", higher=False)[0].set_index("group")["rank"]
    assert (ranks["ce"], ranks["focal"]) == (1, 2)


def test_baseline_is_ce_when_present_else_the_first_group(tmp_path):
    write_run(tmp_path / "a", loss="supcon")
    write_run(tmp_path / "b", loss="focal")
    assert tabulate(tmp_path)[1] == "focal"
    assert tabulate(tmp_path, baseline="supcon")[1] == "supcon"
    with pytest.raises(ReportError, match="no such group"):
        tabulate(tmp_path, baseline="ce")


def test_groups_by_a_config_key_in_numeric_order(tmp_path):
    for temperature in (0.5, 0.07, 0.1):
        write_run(tmp_path / f"t{temperature}", loss="supcon", config={"loss.temperature": temperature})
    assert tabulate(tmp_path, by=["loss.temperature"])[0]["group"].tolist() == ["0.07", "0.1", "0.5"]


def test_groups_by_two_keys(tmp_path):
    for loss in ("ce", "focal"):
        for lr in (0.01, 0.001):
            write_run(tmp_path / f"{loss}_{lr}", loss=loss, config={"optimizer.lr": lr})
    table, baseline = tabulate(tmp_path, by=["loss", "optimizer.lr"])
    assert table["group"].tolist() == ["loss=ce, optimizer.lr=0.001", "loss=ce, optimizer.lr=0.01",
                                       "loss=focal, optimizer.lr=0.001", "loss=focal, optimizer.lr=0.01"]
    assert table["optimizer.lr"].tolist() == [0.001, 0.01, 0.001, 0.01]
    assert baseline == "loss=ce, optimizer.lr=0.001"


def test_a_key_missing_from_a_run_is_a_report_error(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    with pytest.raises(ReportError, match="--by optimizer.momentum"):
        tabulate(two_losses, by=["optimizer.momentum"])


def test_accuracy_prints_as_percent_mean_and_std(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    table, baseline = tabulate(two_losses)
    display = display_table(table, ["loss"], "test/acc", baseline).set_index("loss")
    assert display.loc["ce", "test/acc (%)"] == "92.00 ± 2.00"
    assert display.loc["ce", "95% CI"] == f"± {100 * 4.302652729911275 * 0.02 / math.sqrt(3):.2f}"
    assert display.loc["focal", "Δ vs ce"] == "+2.67"
    assert display.loc["ce", "Δ vs ce"] == display.loc["ce", "p (Welch)"] == "—"
    assert display.loc["focal", "params"] == "824,810"


def test_markdown_and_latex_tables_have_one_row_per_group(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    table, baseline = tabulate(two_losses)
    display = display_table(table, ["loss"], "test/acc", baseline)
    markdown = to_markdown(display).splitlines()
    assert len(markdown) == 4 and markdown[1].startswith("| :--- | ---:")
    assert markdown[2].startswith("| ce | 3 | 92.00 ± 2.00 |")
    latex = to_latex(display)
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    assert r"92.00 $\pm$ 2.00" in latex and r"test/acc (\%)" in latex and r"$\Delta$ vs ce" in latex
