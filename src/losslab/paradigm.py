"""Paradigms (``configs/paradigm/``): where a run's backbone starts, and whether it trains.

``joint`` (the default) trains the backbone and its heads together from random initialisation. ``linear_eval``
and ``finetune`` start from the backbone of an earlier run, ``paradigm.from_run=<its run directory>``:

- ``linear_eval`` freezes it and trains a linear classifier on its features with a classification loss, the
  protocol of the SupCon paper (Khosla et al. 2020, §4) and of solo-learn: no gradient reaches the backbone and it
  stays in eval mode, so BatchNorm keeps the pretrained running statistics (and dropout is off);
- ``finetune`` trains it on, together with the new heads.

The backbone is rebuilt from this run's config, which must name the same backbone as the earlier run's
``config.yaml``; its weights come from that run's ``checkpoints/<paradigm.checkpoint>.ckpt`` (``last`` by
default: SupCon evaluates the final pretrained encoder), and results.json records which file (path, sha256).

A run can also train its pretraining run first: ``paradigm.pretrain`` lists the overrides of that first stage
(``experiment=supcon_two_stage`` sets it). The stage is composed from ``train.yaml``, this run's command-line
overrides except those choosing what a stage trains (``STAGE_GROUPS``) or set by ``paradigm.pretrain``, then
``paradigm.pretrain``; it trains in ``paradigm.from_run``, which, like every run directory, skips it when complete
and resumes it when interrupted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from losslab.errors import ConfigError
from losslab.losses.base import Loss
from losslab.sweep import load_resolved

log = logging.getLogger("losslab")

PARADIGMS = ("joint", "linear_eval", "finetune")
CHECKPOINTS = ("last", "best")
# Overrides choosing what a stage trains: a chain's pretrain stage takes them from paradigm.pretrain, never from
# the command line of the run that evaluates it.
STAGE_GROUPS = ("experiment", "paradigm", "loss", "regularizer", "mixing", "teacher", "teacher_stage")


def paradigm_name(cfg: DictConfig) -> str:
    node = cfg.get("paradigm")
    return str(node.get("name", "joint")) if node else "joint"


def check(cfg: DictConfig, loss: Loss, choices: dict[str, str]) -> None:
    """Rejects, before any data is loaded, a paradigm that cannot work, naming the option and the path."""
    name = paradigm_name(cfg)
    if name not in PARADIGMS:
        raise ConfigError(f"paradigm.name={name!r}: allowed values are {', '.join(PARADIGMS)}")
    if name == "joint":
        return
    if name == "linear_eval" and loss.kind != "classification":
        raise ConfigError(
            f"paradigm=linear_eval trains a linear classifier on the frozen backbone, but "
            f"loss={choices.get('loss', type(loss).__name__)} is an {loss.kind} loss, which trains no classifier; "
            "use a classification loss (loss=ce), and pretrain with the embedding loss (paradigm=joint)"
        )
    checkpoint_path(cfg)
    run_dir = _from_run(cfg)
    saved = load_resolved(run_dir / "config.yaml")
    if saved is None:
        raise ConfigError(
            f"paradigm.from_run={run_dir}: no readable config.yaml there; is it a LossLab run directory?"
        )
    there, here = saved.get("backbone") or {}, OmegaConf.to_container(cfg.backbone, resolve=True)
    if there != here:
        differences = "; ".join(
            f"backbone.{key}: {there.get(key, '(unset)')} there, {here.get(key, '(unset)')} here"
            for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key)
        )  # fmt: skip
        raise ConfigError(
            f"paradigm.from_run={run_dir} was pretrained with backbone={_choice(run_dir, 'backbone', there)}, but "
            f"this run has backbone={choices.get('backbone', here.get('_target_', '?'))} ({differences}); the "
            "pretrained weights load into this run's backbone: choose the same one"
        )


def checkpoint_path(cfg: DictConfig) -> Path | None:
    """The checkpoint a ``linear_eval`` or ``finetune`` run loads its backbone from; a ConfigError naming the option
    and the path when it is not there. None for a smoke test (``trainer.fast_dev_run``) of an earlier smoke test,
    which saved none: the backbone then keeps its initial weights, so that ``debug=fdr`` runs a two-stage chain too."""
    name, node = paradigm_name(cfg), cfg.paradigm
    if not node.get("from_run"):
        raise ConfigError(
            f"paradigm={name} starts from the backbone of an earlier run: give its run directory, "
            "paradigm.from_run=outputs/runs/<run>"
        )
    checkpoint = node.get("checkpoint", "last")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"paradigm.checkpoint={checkpoint!r}: allowed values are {', '.join(CHECKPOINTS)}")
    run_dir = _from_run(cfg)
    if not run_dir.is_dir():
        raise ConfigError(f"paradigm.from_run={node.from_run}: no run directory at {run_dir}")
    path = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if path.is_file():
        return path
    saved = load_resolved(run_dir / "config.yaml") or {}
    if (saved.get("trainer") or {}).get("fast_dev_run"):
        if cfg.trainer.get("fast_dev_run"):
            return None
        why = "it ran with trainer.fast_dev_run (debug=fdr), which saves no checkpoint"
    elif checkpoint == "best" and (run_dir / "checkpoints" / "last.ckpt").is_file():
        why = "it kept only last.ckpt (no validation split to select on): use paradigm.checkpoint=last"
    else:
        why = "the run has not completed an epoch"
    raise ConfigError(f"paradigm.checkpoint={checkpoint}: {path} does not exist ({why})")


def _from_run(cfg: DictConfig) -> Path:
    """``paradigm.from_run``; a relative path is taken from the directory LossLab was launched from."""
    run_dir = Path(str(cfg.paradigm.from_run)).expanduser()
    return run_dir if run_dir.is_absolute() else Path(cfg.paths.root_dir) / run_dir


def load_backbone(cfg: DictConfig, module: Any, datamodule: Any, choices: dict[str, str]) -> None:
    """Loads the pretrained backbone into ``module`` (an :class:`~losslab.objective.Objective`), frozen for
    ``linear_eval``. A backbone built for other inputs (channels, image size) is refused, naming both datasets."""
    name = paradigm_name(cfg)
    if name == "joint":
        return
    path, run_dir = checkpoint_path(cfg), _from_run(cfg)
    if path is None:
        log.warning("paradigm=%s: %s saved no checkpoint (fast_dev_run): the backbone keeps its initial weights",
                    name, run_dir)  # fmt: skip
        if name == "linear_eval":
            freeze_backbone(module)
        return
    # The run's own checkpoint, which Lightning itself loads the same way to resume it.
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {
        key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")
    }
    expected = module.backbone.state_dict()
    saved_dataset = _choice(
        run_dir, "dataset", (load_resolved(run_dir / "config.yaml") or {}).get("dataset") or {}
    )
    dataset = choices.get("dataset", datamodule.name)
    channels = _channels(run_dir)
    if channels is not None and channels != datamodule.num_channels:
        raise ConfigError(
            f"paradigm.from_run={run_dir} was pretrained on dataset={saved_dataset} ({channels}-channel images), "
            f"but this run's dataset={dataset} has {datamodule.num_channels}-channel images; the backbone takes "
            "the channels it was trained on"
        )
    misfits = [
        f"{key}: {tuple(weights[key].shape) if key in weights else 'missing'} there, {tuple(value.shape)} here"
        for key, value in expected.items() if key not in weights or weights[key].shape != value.shape
    ]  # fmt: skip
    if misfits or set(weights) - set(expected):
        raise ConfigError(
            f"paradigm.from_run={run_dir}: the backbone pretrained on dataset={saved_dataset} does not fit this "
            f"run's dataset={dataset} ({datamodule.num_channels}x{datamodule.image_size}x{datamodule.image_size} "
            f"images): {'; '.join(misfits) or 'unexpected ' + ', '.join(sorted(set(weights) - set(expected)))}"
        )
    module.backbone.load_state_dict(weights)
    if name == "linear_eval":
        freeze_backbone(module)
    log.info("paradigm=%s: backbone from %s%s", name, path, " (frozen)" if name == "linear_eval" else "")


def freeze_backbone(module: Any) -> None:
    """No gradients for the backbone, and eval mode for good (the module's ``train()`` keeps it): BatchNorm
    normalises with, and keeps, the pretrained running statistics."""
    module.backbone.requires_grad_(False)
    module.frozen_backbone = True
    module.backbone.eval()


def provenance(cfg: DictConfig) -> dict[str, Any] | None:
    """Where a run's backbone came from, for results.json (None for ``joint``)."""
    name = paradigm_name(cfg)
    if name == "joint":
        return None
    path, run_dir = checkpoint_path(cfg), _from_run(cfg)
    record: dict[str, Any] = {
        "paradigm": name,
        "frozen": name == "linear_eval",
        "run_dir": str(run_dir),
        "checkpoint": str(cfg.paradigm.get("checkpoint", "last")),
        "checkpoint_path": str(path) if path else None,  # None: a smoke test loaded nothing
        "checkpoint_sha256": sha256(path) if path else None,
    }
    pretrained = _results(run_dir)
    if pretrained:
        record["run"] = {
            key: pretrained.get(key) for key in ("run_name", "seed", "choices", "epochs_completed")
        }
    return record


def pretrained_changed(results: dict[str, Any], cfg: DictConfig) -> bool:
    """Whether the checkpoint a completed run's backbone came from has changed since (its run trained again)."""
    recorded = (results.get("pretrained") or {}).get("checkpoint_sha256")
    if recorded is None or paradigm_name(cfg) == "joint":
        return False
    try:
        path = checkpoint_path(cfg)
    except ConfigError:  # gone since: the completed results still say what they came from
        return False
    return path is not None and sha256(path) != recorded


def sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _results(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _choice(run_dir: Path, group: str, node: dict[str, Any]) -> str:
    """A group's choice in an earlier run (from its results.json), else what its config names."""
    choices = (_results(run_dir) or {}).get("choices") or {}
    return str(choices.get(group) or node.get("name") or node.get("_target_") or "?")


def _channels(run_dir: Path) -> int | None:
    """Image channels of an earlier run's dataset, from the per-channel normalisation its results.json records."""
    mean = (((_results(run_dir) or {}).get("data") or {}).get("normalization") or {}).get("mean")
    return len(mean) if mean else None


def train_pretrain_stage(cfg: DictConfig) -> dict[str, Any] | None:
    """A two-stage chain's first stage (``paradigm.pretrain``), trained into ``paradigm.from_run`` (or found
    complete there) before this run builds; returns its results (None without a chain)."""
    stage = (cfg.get("paradigm") or {}).get("pretrain")
    if not stage:
        return None
    if paradigm_name(cfg) == "joint" or not cfg.paradigm.get("from_run"):
        raise ConfigError(
            "paradigm.pretrain trains a first stage for paradigm=linear_eval or finetune to start from: "
            "set those, with paradigm.from_run=<where the stage trains>"
        )
    return train_stage([str(override) for override in stage], _from_run(cfg), "paradigm.pretrain")


def train_teacher_stage(cfg: DictConfig) -> dict[str, Any] | None:
    """The run a distillation's ``teacher=run`` loads, trained first into ``teacher.run_dir`` (or found complete
    there) when ``teacher_stage`` lists its overrides; several students (a sweep) share it."""
    stage = cfg.get("teacher_stage")
    if not stage:
        return None
    run_dir = (cfg.get("teacher") or {}).get("run_dir")
    if not run_dir:
        raise ConfigError(
            "teacher_stage trains the teacher that teacher=run loads: set teacher=run and "
            "teacher.run_dir=<where it trains>"
        )
    path = Path(str(run_dir)).expanduser()
    path = path if path.is_absolute() else Path(cfg.paths.root_dir) / path
    return train_stage([str(override) for override in stage], path, "teacher_stage")


def train_stage(stage: list[str], run_dir: Path, option: str) -> dict[str, Any]:
    """An ordinary run composed from ``train.yaml``, this job's shared command-line overrides and ``stage``, trained
    in ``run_dir`` before the run that starts from it (complete stages are skipped, interrupted ones resumed)."""
    overrides = _stage_overrides(stage)
    try:
        stage_cfg = _compose(overrides)
    except Exception as error:
        raise ConfigError(f"{option}={list(stage)}: the stage cannot be composed: {error}") from error
    from losslab.train import train  # the stage is an ordinary run

    log.info("%s (%s) in %s", option, " ".join(overrides), run_dir)
    with _stage_hydra_config(stage_cfg, run_dir):
        with open_dict(stage_cfg):
            del stage_cfg.hydra
            stage_cfg.paths.output_dir = str(run_dir)
        return train(stage_cfg)


def _stage_overrides(stage: list[str]) -> list[str]:
    """This run's command-line overrides the stage shares, then the stage's own (which win on the same key)."""
    parser = OverridesParser.create()
    own = {override.key_or_group for override in parser.parse_overrides(stage)}
    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    shared = [
        override.input_line for override in parser.parse_overrides(task)
        if override.key_or_group.split(".")[0] not in STAGE_GROUPS and override.key_or_group not in own
    ]  # fmt: skip
    return [*shared, *stage]


def _compose(overrides: list[str]) -> DictConfig:
    from losslab.train import config_dir

    config_name = (HydraConfig.get().job.get("config_name") if HydraConfig.initialized() else None) or "train"
    if GlobalHydra.instance().is_initialized():  # inside the launched job: its config search path
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


@contextmanager
def _stage_hydra_config(stage_cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """While the stage trains, Hydra's runtime config describes it (its choices and overrides, which results.json
    and the sampler read) within this job (its launcher and job number, which place it on the machine)."""
    instance = HydraConfig.instance()
    outer = instance.cfg
    if outer is None:
        instance.set_config(stage_cfg)
    else:
        inner = copy.deepcopy(outer)
        with read_write(inner.hydra):
            inner.hydra.runtime.choices = stage_cfg.hydra.runtime.choices
            inner.hydra.overrides.task = stage_cfg.hydra.overrides.task
            inner.hydra.runtime.output_dir = str(run_dir)
        instance.cfg = inner
    try:
        yield
    finally:
        instance.cfg = outer
