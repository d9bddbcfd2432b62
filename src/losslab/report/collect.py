"""Finding and loading runs: every ``results.json`` under the given directories or glob patterns."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from losslab.report import ReportError

MISSING = object()
GLOB_CHARACTERS = set("*?[")


@dataclass
class Run:
    """One finished run: its directory and the content of its ``results.json``."""

    directory: Path
    results: dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.results.get("seed")

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config") or {}

    def lookup(self, key: str) -> Any:
        """A Hydra group choice (``loss``) if there is one, else the resolved config value at a dotted
        path (``loss.temperature``); ``MISSING`` when neither exists."""
        choices = self.results.get("choices") or {}
        if key in choices:
            return choices[key]
        return dotted(self.config, key)

    def metric(self, name: str) -> float:
        """``test/acc`` is ``results["test"]["acc"]``."""
        split, _, metric = name.partition("/")
        value = (self.results.get(split) or {}).get(metric)
        if value is None:
            raise ReportError(f"{self.directory}: results.json has no {name} (no {split!r}.{metric!r})")
        return float(value)

    @property
    def peak_memory_mb(self) -> float:
        # Device memory is the constraint when a GPU ran; host RSS otherwise.
        memory = self.results.get("peak_memory_mb") or {}
        return float(memory.get("cuda_allocated", memory.get("host_rss", float("nan"))))

    @cached_property
    def curves(self) -> pd.DataFrame | None:
        """``metrics.csv`` (one row per epoch), or None when the run did not leave one."""
        path = self.directory / "metrics.csv"
        return pd.read_csv(path) if path.is_file() else None


def dotted(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def find_results(inputs: list[str]) -> list[Path]:
    """``results.json`` files under each input (a directory, a file or a glob, searched recursively)."""
    found: set[Path] = set()
    for pattern in inputs:
        matches = glob.glob(pattern, recursive=True)
        if not matches:
            raise ReportError(f"{pattern}: no such file or directory")
        for match in map(Path, matches):
            if match.is_dir():
                found.update(path.resolve() for path in match.rglob("results.json"))
            elif match.name == "results.json":
                found.add(match.resolve())
    return sorted(found)


def load_runs(inputs: list[str]) -> tuple[list[Run], int]:
    """(completed runs, number of runs skipped because their status is not ``completed``)."""
    runs, skipped = [], 0
    for path in find_results(inputs):
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not valid JSON ({error})") from None
        if results.get("status") != "completed":
            skipped += 1
            continue
        runs.append(Run(path.parent, results))
    if not runs:
        raise ReportError(f"no completed runs (results.json) found under {' '.join(inputs)}")
    return runs, skipped


def default_output_dir(inputs: list[str]) -> Path:
    """``<first input>/report``; for a glob, its part before the first wildcard (``runs/focal_*`` → ``runs``)."""
    static: list[str] = []
    for part in Path(inputs[0]).parts:
        if GLOB_CHARACTERS & set(part):
            break
        static.append(part)
    base = Path(*static) if static else Path(".")
    if base.is_file():
        base = base.parent
    return base / "report"
