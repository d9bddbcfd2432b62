"""Knowledge distillation: the student's loss given a frozen teacher's outputs on the same images.

Every loss here declares ``needs_teacher``: the training module runs the teacher (:mod:`losslab.teacher`) on the
batch and calls ``loss(logits, target, teacher=TeacherOutputs(...), features=student_features)``. Targets are
class indices ``[N]`` or probabilities ``[N, C]`` (mixing); a term defined through the target class is then its
expectation under the target distribution, so one-hot probabilities give exactly the value on indices.
:meth:`DistillationLoss.distillation_terms` returns the task and distillation terms apart (the loss is their sum)
for optimisers that treat their gradients differently (DOT, Zhao et al. 2023; DHKD's gradient alignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


@dataclass
class TeacherOutputs:
    """What the teacher computed on the student's batch, without gradients and in eval mode."""

    logits: torch.Tensor  # [N, C]
    features: torch.Tensor  # [N, F_t], the input of the teacher's classifier (penultimate layer)


def _positive(option: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"loss.{option}={value}: must be > 0")
    return float(value)


def _non_negative(option: str, value: float) -> float:
    if not value >= 0:
        raise ConfigError(f"loss.{option}={value}: must be >= 0")
    return float(value)


def _warmup_epochs(value: int | None) -> int:
    if value is None:
        return 0
    if int(value) != value or value < 0:
        raise ConfigError(f"loss.warmup_epochs={value}: must be an integer >= 0 (0 or null: no warm-up)")
    return int(value)


def _warmup_scale(epoch: int, warmup_epochs: int) -> float:
    """The distillation term's weight in (0-based) ``epoch``: ``min(1, (epoch + 1) / warmup_epochs)``, as the DKD
    code counts epochs from 1 (``min(epoch / warmup, 1)``)."""
    return 1.0 if warmup_epochs == 0 else min(1.0, (epoch + 1) / warmup_epochs)


def _target_distribution(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` probabilities: one-hot rows for class indices."""
    if target.is_floating_point():
        return target.to(like.dtype)
    return F.one_hot(target, like.shape[-1]).to(like.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target.to(logits.dtype) if target.is_floating_point() else target)


def kd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s soft-target term per sample, ``tau^2 KL(softmax(t / tau) || softmax(s / tau))``, ``[N]``."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def _exclusive_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``out[:, c] = log sum_{j != c} exp(x[:, j])`` for every c at once, from running log-sum-exps from both ends
    (no subtraction, so it stays exact when one term dominates). Needs at least two columns."""
    empty = x.new_full((x.shape[0], 1), -math.inf)
    before = torch.cat([empty, torch.logcumsumexp(x, dim=1)[:, :-1]], dim=1)
    after = torch.cat([torch.logcumsumexp(x.flip(1), dim=1).flip(1)[:, 1:], empty], dim=1)
    return torch.logaddexp(before, after)


def _exclusive_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[:, c] = sum_{j != c} x[:, j]`` without subtracting x[:, c] from the total (no cancellation)."""
    empty = x.new_zeros((x.shape[0], 1))
    before = torch.cat([empty, torch.cumsum(x, dim=1)[:, :-1]], dim=1)
    after = torch.cat([torch.cumsum(x.flip(1), dim=1).flip(1)[:, 1:], empty], dim=1)
    return before + after


def _nckd_at(student: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """NCKD with ``classes [N]`` as the target classes, from the renormalised softmax over the other classes."""
    mask = F.one_hot(classes, student.shape[1]).bool()
    log_p_hat = F.log_softmax(student.masked_fill(mask, -math.inf), dim=1)
    log_q_hat = F.log_softmax(teacher.masked_fill(mask, -math.inf), dim=1)
    return (log_q_hat.exp() * (log_q_hat - log_p_hat).masked_fill(mask, 0.0)).sum(1)


def decoupled_kd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's TCKD and NCKD (Zhao et al. 2022, "Reformulating KD"), times ``tau^2``, for every choice of target class:
    ``[N, C]`` each, column c holding the terms when c is the target. With ``p = softmax(z / tau)``:
    ``TCKD_c = KL([q_c, 1 - q_c] || [p_c, 1 - p_c])``, ``NCKD_c = KL(q_hat || p_hat)`` over the classes j != c with
    ``p_hat_j = p_j / (1 - p_c)``; so that ``KD = TCKD_c + (1 - q_c) NCKD_c`` (q: teacher, p: student).

    ``sum_{j != c} q_hat_j log(q_hat_j / p_hat_j) = sum_{j != c} q_j log(q_j / p_j) / (1 - q_c) - log(1 - q_c)
    + log(1 - p_c)`` gives every column in O(C); in the teacher's top class, whose non-target mass may underflow,
    NCKD is computed from the renormalised softmax directly, as the authors' code does for the target class.
    """
    if student_logits.shape[1] == 1:  # no non-target class: both terms vanish (and so does KD)
        zeros = student_logits * 0.0
        return zeros, zeros
    student, teacher = student_logits / temperature, teacher_logits / temperature
    log_p, log_q = F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1)
    log_p_rest, log_q_rest = (
        _exclusive_logsumexp(log_p),
        _exclusive_logsumexp(log_q),
    )  # log(1 - p_c), log(1 - q_c)
    q, q_rest = log_q.exp(), log_q_rest.exp()
    tckd = q * (log_q - log_p) + q_rest * (log_q_rest - log_p_rest)
    top = teacher.argmax(dim=1)
    is_top = F.one_hot(top, teacher.shape[1]).bool()
    # 1 / (1 - q_c) <= C away from the teacher's top class; that column is replaced below
    inverse_rest = torch.where(is_top, 0.0, (-log_q_rest).exp())
    nckd = _exclusive_sum(q * (log_q - log_p)) * inverse_rest - log_q_rest + log_p_rest
    nckd = torch.where(is_top, _nckd_at(student, teacher, top)[:, None], nckd)
    return temperature**2 * tckd, temperature**2 * nckd


def binary_kl_norm(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """DHKD's logit-level loss per sample (Yang et al. 2024, BinaryKL-Norm), ``[N]``:
    ``tau^2 sum_c KL(Bernoulli(1/2) || Bernoulli(sigmoid((s_c - t_c) / tau)))``, zero iff the logits are equal.
    Written with log-sigmoids (the authors clamp sigmoid to [1e-8, 1 - 1e-8] instead), so it stays finite and keeps
    its gradient for any logit gap: ``KL = -log 2 - (log sigmoid(d) + log sigmoid(-d)) / 2``."""
    gap = (student_logits - teacher_logits) / temperature
    per_class = -0.5 * (F.logsigmoid(gap) + F.logsigmoid(-gap)) - math.log(2.0)
    return temperature**2 * per_class.sum(-1)


def norm_direction_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, class_directions: torch.Tensor
) -> torch.Tensor:
    """The ND loss per sample (Wang et al., "Improving knowledge distillation via regularizing feature norm and
    direction", the ND loss as the authors' ``DirectNormLoss`` computes it), ``[N]``:
    ``1 - <f_s, e_y> / max(||f_s||, ||f_t||)``, e_y the unit mean teacher feature of the sample's class (rows of
    ``class_directions``). Below the teacher's norm it rewards a longer projection on e_y (norm), above it it is the
    cosine distance to e_y (direction)."""
    scale = torch.maximum(student_features.norm(dim=1), teacher_features.norm(dim=1)).clamp_min(1e-12)
    return 1.0 - (student_features * class_directions).sum(1) / scale


class DistillationLoss(Loss):
    """A classification loss learning from a teacher: ``forward(logits, target, teacher, features)``.

    ``needs_teacher_class_means``: the training module calls :meth:`set_teacher_class_means` with the teacher's
    mean feature per class over the training split before training. :meth:`setup_distillation` is called with the
    student's and the teacher's feature dimensions right after :meth:`build_head`, before the optimizer exists, so a
    loss can create parameters of its own (ND's projection) that train with the network.
    """

    needs_teacher: ClassVar[bool] = True
    needs_teacher_class_means: ClassVar[bool] = False
    accepts_soft_targets = True
    gathers_across_ranks = False  # a mean of per-sample terms

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        task, distillation = self.distillation_terms(logits, target, teacher, features)
        return task + distillation

    def distillation_terms(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(task term, distillation term)``, scalars whose sum is the loss."""
        raise NotImplementedError

    def setup_distillation(self, student_feature_dim: int, teacher_feature_dim: int) -> None:
        """Creates the loss's own parameters, if any, once both feature dimensions are known."""

    def set_teacher_class_means(self, means: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not use the teacher's class means")


class KnowledgeDistillation(DistillationLoss):
    """Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network", §2):
    ``(1 - alpha) CE(z_s, y) + alpha tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))``; the ``tau^2`` keeps the
    soft term's gradients on the scale of the hard term's as tau changes."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss.alpha={alpha}: the weight of the distillation term must be in [0, 1]")
        self.alpha = float(alpha)
        self.temperature = _positive("temperature", temperature)

    def distillation_terms(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        logits = upcast(logits)
        kd = kd_divergence(logits, teacher.logits.to(logits.dtype), self.temperature).mean()
        return (1.0 - self.alpha) * cross_entropy(logits, target), self.alpha * kd


class DecoupledKD(DistillationLoss):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang 2022, CVPR, "Decoupled knowledge
    distillation"): ``CE(z_s, y) + w_e (alpha TCKD + beta NCKD)``, TCKD the KL divergence between the
    teacher's and the student's binary (target, non-target) probabilities and NCKD the one between their
    distributions over the non-target classes, both at temperature tau and times ``tau^2``
    (:func:`decoupled_kd_terms`). ``w_e = min(1, e / warmup_epochs)`` in (1-based) epoch e, the linear warm-up of the
    authors' code (:meth:`set_epoch`; it starts at epoch 0's weight). KD is the case ``alpha = 1, beta = 1 - q_t``.
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int | None = 20
    ) -> None:
        super().__init__()
        self.alpha = _non_negative("alpha", alpha)
        self.beta = _non_negative("beta", beta)
        self.temperature = _positive("temperature", temperature)
        self.warmup_epochs = _warmup_epochs(warmup_epochs)
        self.distillation_scale = _warmup_scale(0, self.warmup_epochs)

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.distillation_scale = _warmup_scale(epoch, self.warmup_epochs)

    def distillation_terms(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        logits = upcast(logits)
        tckd, nckd = decoupled_kd_terms(logits, teacher.logits.to(logits.dtype), self.temperature)
        weights = _target_distribution(target, logits)
        decoupled = (weights * (self.alpha * tckd + self.beta * nckd)).sum(1).mean()
        return cross_entropy(logits, target), self.distillation_scale * decoupled


class DualHead(nn.Module):
    """DHKD's classifier: ``main`` (cross-entropy; its logits are the model's, ``forward(features)``) and
    ``auxiliary`` (the logit-level distillation loss), both on the same features. ``auxiliary_head="nonlinear"``
    is the authors' ``NonLinearClassifier``: Linear(D, 200)-Dropout(0.1)-BatchNorm-ReLU-Linear(200, C)."""

    def __init__(self, feature_dim: int, num_classes: int, auxiliary_head: str = "linear") -> None:
        super().__init__()
        self.main = nn.Linear(feature_dim, num_classes)
        if auxiliary_head == "linear":
            self.auxiliary: nn.Module = nn.Linear(feature_dim, num_classes)
        else:
            self.auxiliary = nn.Sequential(
                nn.Linear(feature_dim, 200), nn.Dropout(0.1), nn.BatchNorm1d(200), nn.ReLU(inplace=True),
                nn.Linear(200, num_classes),
            )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.main(features)


class DualHeadKD(DistillationLoss):
    """Dual-head knowledge distillation (Yang, Zong, Huang, Feng & An 2024, "Dual-head knowledge distillation:
    enhancing logits utilization with an auxiliary head", arXiv:2411.08937):
    ``CE(g_main(f), y) + alpha BinaryKL-Norm(g_aux(f), z_t)`` (:func:`binary_kl_norm`, temperature tau), two linear
    classifiers on the student's features f. The logit-level loss and cross-entropy conflict in a shared classifier
    (it collapses) but not in the backbone, so only the auxiliary head and the backbone learn from the teacher; the
    main head's logits are the ones evaluated. The loss owns its head (:class:`DualHead`, :meth:`build_head`) and
    needs ``features`` in ``forward``."""

    AUXILIARY_HEADS = ("linear", "nonlinear")

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, auxiliary_head: str = "linear") -> None:
        super().__init__()
        self.alpha = _non_negative("alpha", alpha)
        self.temperature = _positive("temperature", temperature)
        if auxiliary_head not in self.AUXILIARY_HEADS:
            raise ConfigError(
                f"loss.auxiliary_head={auxiliary_head!r}: allowed values are {', '.join(self.AUXILIARY_HEADS)}"
            )
        self.auxiliary_head = auxiliary_head
        self.head: DualHead | None = None

    def build_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        # A plain reference, not a submodule: the head belongs to the training module (its parameters train and are
        # saved there once); the loss only reads its auxiliary classifier.
        self.__dict__["head"] = DualHead(feature_dim, num_classes, self.auxiliary_head)
        return self.head

    def distillation_terms(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if features is None or self.head is None:
            raise TypeError("DualHeadKD needs the student's features and the head it built (build_head)")
        logits = upcast(logits)
        auxiliary = self.head.auxiliary(features).to(logits.dtype)
        distillation = binary_kl_norm(auxiliary, teacher.logits.to(logits.dtype), self.temperature).mean()
        return cross_entropy(logits, target), self.alpha * distillation


class NormDirectionKD(DistillationLoss):
    """KD++ (Wang, Cheng, Duan, Wang, Feng & Kong, "Improving knowledge distillation via regularizing feature norm
    and direction", arXiv:2305.17007): ``CE + w_e kd_weight tau^2 KL(q || p) + nd_weight ND``, with the ND loss
    (:func:`norm_direction_loss`) pulling the student's features along the teacher's class-mean direction and up to
    the teacher's feature norm. ``kd_weight = 0`` gives CE + ND. ``w_e``: the linear warm-up of the KD term over
    ``warmup_epochs`` of the authors' CIFAR code (ND is not warmed up).

    Student features of another width than the teacher's are mapped to it by a linear layer the loss owns
    (``projection``, created by :meth:`setup_distillation`; the authors' ``EmbTrans``), trained with the network and
    used for the ND loss only. The class means come from :meth:`set_teacher_class_means` (not saved in checkpoints:
    the training module sets them again on resume).
    """

    needs_teacher_class_means = True

    def __init__(
        self, kd_weight: float = 1.0, temperature: float = 4.0, nd_weight: float = 2.0,
        warmup_epochs: int | None = 20,
    ) -> None:  # fmt: skip
        super().__init__()
        self.kd_weight = _non_negative("kd_weight", kd_weight)
        self.temperature = _positive("temperature", temperature)
        self.nd_weight = _non_negative("nd_weight", nd_weight)
        self.warmup_epochs = _warmup_epochs(warmup_epochs)
        self.distillation_scale = _warmup_scale(0, self.warmup_epochs)
        self.projection: nn.Module = nn.Identity()
        self.register_buffer("class_directions", None, persistent=False)

    def setup_distillation(self, student_feature_dim: int, teacher_feature_dim: int) -> None:
        if student_feature_dim != teacher_feature_dim:
            self.projection = nn.Linear(student_feature_dim, teacher_feature_dim)

    def set_teacher_class_means(self, means: torch.Tensor) -> None:
        if means.dim() != 2 or not torch.isfinite(means).all():
            raise ValueError(
                f"teacher class means must be a finite [C, F_t] tensor, got {tuple(means.shape)}"
            )
        self.class_directions = F.normalize(means.detach().float(), dim=1)

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.distillation_scale = _warmup_scale(epoch, self.warmup_epochs)

    def distillation_terms(
        self, logits: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if features is None or self.class_directions is None:
            raise TypeError("NormDirectionKD needs the student's features and set_teacher_class_means")
        logits = upcast(logits)
        kd = kd_divergence(logits, teacher.logits.to(logits.dtype), self.temperature).mean()
        student = self.projection(upcast(features)).to(logits.dtype)
        if student.shape[1] != self.class_directions.shape[1]:
            raise TypeError(
                f"student features of width {student.shape[1]} against teacher class means of width "
                f"{self.class_directions.shape[1]}: call setup_distillation(student_dim, teacher_dim) first"
            )
        directions = self.class_directions.to(logits.dtype)
        # ND is linear in e_y, so for probability targets e_y is their mixture of class directions
        directions = (
            target.to(logits.dtype) @ directions if target.is_floating_point() else directions[target]
        )
        nd = norm_direction_loss(student, teacher.features.to(logits.dtype), directions).mean()
        distillation = self.distillation_scale * self.kd_weight * kd + self.nd_weight * nd
        return cross_entropy(logits, target), distillation
