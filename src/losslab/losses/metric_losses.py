"""Metric-as-loss objectives: AnyLoss (a confusion-matrix metric made differentiable) and the Jaccard metric /
Dice semimetric losses (IoU and Dice scores that accept soft labels).

All three are computed over the whole batch, so their value for a sample depends on the rest of the batch:
they estimate a dataset-level metric from one mini-batch, as their papers do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast

ANYLOSS_METRICS = ("accuracy", "f1", "fbeta", "geometric_mean", "balanced_accuracy")
CLASS_MODES = ("present", "all")


def _as_probabilities(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` targets in the logits' dtype, from class indices or from probabilities."""
    if target.is_floating_point():
        return target.to(logits.dtype)
    return F.one_hot(target, logits.shape[-1]).to(logits.dtype)


def _mean_over(values: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ``included`` classes; 0 (still attached to the graph) when none is."""
    total = torch.where(included, values, torch.zeros_like(values)).sum()
    return total / included.sum().clamp_min(1)


class AnyLoss(Loss):
    """AnyLoss (Han, Moniz & Chawla 2024, KDD, "AnyLoss: Transforming Classification Metrics into Loss
    Functions"): ``1 - metric(TN, FN, FP, TP)`` on a confusion matrix of amplified probabilities
    ``A(p) = 1 / (1 + exp(-L (p - 0.5)))``, e.g. ``TP = sum_i y_i A(p_i)``, ``FP = sum_i (1 - y_i) A(p_i)``.

    ``L`` is the paper's amplifying scale (73 in its experiments); ``metric`` is one of the paper's four:
    ``accuracy`` ``(TP + TN) / N``, ``fbeta`` ``(1 + beta^2) TP / ((1 + beta^2) TP + beta^2 FN + FP)`` (``f1``
    is ``fbeta`` with ``beta = 1``), ``geometric_mean`` ``sqrt(TP / (TP + FN) * TN / (TN + FP))`` and
    ``balanced_accuracy`` ``(TP / (TP + FN) + TN / (TN + FP)) / 2``.

    The paper is binary. Here ``p = softmax(z)`` and each class ``c`` has its one-vs-rest entries ``TP_c``,
    ``FN_c``, ``FP_c`` over the batch. With two classes every metric is exactly the paper's, class 1 being
    the positive class (``A(1 - p) = 1 - A(p)``: class 0's matrix is class 1's mirrored). With more classes
    each metric takes its usual multi-class form: accuracy ``sum_c TP_c / N``; balanced accuracy the mean
    recall ``TP_c / (TP_c + FN_c)`` and geometric mean the geometric mean of recalls over the classes present
    in the batch's labels; F-beta the macro average of ``F_beta,c`` over the classes present. A class absent
    from the labels is left out: its recall is undefined and its F-beta is 0 whatever the prediction. With two
    classes F-beta is class 1's alone, and 0 (loss 1, no gradient) in a batch without positives.
    """

    def __init__(self, metric: str = "f1", L: float = 73.0, beta: float = 1.0) -> None:
        super().__init__()
        if metric not in ANYLOSS_METRICS:
            raise ConfigError(f"loss.metric={metric!r}: must be one of {', '.join(ANYLOSS_METRICS)}")
        if L <= 0:
            raise ConfigError(f"loss.L={L}: the amplifying scale must be > 0")
        if beta <= 0:
            raise ConfigError(f"loss.beta={beta}: must be > 0")
        if metric != "fbeta" and beta != 1.0:
            raise ConfigError(f"loss.beta={beta} is only used by loss.metric=fbeta (loss.metric={metric!r})")
        self.metric, self.L, self.beta = metric, float(L), float(beta)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        labels = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        amplified = torch.sigmoid(self.L * (logits.softmax(-1) - 0.5))
        true_positives = (labels * amplified).sum(0)
        positives = labels.sum(0)  # TP_c + FN_c
        present = positives > 0
        if self.metric == "accuracy":
            return 1.0 - true_positives.sum() / len(labels)
        if self.metric in ("f1", "fbeta"):
            beta_squared = self.beta**2
            # A(p) > 0, so the denominator only vanishes when A underflows (a huge L); 0/tiny is then 0.
            denominator = beta_squared * positives + amplified.sum(0)  # beta^2 (TP + FN) + TP + FP
            denominator = denominator.clamp_min(torch.finfo(logits.dtype).tiny)
            f_beta = (1 + beta_squared) * true_positives / denominator
            return 1.0 - (f_beta[1] if logits.shape[-1] == 2 else _mean_over(f_beta, present))
        recall = true_positives / positives.clamp_min(1)
        if self.metric == "balanced_accuracy":
            return 1.0 - _mean_over(recall, present)
        # Absent classes' recalls are set to 1 before the log: the masked-out branch then carries no NaN.
        log_recall = recall.clamp_min(torch.finfo(logits.dtype).tiny).masked_fill(~present, 1.0).log()
        return 1.0 - _mean_over(log_recall, present).exp()


class _SetOverlapLoss(Loss):
    """Shared by the Jaccard and Dice losses: per-class L1 cardinalities over the batch of ``x = softmax(z)``
    and the target ``y`` (one-hot or probabilities), and the choice of the classes the loss averages over."""

    accepts_soft_targets = True

    def __init__(self, classes: str = "present", threshold: float = 0.01) -> None:
        super().__init__()
        if classes not in CLASS_MODES:
            raise ConfigError(f"loss.classes={classes!r}: must be one of {', '.join(CLASS_MODES)}")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"loss.threshold={threshold}: must be in [0, 1)")
        self.classes, self.threshold = classes, threshold

    def score(
        self, prediction_norm: torch.Tensor, target_norm: torch.Tensor, difference_norm: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        target = _as_probabilities(target, logits)
        probabilities = logits.softmax(-1)
        prediction_norm = probabilities.sum(0)  # ||x_c||_1: x and y are non-negative
        target_norm = target.sum(0)
        difference_norm = (probabilities - target).abs().sum(0)
        # A class with x_c = y_c = 0 (only when softmax underflows and the class has no target mass) compares
        # two empty sets: score 1. The denominator is replaced first so that no 0/0 reaches the gradient.
        empty = prediction_norm + target_norm == 0
        safe_prediction_norm = prediction_norm.masked_fill(empty, 1.0)
        score = torch.where(empty, 1.0, self.score(safe_prediction_norm, target_norm, difference_norm))
        if self.classes == "all":
            included = torch.ones_like(empty)
        else:
            included = target.amax(0) > self.threshold
        return _mean_over(1.0 - score, included)


class JaccardMetricLoss(_SetOverlapLoss):
    """Jaccard metric loss JML (Wang, Ning & Blaschko 2023, NeurIPS, "Jaccard Metric Losses: Optimizing the
    Jaccard Index with Soft Labels"), per class over the batch and averaged over classes:
    ``1 - (||x||_1 + ||y||_1 - ||x - y||_1) / (||x||_1 + ||y||_1 + ||x - y||_1)``, ``x = softmax(z)[:, c]``.

    Equal to the soft Jaccard loss for one-hot targets, and a metric for soft ones (0 exactly when ``x = y``).
    ``classes="present"`` (the paper's advice for hard labels) averages over the classes whose target
    probability exceeds ``threshold`` for some sample of the batch (for one-hot targets: the classes in the
    batch); ``"all"`` averages over every class, an absent one then scoring loss 1 whatever its prediction.
    ``threshold`` is the official code's default 0.01; that code averages over all classes for soft targets
    by default. No class above the threshold (possible only with soft targets) gives 0. The papers state the
    losses without the official code's ``smooth`` constant, and none is needed: a present class has
    ``||y||_1 > 0``.
    """

    def score(
        self, prediction_norm: torch.Tensor, target_norm: torch.Tensor, difference_norm: torch.Tensor
    ) -> torch.Tensor:
        cardinality = prediction_norm + target_norm
        return (cardinality - difference_norm) / (cardinality + difference_norm)


class DiceSemimetricLoss(_SetOverlapLoss):
    """Dice semimetric loss DML (Wang, Popordanoska, Bertels, Lemmens & Blaschko 2023, MICCAI, "Dice
    Semimetric Losses: Optimizing the Dice Score with Soft Labels"), per class over the batch and averaged
    over classes: ``1 - (||x||_1 + ||y||_1 - ||x - y||_1) / (||x||_1 + ||y||_1)``, ``x = softmax(z)[:, c]``.

    Equal to the soft Dice loss for one-hot targets and 0 exactly when ``x = y`` for soft ones; its score
    ``D`` and the Jaccard metric loss's ``J`` satisfy ``J = D / (2 - D)`` class by class. ``classes`` and
    ``threshold`` choose the classes averaged over, as in :class:`JaccardMetricLoss`.
    """

    def score(
        self, prediction_norm: torch.Tensor, target_norm: torch.Tensor, difference_norm: torch.Tensor
    ) -> torch.Tensor:
        cardinality = prediction_norm + target_norm
        return (cardinality - difference_norm) / cardinality
