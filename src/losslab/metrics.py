"""The metrics every run reports, whatever the loss: accuracy, top-5, NLL, calibration and the data of a
reliability diagram, per stage (train, val, test)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError


class NegativeLogLikelihood(Metric):
    """Mean ``-log softmax(z)_y`` over the epoch."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.total += F.cross_entropy(logits.float(), target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class ReliabilityBins(Metric):
    """Per confidence bin (equal width): sample count, summed confidence and summed correctness — the data
    of a reliability diagram (Guo et al. 2017), kept in results.json for the report."""

    full_state_update = False

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        self.n_bins = n_bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        confidence, prediction = probabilities.max(dim=-1)
        # Bin b holds confidences in (b/n, (b+1)/n], as torchmetrics' calibration error does.
        index = (torch.ceil(confidence * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
        self.confidence.index_add_(0, index, confidence.double())
        self.correct.index_add_(0, index, (prediction == target).double())

    def compute(self) -> dict[str, list[float]]:
        return {
            "bin_upper_edges": [(b + 1) / self.n_bins for b in range(self.n_bins)],
            "count": self.count.tolist(),
            "mean_confidence": (self.confidence / self.count.clamp_min(1)).tolist(),
            "accuracy": (self.correct / self.count.clamp_min(1)).tolist(),
        }


class StageMetrics(nn.Module):
    """Top-1, top-5 (more than 5 classes), NLL and 15-bin ECE for one stage (train, val or test)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.probability_metrics = nn.ModuleDict(
            {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)}
        )
        if num_classes > 5:
            self.probability_metrics["acc_top5"] = MulticlassAccuracy(
                num_classes, top_k=5, average="micro", validate_args=False
            )
        self.probability_metrics["ece"] = MulticlassCalibrationError(
            num_classes, n_bins=15, norm="l1", validate_args=False
        )
        self.nll = NegativeLogLikelihood()
        self.reliability = ReliabilityBins(n_bins=15)
        self.per_class = MulticlassAccuracy(num_classes, average=None, validate_args=False)

    def update(self, logits: torch.Tensor, target: torch.Tensor, reliability: bool = False) -> None:
        logits = logits.detach().float()
        probabilities = logits.softmax(dim=-1)
        for metric in self.probability_metrics.values():
            metric.update(probabilities, target)
        self.nll.update(logits, target)
        if reliability:
            self.reliability.update(probabilities, target)
            self.per_class.update(probabilities, target)

    def items(self) -> dict[str, Metric]:
        return {**self.probability_metrics, "nll": self.nll}
