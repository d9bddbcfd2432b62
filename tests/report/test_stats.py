"""Statistics over seeds against hand computations of their formulas."""

import math

import pandas as pd
import pytest
from scipy import stats

from losslab.report import ReportError
from losslab.report.stats import higher_is_better, paired_p, rank, summarize, welch_p

T_975_DF2 = 4.302652729911275  # t-distribution 97.5% quantile with 2 degrees of freedom, from tables


def hand_welch_p(a: list[float], b: list[float]) -> float:
    """Welch's t statistic with Welch–Satterthwaite degrees of freedom, two-sided."""
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    se_a, se_b = var_a / len(a), var_b / len(b)
    t = (mean_a - mean_b) / math.sqrt(se_a + se_b)
    df = (se_a + se_b) ** 2 / (se_a**2 / (len(a) - 1) + se_b**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_summary_of_three_values_matches_hand_computation():
    summary = summarize([0.90, 0.92, 0.94])
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.92)
    assert summary.std == pytest.approx(0.02)
    assert summary.ci95 == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))


def test_single_run_has_no_std_or_interval():
    summary = summarize([0.9])
    assert summary.mean == 0.9 and math.isnan(summary.std) and math.isnan(summary.ci95)


def test_welch_p_matches_scipy_and_the_hand_formula():
    a, b = [0.93, 0.95, 0.96], [0.90, 0.92, 0.94, 0.89]
    p = welch_p(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert p == pytest.approx(hand_welch_p(a, b))


def test_welch_p_needs_two_runs_per_side():
    assert math.isnan(welch_p([0.9], [0.8, 0.85]))


def test_paired_p_matches_values_by_seed_not_by_order():
    values = pd.Series([0.96, 0.93, 0.95], index=[2, 0, 1])
    baseline = pd.Series([0.90, 0.92, 0.94], index=[0, 1, 2])
    differences = [0.93 - 0.90, 0.95 - 0.92, 0.96 - 0.94]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    hand = 2 * stats.t.sf(abs(mean / (sd / math.sqrt(3))), 2)
    assert paired_p(values, baseline) == pytest.approx(hand)
    assert paired_p(values, baseline) == pytest.approx(stats.ttest_rel([0.93, 0.95, 0.96], [0.90, 0.92, 0.94]).pvalue)


@pytest.mark.parametrize("seeds", [[0, 1, 3], [0, 1], [0, 0, 1]])
def test_paired_p_is_absent_unless_seeds_match_one_to_one(seeds):
    values = pd.Series([0.93, 0.95, 0.96][: len(seeds)], index=seeds)
    baseline = pd.Series([0.90, 0.92, 0.94], index=[0, 1, 2])
    assert math.isnan(paired_p(values, baseline))


@pytest.mark.parametrize("metric", ["test/acc", "val/acc_top5"])
def test_accuracies_are_better_higher(metric):
    assert higher_is_better(metric)


@pytest.mark.parametrize("metric", ["test/ece", "val/nll", "test/loss", "test/brier"])
def test_errors_are_better_lower(metric):
    assert not higher_is_better(metric)


def test_unknown_metric_direction_asks_for_a_flag():
    with pytest.raises(ReportError, match="--higher-is-better"):
        higher_is_better("test/auroc_weird")


def test_rank_1_is_the_best_in_either_direction_and_ties_share_it():
    means = pd.Series([0.90, 0.95, 0.90])
    assert rank(means, higher=True).tolist() == [2, 1, 2]
    assert rank(means, higher=False).tolist() == [1, 3, 1]
