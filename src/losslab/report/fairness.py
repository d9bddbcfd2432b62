"""A comparison is fair when runs differ only in what is compared (the grouping keys) and the seed.

Anything else that differs (a learning rate, the number of epochs) would be credited to the objective,
so the report refuses unless the user names it with ``--allow-differ``, and then says so in its notes.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any

from losslab.report import ReportError
from losslab.report.collect import MISSING, Run, dotted
from losslab.sweep import BOOKKEEPING_KEYS

# Settings that do not change what is learned: the keys that name, place or launch a run (as for sweeps),
# logging and progress display, and the seeds, which the comparison varies on purpose (dataset.seed
# follows the run's seed). optimized_metric only tells a sweeper what to read from the results.
BOOKKEEPING = (
    *BOOKKEEPING_KEYS, "seed", "tags", "hydra", "logger", "callbacks.*progress*", "trainer.enable_progress_bar",
    "dataset.seed", "optimized_metric",
)


def matches(key: str, pattern: str) -> bool:
    """``pattern`` names ``key`` itself or a parent of it (dotted prefix), or matches it as a wildcard."""
    return key == pattern or key.startswith(pattern + ".") or fnmatchcase(key, pattern)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def comparable_config(run: Run) -> dict[str, str]:
    """The run's config as dotted key → JSON text, with the run's own paths written back as ``${paths.*}``:
    a checkpoint ``dirpath`` under the run directory is the same setting in every run."""
    config = flatten(run.config)
    paths = {f"${{paths.{key}}}": value for key, value in (run.config.get("paths") or {}).items()
             if isinstance(value, str) and len(value) > 1}
    # Longest first, so output_dir is replaced before the root_dir it starts with.
    replacements = sorted(paths.items(), key=lambda item: -len(item[1]))
    comparable = {}
    for key, value in config.items():
        if isinstance(value, str):
            for placeholder, path in replacements:
                value = value.replace(path, placeholder)
        comparable[key] = json.dumps(value, sort_keys=True)
    return comparable


def _show(text: str) -> str:
    value = json.loads(text)
    return value if isinstance(value, str) else text


def differing_keys(runs: list[Run], ignore: list[str]) -> dict[str, dict[str, Run]]:
    """Each config key whose value differs between runs → {value: an example run with it}."""
    configs = [comparable_config(run) for run in runs]
    keys = sorted({key for config in configs for key in config})
    differing = {}
    for key in keys:
        if any(matches(key, pattern) for pattern in ignore):
            continue
        examples: dict[str, Run] = {}
        for run, config in zip(runs, configs):
            examples.setdefault(_show(config.get(key, '"<missing>"')), run)
        if len(examples) <= 1:
            continue
        block = _absent_block(key, runs)
        if block != key:  # a whole block (a callback, an option) is absent from some runs: name it once
            examples = {}
            for run in runs:
                examples.setdefault("<missing>" if dotted(run.config, block) is MISSING else "present", run)
        differing.setdefault(block, examples)
    return differing


def _absent_block(key: str, runs: list[Run]) -> str:
    """The shortest prefix of ``key`` that some run lacks entirely (``key`` itself when none does)."""
    parts = key.split(".")
    for length in range(1, len(parts)):
        prefix = ".".join(parts[:length])
        if any(dotted(run.config, prefix) is MISSING for run in runs):
            return prefix
    return key


def check_fair(runs: list[Run], by: list[str], allow_differ: list[str]) -> list[str]:
    """Raise ``ReportError`` naming every setting that differs beyond the grouping keys, the seed and
    bookkeeping, unless allowed; return one note per allowed difference."""
    # Grouping by a choice (loss) ignores its whole config group (loss.*): another loss has other parameters.
    differing = differing_keys(runs, [*BOOKKEEPING, *by])
    refused = {key: examples for key, examples in differing.items()
               if not any(matches(key, allowed) for allowed in allow_differ)}
    if refused:
        listed = "; ".join(
            f"{key}: " + ", ".join(f"{value} ({run.directory.name})" for value, run in list(examples.items())[:3])
            for key, examples in refused.items()
        )
        raise ReportError(
            f"runs differ in more than {', '.join(by)} and the seed — {listed}. "
            "Group by these keys with --by, or accept the difference with --allow-differ KEY"
        )
    return [f"{key} differs between runs (allowed): {', '.join(examples)}" for key, examples in differing.items()]
