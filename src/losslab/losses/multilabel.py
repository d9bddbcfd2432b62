"""Losses designed for multi-label classification (one sigmoid per class, ``[N, C]`` multi-hot targets).

BCE and the sigmoid focal loss, which also have single-label forms, live in :mod:`losslab.losses.baselines`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast
from losslab.losses.baselines import as_probabilities

REDUCTIONS = ("mean", "sum")


class AsymmetricLoss(Loss):
    """Asymmetric loss, ASL (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification", ICCV),
    per class with ``p = sigmoid(z)`` and the shifted probability ``p_m = max(p - clip, 0)``:
    ``L+ = -(1 - p)^gamma_pos log p`` for positives, ``L- = -p_m^gamma_neg log(1 - p_m)`` for negatives;
    summed over classes. ``gamma_neg = gamma_pos = clip = 0`` is binary cross-entropy.

    Defaults are the paper's (gamma_neg 4, gamma_pos 0, clip m = 0.05). Two choices of the official code
    (Alibaba-MIIL/ASL) are options, off by default: ``reduction="sum"`` sums over the batch too (the code
    returns ``-loss.sum()``; the default averages over the batch like every LossLab loss), and
    ``detach_focusing_weights=True`` stops the gradient through ``(1 - p)^gamma_pos`` and ``p_m^gamma_neg``
    (the code's ``disable_torch_grad_focal_loss``). Log-probabilities are computed from the logits, so unlike
    the code (which clamps p at 1e-8) the gradient never vanishes on confidently wrong positives.
    """

    supports_multi_label = True

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        reduction: str = "mean",
        detach_focusing_weights: bool = False,
    ) -> None:
        super().__init__()
        for name, gamma in (("gamma_neg", gamma_neg), ("gamma_pos", gamma_pos)):
            if gamma < 0:
                raise ConfigError(f"loss.{name}={gamma}: must be >= 0")
        if not 0.0 <= clip < 1.0:
            raise ConfigError(f"loss.clip={clip}: must be in [0, 1)")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss.reduction={reduction!r}: allowed values are {', '.join(REDUCTIONS)}")
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        # Multi-label by construction (a sigmoid per class): [N, C] label sets are its native targets.
        self.multi_label = True
        self.reduction = reduction
        self.detach_focusing_weights = detach_focusing_weights

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` loss of each (sample, class) pair; ``target`` multi-hot (or one-hot) in logits' dtype."""
        tiny = torch.finfo(logits.dtype).tiny
        one_minus_p = torch.sigmoid(-logits)
        if self.clip > 0:
            # 1 - p_m = min(1 - p + clip, 1): log is 0, and so is the gradient, wherever p <= clip.
            log_one_minus_shifted = torch.log((one_minus_p + self.clip).clamp(max=1.0))
        else:
            log_one_minus_shifted = F.logsigmoid(-logits)
        shifted = (torch.sigmoid(logits) - self.clip).clamp(min=tiny)
        # The floors keep x^gamma's gradient finite at x = 0 for gamma < 1; they only touch terms equal to 0.
        weight_pos = one_minus_p.clamp(min=tiny).pow(self.gamma_pos)
        weight_neg = shifted.pow(self.gamma_neg)
        if self.detach_focusing_weights:
            weight_pos, weight_neg = weight_pos.detach(), weight_neg.detach()
        positive = weight_pos * F.logsigmoid(logits)
        negative = weight_neg * log_one_minus_shifted
        return -(target * positive + (1.0 - target) * negative)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upcast(logits)
        per_sample = self.per_class(logits, as_probabilities(target, logits)).sum(dim=-1)
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()
