"""Cross-entropy reshaped: polynomial corrections (PolyLoss), the comp-sum family, added square terms,
other normalisations than softmax (Z-loss, StableMax) and a bonus for well-classified examples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast
from losslab.losses.baselines import (
    as_probabilities,
    focal_term,
    one_minus_probability,
    target_log_probability,
)


class Poly1(Loss):
    """Poly-1 loss (Leng et al. 2022, "PolyLoss: a polynomial expansion perspective of classification loss
    functions"): ``-log p_t + epsilon (1 - p_t)``; epsilon = 0 is cross-entropy.

    With a target distribution t, ``p_t = sum_c t_c p_c`` and the first term is ``-sum_c t_c log p_c``, as in
    the paper's code listing (which applies it to label-smoothed targets).
    """

    accepts_soft_targets = True

    def __init__(self, epsilon: float = 1.0) -> None:
        super().__init__()
        if epsilon < -1:
            raise ConfigError(f"loss.epsilon={epsilon}: must be >= -1 (the loss is negative otherwise)")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        log_probabilities = logits.log_softmax(dim=-1)
        probabilities = as_probabilities(target, logits)
        cross_entropy = -(probabilities * log_probabilities).sum(dim=-1)
        # 1 - sum_c t_c p_c = sum_c t_c (1 - p_c), without cancellation when p_t is close to 1
        one_minus_p_t = (probabilities * one_minus_probability(log_probabilities)).sum(dim=-1)
        return (cross_entropy + self.epsilon * one_minus_p_t).mean()


class Poly1Focal(Loss):
    """Poly-1 focal loss (Leng et al. 2022): ``-(1 - p_t)^gamma log p_t + epsilon (1 - p_t)^(gamma + 1)``;
    epsilon = 0 is the focal loss. The paper applies it to sigmoid detection heads; here p_t is the softmax
    probability of the true class, so that it extends the softmax ``focal`` loss."""

    def __init__(self, epsilon: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        if epsilon < -1:
            raise ConfigError(f"loss.epsilon={epsilon}: must be >= -1 (the loss is negative otherwise)")
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma}: must be >= 0")
        self.epsilon = epsilon
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        log_p_t = target_log_probability(logits, target)
        polynomial = one_minus_probability(log_p_t).pow(self.gamma + 1)
        return (focal_term(log_p_t, self.gamma) + self.epsilon * polynomial).mean()


class CompSum(Loss):
    """Comp-sum losses (Mao, Mohri & Zhong 2023, "Cross-entropy loss functions: theoretical analysis and
    applications"): ``Psi^tau(u)`` with ``u = sum_{c != y} exp(z_c - z_y)``, ``Psi^1(u) = log(1 + u)`` and
    ``Psi^tau(u) = ((1 + u)^(1 - tau) - 1) / (1 - tau)`` otherwise.

    Since ``1 + u = 1 / p_y``: tau = 0 is the sum-exponential loss u, tau = 1 cross-entropy, tau in (1, 2)
    generalised cross-entropy ``(1 - p_y^q) / q`` with q = tau - 1, tau = 2 the MAE-like ``1 - p_y``. For tau < 1
    the loss grows like ``exp((1 - tau) * margin)`` and overflows for badly wrong logits of large magnitude.
    """

    def __init__(self, tau: float = 1.5) -> None:
        super().__init__()
        if tau < 0:
            raise ConfigError(f"loss.tau={tau}: must be >= 0")
        self.tau = tau

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        log_one_plus_u = -target_log_probability(logits, target)
        if self.tau == 1:
            return log_one_plus_u.mean()
        return (torch.expm1((1 - self.tau) * log_one_plus_u) / (1 - self.tau)).mean()


class ZLossSpherical(Loss):
    """Z-loss (de Brébisson & Vincent 2016, "The Z-loss: a shift and scale invariant classification loss
    belonging to the spherical family", which follows their "An exploration of softmax alternatives belonging
    to the spherical loss family"): ``softplus(a (b - z'_y)) / a`` on the standardised logits
    ``z' = (z - mean(z)) / std(z)``, std over the classes with 1/C (the paper's sigma).

    A floor of 1e-6 on the variance makes all-equal logits give z' = 0 instead of 0/0; the loss is scale
    invariant, so its gradient still grows like 1 / std(z) for nearly equal logits.
    """

    variance_floor = 1e-6

    def __init__(self, a: float = 1.0, b: float = 1.0) -> None:
        super().__init__()
        if a <= 0:
            raise ConfigError(f"loss.a={a}: must be > 0")
        self.a = a
        self.b = b

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        centred = logits - logits.mean(dim=-1, keepdim=True)
        variance = centred.square().mean(dim=-1, keepdim=True)
        standardised = centred * torch.rsqrt(variance + self.variance_floor)
        z_target = standardised.gather(1, target[:, None]).squeeze(1)
        return (F.softplus(self.a * (self.b - z_target)) / self.a).mean()


class Squentropy(Loss):
    """Squentropy (Hui, Belkin & Wu 2023, "Cut your losses with squentropy"): cross-entropy plus the
    average square loss of the incorrect classes' logits, ``-log p_y + 1/(C - 1) sum_{c != y} z_c^2``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        classes = logits.shape[-1]
        incorrect = 1.0 - F.one_hot(target, classes).to(logits.dtype)
        square = (incorrect * logits.square()).sum(dim=-1) / (classes - 1)
        return (F.cross_entropy(logits, target, reduction="none") + square).mean()


class StableMax(Loss):
    """StableMax cross-entropy (Prieto et al. 2025, "Grokking at the edge of numerical stability"):
    ``-log s(z_y) / sum_k s(z_k)`` with ``s(x) = x + 1`` for x >= 0 and ``1 / (1 - x)`` for x < 0, a softmax
    whose normaliser grows linearly instead of exponentially."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        # each branch sees only its own half-line, so the branch torch.where discards has a finite gradient
        positive = logits.clamp(min=0)
        negative = logits.clamp(max=0)
        log_s = torch.where(logits >= 0, torch.log1p(positive), -torch.log1p(-negative))
        log_normaliser = torch.logsumexp(log_s, dim=-1)
        return (log_normaliser - log_s.gather(1, target[:, None]).squeeze(1)).mean()


class Encouraging(Loss):
    """Encouraging loss (Zhao et al. 2022, "Well-classified examples are underestimated in classification
    with deep neural networks"): cross-entropy plus a bonus that keeps rewarding well-classified examples,
    ``-log p_y + log(1 - p_y)``.

    ``log_end`` < 1 is the paper's conservative bonus: beyond ``p_y = log_end`` the log curve is replaced by
    its tangent there, ``(p_y - log_end) / (log_end - 1) + log(1 - log_end)``, so the bonus stays bounded.
    ``log_end = 1`` is the plain bonus, floored at ``log(1e-5)`` as in the authors' code.
    """

    plain_bonus_floor = math.log(1e-5)

    def __init__(self, log_end: float = 0.75) -> None:
        super().__init__()
        if not 0.0 < log_end <= 1.0:
            raise ConfigError(f"loss.log_end={log_end}: must be in (0, 1]")
        self.log_end = log_end

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        is_target = F.one_hot(target, logits.shape[-1]).bool()
        log_normaliser = torch.logsumexp(logits, dim=-1)
        log_p_y = logits.gather(1, target[:, None]).squeeze(1) - log_normaliser
        # log(1 - p_y) = log sum_{c != y} exp(z_c) - log sum_c exp(z_c): exact even when p_y rounds to 1
        log_one_minus_p_y = torch.logsumexp(logits.masked_fill(is_target, -math.inf), dim=-1) - log_normaliser
        bonus = log_one_minus_p_y.clamp(min=self.plain_bonus_floor)
        if self.log_end < 1.0:
            p_y = log_p_y.exp()
            tangent = (p_y - self.log_end) / (self.log_end - 1.0) + math.log(1.0 - self.log_end)
            bonus = torch.where(p_y > self.log_end, tangent, bonus)
        return (bonus - log_p_y).mean()
