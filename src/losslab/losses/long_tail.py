"""Long-tail (label-imbalance) objectives built on the training split's class counts n_c and priors
pi_c = n_c / sum(n): logit adjustment, balanced softmax, LDAM with deferred re-weighting and the
vector-scaling loss. The training module passes the counts once, through ``set_class_counts``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


class ClassPriorLoss(Loss):
    """Shared plumbing: keeps ``prior`` (pi_c) as a buffer so it follows the module's device and dtype.

    The buffers start as placeholders; ``set_class_counts`` computes every statistic in float64 and
    stores it in the placeholder's current dtype and device (so a module converted with ``.double()``
    first gets float64 statistics).
    """

    needs_class_counts = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prior", torch.ones(1), persistent=False)
        self.has_class_counts = False

    def set_class_counts(self, counts: torch.Tensor) -> None:
        counts = torch.as_tensor(counts).detach().cpu().to(torch.float64)
        if counts.ndim != 1 or counts.numel() == 0:
            raise ConfigError(
                f"{type(self).__name__}: class counts must be one count per class, got shape "
                f"{tuple(counts.shape)}"
            )
        if (counts <= 0).any():
            empty = torch.nonzero(counts <= 0).flatten().tolist()
            raise ConfigError(
                f"{type(self).__name__}: every class needs training samples; classes {empty} have none"
            )
        self.store_buffer("prior", counts / counts.sum())
        self.store_class_statistics(counts)
        self.has_class_counts = True

    def store_class_statistics(self, counts: torch.Tensor) -> None:
        """Subclasses derive further per-class buffers from the float64 counts here."""

    def store_buffer(self, name: str, values: torch.Tensor) -> None:
        placeholder = getattr(self, name)
        setattr(self, name, values.to(device=placeholder.device, dtype=placeholder.dtype))

    def check_ready(self, logits: torch.Tensor) -> None:
        if not self.has_class_counts:
            raise RuntimeError(
                f"{type(self).__name__} needs the training split's class counts: call "
                "set_class_counts(counts) before computing the loss"
            )
        if len(self.prior) != logits.shape[-1]:
            raise ConfigError(
                f"{type(self).__name__} got class counts for {len(self.prior)} classes but the "
                f"classifier has {logits.shape[-1]}"
            )


class LogitAdjust(ClassPriorLoss):
    """Logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit adjustment", ICLR):
    ``-log softmax(z + tau log pi)_y``, cross-entropy on logits shifted by the scaled log-prior.
    tau = 0 is cross-entropy; the adjustment is training-only, predictions use the plain z.
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        if tau < 0:
            raise ConfigError(f"loss.tau={tau}: must be >= 0")
        self.tau = tau

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        self.check_ready(logits)
        return F.cross_entropy(logits + self.tau * self.prior.to(logits.dtype).log(), target)


class BalancedSoftmax(ClassPriorLoss):
    """Balanced softmax (Ren et al. 2020, "Balanced meta-softmax for long-tailed visual recognition",
    NeurIPS, eq. 4): ``-log [n_y exp(z_y) / sum_j n_j exp(z_j)] = -log softmax(z + log pi)_y``
    (n and pi differ by a constant, which softmax ignores). It equals ``LogitAdjust(tau=1)``.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        self.check_ready(logits)
        return F.cross_entropy(logits + self.prior.to(logits.dtype).log(), target)


class LDAM(ClassPriorLoss):
    """Label-distribution-aware margin loss with deferred re-weighting, LDAM-DRW (Cao et al. 2019,
    "Learning imbalanced datasets with label-distribution-aware margin loss", NeurIPS, eq. 13 and
    algorithm 1): ``-w_y log softmax(s (z - Delta_y e_y))_y`` with margins ``Delta_c ∝ n_c^(-1/4)``, the
    largest being ``max_margin``.

    ``s`` = 30 is the scale of the authors' code, which applies it to cosine logits (normalised features
    and class weights); with an ordinary linear head, a smaller s (e.g. 1) may suit better.

    DRW (``drw``): weights are 1 until epoch ``drw_start_epoch`` (null: ``round(drw_start_fraction *
    max_epochs)``, 160 of 200 in the paper), then the class-balanced weights of Cui et al. 2019
    ("Class-balanced loss based on effective number of samples"):
    ``w_c = (1 - beta) / (1 - beta^n_c)``, normalised to sum to C. ``set_epoch`` switches them on. As in the
    authors' code (``F.cross_entropy(..., weight=w)``), the batch mean is weighted: ``sum w_y l / sum w_y``.
    """

    def __init__(
        self,
        max_margin: float = 0.5,
        s: float = 30.0,
        drw: bool = True,
        drw_start_fraction: float = 0.8,
        drw_start_epoch: int | None = None,
        beta: float = 0.9999,
    ) -> None:
        super().__init__()
        if max_margin < 0:
            raise ConfigError(f"loss.max_margin={max_margin}: must be >= 0")
        if s <= 0:
            raise ConfigError(f"loss.s={s}: must be > 0")
        if not 0.0 <= drw_start_fraction <= 1.0:
            raise ConfigError(f"loss.drw_start_fraction={drw_start_fraction}: must be in [0, 1]")
        if drw_start_epoch is not None and (int(drw_start_epoch) != drw_start_epoch or drw_start_epoch < 0):
            raise ConfigError(f"loss.drw_start_epoch={drw_start_epoch}: must be null or an integer >= 0")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"loss.beta={beta}: must be in [0, 1)")
        self.max_margin = max_margin
        self.s = s
        self.drw = drw
        self.drw_start_fraction = drw_start_fraction
        self.drw_start_epoch = drw_start_epoch
        self.beta = beta
        self.reweighting = False
        self.register_buffer("margins", torch.ones(1), persistent=False)
        self.register_buffer("class_balanced_weights", torch.ones(1), persistent=False)

    def store_class_statistics(self, counts: torch.Tensor) -> None:
        margins = counts.pow(-0.25)
        self.store_buffer("margins", margins * (self.max_margin / margins.max()))
        weights = (1.0 - self.beta) / (1.0 - self.beta**counts)
        self.store_buffer("class_balanced_weights", weights * (len(counts) / weights.sum()))

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        start = self.drw_start_epoch
        if start is None:
            start = round(self.drw_start_fraction * max_epochs)
        self.reweighting = self.drw and epoch >= start

    @property
    def class_weights(self) -> torch.Tensor:
        """The per-class weights in force this epoch: 1 before DRW starts, the class-balanced ones after."""
        if self.reweighting:
            return self.class_balanced_weights
        return torch.ones_like(self.class_balanced_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        self.check_ready(logits)
        margin = self.margins.to(logits.dtype)[target]
        shifted = logits - margin[:, None] * F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        weight = self.class_balanced_weights.to(logits.dtype) if self.reweighting else None
        return F.cross_entropy(self.s * shifted, target, weight=weight)


class VectorScaling(ClassPriorLoss):
    """Vector-scaling loss, VS-loss (Kini et al. 2021, "Label-imbalanced and group-sensitive
    classification under overparameterization", NeurIPS): ``-log softmax(Delta * z + iota)_y`` with the
    multiplicative ``Delta_c = (n_c / n_max)^gamma`` and additive ``iota_c = tau log pi_c`` adjustments.
    gamma = 0 is ``LogitAdjust(tau)``; gamma = tau = 0 is cross-entropy. Defaults gamma = 0.2, tau = 1.5 are
    the paper's CIFAR values.
    """

    def __init__(self, gamma: float = 0.2, tau: float = 1.5) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma}: must be >= 0")
        if tau < 0:
            raise ConfigError(f"loss.tau={tau}: must be >= 0")
        self.gamma = gamma
        self.tau = tau

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        self.check_ready(logits)
        prior = self.prior.to(logits.dtype)
        multiplicative = (prior / prior.max()).pow(self.gamma)  # n_c / n_max, as priors share the total
        additive = self.tau * prior.log()
        return F.cross_entropy(multiplicative * logits + additive, target)
