"""What a loss declares about itself, so the training module can build the heads and batches it needs
without ever naming a specific loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from losslab.errors import ConfigError

KINDS = ("classification", "embedding")


class SoftTargetError(ConfigError):
    """A loss that is defined on class indices only was given probability targets."""


def soft_target_losses_hint() -> str:
    return "see the 'soft targets' column of docs/losses.md (e.g. ce, label_smoothing, bce, poly1)"


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
    ``needs_positives``: an embedding loss that compares each anchor with other samples of its label (pair and
    triplet losses); training then draws batches from the m-per-class sampler unless ``dataset.sampler`` is set.
    ``gathers_across_ranks``: under DDP an embedding loss is computed on the embeddings and labels gathered from
    every rank, with gradients (:mod:`losslab.distributed`), since its terms couple the samples of a batch; a
    loss that is a mean of independent per-sample terms sets it False and sees only its rank's share (DDP's
    gradient average is then already the global batch's). Classification losses always see their rank's share.
    ``accepts_soft_targets``: whether a classification loss takes ``[N, C]`` probability targets.
    ``needs_class_counts``: the training module calls :meth:`set_class_counts` with the training split's
    per-class counts before training (class priors for long-tail losses).
    ``supports_multi_label``: whether a classification loss trains on multi-label datasets, whose targets are
    ``[N, C]`` multi-hot; the training module then calls :meth:`set_multi_label` before training.
    :meth:`build_head`: the module that turns a classification loss's features into its logits.
    :meth:`setup_embedding`: where an embedding loss creates parameters of its own (class proxies), once the
    embedding dimension and the number of classes are known.
    ``lr_multiplier``: the loss's own parameters learn at this multiple of the optimizer's learning rate.
    ``needs_teacher``: a distillation loss, ``forward(logits, target, teacher=TeacherOutputs)`` (``teacher`` group).
    """

    kind: ClassVar[str] = "classification"
    n_views: ClassVar[int] = 1
    needs_labels: ClassVar[bool] = True
    needs_positives: ClassVar[bool] = False
    accepts_soft_targets: ClassVar[bool] = False
    needs_class_counts: ClassVar[bool] = False
    supports_multi_label: ClassVar[bool] = False
    gathers_across_ranks: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    multi_label: bool = False
    lr_multiplier: float = 1.0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "classification" and not (self.accepts_soft_targets or self.multi_label):
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(target, torch.Tensor) and target.is_floating_point():
                raise SoftTargetError(
                    f"{type(self).__name__} is defined on class indices only and refuses [N, C] probability "
                    f"targets (mixing, distillation); use a loss that accepts them: {soft_target_losses_hint()}"
                )
        return super().__call__(*args, **kwargs)

    def build_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        """The classifier a classification loss is trained through: a linear layer, unless the loss owns
        its head (e.g. the class centres of the harmonic loss). Its parameters train with the backbone."""
        return nn.Linear(feature_dim, num_classes)

    def setup_embedding(self, embedding_dim: int, num_classes: int) -> None:
        """Called by the training module for an embedding loss right after it builds the projection head, with
        the head's output dimension and the number of classes, before the optimizer exists: a loss that owns
        parameters (one proxy per class) creates them here, and they train with the network."""

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Receives the training split's samples per class (only called when ``needs_class_counts``)."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_class_counts but does not take them")

    def set_multi_label(self, multi_label: bool) -> None:
        """Tells the loss whether its targets are ``[N, C]`` multi-hot label sets (a multi-label dataset), so a
        loss with a single-label and a multi-label form (focal: softmax or sigmoid) picks the right one."""
        if multi_label and not self.supports_multi_label:
            raise TypeError(f"{type(self).__name__} does not declare supports_multi_label")
        self.multi_label = multi_label

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called as every training epoch starts, for losses with a schedule (e.g. deferred re-weighting)."""

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Counters a loss wants logged next to its value (e.g. anchors that had no positive)."""
        return {}
