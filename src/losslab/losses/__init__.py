"""Training objectives. Each loss declares what it consumes (see :class:`losslab.losses.base.Loss`)."""

from losslab.losses.base import Loss
from losslab.losses.classification import CrossEntropy, LabelSmoothing
from losslab.losses.contrastive import SimCLR, SupCon

__all__ = ["CrossEntropy", "LabelSmoothing", "Loss", "SimCLR", "SupCon"]
