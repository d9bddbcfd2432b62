"""``losslab-compare``: compare finished runs grouped by a config key, with statistics over seeds.

    losslab-compare outputs/runs --by loss --metric test/acc
    losslab-compare 'outputs/runs/sweep_*' --by loss --sweep-param optimizer.lr --allow-differ optimizer.lr
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from losslab.errors import LossLabError
from losslab.report import ReportError, html, plots
from losslab.report.collect import default_output_dir, load_runs
from losslab.report.fairness import check_fair
from losslab.report.stats import higher_is_better
from losslab.report.table import (
    Group,
    build_table,
    display_table,
    group_runs,
    pick_baseline,
    runs_table,
    to_latex,
    to_markdown,
)

FORMATS = ("md", "csv", "tex", "html")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="losslab-compare",
        description="Compare finished LossLab runs (results.json) grouped by a config key, over seeds.",
        epilog="Give the directories first: --by and --allow-differ take every word that follows them.",
    )
    parser.add_argument("inputs", nargs="+", metavar="DIR_OR_GLOB",
                        help="run directories, parents of run directories, or glob patterns (searched recursively)")
    # "extend": both `--by loss optimizer.lr` and `--by loss --by optimizer.lr` work.
    parser.add_argument("--by", nargs="+", action="extend", metavar="KEY",
                        help="group by these Hydra choices or dotted config keys (default: loss)")
    parser.add_argument("--metric", default="test/acc", help="split/name in results.json (default: test/acc)")
    parser.add_argument("--baseline", help="group the others are tested against (default: ce if present, else the first)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher", action="store_true", default=None,
                           help="rank by this direction (known for acc*, loss, nll, ece*, adaptive_ece*, "
                                "classwise_ece*, brier*, map*, f1*, hamming)")
    direction.add_argument("--lower-is-better", dest="higher", action="store_false")
    parser.add_argument("--allow-differ", nargs="+", action="extend", default=[], metavar="KEY",
                        help="config keys (dotted prefixes) runs may differ in besides the grouping keys and seed")
    parser.add_argument("--sweep-param", metavar="KEY", help="also plot the metric against this config key")
    parser.add_argument("--out", type=Path, help="output directory (default: <first input>/report)")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated table formats among {','.join(FORMATS)} (figures are always written)")
    args = parser.parse_args(argv)
    args.by = args.by or ["loss"]
    args.format = [name.strip() for name in args.format.split(",") if name.strip()]
    unknown = sorted(set(args.format) - set(FORMATS))
    if unknown:
        parser.error(f"--format {','.join(unknown)}: choose among {','.join(FORMATS)}")
    return args


@dataclass
class Report:
    table: pd.DataFrame
    display: pd.DataFrame
    notes: list[str]
    out_dir: Path
    written: list[Path] = field(default_factory=list)


def compare(args: argparse.Namespace) -> Report:
    """Load, check, tabulate, plot and write; raises ``LossLabError`` for anything the user can fix."""
    if "/" not in args.metric:
        raise ReportError(f"--metric {args.metric}: expected split/name, e.g. test/acc or val/ece")
    higher = higher_is_better(args.metric) if args.higher is None else args.higher
    runs, skipped = load_runs(args.inputs)
    # The swept key varies by design: allow it, and say so in the notes.
    allowed = [*args.allow_differ, *([args.sweep_param] if args.sweep_param else [])]
    notes = check_fair(runs, args.by, allowed)
    if skipped:
        notes.insert(0, f"skipped {skipped} run(s) whose status is not completed")
    groups = group_runs(runs, args.by)
    baseline = pick_baseline(groups, args.baseline)
    table = build_table(groups, args.by, args.metric, baseline, higher)
    display = display_table(table, args.by, args.metric, baseline.label)
    notes += _caveats(groups, table, args, higher, baseline.label)

    out_dir = args.out or default_output_dir(args.inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(table, display, notes, out_dir)
    figures = [(f"{args.metric} per group: runs (grey), mean and 95% CI",
                plots.save(plots.metric_plot(groups, table, args.metric), out_dir, "metric"))]
    optional = [
        ("learning curves: mean ± std over seeds", "learning_curves", plots.learning_curves(groups)),
        (f"{args.metric} against {args.sweep_param}", "sweep",
         plots.sweep_plot(groups, args.sweep_param, args.metric) if args.sweep_param else None),
        ("reliability diagrams on the test set, bins summed over seeds", "reliability",
         plots.reliability_diagrams(groups)),
    ]
    figures += [(caption, plots.save(figure, out_dir, name)) for caption, name, figure in optional if figure]
    for _, png in figures:
        report.written += [png, png.with_suffix(".pdf")]

    notes_md = "".join(f"\n- {note}" for note in notes)
    contents = {
        "md": lambda: to_markdown(display) + ("\n\nNotes:\n" + notes_md if notes else "") + "\n",
        "csv": lambda: table.to_csv(index=False),
        "tex": lambda: to_latex(display),
        "html": lambda: html.render(f"LossLab comparison: {args.metric} by {', '.join(args.by)}", display, notes,
                                    runs_table(groups, args.metric), figures),
    }
    for name in args.format:
        path = out_dir / ("report.html" if name == "html" else f"table.{name}")
        path.write_text(contents[name]())
        report.written.append(path)
    return report


def _has_reruns(group: Group, sweep_param: str | None) -> bool:
    keys = [(run.seed, str(run.lookup(sweep_param)) if sweep_param else None) for run in group.runs]
    return len(set(keys)) < len(keys)


def _caveats(groups: list[Group], table: pd.DataFrame, args: argparse.Namespace, higher: bool,
             baseline: str) -> list[str]:
    """What a reader should know before trusting a number in the table."""
    notes = [f"rank 1 is the {'highest' if higher else 'lowest'} mean {args.metric}"]
    if args.sweep_param:
        notes.append(f"table rows pool every value of {args.sweep_param}; see the sweep figure")
    single = table.loc[table["n"] < 2, "group"].tolist()
    if single:
        notes.append(f"one run only (no std, CI or test): {', '.join(single)}")
    # Within a sweep a seed recurs once per swept value; only a repeat at the same value is a rerun.
    repeated = [group.label for group in groups if _has_reruns(group, args.sweep_param)]
    if repeated:
        notes.append(f"a seed ran more than once (its spread is not seed-to-seed variation): {', '.join(repeated)}")
    unpaired = table.loc[(table["group"] != baseline) & (table["n"] >= 2) & table["p_paired"].isna(), "group"]
    if len(unpaired):
        notes.append(f"no paired test (needs exactly {baseline}'s seeds, each once): {', '.join(unpaired)}")
    return notes


def print_report(report: Report, console: Console) -> None:
    table = Table(title="LossLab comparison", header_style="bold", box=box.SIMPLE_HEAD)
    for index, column in enumerate(report.display.columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in report.display.itertuples(index=False):
        table.add_row(*map(str, row))
    console.print(table)
    for note in report.notes:
        console.print(f"  • {note}", highlight=False)
    console.print(f"wrote {len(report.written)} files to {report.out_dir}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 for user errors, with a one-line message)."""
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and bad usage (2): return it like any other code
        return stop.code if isinstance(stop.code, int) else 0
    try:
        report = compare(args)
    except LossLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Piped output has no terminal width; rich would squeeze the table into 80 columns.
    console = Console()
    print_report(report, console if console.is_terminal else Console(width=200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
