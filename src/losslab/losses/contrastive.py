"""Contrastive objectives on embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast


def _flatten_views(embeddings: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V, D]`` (or ``[N, D]``) → ``[N*V, D]`` with one label per row; without labels each image
    is its own class, so the positives are its other views."""
    if embeddings.dim() == 2:
        embeddings = embeddings[:, None]
    n, views = embeddings.shape[:2]
    if labels is None:
        labels = torch.arange(n, device=embeddings.device)
    return embeddings.reshape(n * views, -1), labels.repeat_interleave(views)


class SupCon(Loss):
    """Supervised contrastive loss, L_out of Khosla et al. 2020 (NeurIPS), eq. 2:

    ``L = sum_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i·z_p/τ) / sum_{a ≠ i} exp(z_i·z_a/τ) )``

    on L2-normalised embeddings, every view an anchor, averaged over anchors. ``P(i)`` are the other
    samples with i's label; with ``labels=None`` they are i's other views (SimCLR's NT-Xent). Anchors with
    no positive are left out and counted; a batch with none gives a zero loss that keeps its graph.
    """

    kind = "embedding"
    n_views = 2

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.anchors_without_positives = torch.zeros(())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features, labels = _flatten_views(embeddings, labels)
        features = F.normalize(upcast(features), dim=-1)
        n = features.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
        logits = (features @ features.T / self.temperature).masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_positives = positives.sum(dim=1)
        has_positive = n_positives > 0
        self.anchors_without_positives = (~has_positive).sum().detach()
        if not has_positive.any():
            return features.sum() * 0.0
        mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_positives.clamp_min(1)
        return -mean_log_prob[has_positive].mean()

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"anchors_without_positives": self.anchors_without_positives}


class SimCLR(SupCon):
    """NT-Xent of SimCLR (Chen et al. 2020, ICML, eq. 1): each view's only positive is the other view of
    its own image; labels are never used. Equal to :class:`SupCon` with ``labels=None``."""

    needs_labels = False

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__(temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(embeddings, None)
