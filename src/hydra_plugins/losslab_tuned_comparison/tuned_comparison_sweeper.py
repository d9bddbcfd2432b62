"""Fair tuning, then seeds: ``python scripts/train.py sweep=tuned_comparison``.

The point of "A Metric Learning Reality Check" (Musgrave, Belongie & Lim, ECCV 2020): losses compared at
settings tuned for one of them measure the settings, not the losses. So every loss in ``losses`` gets the
same Optuna budget (``n_trials``) over the shared hyperparameters (``shared``: learning rate, weight decay)
plus its own (``search_spaces.<loss>``), selected on the validation metric each run returns
(``optimized_metric``). Each loss's best trial is then run again for every seed in ``seeds``; those runs,
compared on test metrics, are the result:

    <sweep dir>/tune/<loss>/<overrides>/   one run per trial
    <sweep dir>/final/<overrides>/         each loss's best setting, once per seed
    <sweep dir>/tuned_comparison.json      budgets, every trial, the best settings, the final runs

Every job's directory is named by its overrides, so launching the same sweep again finds each completed
run (which returns its stored result instead of training) and, the sampler being seeded, asks for the same
trials in the same order.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

from losslab.errors import ConfigError, LossLabError
from losslab.recording import write_json_atomic

if TYPE_CHECKING:  # optuna is imported when a sweep starts, not each time Hydra scans its plugins
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
RESULTS_FILE = "tuned_comparison.json"


# No `from __future__ import annotations` here: Hydra's plugin scan runs this module outside sys.modules,
# where dataclasses cannot resolve string annotations. OmegaConf builds the config's schema from these types.
@dataclass
class TunedComparisonConf:
    _target_: str = "hydra_plugins.losslab_tuned_comparison.tuned_comparison_sweeper.TunedComparisonSweeper"
    # Choices of the loss config group (configs/loss/<name>.yaml), each tuned with the same budget.
    losses: list[str] = MISSING
    # Optuna trials per loss.
    n_trials: int = 10
    # The best trial of each loss runs once per seed; these runs are the comparison.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Jobs handed to the launcher at once (trials asked together); parallel only with a parallel launcher.
    n_jobs: int = 1
    # Searched for every loss: config key -> search space in the Optuna sweeper's override grammar.
    shared: dict[str, str] = field(
        default_factory=lambda: {
            "optimizer.lr": "tag(log, interval(1e-4, 3e-2))",
            "optimizer.weight_decay": "tag(log, interval(1e-6, 1e-2))",
        }
    )
    # Searched for one loss only, on top of `shared`: loss -> {config key -> search space}.
    search_spaces: dict[str, dict[str, str]] = field(default_factory=dict)
    # Whether a higher optimized_metric is better (val/acc) or a lower one (val/nll).
    direction: str = "maximize"
    # Seeds the TPE sampler: the same command asks for the same trials.
    sampler_seed: int = 0
    # Trials sampled at random before TPE models the results.
    n_startup_trials: int = 5


ConfigStore.instance().store(group="hydra/sweeper", name="tuned_comparison", node=TunedComparisonConf,
                             provider="losslab")  # fmt: skip


class SweepConfigError(ConfigError, CompactHydraException):
    """A bad sweeper setting or command line: Hydra prints its message alone, without a traceback."""


class SweepIncompleteError(LossLabError, CompactHydraException):
    """Some loss has no successful trial or a final run failed; the record says which runs to look at."""


@dataclass
class SearchSpace:
    """What one loss is tuned on: Optuna distributions, and the grammar they were written in (the record)."""

    distributions: dict[str, "BaseDistribution"]
    written: dict[str, str]


class TunedComparisonSweeper(Sweeper):
    """Tunes each loss with the same Optuna budget, then runs each loss's best setting over seeds."""

    def __init__(self, losses: list[str], n_trials: int, seeds: list[int], n_jobs: int,
                 shared: dict[str, str], search_spaces: dict[str, dict[str, str]], direction: str,
                 sampler_seed: int, n_startup_trials: int) -> None:  # fmt: skip
        self.losses = list(losses)
        self.n_trials = n_trials
        self.seeds = list(seeds)
        self.n_jobs = n_jobs
        self.shared = dict(shared or {})
        self.search_spaces = {loss: dict(space or {}) for loss, space in (search_spaces or {}).items()}
        self.direction = direction
        self.sampler_seed = sampler_seed
        self.n_startup_trials = n_startup_trials
        self.job_idx = 0
        self.record: dict[str, Any] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self._validate(hydra_context.config_loader.get_group_options("loss"))

    def _validate(self, available_losses: list[str]) -> None:
        unknown = [loss for loss in self.losses if loss not in available_losses]
        if unknown:
            raise SweepConfigError(
                f"hydra.sweeper.losses={self.losses}: no loss config named {', '.join(unknown)}; "
                f"available: {', '.join(sorted(available_losses))}"
            )
        if not self.losses or len(set(self.losses)) != len(self.losses):
            raise SweepConfigError(f"hydra.sweeper.losses={self.losses}: list each loss to compare once")
        if self.n_trials < 1:
            raise SweepConfigError(
                f"hydra.sweeper.n_trials={self.n_trials}: every loss needs at least 1 trial"
            )
        if not self.seeds:
            raise SweepConfigError("hydra.sweeper.seeds=[]: give at least one seed for the final runs")
        if self.n_jobs < 1:
            raise SweepConfigError(f"hydra.sweeper.n_jobs={self.n_jobs}: must be >= 1")
        if self.direction not in DIRECTIONS:
            raise SweepConfigError(
                f"hydra.sweeper.direction={self.direction!r}: allowed values are {', '.join(DIRECTIONS)}"
            )

    def sweep(self, arguments: list[str]) -> None:
        # Importing optuna imports its storage backend, alembic, which logs each of its plugins at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        fixed = self._command_line(arguments)
        spaces = {loss: self._search_space(loss, fixed) for loss in self.losses}
        # Compose one job per loss before training anything: a search-space key the config lacks fails now.
        for loss, space in spaces.items():
            probe = {key: _inside(distribution) for key, distribution in space.distributions.items()}
            try:
                self.validate_batch_is_legal([self._overrides(arguments, loss, probe, "probe")])
            except Exception as error:
                raise SweepConfigError(
                    f"loss={loss} searched over {', '.join(space.written) or 'nothing'} cannot be composed: "
                    f"{error} {error.__cause__ or ''}".strip()
                ) from error
        self.record = {
            "sweep_dir": str(self.sweep_dir),
            "optimized_metric": self.config.get("optimized_metric"),
            "direction": self.direction,
            "n_trials": self.n_trials,
            "seeds": self.seeds,
            "sampler_seed": self.sampler_seed,
            "compare": self._compare_command(spaces),
            "losses": {},
        }
        studies = {loss: self._tune(loss, spaces[loss], arguments) for loss in self.losses}
        self._run_final(studies, arguments)
        problems = []
        for loss, entry in self.record["losses"].items():
            if entry["best_params"] is None:
                problems.append(f"loss={loss}: every trial failed")
            problems += [f"loss={loss} seed={run['seed']}: final run failed"
                         for run in entry["final_runs"] if run["state"] != "COMPLETE"]  # fmt: skip
        log.info("Tuned comparison recorded in %s", self.sweep_dir / RESULTS_FILE)
        if problems:
            raise SweepIncompleteError(
                f"tuned comparison incomplete ({'; '.join(problems)}): see the runs listed in "
                f"{self.sweep_dir / RESULTS_FILE}"
            )
        log.info("Compare the final runs on test metrics: %s", self.record["compare"])

    def _command_line(self, arguments: list[str]) -> set[str]:
        """Check the user's overrides; return the keys they fix (those are not searched)."""
        fixed = set()
        for override in OverridesParser.create().parse_overrides(arguments):
            key = override.key_or_group
            if key == "loss":
                raise SweepConfigError(
                    f"{override.input_line}: sweep=tuned_comparison runs every loss in hydra.sweeper.losses "
                    f"({', '.join(self.losses)}); list the losses there instead"
                )
            if override.is_sweep_override():
                raise SweepConfigError(
                    f"{override.input_line}: sweep=tuned_comparison searches hydra.sweeper.shared and "
                    "hydra.sweeper.search_spaces.<loss>; put a search space there, or fix a single value"
                )
            fixed.add(key)
        return fixed

    def _search_space(self, loss: str, fixed: set[str]) -> SearchSpace:
        from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
        from optuna.distributions import BaseDistribution

        parser = OverridesParser.create()
        own = self.search_spaces.get(loss, {})
        space = SearchSpace(distributions={}, written={})
        for key, grammar in {**self.shared, **own}.items():
            where = (
                f"hydra.sweeper.search_spaces.{loss}.{key}" if key in own else f"hydra.sweeper.shared.{key}"
            )
            if key in fixed:
                log.info("%s is fixed on the command line: not searched (%s)", key, where)
                continue
            try:
                distribution = create_optuna_distribution_from_override(
                    parser.parse_override(f"{key}={grammar}")
                )
            except Exception as error:
                raise SweepConfigError(f"{where}={grammar!r}: not a search space ({error})") from error
            if not isinstance(distribution, BaseDistribution):
                raise SweepConfigError(
                    f"{where}={grammar!r} is a single value; write a search space such as "
                    f"interval(0.0, 0.3), tag(log, interval(1e-4, 3e-2)) or choice(a, b), or fix it with "
                    f"{key}={grammar} on the command line"
                )
            space.distributions[key] = distribution
            space.written[key] = str(grammar)
        return space

    def _overrides(self, arguments: list[str], loss: str, params: dict[str, Any], subdir: str) -> list[str]:
        """A job: the user's overrides, then the loss, the trial's values and the directory it runs in."""
        parser = OverridesParser.create()
        kept = [arg for arg in arguments if parser.parse_override(arg).key_or_group not in params]
        return [*kept, f"loss={loss}", *(f"{key}={value}" for key, value in params.items()),
                f"hydra.sweep.subdir={subdir}"]  # fmt: skip

    def _launch(self, jobs: list[list[str]]) -> list[JobReturn]:
        returns = list(self.launcher.launch(jobs, initial_job_idx=self.job_idx))
        self.job_idx += len(returns)
        return returns

    def _tune(self, loss: str, space: SearchSpace, arguments: list[str]) -> "optuna.Study":
        import optuna

        sampler = optuna.samplers.TPESampler(seed=self.sampler_seed, n_startup_trials=self.n_startup_trials)
        study = optuna.create_study(study_name=f"{self.sweep_dir.name}/{loss}", direction=self.direction,
                                    sampler=sampler)  # fmt: skip
        entry = self.record["losses"][loss] = {
            "budget": self.n_trials,
            "search_space": space.written,
            "best_params": None,
            "best_value": None,
            "best_trial": None,
            "trials": [],
            "final_runs": [],
        }
        log.info(
            "Tuning loss=%s: %d trials over %s", loss, self.n_trials, ", ".join(space.written) or "nothing"
        )
        subdir = f"tune/{loss}/${{hydra.job.override_dirname}}"
        while len(entry["trials"]) < self.n_trials:
            trials = [study.ask(space.distributions)
                      for _ in range(min(self.n_jobs, self.n_trials - len(entry["trials"])))]  # fmt: skip
            returns = self._launch(
                [self._overrides(arguments, loss, trial.params, subdir) for trial in trials]
            )
            for trial, job in zip(trials, returns):
                value, error = _objective(job)
                if error is None:
                    study.tell(trial, value)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("loss=%s trial %d failed (%s); the sweep goes on", loss, trial.number, error)
                entry["trials"].append({
                    "number": trial.number, "params": trial.params, "value": value,
                    "state": "COMPLETE" if error is None else "FAIL", "error": error, "dir": _job_dir(job),
                })  # fmt: skip
            self._write()
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if completed:
            best = study.best_trial
            entry.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("loss=%s: best %s=%.4f with %s", loss, self.config.get("optimized_metric"), best.value,
                     best.params)  # fmt: skip
        else:
            log.error("loss=%s: all %d trials failed; it has no final runs", loss, self.n_trials)
        self._write()
        return study

    def _run_final(self, studies: dict[str, "optuna.Study"], arguments: list[str]) -> None:
        jobs = [
            (loss, seed) for loss in self.losses if self.record["losses"][loss]["best_params"] is not None
            for seed in self.seeds
        ]  # fmt: skip
        log.info("Final runs: each loss's best trial over seeds %s (%d runs)", self.seeds, len(jobs))
        for start in range(0, len(jobs), self.n_jobs):
            batch = jobs[start : start + self.n_jobs]
            returns = self._launch([
                self._overrides(arguments, loss, {**studies[loss].best_params, "seed": seed},
                                "final/${hydra.job.override_dirname}")
                for loss, seed in batch
            ])  # fmt: skip
            for (loss, seed), job in zip(batch, returns):
                value, error = _objective(job)
                if error is not None:
                    log.warning("loss=%s final run with seed=%d failed (%s)", loss, seed, error)
                self.record["losses"][loss]["final_runs"].append({
                    "seed": seed, "dir": _job_dir(job), "state": "COMPLETE" if error is None else "FAIL",
                    "value": value, "error": error,
                })  # fmt: skip
            self._write()

    def _compare_command(self, spaces: dict[str, SearchSpace]) -> str:
        # Keys under loss.* are part of what is compared; the shared ones were tuned per loss on purpose.
        tuned = sorted(
            {key for space in spaces.values() for key in space.distributions if not key.startswith("loss.")}
        )
        allow = f" --allow-differ {' '.join(tuned)}" if tuned else ""
        return f"losslab-compare {self.sweep_dir / 'final'} --by loss{allow}"

    def _write(self) -> None:
        write_json_atomic(self.sweep_dir / RESULTS_FILE, self.record)


def _objective(job: JobReturn) -> tuple[float | None, str | None]:
    """(the value a job returned, None) or (None, why it cannot be used)."""
    if job.status != JobStatus.COMPLETED:
        return None, repr(job._return_value)[:500]
    try:
        value = float(job.return_value)
    except (TypeError, ValueError):
        return None, f"returned {job.return_value!r}, not a number: is optimized_metric logged?"
    if not math.isfinite(value):
        return None, f"returned {value}"
    return value, None


def _job_dir(job: JobReturn) -> str | None:
    return OmegaConf.select(job.hydra_cfg, "hydra.runtime.output_dir") if job.hydra_cfg is not None else None


def _inside(distribution: "BaseDistribution") -> Any:
    """A value inside a search space, to compose a job with before any trial is asked."""
    return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
