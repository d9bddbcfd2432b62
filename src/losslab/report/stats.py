"""Statistics over seeds: mean, sample std, t-based 95% CI, ranks, Welch and paired t-tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from losslab.report import ReportError

# Direction of each metric family by name prefix; "acc" also covers acc_top5, "ece" ece_ts. Brier and NLL
# are proper scoring rules; map, f1, acc_subset and hamming (the fraction of wrong labels) are the multi-label metrics.
# The representation metrics (losslab.retrieval): knn_acc, map_at_r, precision_at_1, r_precision, recall_at_k, and
# Wang & Isola's alignment and uniformity, both lower for a better-aligned, more uniform embedding.
HIGHER_IS_BETTER = {"acc": True, "loss": False, "nll": False, "ece": False, "adaptive_ece": False,
                    "classwise_ece": False, "brier": False, "map": True, "f1": True, "hamming": False,
                    "knn_acc": True, "precision_at": True, "r_precision": True, "recall_at": True,
                    "alignment": False, "uniformity": False}


def higher_is_better(metric: str) -> bool:
    """Direction of ``test/acc``, ``val/ece``, ...; unknown metrics need --higher-is-better/--lower-is-better."""
    name = metric.rpartition("/")[2]
    for family, higher in HIGHER_IS_BETTER.items():
        if name.startswith(family):
            return higher
    raise ReportError(
        f"no known direction for {metric}: pass --higher-is-better or --lower-is-better"
    )


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    ci95: float  # half-width


def summarize(values: list[float]) -> Summary:
    """Mean, sample standard deviation (ddof=1) and the 95% CI half-width t(0.975, n-1)·std/√n."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    if n < 2:
        return Summary(n, float(array.mean()), math.nan, math.nan)
    std = float(array.std(ddof=1))
    return Summary(n, float(array.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


def welch_p(values: list[float], baseline: list[float]) -> float:
    """Two-sided Welch t-test (unequal variances); NaN when either side has fewer than two runs."""
    if len(values) < 2 or len(baseline) < 2:
        return math.nan
    return float(stats.ttest_ind(values, baseline, equal_var=False).pvalue)


def paired_p(values: pd.Series, baseline: pd.Series) -> float:
    """Two-sided paired t-test on values indexed by seed; NaN unless both groups ran the same seeds, each
    once, at least two. Pairing removes the variation both objectives share per seed (split, initialisation)."""
    same_seeds = values.index.is_unique and baseline.index.is_unique and set(values.index) == set(baseline.index)
    if not same_seeds or len(values) < 2:
        return math.nan
    return float(stats.ttest_rel(values.to_numpy(), baseline.reindex(values.index).to_numpy()).pvalue)


def rank(means: pd.Series, higher: bool) -> pd.Series:
    """1 = best; ties share the better rank."""
    return means.rank(ascending=not higher, method="min").astype("Int64")
