"""Terms added to any classification loss: ``regularizer=<name>`` or ``regularizer=[<name>,<name>]``.

Each choice is one YAML in ``configs/regularizer/`` whose single top-level key names it
(``palm_zloss: {_target_: ...}``), so several can be selected at once and each is overridden as
``regularizer.<name>.<hyperparameter>=...``. The training module adds every selected term to the loss and
logs each as ``<stage>/reg/<name>``; an embedding loss has no logits and is refused at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.base import upcast
from losslab.losses.classification import palm_z_loss


@dataclass
class RegularizerContext:
    """What a term that probes the network gets besides the logits (``needs_context = True``)."""

    images: torch.Tensor  # the training batch the logits came from, [N, C, H, W] float, normalised
    features: torch.Tensor  # backbone features of those images, [N, F]
    classify: Callable[[torch.Tensor], torch.Tensor]  # images -> logits through backbone and head (with grad)
    embed: Callable[[torch.Tensor], torch.Tensor]  # images -> backbone features (with grad)


class Regularizer(nn.Module):
    """``forward(logits [N, C], target [N] long or [N, C] probabilities[, context]) -> scalar``, already
    weighted: the training module adds it to the loss as it is. A term with ``needs_context = True`` also
    gets a :class:`RegularizerContext`; :meth:`build` creates parameters of its own before the optimizer is
    built, and :meth:`evaluation_logits` gives its own inference rule's logits at val/test, if it has one."""

    needs_context: bool = False

    def build(self, feature_dim: int, num_classes: int) -> None:
        """Called once by the training module, before the optimizer is built."""

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, context: RegularizerContext | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def evaluation_logits(self, images: torch.Tensor, context: RegularizerContext) -> torch.Tensor | None:
        return None


def _probabilities(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N]`` class indices as one-hot rows; ``[N, C]`` probabilities as they are."""
    if target.is_floating_point():
        return target.to(dtype)
    return F.one_hot(target, num_classes).to(dtype)


def _check(condition: bool, option: str, value: object, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"regularizer.{option}={value!r}: {requirement}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PaLMZLossRegularizer(Regularizer):
    """PaLM's z-loss (Chowdhery et al. 2022, section 5), ``coefficient * log^2 Z`` with Z the softmax
    normaliser: :func:`losslab.losses.classification.palm_z_loss`. Not the spherical Z-loss of
    de Brebisson & Vincent 2016 (``loss=zloss_spherical``)."""

    def __init__(self, coefficient: float = 1e-4) -> None:
        super().__init__()
        if coefficient < 0:
            raise ConfigError(f"regularizer.palm_zloss.coefficient={coefficient}: must be >= 0")
        self.coefficient = coefficient

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return palm_z_loss(logits, self.coefficient)


def _unit(direction: torch.Tensor) -> torch.Tensor:
    """Each sample divided by its L2 norm over all non-batch dims (a zero direction stays zero). Dividing by
    the largest entry first keeps the squares of a tiny finite-difference gradient representable."""
    dims = tuple(range(1, direction.dim()))
    tiny = torch.finfo(direction.dtype).tiny
    direction = direction / direction.abs().amax(dim=dims, keepdim=True).clamp_min(tiny)
    return direction / direction.square().sum(dim=dims, keepdim=True).sqrt().clamp_min(tiny)


def _kl_from_logits(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``mean_i KL(softmax(reference_i) || softmax(logits_i))``."""
    reference = F.log_softmax(upcast(reference_logits), dim=-1)
    return (reference.exp() * (reference - F.log_softmax(upcast(logits), dim=-1))).sum(dim=-1).mean()


@contextmanager
def _batchnorm_statistics_frozen(network: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Extra forward passes leave BatchNorm's running statistics (and ``num_batches_tracked``) untouched, as
    ``update_batch_stats=False`` does in the official VAT code: with ``track_running_stats`` off, a BatchNorm
    in training mode normalises with the batch's statistics without recording them, and one in eval mode
    still uses the running ones. Reached when ``network`` is an ``nn.Module`` or a bound method of one (the
    training module passes itself); a plain function's BatchNorm layers cannot be found and keep updating."""
    owner = network if isinstance(network, nn.Module) else getattr(network, "__self__", None)
    norms = []
    if isinstance(owner, nn.Module):
        norms = [m for m in owner.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]  # fmt: skip
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


class VATRegularizer(Regularizer):
    """Virtual adversarial training (Miyato, Maeda, Koyama & Ishii 2018, TPAMI, "Virtual Adversarial
    Training: a regularization method for supervised and semi-supervised learning", section 3):
    ``alpha * mean_i KL(p(y|x_i) || p(y|x_i + r_adv,i))`` (the LDS), p(y|x) the batch's own prediction held
    constant, ``r_adv = eps * g / ||g||`` with g from ``power_iterations`` steps of the power method started
    at a random d: ``g = grad_d KL(p(y|x) || p(y|x + xi * d / ||d||))``, then d <- g (norms per sample, over
    all non-batch dims). The label is not used, so soft targets change nothing.

    The direction comes from ``torch.autograd.grad`` with respect to d alone (no ``.grad`` is left on the
    parameters) with autocast disabled (a ``xi = 1e-6`` step is below bf16/fp16 resolution). The extra passes
    do not update BatchNorm's running statistics (:func:`_batchnorm_statistics_frozen`); dropout follows the
    module's mode, as in the official code. ``r_adv`` lives in the space of ``context.images``: after the
    dataset's normalisation."""

    needs_context = True

    def __init__(
        self, coefficient: float = 1.0, eps: float = 8.0, xi: float = 1e-6, power_iterations: int = 1
    ) -> None:
        super().__init__()
        _check(_is_number(coefficient) and coefficient >= 0, "vat.coefficient", coefficient, "must be >= 0")
        _check(_is_number(eps) and eps > 0, "vat.eps", eps, "must be > 0")
        _check(_is_number(xi) and xi > 0, "vat.xi", xi, "must be > 0")
        integer = isinstance(power_iterations, int) and not isinstance(power_iterations, bool)
        _check(integer and power_iterations >= 1, "vat.power_iterations", power_iterations,
               "must be an integer >= 1")  # fmt: skip
        self.coefficient = coefficient
        self.eps = eps
        self.xi = xi
        self.power_iterations = power_iterations

    def adversarial_perturbation(
        self, images: torch.Tensor, logits: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor],
        direction: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """``r_adv`` (detached, of norm ``eps`` per sample) from the starting direction ``direction``."""
        images, logits = images.detach(), logits.detach()
        with _batchnorm_statistics_frozen(classify), torch.autocast(images.device.type, enabled=False):
            for _ in range(self.power_iterations):
                step = (self.xi * _unit(direction)).requires_grad_()
                divergence = _kl_from_logits(logits, classify(images + step))
                (direction,) = torch.autograd.grad(divergence, step)
        return self.eps * _unit(direction.detach())

    def local_distributional_smoothness(
        self, logits: torch.Tensor, context: RegularizerContext, direction: torch.Tensor
    ) -> torch.Tensor:
        """The batch's unweighted LDS, the power method started at ``direction``."""
        perturbation = self.adversarial_perturbation(context.images, logits, context.classify, direction)
        with _batchnorm_statistics_frozen(context.classify):
            perturbed_logits = context.classify(context.images.detach() + perturbation)
        return _kl_from_logits(logits.detach(), perturbed_logits)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, context: RegularizerContext | None = None
    ) -> torch.Tensor:
        direction = torch.randn_like(context.images)
        return self.coefficient * self.local_distributional_smoothness(logits, context, direction)


ROTATIONS = 4  # 0, 90, 180 and 270 degrees


class SLARegularizer(Regularizer):
    """Self-supervised label augmentation (Lee, Hwang & Shin 2020, ICML, "Self-supervised Label Augmentation
    via Input Transformations"): a joint head u over (class, rotation) pairs trained on the four rotations x_r
    of each image, ``coefficient * (1/4) sum_r CE(u(f(x_r)), (y, r))``; with ``[N, C]`` probabilities the
    joint target of x_r is ``y ⊗ onehot(r)``. Joint index ``c * 4 + r``, as in the official code.

    Aggregated inference (SLA+AG), :meth:`evaluation_logits`: ``z_c = (1/4) sum_r u(f(x_r))_(c, r)``.
    ``self_distillation`` (SLA+SD) adds ``T^2 * KL(softmax(z_agg / T) || softmax(z / T))``, z the main head's
    logits and z_agg held constant, so the main head learns the aggregated prediction (the paper's
    ``beta * CE`` on that head is the main loss here). ``coefficient`` weighs both parts (1: the paper).
    The rotated batch goes through the backbone in the module's mode: in training its BatchNorm statistics
    are recorded, as when the paper trains on it. Images must be square."""

    needs_context = True

    def __init__(
        self, coefficient: float = 1.0, self_distillation: bool = False, temperature: float = 1.0
    ) -> None:
        super().__init__()
        _check(_is_number(coefficient) and coefficient >= 0, "sla.coefficient", coefficient, "must be >= 0")
        _check(isinstance(self_distillation, bool), "sla.self_distillation", self_distillation,
               "must be true or false")  # fmt: skip
        _check(_is_number(temperature) and temperature > 0, "sla.temperature", temperature, "must be > 0")
        self.coefficient = coefficient
        self.self_distillation = self_distillation
        self.temperature = temperature
        self.joint_head: nn.Linear | None = None

    def build(self, feature_dim: int, num_classes: int) -> None:
        self.joint_head = nn.Linear(feature_dim, ROTATIONS * num_classes)

    def rotated_joint_logits(self, images: torch.Tensor, context: RegularizerContext) -> torch.Tensor:
        """``[4, N, C, 4]``: the joint logits of each rotation r (first index) of each image."""
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"regularizer=sla rotates images by 90 degrees: they must be square, "
                             f"got {tuple(images.shape)}")  # fmt: skip
        rotated = torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(ROTATIONS)])
        joint = self.joint_head(context.embed(rotated))
        return joint.view(ROTATIONS, len(images), -1, ROTATIONS)

    @staticmethod
    def _at_own_rotation(joint: torch.Tensor) -> torch.Tensor:
        """``[4, N, C]``: the joint logits of the pairs (c, r) for the rotation r of each image."""
        rotation = torch.arange(ROTATIONS, device=joint.device)
        return joint[rotation, :, :, rotation]

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, context: RegularizerContext | None = None
    ) -> torch.Tensor:
        joint = upcast(self.rotated_joint_logits(context.images, context))
        log_joint = F.log_softmax(joint.flatten(2), dim=-1).view_as(joint)
        target = _probabilities(target, joint.shape[2], log_joint.dtype)
        term = -(target * self._at_own_rotation(log_joint)).sum(dim=-1).mean()
        if self.self_distillation:
            aggregated = self._at_own_rotation(joint).mean(dim=0).detach()
            t = self.temperature
            term = term + t**2 * _kl_from_logits(aggregated / t, upcast(logits) / t)
        return self.coefficient * term

    def evaluation_logits(self, images: torch.Tensor, context: RegularizerContext) -> torch.Tensor:
        return self._at_own_rotation(self.rotated_joint_logits(images, context)).mean(dim=0)


class EntropyMinimizationRegularizer(Regularizer):
    """Entropy minimisation (Grandvalet & Bengio 2005, NeurIPS, "Semi-supervised learning by entropy
    minimization"): ``coefficient * mean_i H(softmax(z_i))``, ``H(p) = -sum_c p_c log p_c``. A positive
    coefficient (their lambda) sharpens the predictions; a negative one maximises the entropy: the confidence
    penalty of Pereyra et al. 2017 ("Regularizing neural networks by penalizing confident output
    distributions") with beta = -coefficient. The label is not used."""

    def __init__(self, coefficient: float = 0.1) -> None:
        super().__init__()
        _check(_is_number(coefficient), "entropy_min.coefficient", coefficient,
               "must be finite (> 0 minimises the entropy, < 0 is the confidence penalty)")  # fmt: skip
        self.coefficient = coefficient

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, context: RegularizerContext | None = None
    ) -> torch.Tensor:
        log_p = F.log_softmax(upcast(logits), dim=-1)
        return self.coefficient * -(log_p.exp() * log_p).sum(dim=-1).mean()


class LogitPenaltyRegularizer(Regularizer):
    """A squared-L2 penalty on the final layer, ``coefficient * mean_i ||v_i||^2``.
    ``norm_of: features``: v the backbone features fed to the classifier, the embedding penalty of Dauphin &
    Cubuk 2021 (ICLR, "Deconstructing the Regularization of BatchNorm"), which limits the growth of the
    final layer. ``norm_of: logits``: v the logits, the squared form of logit squeezing (Kannan, Kurakin &
    Goodfellow 2018, "Adversarial Logit Pairing", which penalises the logits' norm). The label is not used.
    (The option is not called ``on``: YAML reads that key as a boolean.)"""

    TARGETS = ("logits", "features")

    def __init__(self, coefficient: float = 1e-4, norm_of: str = "logits") -> None:
        super().__init__()
        _check(_is_number(coefficient) and coefficient >= 0, "logit_penalty.coefficient", coefficient,
               "must be >= 0")  # fmt: skip
        _check(norm_of in self.TARGETS, "logit_penalty.norm_of", norm_of, f"must be one of {self.TARGETS}")
        self.coefficient = coefficient
        self.norm_of = norm_of
        self.needs_context = norm_of == "features"

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, context: RegularizerContext | None = None
    ) -> torch.Tensor:
        values = context.features if self.norm_of == "features" else logits
        return self.coefficient * upcast(values).square().sum(dim=-1).mean()
