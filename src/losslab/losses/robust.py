"""Losses robust to label noise: GCE, SCE, the Active-Passive losses (NCE/NFL + RCE/MAE) and LDR-KL.

Where an official implementation departs from its paper, the paper's form is the default and the code's
form is an option (``mae_form``, ``rce_form``, ``nfl_form``, ``score_form``: ``"paper"`` or ``"code"``), so that
published numbers can be reproduced either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast

RCE_LOG_ZERO = -4.0  # the constant A := log 0 of Wang et al. 2019, kept by Ma et al. 2020
FORMS = ("paper", "code")


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 - softmax(z))`` for every class, finite with finite gradients even where ``p`` rounds to 1.

    At each row's largest logit it is the log-sum-exp of the other logits minus that of all (no cancellation);
    every other class has ``p <= 1/2``, where ``log(-expm1(log p))`` is exact.
    """
    log_probs = logits.log_softmax(-1)
    is_top = F.one_hot(logits.argmax(-1), logits.shape[-1]).bool()
    top = logits.masked_fill(is_top, float("-inf")).logsumexp(-1, keepdim=True) - logits.logsumexp(
        -1, keepdim=True
    )
    # The top class's log p is replaced before expm1: an unused log(0) would still send NaN through where().
    rest = torch.log(-torch.expm1(log_probs.masked_fill(is_top, -1.0)))
    return torch.where(is_top, top, rest)


def _one_hot(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.one_hot(target, logits.shape[-1]).to(logits.dtype)


def _check_form(name: str, value: str) -> None:
    if value not in FORMS:
        raise ConfigError(f"loss.{name}={value!r}: must be 'paper' or 'code'")


def _check_weights(alpha: float, beta: float) -> None:
    if alpha < 0:
        raise ConfigError(f"loss.alpha={alpha}: must be >= 0")
    if beta < 0:
        raise ConfigError(f"loss.beta={beta}: must be >= 0")
    if alpha == 0 and beta == 0:
        raise ConfigError("loss.alpha=0 and loss.beta=0: at least one term must have a positive weight")


def _check_gamma(gamma: float) -> None:
    if gamma < 0:
        raise ConfigError(f"loss.gamma={gamma}: must be >= 0")


def reverse_cross_entropy(
    logits: torch.Tensor, target_probabilities: torch.Tensor, form: str
) -> torch.Tensor:
    """Per-sample ``-sum_c p_c log t_c``. ``paper``: ``log 0 := A = -4`` (one-hot: ``4 (1 - p_y)``).
    ``code``: ``p`` clamped to ``[1e-7, 1]`` and ``t`` to ``[1e-4, 1]``, so ``log 0`` becomes ``log 1e-4 ≈ -9.21``
    and classes with ``p < 1e-7`` get no gradient."""
    probs = logits.softmax(-1)
    if form == "code":
        return -(probs.clamp(1e-7, 1.0) * target_probabilities.clamp(1e-4, 1.0).log()).sum(-1)
    positive = target_probabilities > 0
    log_target = torch.where(positive, target_probabilities.masked_fill(~positive, 1.0).log(), RCE_LOG_ZERO)
    return -(probs * log_target).sum(-1)


def mean_absolute_error(logits: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    """Per-sample ``||p - onehot(y)||_1 = 2 (1 - p_y)`` (``paper``) or ``1 - p_y`` (``code``); ``1 - p_y`` is
    summed over the other classes rather than subtracted, so it stays exact when ``p_y`` is close to 1."""
    others = logits.softmax(-1).masked_fill(F.one_hot(target, logits.shape[-1]).bool(), 0.0).sum(-1)
    return 2.0 * others if form == "paper" else others


def normalized_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log p_y / sum_k log p_k``, in [0, 1]; the denominator is at least ``C log C``."""
    log_probs = logits.log_softmax(-1)
    return log_probs.gather(-1, target[:, None]).squeeze(-1) / log_probs.sum(-1)


def normalized_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, form: str
) -> torch.Tensor:
    """Per-sample ``FL_y / sum_k FL_k`` with ``FL_k = -(1 - p_k)^gamma log p_k``. ``code`` detaches the focal
    factors ``(1 - p_k)^gamma`` (numerator and normaliser) as the official code does: same value, other gradient."""
    focal_factor = (gamma * log_one_minus_softmax(logits)).exp()
    if form == "code":
        focal_factor = focal_factor.detach()
    focal = -focal_factor * logits.log_softmax(-1)
    return focal.gather(-1, target[:, None]).squeeze(-1) / focal.sum(-1)


class GCE(Loss):
    """Generalized cross-entropy, the L_q loss of Zhang & Sabuncu 2018 (NeurIPS):
    ``(1 - p_y^q) / q``; CE as ``q -> 0``, ``1 - p_y`` (MAE up to a factor 2) at ``q = 1``."""

    def __init__(self, q: float = 0.7) -> None:
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"loss.q={q}: must be in (0, 1]")
        self.q = q

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p_target = upcast(logits).log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        # expm1 keeps (1 - p^q) / q accurate for small q, where it tends to -log p.
        return (-torch.expm1(self.q * log_p_target) / self.q).mean()


class SCE(Loss):
    """Symmetric cross-entropy of Wang et al. 2019 (ICCV): ``alpha * CE + beta * RCE`` with
    ``RCE = -sum_c p_c log t_c`` and ``log 0 := A = -4``.

    The paper tunes ``alpha, beta`` per dataset; the defaults are its CIFAR-10 values (CIFAR-100: 6.0, 0.1).
    ``rce_form="code"``: the official code's clamps instead of ``A`` (see :func:`reverse_cross_entropy`).
    Both terms are defined for a target distribution, so soft targets are accepted.
    """

    accepts_soft_targets = True

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, rce_form: str = "paper") -> None:
        super().__init__()
        _check_weights(alpha, beta)
        _check_form("rce_form", rce_form)
        self.alpha, self.beta, self.rce_form = alpha, beta, rce_form

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        target = target.to(logits.dtype) if target.is_floating_point() else _one_hot(target, logits)
        cross_entropy = -(target * logits.log_softmax(-1)).sum(-1)
        return (
            self.alpha * cross_entropy + self.beta * reverse_cross_entropy(logits, target, self.rce_form)
        ).mean()


class NCEandRCE(Loss):
    """Active-Passive loss NCE+RCE of Ma et al. 2020 (ICML, "Normalized loss functions for deep learning with
    noisy labels"): ``alpha * CE_y / sum_k CE_k + beta * RCE``, RCE with ``log 0 := A = -4``.

    Defaults: their CIFAR-10 ``alpha = beta = 1`` (CIFAR-100: 10, 0.1). ``rce_form="code"``: the official
    code's clamps, which amount to ``A = log 1e-4`` (see :func:`reverse_cross_entropy`).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, rce_form: str = "paper") -> None:
        super().__init__()
        _check_weights(alpha, beta)
        _check_form("rce_form", rce_form)
        self.alpha, self.beta, self.rce_form = alpha, beta, rce_form

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        active = normalized_cross_entropy(logits, target)
        passive = reverse_cross_entropy(logits, _one_hot(target, logits), self.rce_form)
        return (self.alpha * active + self.beta * passive).mean()


class NCEandMAE(Loss):
    """Active-Passive loss NCE+MAE of Ma et al. 2020 (ICML): ``alpha * CE_y / sum_k CE_k + beta * ||p - onehot||_1``.

    Defaults: their CIFAR-10 ``alpha = beta = 1`` (CIFAR-100: 10, 0.1). ``mae_form="code"``: the official
    code's ``1 - p_y``, half the paper's ``2 (1 - p_y)``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, mae_form: str = "paper") -> None:
        super().__init__()
        _check_weights(alpha, beta)
        _check_form("mae_form", mae_form)
        self.alpha, self.beta, self.mae_form = alpha, beta, mae_form

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        active = normalized_cross_entropy(logits, target)
        passive = mean_absolute_error(logits, target, self.mae_form)
        return (self.alpha * active + self.beta * passive).mean()


class NFLandRCE(Loss):
    """Active-Passive loss NFL+RCE of Ma et al. 2020 (ICML): ``alpha * FL_y / sum_k FL_k + beta * RCE`` with
    ``FL_k = -(1 - p_k)^gamma log p_k`` and RCE's ``log 0 := A = -4``.

    Defaults: their CIFAR-10 ``alpha = beta = 1`` (CIFAR-100: 10, 0.1), ``gamma = 0.5`` as in their configs.
    ``nfl_form="code"`` detaches the focal factors as the official code does (same value, other gradient);
    ``rce_form="code"``: the official clamps (see :func:`reverse_cross_entropy`).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.5,
        nfl_form: str = "paper",
        rce_form: str = "paper",
    ) -> None:
        super().__init__()
        _check_weights(alpha, beta)
        _check_gamma(gamma)
        _check_form("nfl_form", nfl_form)
        _check_form("rce_form", rce_form)
        self.alpha, self.beta, self.gamma, self.nfl_form, self.rce_form = (
            alpha,
            beta,
            gamma,
            nfl_form,
            rce_form,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        active = normalized_focal_loss(logits, target, self.gamma, self.nfl_form)
        passive = reverse_cross_entropy(logits, _one_hot(target, logits), self.rce_form)
        return (self.alpha * active + self.beta * passive).mean()


class NFLandMAE(Loss):
    """Active-Passive loss NFL+MAE of Ma et al. 2020 (ICML): ``alpha * FL_y / sum_k FL_k + beta * ||p - onehot||_1``
    with ``FL_k = -(1 - p_k)^gamma log p_k``.

    Defaults: their CIFAR-10 ``alpha = beta = 1`` (CIFAR-100: 10, 0.1), ``gamma = 0.5`` as in their configs.
    ``nfl_form="code"`` detaches the focal factors as the official code does; ``mae_form="code"``: ``1 - p_y``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.5,
        nfl_form: str = "paper",
        mae_form: str = "paper",
    ) -> None:
        super().__init__()
        _check_weights(alpha, beta)
        _check_gamma(gamma)
        _check_form("nfl_form", nfl_form)
        _check_form("mae_form", mae_form)
        self.alpha, self.beta, self.gamma, self.nfl_form, self.mae_form = (
            alpha,
            beta,
            gamma,
            nfl_form,
            mae_form,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        active = normalized_focal_loss(logits, target, self.gamma, self.nfl_form)
        passive = mean_absolute_error(logits, target, self.mae_form)
        return (self.alpha * active + self.beta * passive).mean()


class LDRKL(Loss):
    """LDR-KL loss of Zhu, Ying & Yang 2023 (ICML, "Label distributionally robust losses for multi-class
    classification"), the KL-regularised worst case over label distributions ``q``:
    ``max_q sum_k q_k (c 1[k≠y] + f_k - f_y) - λ KL(q, 1/C) = λ log (1/C) sum_k exp((c 1[k≠y] + f_k - f_y) / λ)``.

    ``margin`` is ``c`` (0.1, their experiment script's default); ``lambda_`` is ``λ`` (1, the middle of their
    tuning grid {0.1, 1, 10}). ``score_form="paper"`` uses the logits as ``f``; ``"code"`` uses the official
    code's ``f = softplus(z) / mean_k softplus(z)``.
    """

    def __init__(self, lambda_: float = 1.0, margin: float = 0.1, score_form: str = "paper") -> None:
        super().__init__()
        if lambda_ <= 0:
            raise ConfigError(f"loss.lambda_={lambda_}: must be > 0")
        if margin < 0:
            raise ConfigError(f"loss.margin={margin}: must be >= 0")
        _check_form("score_form", score_form)
        self.lambda_, self.margin, self.score_form = lambda_, margin, score_form

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scores = upcast(logits)
        if self.score_form == "code":
            scores = F.softplus(scores)
            # All-very-negative logits make every softplus 0; the floor turns 0/0 into 0 instead of NaN.
            scores = scores / scores.mean(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        is_target = F.one_hot(target, scores.shape[-1]).bool()
        margins = scores - scores.gather(-1, target[:, None]) + self.margin * (~is_target).to(scores.dtype)
        log_mean_exp = (margins / self.lambda_).logsumexp(-1) - math.log(scores.shape[-1])
        return (self.lambda_ * log_mean_exp).mean()
