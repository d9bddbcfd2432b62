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
