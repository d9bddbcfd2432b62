"""Baseline classification objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


class CrossEntropy(Loss):
    """Cross-entropy, ``-sum_c t_c log softmax(z)_c``, on class indices or probability targets."""

    accepts_soft_targets = True

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        return F.cross_entropy(logits, target.to(logits.dtype) if target.is_floating_point() else target)


def palm_z_loss(logits: torch.Tensor, coefficient: float) -> torch.Tensor:
    """PaLM's auxiliary z-loss (Chowdhery et al. 2022, "PaLM: scaling language modeling with pathways",
    section 5): ``coefficient * mean(log^2 Z)`` with ``log Z = logsumexp(z)`` the softmax normaliser, which
    keeps log Z close to 0. Not the spherical Z-loss of de Brebisson & Vincent 2016 (``zloss_spherical``)."""
    return coefficient * torch.logsumexp(upcast(logits), dim=-1).square().mean()


class PaLMZLoss(Loss):
    """Cross-entropy plus PaLM's z-loss, ``-log p_y + coefficient * log^2 Z`` (Chowdhery et al. 2022,
    section 5; coefficient 1e-4 in the paper): :func:`palm_z_loss` as part of the loss. The same term can
    be added to any classification loss with ``regularizer=palm_zloss``."""

    accepts_soft_targets = True

    def __init__(self, coefficient: float = 1e-4) -> None:
        super().__init__()
        if coefficient < 0:
            raise ConfigError(f"loss.coefficient={coefficient}: the z-loss coefficient must be >= 0")
        self.coefficient = coefficient

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        target = target.to(logits.dtype) if target.is_floating_point() else target
        return F.cross_entropy(logits, target) + palm_z_loss(logits, self.coefficient)


class LabelSmoothing(Loss):
    """Cross-entropy against ``(1 - epsilon) * t + epsilon / C`` (Szegedy et al. 2016, "Rethinking the
    Inception architecture", section 7)."""

    accepts_soft_targets = True

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ConfigError(f"loss.epsilon={epsilon}: label smoothing needs 0 <= epsilon < 1")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, label_smoothing=self.epsilon)
        smoothed = (1.0 - self.epsilon) * target.to(logits.dtype) + self.epsilon / logits.shape[-1]
        return F.cross_entropy(logits, smoothed)
