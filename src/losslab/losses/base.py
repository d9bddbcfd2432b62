"""What a loss declares about itself, so the training module can build the heads and batches it needs
without ever naming a specific loss."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

KINDS = ("classification", "embedding")


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 inputs are computed in float32 (softmax and log-sum-exp overflow in half precision);
    float32 and float64 are kept, so gradient checks can run in float64."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class Loss(nn.Module):
    """Base class of every LossLab objective.

    ``kind = "classification"``: ``forward(logits [N, C], target [N] long or [N, C] probabilities)``.
    ``kind = "embedding"``: ``forward(embeddings [N, D] or [N, V, D], labels [N] or None)``.
    ``n_views``: how many augmented views of each image a training batch must carry.
    ``needs_labels``: False for self-supervised objectives (labels are then not passed).
    ``accepts_soft_targets``: whether a classification loss takes ``[N, C]`` probability targets.
    ``needs_class_counts``: the training module calls :meth:`set_class_counts` with the training split's
    per-class counts before training (class priors for long-tail losses).
    """

    kind: ClassVar[str] = "classification"
    n_views: ClassVar[int] = 1
    needs_labels: ClassVar[bool] = True
    accepts_soft_targets: ClassVar[bool] = False
    needs_class_counts: ClassVar[bool] = False

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Receives the training split's samples per class (only called when ``needs_class_counts``)."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_class_counts but does not take them")

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called as every training epoch starts, for losses with a schedule (e.g. deferred re-weighting)."""

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Counters a loss wants logged next to its value (e.g. anchors that had no positive)."""
        return {}
