"""The comparison table: one row per group of runs, as raw numbers (CSV) and as a paper prints it
(Markdown, LaTeX booktabs)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from losslab.report import ReportError
from losslab.report.collect import MISSING, Run
from losslab.report.stats import paired_p, rank, summarize, welch_p

# Fractions printed in percent, as papers report accuracy, calibration errors and mAP.
PERCENT_METRICS = ("acc", "ece", "adaptive_ece", "classwise_ece", "map", "f1")
MISSING_CELL = "—"


@dataclass
class Group:
    label: str
    values: tuple
    runs: list[Run]

    def metric(self, name: str) -> pd.Series:
        """The metric of each run, indexed by seed."""
        return pd.Series([run.metric(name) for run in self.runs], index=[run.seed for run in self.runs])


def _hashable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value, sort_keys=True)


def _order(values: tuple) -> tuple:
    # Numbers in numeric order (0.1 < 0.5 < 1.0), then everything else alphabetically.
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in values)


def group_runs(runs: list[Run], by: list[str]) -> list[Group]:
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        values = tuple(run.lookup(key) for key in by)
        for key, value in zip(by, values):
            if value is MISSING:
                raise ReportError(f"{run.directory}: --by {key} is neither a choice nor a config key of this run")
        buckets.setdefault(tuple(map(_hashable, values)), []).append(run)
    groups = []
    for values in sorted(buckets, key=_order):
        label = str(values[0]) if len(by) == 1 else ", ".join(f"{k}={v}" for k, v in zip(by, values))
        groups.append(Group(label, values, buckets[values]))
    return groups


def pick_baseline(groups: list[Group], requested: str | None) -> Group:
    """The group named by --baseline; by default the one using ``ce`` if any, else the first."""
    if requested is None:
        return next((group for group in groups if "ce" in group.values), groups[0])
    for group in groups:
        if requested == group.label:
            return group
    raise ReportError(f"--baseline {requested}: no such group (groups: {', '.join(g.label for g in groups)})")


def build_table(groups: list[Group], by: list[str], metric: str, baseline: Group, higher: bool) -> pd.DataFrame:
    """Raw numbers, one row per group: statistics of ``metric`` over seeds, tests against the baseline, cost."""
    reference = baseline.metric(metric)
    rows = []
    for group in groups:
        values = group.metric(metric)
        summary = summarize(values.tolist())
        is_baseline = group is baseline
        rows.append({
            "group": group.label,
            **({key: value for key, value in zip(by, group.values)} if len(by) > 1 else {}),
            "n": summary.n,
            "mean": summary.mean,
            "std": summary.std,
            "ci95": summary.ci95,
            "delta": summary.mean - reference.mean(),
            "p_welch": math.nan if is_baseline else welch_p(values.tolist(), reference.tolist()),
            "p_paired": math.nan if is_baseline else paired_p(values, reference),
            "seconds_per_epoch": _mean([run.results.get("seconds_per_epoch") for run in group.runs]),
            "wall_time_s": _mean([run.results.get("wall_time_s") for run in group.runs]),
            "peak_memory_mb": max(run.peak_memory_mb for run in group.runs),
            "parameters": max((run.results.get("parameters") or {}).get("total", 0) for run in group.runs),
            "seeds": " ".join(str(run.seed) for run in group.runs),
        })
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("delta"), "rank", rank(table["mean"], higher))
    return table


def _mean(values: list[float | None]) -> float:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else math.nan


def _p_value(p: float) -> str:
    if math.isnan(p):
        return MISSING_CELL
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _number(value: float, fmt: str) -> str:
    return MISSING_CELL if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def display_table(table: pd.DataFrame, by: list[str], metric: str, baseline: str) -> pd.DataFrame:
    """Formatted strings: ``mean ± std`` (percent for accuracies and ECE), CI, Δ, p-values and cost."""
    percent = metric.rpartition("/")[2].startswith(PERCENT_METRICS)
    scale, digits, unit = (100, 2, " (%)") if percent else (1, 3, "")

    def scaled(value: float, sign: str = "") -> str:
        return _number(value * scale, f"{sign}.{digits}f")

    return pd.DataFrame({
        ", ".join(by): table["group"],
        "n": table["n"].astype(str),
        f"{metric}{unit}": [
            scaled(mean) if math.isnan(std) else f"{scaled(mean)} ± {scaled(std)}"
            for mean, std in zip(table["mean"], table["std"])
        ],
        "95% CI": [MISSING_CELL if math.isnan(ci) else f"± {scaled(ci)}" for ci in table["ci95"]],
        f"Δ vs {baseline}": [
            MISSING_CELL if label == baseline else scaled(d, "+") for label, d in zip(table["group"], table["delta"])
        ],
        "p (Welch)": table["p_welch"].map(_p_value),
        "p (paired)": table["p_paired"].map(_p_value),
        "rank": table["rank"].astype(str),
        "s/epoch": table["seconds_per_epoch"].map(lambda v: _number(v, ".1f")),
        "wall (s)": table["wall_time_s"].map(lambda v: _number(v, ".0f")),
        "peak mem (MB)": table["peak_memory_mb"].map(lambda v: _number(v, ".0f")),
        "params": table["parameters"].map(lambda v: f"{int(v):,}"),
    })


def to_markdown(display: pd.DataFrame) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", r"\|") for cell in cells) + " |"

    align = [":---"] + ["---:"] * (display.shape[1] - 1)
    return "\n".join([row(list(display.columns)), row(align), *(row(list(r)) for r in display.itertuples(index=False))])


def to_latex(display: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    styler = display.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    latex = styler.to_latex(hrules=True, column_format="l" + "r" * (display.shape[1] - 1))
    # Escaping leaves these as text; LaTeX typesets ±, Δ and < correctly only in math mode.
    for text, typeset in (("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("<", "$<$"), (MISSING_CELL, "--")):
        latex = latex.replace(text, typeset)
    return latex


def runs_table(groups: list[Group], metric: str) -> pd.DataFrame:
    """Every run that entered the table, so each number can be traced to its directory."""
    return pd.DataFrame(
        [{"run": str(run.directory), "seed": run.seed, "group": group.label, metric: run.metric(metric)}
         for group in groups for run in group.runs]
    )
