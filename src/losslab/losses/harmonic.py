"""Harmonic loss: a classifier of distances to class centres instead of dot products."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


class HarmonicHead(nn.Module):
    """Class centres ``w_c`` (``weight``, ``[C, D]``) and the logits ``-n log d_c`` of the distances
    ``d_c = ||w_c - x||_2``, so that ``softmax(logits)_c = d_c^-n / sum_j d_j^-n`` is exactly HarMax.

    ``log d = log(d^2 + floor) / 2``: a sample on its centre (d = 0) gets a large finite logit instead of
    +inf, and the gradient stays finite. ``d^2 = ||x||^2 - 2 x.w + ||w||^2`` is computed in float32 at least
    (never autocast to half precision) and clamped at 0, since rounding can make it slightly negative; this
    costs O(N C) memory instead of the O(N C D) of the differences.
    """

    squared_distance_floor = 1e-12

    def __init__(self, feature_dim: int, num_classes: int, n: float) -> None:
        super().__init__()
        self.n = n
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        # nn.Linear's initialisation, as in the authors' code (their distance layer subclasses nn.Linear).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def squared_distances(self, features: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(upcast(features).dtype, upcast(self.weight).dtype)
        with torch.autocast(features.device.type, enabled=False):
            x, w = features.to(dtype), self.weight.to(dtype)
            squared = x.square().sum(dim=-1, keepdim=True) - 2.0 * x @ w.T + w.square().sum(dim=-1)
            return squared.clamp(min=0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.n * torch.log(self.squared_distances(features) + self.squared_distance_floor)

    def extra_repr(self) -> str:
        return f"feature_dim={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, n={self.n:.4g}"


class Harmonic(Loss):
    """Harmonic loss (Baek, Liu, Tyagi & Tegmark 2025, "Harmonic loss trains interpretable AI models"):
    ``-log p_y`` with HarMax ``p_c = d_c^-n / sum_j d_j^-n`` over the distances ``d_c = ||w_c - x||_2`` of
    the features to learned class centres, n the harmonic exponent.

    The loss owns its head (:class:`HarmonicHead`), whose logits ``-n log d_c`` make this cross-entropy on
    those logits; accuracy, NLL and calibration are then measured on HarMax's probabilities.
    ``n = None`` is the paper's rule of thumb ``n = sqrt(D)``, D the feature dimension.
    """

    accepts_soft_targets = True

    def __init__(self, n: float | None = None) -> None:
        super().__init__()
        if n is not None and n <= 0:
            raise ConfigError(
                f"loss.n={n}: the harmonic exponent must be > 0 (or null for sqrt(feature dim))"
            )
        self.n = n

    def build_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return HarmonicHead(
            feature_dim, num_classes, self.n if self.n is not None else math.sqrt(feature_dim)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        return F.cross_entropy(logits, target.to(logits.dtype) if target.is_floating_point() else target)
