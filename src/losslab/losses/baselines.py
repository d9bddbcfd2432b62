"""Classic alternatives to cross-entropy: focal, sample-dependent focal, one-vs-rest BCE, MAE and the
squared-hinge (L2-SVM) loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


def target_log_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log softmax(z)_y`` per sample, ``[N]``."""
    return logits.log_softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


def one_minus_probability(log_probability: torch.Tensor) -> torch.Tensor:
    """``1 - p`` from ``log p``; ``-expm1`` keeps the digits that ``1 - exp`` loses when p is close to 1."""
    return -torch.expm1(log_probability)


def focal_term(log_p_t: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """``-(1 - p_t)^gamma log p_t`` per sample. The floor on ``1 - p_t`` only matters where p_t rounds to 1
    (the term is then 0): it keeps the gradient of ``x^gamma`` finite at x = 0 for gamma < 1."""
    tiny = torch.finfo(log_p_t.dtype).tiny
    return -one_minus_probability(log_p_t).clamp(min=tiny).pow(gamma) * log_p_t


def as_probabilities(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` probability targets from class indices or from probabilities, in the logits' dtype."""
    if target.is_floating_point():
        return target.to(logits.dtype)
    return F.one_hot(target, logits.shape[-1]).to(logits.dtype)


def sigmoid_focal(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Per-class sigmoid focal loss (Lin et al. 2017, eq. 5), ``[N, C]``: ``-alpha_t (1 - p_t)^gamma log p_t``
    with ``p_t = p`` for positives and ``1 - p`` for negatives, ``alpha_t = alpha`` for positives and
    ``1 - alpha`` for negatives (no weighting when alpha is None). ``log p_t`` is minus the binary
    cross-entropy, so gamma = 0 and no alpha is exactly BCE."""
    log_p_t = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = focal_term(log_p_t, gamma)
    if alpha is not None:
        loss = (alpha * target + (1.0 - alpha) * (1.0 - target)) * loss
    return loss


class Focal(Loss):
    """Focal loss (Lin et al. 2017, "Focal loss for dense object detection", eq. 5).

    Softmax form (single-label datasets): ``FL = -alpha_y (1 - p_y)^gamma log p_y``; gamma = 0 and no alpha is
    cross-entropy. ``alpha``: None (no weighting) or one non-negative weight per class, ``alpha_y`` being the
    weight of the sample's class (the paper's alpha-balancing, eq. 3, for more than two classes).

    Sigmoid form (multi-label datasets, the paper's own binary form): :func:`sigmoid_focal` per class, summed
    over classes and averaged over the batch. ``sigmoid_alpha`` weights positives (negatives get
    ``1 - sigmoid_alpha``); the paper's 0.25, or None for no weighting.

    Probability targets t (batch mixing, distillation): ``-sum_c t_c alpha_c (1 - p_c)^gamma log p_c``, the
    expectation of the per-class focal term under t, as for cross-entropy; a one-hot t gives the form above.
    """

    supports_multi_label = True
    accepts_soft_targets = True

    def __init__(
        self, gamma: float = 2.0, alpha: Sequence[float] | None = None, sigmoid_alpha: float | None = 0.25
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma}: must be >= 0")
        if alpha is not None:
            alpha = [float(weight) for weight in alpha]
            if not alpha or min(alpha) < 0:
                raise ConfigError(f"loss.alpha={alpha}: must be null or a non-empty list of weights >= 0")
        if sigmoid_alpha is not None and not 0.0 <= sigmoid_alpha <= 1.0:
            raise ConfigError(f"loss.sigmoid_alpha={sigmoid_alpha}: must be null or in [0, 1]")
        self.gamma = gamma
        self.sigmoid_alpha = sigmoid_alpha
        self.register_buffer("alpha", None if alpha is None else torch.tensor(alpha), persistent=False)

    def set_multi_label(self, multi_label: bool) -> None:
        if multi_label and self.alpha is not None:
            raise ConfigError(
                "loss.alpha weights the classes of the softmax (single-label) focal loss; on a multi-label "
                "dataset the sigmoid form weights positives by loss.sigmoid_alpha: set loss.alpha=null"
            )
        super().set_multi_label(multi_label)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        if self.multi_label:
            per_class = sigmoid_focal(logits, target.to(logits.dtype), self.gamma, self.sigmoid_alpha)
            return per_class.sum(dim=-1).mean()
        if self.alpha is not None and len(self.alpha) != logits.shape[-1]:
            raise ConfigError(
                f"loss.alpha has {len(self.alpha)} weights but the classifier has {logits.shape[-1]} classes"
            )
        if target.is_floating_point():
            weights = target.to(logits.dtype)
            if self.alpha is not None:
                weights = weights * self.alpha.to(logits.dtype)
            return (weights * focal_term(logits.log_softmax(dim=-1), self.gamma)).sum(dim=-1).mean()
        loss = focal_term(target_log_probability(logits, target), self.gamma)
        if self.alpha is not None:
            loss = self.alpha.to(logits.dtype)[target] * loss
        return loss.mean()


class FocalAdaptive(Loss):
    """Sample-dependent focal loss FLSD-53 (Mukhoti et al. 2020, "Calibrating deep neural networks using
    focal loss", FLSD-53): ``-(1 - p_y)^gamma log p_y`` with ``gamma = gamma_low`` (5) where
    ``p_y < p_threshold`` (0.2) and ``gamma_high`` (3) otherwise. As in the authors' code, gamma is chosen
    from the detached p_y, so it carries no gradient.
    """

    def __init__(self, gamma_low: float = 5.0, gamma_high: float = 3.0, p_threshold: float = 0.2) -> None:
        super().__init__()
        for name, gamma in (("gamma_low", gamma_low), ("gamma_high", gamma_high)):
            if gamma < 0:
                raise ConfigError(f"loss.{name}={gamma}: must be >= 0")
        if not 0.0 < p_threshold < 1.0:
            raise ConfigError(f"loss.p_threshold={p_threshold}: must be in (0, 1)")
        self.gamma_low = gamma_low
        self.gamma_high = gamma_high
        self.p_threshold = p_threshold

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        log_p_t = target_log_probability(logits, target)
        below = log_p_t.detach() < torch.log(torch.tensor(self.p_threshold, dtype=logits.dtype))
        gamma = torch.where(below, self.gamma_low, self.gamma_high).to(logits.dtype)
        return focal_term(log_p_t, gamma).mean()


class BinaryCrossEntropy(Loss):
    """One-vs-rest sigmoid binary cross-entropy, summed over classes and averaged over the batch:
    ``-sum_c [t_c log sigmoid(z_c) + (1 - t_c) log sigmoid(-z_c)]``, with t one-hot, a distribution, or the
    multi-hot label set of a multi-label dataset (the standard multi-label BCE, one sigmoid per class)."""

    accepts_soft_targets = True
    supports_multi_label = True

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        per_class = F.binary_cross_entropy_with_logits(
            logits, as_probabilities(target, logits), reduction="none"
        )
        return per_class.sum(dim=-1).mean()


class MeanAbsoluteError(Loss):
    """Mean absolute error (Ghosh et al. 2017, "Robust loss functions under label noise for deep neural
    networks"): ``||softmax(z) - t||_1``, which is ``2 (1 - p_y)`` for a one-hot t."""

    accepts_soft_targets = True

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        probabilities = logits.softmax(dim=-1)
        return (probabilities - as_probabilities(target, logits)).abs().sum(dim=-1).mean()


class SquaredHinge(Loss):
    """One-vs-rest L2-SVM (Tang 2013, "Deep learning using linear support vector machines"):
    ``sum_c max(0, margin - y_c z_c)^2`` with ``y_c = +1`` for the true class and ``-1`` otherwise. The
    paper's ``1/2 w^T w`` term is the optimiser's weight decay, not part of this loss."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin <= 0:
            raise ConfigError(f"loss.margin={margin}: must be > 0")
        self.margin = margin

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        signs = 2.0 * F.one_hot(target, logits.shape[-1]).to(logits.dtype) - 1.0
        return F.relu(self.margin - signs * logits).square().sum(dim=-1).mean()
