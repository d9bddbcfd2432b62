"""``losslab-reproduce paper/<name>``: run a paper recipe's rows over seeds and print ours beside the
published numbers.

A recipe (``configs/experiment/paper/<name>.yaml``) is an experiment with a ``paper`` block: the source,
the metric, the seeds and, per row, the published value and the overrides that state its setting. Each
row runs as one multirun over the seeds in the recipe's sweep directory (so a relaunch only finishes
missing runs); the runs carry ``paper_row=<row>`` and are grouped by it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from losslab.errors import LossLabError
from losslab.recording import write_atomic, write_json_atomic
from losslab.report.collect import dotted, load_runs
from losslab.report.stats import summarize
from losslab.train import config_dir


def load_recipe(name: str, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    """The recipe's ``paper`` block and its sweep directory, from the composed config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            cfg = compose("train", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)
        except Exception as error:  # Hydra's message lists the available recipes
            raise LossLabError(f"experiment={name}: {error}") from None
    if cfg.paper is None:
        raise LossLabError(f"experiment={name} has no `paper` block: it is not a paper recipe")
    paper = OmegaConf.to_container(cfg.paper, resolve=True)
    return paper, Path(cfg.paths.log_dir) / "multirun" / str(cfg.sweep_name)


def row_command(name: str, row: str, spec: dict[str, Any], seeds: list[int], jobs: int, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "losslab.train", "-m", f"experiment={name}", f"paper_row={row}",
               f"seed={','.join(str(s) for s in seeds)}", *spec.get("overrides", []), *extra]  # fmt: skip
    if jobs > 1:
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return command


def compare_with_paper(paper: dict[str, Any], sweep_dir: Path, rows: list[str]) -> list[dict[str, Any]]:
    """Per row: published value, ours (mean, std, 95% CI over seeds, n) and the difference."""
    runs, _ = load_runs([str(sweep_dir)]) if sweep_dir.exists() else ([], 0)
    metric = paper["metric"]
    table = []
    for row in rows:
        spec = paper["rows"][row]
        values = [run.metric(metric) for run in runs if dotted(run.config, "paper_row") == row]
        entry = {"row": row, "label": spec.get("label", row), "published": spec["published"],
                 "source_row": spec.get("source_row"), "n": len(values)}  # fmt: skip
        if values:
            summary = summarize(values)
            entry.update(mean=summary.mean, std=summary.std, ci95=summary.ci95,
                         difference=summary.mean - spec["published"])  # fmt: skip
        table.append(entry)
    return table


def to_markdown(paper: dict[str, Any], table: list[dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None or value != value else f"{100 * value:.2f}"

    lines = [f"{paper['source']} — {paper['metric']} (%), ours: mean ± std over seeds", "",
             "| row | published | ours | n | Δ (ours − published) |", "|---|---|---|---|---|"]  # fmt: skip
    for entry in table:
        ours = f"{pct(entry.get('mean'))} ± {pct(entry.get('std'))}" if entry["n"] else "not run"
        difference = f"{100 * entry['difference']:+.2f}" if entry["n"] else "—"
        lines.append(f"| {entry['label']} | {pct(entry['published'])} | {ours} | {entry['n']} | {difference} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="losslab-reproduce",
        description="Run a paper recipe and print ours beside the published numbers. "
        "Extra Hydra overrides for every run follow `--`.",
    )
    parser.add_argument("recipe", help="paper/<name>, a file of configs/experiment/paper/")
    parser.add_argument("--rows", help="comma-separated rows to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the recipe's)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel jobs (joblib launcher)")
    parser.add_argument("--report-only", action="store_true", help="do not train; compare what has been run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args, extra = parser.parse_known_args(argv)
    args.overrides = [a for a in extra if a != "--"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        paper, sweep_dir = load_recipe(args.recipe, args.overrides)
        rows = args.rows.split(",") if args.rows else list(paper["rows"])
        unknown = [row for row in rows if row not in paper["rows"]]
        if unknown:
            raise LossLabError(f"--rows {','.join(unknown)}: allowed values are {', '.join(paper['rows'])}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(paper.get("seeds", [0]))
        if not args.report_only:
            for row in rows:
                command = row_command(args.recipe, row, paper["rows"][row], seeds, args.jobs, args.overrides)
                console.print("losslab-train " + " ".join(command[4:]), highlight=False)
                if not args.dry_run and subprocess.run(command).returncode != 0:
                    raise LossLabError(f"row {row} failed; its runs are in {sweep_dir}")
            if args.dry_run:
                return 0
        table = compare_with_paper(paper, sweep_dir, rows)
    except LossLabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    markdown = to_markdown(paper, table)
    if sweep_dir.exists():
        write_atomic(sweep_dir / "reproduce.md", markdown)
        write_json_atomic(sweep_dir / "reproduce.json", {"paper": paper, "rows": table})
    shown = Table(title=f"{paper['source']} — {paper['metric']}")
    for column in ("row", "published", "ours (mean ± std)", "n", "Δ"):
        shown.add_column(column)
    for entry in table:
        ours = f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}" if entry["n"] > 1 else (
            f"{100 * entry['mean']:.2f}" if entry["n"] else "not run")  # fmt: skip
        difference = f"{100 * entry['difference']:+.2f}" if entry["n"] else "—"
        shown.add_row(entry["label"], f"{100 * entry['published']:.2f}", ours, str(entry["n"]), difference)
    console.print(shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
