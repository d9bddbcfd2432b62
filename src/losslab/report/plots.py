"""Figures, each saved as PNG (for the HTML report) and PDF (for papers).

Built on ``matplotlib.figure.Figure`` rather than pyplot: no global figure state and no GUI backend,
so the report runs headless and figures are freed with their last reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from losslab.report import ReportError
from losslab.report.collect import MISSING
from losslab.report.table import Group

# Panels of the learning curves; one is drawn when some run logged its column (val/map: multi-label runs).
CURVES = (("val/acc", "validation accuracy"), ("val/map", "validation mAP"), ("train/loss", "training loss"))


def save(figure: Figure, out_dir: Path, name: str) -> Path:
    """Write ``name.png`` and ``name.pdf``; return the PNG's path."""
    figure.tight_layout()
    for suffix in ("png", "pdf"):
        figure.savefig(out_dir / f"{name}.{suffix}", dpi=150)
    return out_dir / f"{name}.png"


def metric_plot(groups: list[Group], table: pd.DataFrame, metric: str) -> Figure:
    """Each run as a dot, each group's mean with its 95% CI."""
    figure = Figure(figsize=(max(4.5, 1.2 + 0.9 * len(groups)), 3.6))
    axes = figure.add_subplot()
    positions = np.arange(len(groups))
    for position, group in zip(positions, groups):
        values = group.metric(metric)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        axes.scatter(position + np.asarray(jitter), values, s=12, color="0.6", zorder=2)
    axes.errorbar(positions, table["mean"], yerr=table["ci95"].fillna(0.0), fmt="o", color="C0", capsize=4, zorder=3)
    crowded = len(groups) > 4
    axes.set_xticks(positions, table["group"], rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: mean and 95% CI over seeds", fontsize="medium")
    axes.grid(axis="y", alpha=0.3)
    return figure


def learning_curves(groups: list[Group]) -> Figure | None:
    """Mean ± std over seeds per epoch of validation accuracy (mAP for multi-label runs) and training loss;
    None without metrics.csv."""
    curves = [(column, title) for column, title in CURVES
              if any(run.curves is not None and column in run.curves for group in groups for run in group.runs)]
    figure = Figure(figsize=(5 * max(1, len(curves)), 3.6))
    plotted = False
    for index, (column, title) in enumerate(curves):
        axes = figure.add_subplot(1, len(curves), index + 1)
        for color, group in enumerate(groups):
            frames = [run.curves[["epoch", column]] for run in group.runs
                      if run.curves is not None and column in run.curves]
            if not frames:
                continue
            per_epoch = pd.concat(frames).groupby("epoch")[column].agg(["mean", "std"]).fillna({"std": 0.0})
            axes.plot(per_epoch.index, per_epoch["mean"], color=f"C{color}", label=group.label)
            axes.fill_between(per_epoch.index, per_epoch["mean"] - per_epoch["std"],
                              per_epoch["mean"] + per_epoch["std"], color=f"C{color}", alpha=0.2)
            plotted = True
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title)
        axes.grid(alpha=0.3)
    if not plotted:
        return None
    figure.axes[0].legend(fontsize="small")
    return figure


def sweep_plot(groups: list[Group], key: str, metric: str) -> Figure:
    """``metric`` against the value of ``key`` in each run's config, one line (mean ± std) per group."""
    figure = Figure(figsize=(6, 3.8))
    axes = figure.add_subplot()
    xs = []
    for color, group in enumerate(groups):
        settings = [run.lookup(key) for run in group.runs]
        if any(x is MISSING for x in settings):
            raise ReportError(f"--sweep-param {key}: not a choice or config key of every run in group {group.label}")
        points = pd.DataFrame({"x": settings, "y": group.metric(metric).to_numpy()})
        per_x = points.groupby("x")["y"].agg(["mean", "std"]).fillna({"std": 0.0})
        axes.errorbar(per_x.index, per_x["mean"], yerr=per_x["std"], marker="o", capsize=3,
                      color=f"C{color}", label=group.label)
        xs += list(per_x.index)
    numeric = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    # Learning rates and weight decays are swept over decades: spread them evenly.
    if len(numeric) == len(xs) and min(numeric) > 0 and max(numeric) / min(numeric) >= 100:
        axes.set_xscale("log")
    axes.set_xlabel(key)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against {key} (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def reliability_bins(group: Group) -> pd.DataFrame | None:
    """Bins of calibration.test summed over the group's runs: counts add, means are count-weighted."""
    frames = []
    for run in group.runs:
        bins = (run.results.get("calibration") or {}).get("test") or {}
        if bins.get("count"):
            frames.append(pd.DataFrame(bins))
    if not frames:
        return None
    stacked = pd.concat(frames)
    weighted = stacked[["mean_confidence", "accuracy"]].mul(stacked["count"], axis=0)
    weighted[["bin_upper_edges", "count"]] = stacked[["bin_upper_edges", "count"]]
    summed = weighted.groupby("bin_upper_edges").sum()
    means = summed[["mean_confidence", "accuracy"]].div(summed["count"].clip(lower=1), axis=0)
    return means.assign(count=summed["count"]).reset_index()


def reliability_diagrams(groups: list[Group]) -> Figure | None:
    """Accuracy against confidence per bin (Guo et al. 2017) for each group with calibration data."""
    binned = [(group, bins) for group in groups if (bins := reliability_bins(group)) is not None]
    if not binned:
        return None
    columns = min(4, len(binned))
    rows = math.ceil(len(binned) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))
    for index, (group, bins) in enumerate(binned):
        axes = figure.add_subplot(rows, columns, index + 1)
        width = 1 / len(bins)
        total = bins["count"].sum()
        ece = float((bins["count"] * (bins["accuracy"] - bins["mean_confidence"]).abs()).sum() / total)
        axes.bar(bins["bin_upper_edges"] - width / 2, bins["accuracy"], width=width, edgecolor="black",
                 linewidth=0.5, color="C0", label="accuracy")
        axes.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence")
        axes.set_ylabel("accuracy")
        axes.set_title(f"{group.label} (ECE {100 * ece:.2f}%)", fontsize="medium")
    figure.axes[0].legend(fontsize="x-small", loc="upper left")
    return figure
