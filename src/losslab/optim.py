"""Learning-rate schedules. Each factory is configured by Hydra with ``_partial_: true`` and called by the
training module once the number of steps is known: ``factory(optimizer, total_steps, steps_per_epoch)``.
It returns Lightning's scheduler dict (scheduler plus the interval it steps on)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR, OneCycleLR

from losslab.errors import ConfigError


def _warmup_then_decay(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float, min_lr_ratio: float,
    decay: Callable[[float], float],
) -> dict[str, Any]:
    """Linear warmup from 0 over ``warmup_epochs``, then ``min_lr_ratio + (1 - min_lr_ratio) · decay(progress)``
    with progress going from 0 to 1 over the remaining steps (``decay`` from 1 to 0), stepped per batch."""
    if warmup_epochs < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(
            f"scheduler.warmup_epochs={warmup_epochs}, scheduler.min_lr_ratio={min_lr_ratio}: "
            "need warmup_epochs >= 0 and 0 <= min_lr_ratio <= 1"
        )
    warmup_steps = round(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay(progress)

    return {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}


def cosine(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0
) -> dict[str, Any]:
    """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to ``min_lr_ratio`` × the base lr
    (Loshchilov & Hutter 2017, without restarts)."""
    return _warmup_then_decay(
        optimizer, total_steps, steps_per_epoch, warmup_epochs, min_lr_ratio,
        lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    )  # fmt: skip


def onecycle(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    max_lr: float | None = None,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
) -> dict[str, Any]:
    """The 1cycle policy (Smith & Topin 2019); ``max_lr`` defaults to the optimizer's lr."""
    if anneal_strategy not in ("cos", "linear"):
        raise ConfigError(f"scheduler.anneal_strategy={anneal_strategy!r}: allowed values are cos, linear")
    if not 0.0 <= pct_start <= 1.0:
        raise ConfigError(f"scheduler.pct_start={pct_start}: must be in [0, 1] (the fraction of steps warming up)")
    for option, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor), ("max_lr", max_lr)):
        if value is not None and value <= 0:
            raise ConfigError(f"scheduler.{option}={value}: must be > 0")
    peak = [group["lr"] for group in optimizer.param_groups] if max_lr is None else max_lr
    scheduler = OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=max(1, total_steps),
        pct_start=float(pct_start),  # torch refuses the ints 0 and 1
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
    )
    return {"scheduler": scheduler, "interval": "step"}


def step(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, milestones: tuple[int, ...] = (), gamma: float = 0.1
) -> dict[str, Any]:
    """Multiply the lr by ``gamma`` at each epoch in ``milestones``."""
    if any(m <= 0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError(f"scheduler.milestones={list(milestones)}: must be increasing positive epochs")
    if gamma <= 0:
        raise ConfigError(f"scheduler.gamma={gamma}: must be > 0 (the factor the lr is multiplied by)")
    return {"scheduler": MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma), "interval": "epoch"}


def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """No schedule: the optimizer's lr throughout."""
    return {"scheduler": LambdaLR(optimizer, lambda _: 1.0), "interval": "epoch"}


def linear(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0
) -> dict[str, Any]:
    """Linear warmup from 0 over ``warmup_epochs``, then linear decay to ``min_lr_ratio`` × the base lr at the last
    step."""
    return _warmup_then_decay(
        optimizer, total_steps, steps_per_epoch, warmup_epochs, min_lr_ratio, lambda progress: 1.0 - progress
    )
