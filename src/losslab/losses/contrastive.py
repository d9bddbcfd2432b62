"""Contrastive objectives on embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
    return embeddings.reshape(n * views, -1), labels.repeat_interleave(views, dim=0)


class SupCon(Loss):
    """Supervised contrastive loss, L_out of Khosla et al. 2020 (NeurIPS), eq. 2:

    ``L = sum_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i·z_p/τ) / sum_{a ≠ i} exp(z_i·z_a/τ) )``

    on L2-normalised embeddings, every view an anchor, averaged over anchors. ``P(i)`` are the other
    samples with i's label; with ``labels=None`` they are i's other views (SimCLR's NT-Xent). Anchors with
    no positive are left out and counted; a batch with none gives a zero loss that keeps its graph.

    Probability labels ``[N, C]`` (batch mixing): each other sample p is a positive of weight
    ``w_ip = <y_i, y_p>``, the chance that the two share a label, and the average over P(i) becomes
    ``sum_p w_ip (·) / sum_p w_ip``; one-hot labels give eq. 2 exactly. An anchor whose weights sum to less than
    1e-6 has no positive.
    """

    kind = "embedding"
    n_views = 2
    accepts_soft_targets = True

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.anchors_without_positives = torch.zeros(())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features, labels = _flatten_views(embeddings, labels)
        features = F.normalize(upcast(features), dim=-1)
        # The only N×N work is the logits and their log-sum-exp: log p_ip summed over the positives is
        # z_i·(sum of i's class − z_i)/τ − |P(i)| log-sum-exp_i, so no positive mask is built.
        if labels.is_floating_point():  # weights <y_i, y_p>: the class sums become Y^T Z
            targets = labels.to(features.dtype)
            own_weight = targets.square().sum(dim=1)
            n_positives = targets @ targets.sum(dim=0) - own_weight
            has_positive = n_positives > 1e-6
            weighted_sums = targets @ (targets.T @ features) - own_weight[:, None] * features
        else:
            _, own, counts = torch.unique(labels, return_inverse=True, return_counts=True)
            n_positives = counts[own] - 1
            has_positive = n_positives > 0
            class_sums = features.new_zeros(len(counts), features.shape[1]).index_add(0, own, features)
            weighted_sums = class_sums[own] - features
        self.anchors_without_positives = (~has_positive).sum().detach()
        if not has_positive.any():
            return features.sum() * 0.0
        logits = (features / self.temperature) @ features.T
        logits.fill_diagonal_(float("-inf"))  # not needed by the matmul's backward, so filled in place
        positive_logits = (features * weighted_sums).sum(dim=1) / self.temperature
        mean_log_prob = positive_logits / torch.where(has_positive, n_positives, 1) - torch.logsumexp(logits, dim=1)
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


class SupConReLU(SupCon):
    """SupCon with a ReLU on the final embedding before normalisation (Kini et al. 2024, ICLR): with
    non-negative embeddings the minimisers are an orthogonal frame (symmetric neural collapse) even when the
    classes are imbalanced; ``L`` is :class:`SupCon`'s eq. 2 on ``normalize(relu(h))``."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(F.relu(embeddings), labels)


class DCL(Loss):
    """Decoupled contrastive loss (Yeh et al. 2022, ECCV), eq. 6: NT-Xent with the positive removed from the
    denominator, ``L_i = -w_i z_i·z_p/τ + log sum_{a ∉ {i, p}} exp(z_i·z_a/τ)`` with ``w_i = 1``,

    on L2-normalised embeddings, every view an anchor, averaged over anchors. Self-supervised: the positives
    are the anchor's other views, the negatives every view of the other images (labels are never used).
    Anchors without a positive (one view) or without a negative (one image) are left out and counted; a batch
    with none left gives a zero loss that keeps its graph. Dropping the positive removes NT-Xent's
    negative-positive coupling (a gradient scaled by 1 - p_positive), so small batches lose less signal.
    """

    kind = "embedding"
    n_views = 2
    needs_labels = False

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.anchors_without_positives = torch.zeros(())
        self.anchors_without_negatives = torch.zeros(())

    def positive_weights(self, similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """The weight of each positive pair's term (``[M, M]``, read where ``positives``): 1 in DCL."""
        return positives.to(similarity.dtype)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features, images = _flatten_views(embeddings, None)
        features = F.normalize(upcast(features), dim=-1)
        n = features.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
        same_image = images[:, None] == images[None, :]
        positives, negatives = same_image & ~self_mask, ~same_image
        has_positive, has_negative = positives.any(dim=1), negatives.any(dim=1)
        self.anchors_without_positives = (~has_positive).sum().detach()
        self.anchors_without_negatives = (has_positive & ~has_negative).sum().detach()
        kept = has_positive & has_negative
        if not kept.any():
            return features.sum() * 0.0
        positives = positives & kept[:, None]
        similarity = features @ features.T
        # Rows without negatives are dropped below; filling them keeps log-sum-exp (and its gradient) finite.
        denominator_mask = negatives | ~has_negative[:, None]
        negative_term = torch.logsumexp(
            (similarity / self.temperature).masked_fill(~denominator_mask, float("-inf")), dim=1
        )
        weighted = (self.positive_weights(similarity, positives) * similarity).masked_fill(~positives, 0.0)
        positive_term = weighted.sum(dim=1) / positives.sum(dim=1).clamp_min(1)
        return (negative_term - positive_term / self.temperature)[kept].mean()

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {
            "anchors_without_positives": self.anchors_without_positives,
            "anchors_without_negatives": self.anchors_without_negatives,
        }


class DCLW(DCL):
    """Weighted decoupled contrastive loss (Yeh et al. 2022, ECCV): :class:`DCL` with the positive term
    weighted by the negative von Mises-Fisher weighting ``w_i = 2 - exp(z_i·z_p/σ) / E[exp(z_k·z_q/σ)]``,
    the mean over the batch's positive pairs (so the weights average 1 and harder positives weigh more).
    The weights are not detached, as in the reference implementation."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5) -> None:
        super().__init__(temperature)
        if sigma <= 0:
            raise ConfigError(f"loss.sigma={sigma}: must be > 0")
        self.sigma = sigma

    def positive_weights(self, similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        pair_logits = (similarity / self.sigma).masked_fill(~positives, float("-inf"))
        pair_share = torch.softmax(pair_logits.flatten(), dim=0).view_as(similarity)
        return 2.0 - positives.sum() * pair_share


class AlignUniform(Loss):
    """Alignment and uniformity on the hypersphere (Wang & Isola 2020, ICML):
    ``lam_align·E‖f(x) - f(y)‖₂^α + lam_uniform·log E exp(-t‖f(x) - f(y)‖₂²)``, the first over positive pairs,

    the second over all pairs of distinct images of one view, averaged over the views (as the paper's code).
    Embeddings are L2-normalised. Self-supervised: positive pairs are two views of one image (labels unused).
    With one view there is no positive pair: the alignment term is left out (counted in
    ``anchors_without_positives``); with one image there is no pair for uniformity, which is then left out.
    """

    kind = "embedding"
    n_views = 2
    needs_labels = False

    def __init__(
        self, alpha: float = 2.0, t: float = 2.0, lam_align: float = 1.0, lam_uniform: float = 1.0
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("t", t)):
            if value <= 0:
                raise ConfigError(f"loss.{name}={value}: must be > 0")
        for name, value in (("lam_align", lam_align), ("lam_uniform", lam_uniform)):
            if value < 0:
                raise ConfigError(f"loss.{name}={value}: must be >= 0")
        self.alpha, self.t, self.lam_align, self.lam_uniform = alpha, t, lam_align, lam_uniform
        self.anchors_without_positives = torch.zeros(())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings.dim() == 2:
            embeddings = embeddings[:, None]
        z = F.normalize(upcast(embeddings), dim=-1)
        n, views = z.shape[:2]
        self.anchors_without_positives = torch.tensor(n if views < 2 else 0, device=z.device)
        loss = z.sum() * 0.0
        if views >= 2:
            first, second = torch.triu_indices(views, views, offset=1, device=z.device)
            # The norm of the difference (not sqrt of 2 - 2cos) has a finite gradient when the views coincide.
            distance = torch.linalg.vector_norm(z[:, first] - z[:, second], dim=-1)
            loss = loss + self.lam_align * distance.pow(self.alpha).mean()
        if n >= 2:
            left, right = torch.triu_indices(n, n, offset=1, device=z.device)
            per_view = z.transpose(0, 1)
            squared_distance = 2.0 - 2.0 * (per_view @ per_view.transpose(1, 2))[:, left, right]
            uniformity = torch.logsumexp(-self.t * squared_distance, dim=1) - math.log(left.numel())
            loss = loss + self.lam_uniform * uniformity.mean()
        return loss

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"anchors_without_positives": self.anchors_without_positives}


class SigLIP(Loss):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, ICCV) between two views of each image:
    ``L = -1/N sum_i sum_j log σ(z_ij (t x_i·y_j + b))``, ``z_ij = 1`` for a positive pair and -1 otherwise,

    x, y the views' L2-normalised embeddings, ``t = exp(t')`` and ``b`` learned with the network from
    ``t = temperature_init`` and ``b = bias_init`` (the paper's t' = log 10, b = -10). Positives are the views of
    one image; labels, when given to a direct call, make every same-label pair positive (training passes none).
    More than two views: every ordered pair of distinct views, averaged. One view has no pair: a zero loss
    that keeps its graph, every anchor counted in ``anchors_without_positives``.
    """

    kind = "embedding"
    n_views = 2
    needs_labels = False

    def __init__(self, temperature_init: float = 10.0, bias_init: float = -10.0) -> None:
        super().__init__()
        if temperature_init <= 0:
            raise ConfigError(f"loss.temperature_init={temperature_init}: must be > 0")
        self.temperature_init, self.bias_init = float(temperature_init), float(bias_init)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.bias = nn.Parameter(torch.tensor(self.bias_init))
        self.anchors_without_positives = torch.zeros(())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings.dim() == 2:
            embeddings = embeddings[:, None]
        n, views = embeddings.shape[:2]
        features, labels = _flatten_views(embeddings, labels)
        features = F.normalize(upcast(features), dim=-1)
        self.anchors_without_positives = torch.tensor(n if views < 2 else 0, device=features.device)
        if views < 2:
            return features.sum() * 0.0
        view = torch.arange(views, device=features.device).repeat(n)
        cross_view = view[:, None] != view[None, :]
        signs = torch.where(labels[:, None] == labels[None, :], 1.0, -1.0).to(features.dtype)
        logits = self.log_temperature.exp() * (features @ features.T) + self.bias
        pair_losses = -F.logsigmoid(signs * logits).masked_fill(~cross_view, 0.0)
        return pair_losses.sum() / (n * views * (views - 1))

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"anchors_without_positives": self.anchors_without_positives}
