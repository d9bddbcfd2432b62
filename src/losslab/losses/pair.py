"""Pair and triplet losses on embeddings (deep metric learning).

Every sample of the batch is an anchor; its positives are the other samples with its label, its negatives the
samples with another label. ``[N, V, D]`` embeddings are flattened, each view an anchor with its image's label.
Everything is computed from the batch's N×N distance or similarity matrix: no loss builds an N×N×N tensor.
Batch-all with a soft margin, the one sum over every triplet that does not reduce to N×N terms, runs over
chunks of anchors under activation checkpointing, so its memory stays O(N²) too.

These losses need positives in every batch (``needs_positives``): training draws its batches from the
m-per-class sampler unless ``dataset.sampler`` is set explicitly. Anchors without a positive (or without a
negative, where the loss needs one) are left out and counted (``anchors_without_positives``,
``anchors_without_negatives``); a batch with no anchor left gives a zero loss that keeps its graph.
Half-precision embeddings are computed in float32, with autocast off for the distances.

Reference embeddings: :class:`Contrastive`, :class:`Triplet`, :class:`Circle` and :class:`MultiSimilarity` also
take ``reference_embeddings [R, D]`` and ``reference_labels [R]``, the candidates every anchor is compared with
(default: the batch itself), so their N×N matrices become N×R. The references begin with the anchors' own rows
(copies, e.g. detached), which are never paired with their anchor: the cross-batch memory
(:class:`losslab.losses.memory.CrossBatchMemory`) passes the batch followed by its stored embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast
from losslab.losses.contrastive import _flatten_views

DISTANCES = ("euclidean", "cosine")
MININGS = ("batch_hard", "batch_all", "semi_hard")
GE2E_VARIANTS = ("softmax", "contrast")
# Batch-all with a soft margin: at most this many (anchor, positive, negative) terms exist at once.
TRIPLET_CHUNK = 2**22
# Euclidean distances: at most this many coordinate differences exist at once.
DISTANCE_CHUNK = 2**24


def _label_masks(
    labels: torch.Tensor, reference_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positives, negatives)``, ``[M, R]`` booleans: same label and not itself; another label. The references
    default to the anchors; given, their first M rows are the anchors themselves."""
    references = labels if reference_labels is None else reference_labels
    same = labels[:, None] == references[None, :]
    itself = torch.eye(len(labels), len(references), dtype=torch.bool, device=labels.device)
    return same & ~itself, ~same


def _cosine_similarity(features: torch.Tensor, references: torch.Tensor | None = None) -> torch.Tensor:
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features, dim=-1)
        return z @ (z if references is None else F.normalize(references, dim=-1)).T


def _euclidean_distance(
    features: torch.Tensor, squared: bool = False, references: torch.Tensor | None = None
) -> torch.Tensor:
    if references is not None:  # anchors against other candidates (a memory): every pair from its differences
        with torch.autocast(features.device.type, enabled=False):
            return _difference_distance(features, squared, references)
    # cdist's matmul form |a|² + |b|² − 2a·b (one matmul each way, two N×N passes) leaves close pairs few
    # correct digits and equal embeddings no exact zero, where the square root's slope is infinite. Pairs other
    # than a sample with itself closer than eps^¼·sqrt(2 max|x|²) (duplicates) are recomputed from their
    # differences: exact zeros, whose gradient is 0 as in cdist. Past two such pairs per sample (a collapsed
    # batch) every pair is computed from differences. The diagonal is left inexact: every loss leaves a sample's
    # pair with itself out, so neither its value nor a gradient through it is ever used.
    with torch.autocast(features.device.type, enabled=False):
        distance = torch.cdist(features, features, compute_mode="use_mm_for_euclid_dist")
        largest_norm = features.detach().square().sum(dim=1).max()
        close = distance <= torch.finfo(features.dtype).eps ** 0.25 * (2.0 * largest_norm).sqrt()
        close.fill_diagonal_(False)
        rows, columns = close.nonzero(as_tuple=True)
        if len(rows) > 2 * len(features):
            return _difference_distance(features, squared)
        if len(rows) > 0:
            exact = torch.linalg.vector_norm(features[rows] - features[columns], dim=1)
            distance = distance.index_put((rows, columns), exact)
    return distance.square() if squared else distance


def _difference_distance(
    features: torch.Tensor, squared: bool, references: torch.Tensor | None = None
) -> torch.Tensor:
    """Every pair's distance from its coordinate differences, to the references (default: the features).
    cdist's CUDA backward holds a rows × R × D buffer, hence the blocks of rows."""
    references = features if references is None else references
    rows = max(1, DISTANCE_CHUNK // references.numel())
    distance = torch.cat([
        torch.cdist(block, references, compute_mode="donot_use_mm_for_euclid_dist") for block in features.split(rows)
    ])  # fmt: skip
    return distance.square() if squared else distance


def _normalized(references: torch.Tensor | None) -> torch.Tensor | None:
    return None if references is None else F.normalize(references, dim=-1)


def _kept_rows(kept: torch.Tensor, *matrices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept anchors' rows of each matrix; the matrices themselves when every anchor is kept, as in
    m-per-class batches, which spares an N×N copy of each."""
    return matrices if kept.all() else tuple(matrix[kept] for matrix in matrices)


def _check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"loss.{option}={value!r}: allowed values are {', '.join(allowed)}")


class _PairLoss(Loss):
    """Shared by the losses below: the anchors' positive and negative masks, and the counters of anchors
    that have none (an anchor without a negative is counted only if it has a positive)."""

    kind = "embedding"
    needs_positives = True

    def __init__(self) -> None:
        super().__init__()
        self.anchors_without_positives = torch.zeros(())
        self.anchors_without_negatives = torch.zeros(())

    def _batch(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference_embeddings: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``(features [M, D], references [R, D] or None, positives [M, R], negatives [M, R], kept [M])``,
        ``kept`` the anchors with at least one positive and one negative; no references: the batch itself."""
        features, labels = _flatten_views(embeddings, labels)
        references = None if reference_embeddings is None else upcast(reference_embeddings)
        positives, negatives = _label_masks(labels, reference_labels)
        has_positive, has_negative = positives.any(dim=1), negatives.any(dim=1)
        self.anchors_without_positives = (~has_positive).sum().detach()
        self.anchors_without_negatives = (has_positive & ~has_negative).sum().detach()
        return upcast(features), references, positives, negatives, has_positive & has_negative

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {
            "anchors_without_positives": self.anchors_without_positives,
            "anchors_without_negatives": self.anchors_without_negatives,
        }


class Contrastive(_PairLoss):
    """Contrastive loss of Hadsell, Chopra & LeCun 2006 (CVPR, "Dimensionality Reduction by Learning an Invariant
    Mapping"), eq. 4, over every pair of the batch:

    ``L = mean_{i≠j} [ ½ D_ij²  if y_i = y_j,  else  ½ max(0, m − D_ij)² ]``

    ``D`` is the Euclidean distance (the paper's), on L2-normalised embeddings when ``normalize``, or the cosine
    distance ``1 − cos`` (``distance=cosine``). The paper sums over the pairs it samples; here every pair of the
    batch is a term and the terms are averaged. The pairs, not the anchors, are the terms: an anchor without a
    positive keeps its negative pairs (it is still counted in ``anchors_without_positives``), and only a batch
    of one sample has no pair.
    """

    def __init__(self, margin: float = 1.0, distance: str = "euclidean", normalize: bool = True) -> None:
        super().__init__()
        _check_choice("distance", distance, DISTANCES)
        if margin <= 0:
            raise ConfigError(f"loss.margin={margin}: must be > 0")
        self.margin, self.distance, self.normalize = margin, distance, normalize

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference_embeddings: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, references, positives, negatives, _ = self._batch(
            embeddings, labels, reference_embeddings, reference_labels
        )
        n, candidates = positives.shape
        if candidates < 2:
            return features.sum() * 0.0
        if self.distance == "cosine":
            distance = 1.0 - _cosine_similarity(features, references)
        elif self.normalize:
            distance = _euclidean_distance(F.normalize(features, dim=-1), references=_normalized(references))
        else:
            distance = _euclidean_distance(features, references=references)
        # Every term as one squared error, which takes the fewest passes over N×N: a positive pair's D against 0,
        # a negative pair's D against m where D < m (the hinge), and every other pair its target against itself.
        target = torch.where(positives, distance.new_zeros(()), distance.new_tensor(self.margin))
        active = positives | (negatives & (distance < self.margin))
        total = F.mse_loss(torch.where(active, distance, target), target, reduction="sum")
        return 0.5 * total / (n * (candidates - 1))


class Triplet(_PairLoss):
    """Triplet loss mined in the batch (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for Person
    Re-Identification"): each triplet costs ``f(D_ap − D_an)``, with the hinge ``f(x) = [m + x]_+`` or, with
    ``soft_margin`` (the paper's recommendation), the softplus ``f(x) = ln(1 + exp(x))`` (``margin`` unused).

    ``mining``: ``batch_hard`` (the paper's L_BH): each anchor's farthest positive and closest negative, averaged
    over the anchors. ``batch_all``: every (a, p, n) of the batch, averaged over the active triplets, those with
    a non-zero term (the paper's L_BA≠0; with the soft margin every triplet is active). ``semi_hard``
    (Schroff et al. 2015, FaceNet): each positive pair with the closest negative farther than the positive,
    ``D_ap < D_an``, averaged over the pairs; a pair without such a negative is left out and counted in
    ``positive_pairs_without_semi_hard_negative`` (TensorFlow's version takes the farthest negative instead).

    ``D`` is the Euclidean distance, unsquared on unnormalised embeddings as in the paper; ``normalize`` and
    ``squared`` give FaceNet's squared distance on the unit hypersphere. ``margin`` 0.2 is FaceNet's α.
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        soft_margin: bool = True,
        normalize: bool = False,
        squared: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("mining", mining, MININGS)
        if margin <= 0:
            raise ConfigError(f"loss.margin={margin}: must be > 0")
        self.margin, self.mining, self.soft_margin = margin, mining, soft_margin
        self.normalize, self.squared = normalize, squared
        self.positive_pairs_without_semi_hard_negative = torch.zeros(())

    def triplet_term(self, difference: torch.Tensor) -> torch.Tensor:
        """``f(D_ap − D_an)``."""
        return F.softplus(difference) if self.soft_margin else F.relu(self.margin + difference)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference_embeddings: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, references, positives, negatives, kept = self._batch(
            embeddings, labels, reference_embeddings, reference_labels
        )
        self.positive_pairs_without_semi_hard_negative = torch.zeros((), dtype=torch.long, device=features.device)
        if not kept.any():
            return features.sum() * 0.0
        if self.normalize:
            features, references = F.normalize(features, dim=-1), _normalized(references)
        distance = _euclidean_distance(features, self.squared, references)
        distance, positives, negatives = _kept_rows(kept, distance, positives, negatives)
        if self.mining == "batch_hard":
            # Mined on the detached distances and the two chosen gathered, so no N×N mask is differentiated.
            fixed = distance.detach()
            farthest_positive = torch.where(positives, fixed, float("-inf")).argmax(dim=1)
            closest_negative = torch.where(negatives, fixed, float("inf")).argmin(dim=1)
            hardest = distance.gather(1, torch.stack([farthest_positive, closest_negative], dim=1))
            return self.triplet_term(hardest[:, 0] - hardest[:, 1]).mean()
        if self.mining == "batch_all" and self.soft_margin:
            total = _soft_triplet_sum(distance, positives, negatives)
            return total / (positives.sum(dim=1) * negatives.sum(dim=1)).sum()
        # Each anchor's negative distances in increasing order: a positive's semi-hard negative, or its active
        # negatives, are found by binary search (O(N²) memory instead of one term per triplet).
        negative_distance = distance.masked_fill(~negatives, float("inf")).sort(dim=1).values
        if self.mining == "batch_all":
            threshold = distance + self.margin  # triplet (a, p, n) is active when D_an < D_ap + m
            active = torch.searchsorted(negative_distance.detach(), threshold.detach())
            finite = negative_distance.masked_fill(torch.isinf(negative_distance), 0.0)
            prefix = F.pad(finite.cumsum(dim=1), (1, 0))
            # sum over the active negatives of m + D_ap − D_an, for every pair (a, p)
            pair_sums = active * threshold - prefix.gather(1, active)
            return pair_sums[positives].sum() / active[positives].sum().clamp_min(1)
        farther = torch.searchsorted(negative_distance.detach(), distance.detach(), right=True)
        found = farther < negatives.sum(dim=1, keepdim=True)
        self.positive_pairs_without_semi_hard_negative = (positives & ~found).sum().detach()
        triplets = positives & found
        if not triplets.any():
            return features.sum() * 0.0
        semi_hard = negative_distance.gather(1, farther.clamp(max=distance.shape[1] - 1))
        return self.triplet_term(distance[triplets] - semi_hard[triplets]).mean()

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        metrics = super().extra_metrics()
        if self.mining == "semi_hard":
            metrics["positive_pairs_without_semi_hard_negative"] = self.positive_pairs_without_semi_hard_negative
        return metrics


def _soft_triplet_sum(distance: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``sum_(a, p, n) ln(1 + exp(D_ap − D_an))`` over every triplet, anchors taken in chunks of at most
    ``TRIPLET_CHUNK`` terms, each chunk recomputed in the backward pass instead of kept."""
    rows = max(1, TRIPLET_CHUNK // distance.shape[1] ** 2)
    total = distance.new_zeros(())
    for start in range(0, distance.shape[0], rows):
        chunk = (distance[start : start + rows], positives[start : start + rows], negatives[start : start + rows])
        if torch.is_grad_enabled() and distance.requires_grad:
            total = total + checkpoint(_soft_triplets, *chunk, use_reentrant=False)
        else:
            total = total + _soft_triplets(*chunk)
    return total


def _soft_triplets(distance: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    valid = positives[:, :, None] & negatives[:, None, :]
    return torch.where(valid, F.softplus(distance[:, :, None] - distance[:, None, :]), 0.0).sum()


class Circle(_PairLoss):
    """Circle loss (Sun et al. 2020, CVPR, "Circle Loss: A Unified Perspective of Pair Similarity Optimization"),
    eq. 6 with pair-wise labels, per anchor on cosine similarities ``s``:

    ``L = log[1 + sum_n exp(γ α_n (s_n − Δ_n)) · sum_p exp(−γ α_p (s_p − Δ_p))]``, ``α_p = [1 + m − s_p]_+``,
    ``α_n = [s_n + m]_+``, ``Δ_p = 1 − m``, ``Δ_n = m``,

    computed as ``softplus(logsumexp + logsumexp)`` and averaged over the anchors. The weights α are constants
    for the gradient, as in the official code. ``margin`` m = 0.4 and ``gamma`` γ = 80 are the paper's values for
    fine-grained image retrieval (pair-wise labels); it uses m = 0.25, γ = 256 for face recognition.
    """

    def __init__(self, margin: float = 0.4, gamma: float = 80.0) -> None:
        super().__init__()
        if not margin < 0.5:
            raise ConfigError(f"loss.margin={margin}: must be < 0.5 (Δ_p = 1 − m must exceed Δ_n = m)")
        if gamma <= 0:
            raise ConfigError(f"loss.gamma={gamma}: must be > 0")
        self.margin, self.gamma = margin, gamma

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference_embeddings: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, references, positives, negatives, kept = self._batch(
            embeddings, labels, reference_embeddings, reference_labels
        )
        if not kept.any():
            return features.sum() * 0.0
        similarity = _cosine_similarity(features, references)
        similarity, positives, negatives = _kept_rows(kept, similarity, positives, negatives)
        fixed = similarity.detach()
        alpha_p = F.relu(1.0 + self.margin - fixed)
        alpha_n = F.relu(fixed + self.margin)
        logit_p = (-self.gamma * alpha_p * (similarity - (1.0 - self.margin))).masked_fill(~positives, float("-inf"))
        logit_n = (self.gamma * alpha_n * (similarity - self.margin)).masked_fill(~negatives, float("-inf"))
        return F.softplus(torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1)).mean()


def _log_one_plus_sum_exp(logits: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_k exp(logits_k))`` over the included entries of each row (0 for an empty row)."""
    logits = torch.cat([logits.new_zeros(len(logits), 1), logits.masked_fill(~included, float("-inf"))], dim=1)
    return torch.logsumexp(logits, dim=1)


class MultiSimilarity(_PairLoss):
    """Multi-similarity loss (Wang et al. 2019, CVPR, "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning") on cosine similarities ``S`` of the pairs kept by the paper's mining:

    ``L_i = 1/α log[1 + sum_{k∈P_i} exp(−α (S_ik − λ))] + 1/β log[1 + sum_{k∈N_i} exp(β (S_ik − λ))]``;

    a negative pair is kept when ``S_ik > min_{y_j = y_i} S_ij − ε`` and a positive pair when
    ``S_ik < max_{y_j ≠ y_i} S_ij + ε``, each side possibly left empty (its term is then 0). Averaged
    over the anchors that have a positive and a negative (the paper divides by the batch size, which is the same
    when every anchor has both). Defaults are the paper's (α = 2, β = 50, λ = 1, ε = 0.1); the official code
    fixes λ = 0.5 (``lambda_: 0.5`` reproduces it).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, lambda_: float = 1.0, epsilon: float = 0.1) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value <= 0:
                raise ConfigError(f"loss.{name}={value}: must be > 0")
        if epsilon < 0:
            raise ConfigError(f"loss.epsilon={epsilon}: must be >= 0")
        self.alpha, self.beta, self.lambda_, self.epsilon = alpha, beta, lambda_, epsilon

    def mine(
        self, similarity: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs the ε-mining keeps, ``(positives, negatives)`` masks within the given ones, for the rows of
        anchors with a positive and a negative (the similarities are constants here)."""
        fixed = similarity.detach()
        hardest_positive = fixed.masked_fill(~positives, float("inf")).amin(dim=1, keepdim=True)
        hardest_negative = fixed.masked_fill(~negatives, float("-inf")).amax(dim=1, keepdim=True)
        return positives & (fixed < hardest_negative + self.epsilon), negatives & (fixed > hardest_positive - self.epsilon)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        reference_embeddings: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features, references, positives, negatives, kept = self._batch(
            embeddings, labels, reference_embeddings, reference_labels
        )
        if not kept.any():
            return features.sum() * 0.0
        similarity = _cosine_similarity(features, references)
        similarity, positives, negatives = _kept_rows(kept, similarity, positives, negatives)
        mined_positives, mined_negatives = self.mine(similarity, positives, negatives)
        shifted = similarity - self.lambda_
        positive_term = _log_one_plus_sum_exp(-self.alpha * shifted, mined_positives) / self.alpha
        negative_term = _log_one_plus_sum_exp(self.beta * shifted, mined_negatives) / self.beta
        return (positive_term + negative_term).mean()


class ThresholdConsistentMargin(Loss):
    """A base pair loss plus the threshold-consistent margin regulariser TCM (Zhang et al. 2024, ICLR,
    "Threshold-Consistent Margin Loss for Open-World Deep Metric Learning"), on cosine similarities ``s``:

    ``L = L_base + λ+ mean_{s∈S+, s ≤ m+} (m+ − s) + λ− mean_{s∈S−, s ≥ m−} (s − m−)``

    over the batch's positive pairs S+ and negative pairs S− (a mean over no pair is 0): only the hard pairs,
    positives below m+ and negatives above m−, are penalised. The paper adds TCM to several base losses;
    ``base`` defaults to :class:`MultiSimilarity`. ``λ± = 1``, ``m+ = 0.9``, ``m− = 0.5`` as in
    pytorch-metric-learning's implementation. Its counters are the base loss's.
    """

    kind = "embedding"
    needs_positives = True

    def __init__(
        self,
        base: Loss | None = None,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
    ) -> None:
        super().__init__()
        base = MultiSimilarity() if base is None else base
        if not isinstance(base, Loss) or base.kind != "embedding" or not base.needs_labels:
            raise ConfigError(
                f"loss.base={type(base).__name__}: TCM regularises an embedding loss that uses labels "
                "(e.g. losslab.losses.pair.MultiSimilarity, Triplet, Circle, Contrastive)"
            )
        for name, value in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus)):
            if value < 0:
                raise ConfigError(f"loss.{name}={value}: must be >= 0")
        for name, value in (("margin_plus", margin_plus), ("margin_minus", margin_minus)):
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"loss.{name}={value}: a cosine similarity, must be in [-1, 1]")
        self.base = base
        self.lambda_plus, self.lambda_minus = lambda_plus, lambda_minus
        self.margin_plus, self.margin_minus = margin_plus, margin_minus

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = self.base(embeddings, labels)
        features, labels = _flatten_views(embeddings, labels)
        positives, negatives = _label_masks(labels)
        similarity = _cosine_similarity(upcast(features))
        hard_positives = positives & (similarity <= self.margin_plus)
        hard_negatives = negatives & (similarity >= self.margin_minus)
        positive_term = torch.where(hard_positives, self.margin_plus - similarity, 0.0).sum()
        negative_term = torch.where(hard_negatives, similarity - self.margin_minus, 0.0).sum()
        return (
            base
            + self.lambda_plus * positive_term / hard_positives.sum().clamp_min(1)
            + self.lambda_minus * negative_term / hard_negatives.sum().clamp_min(1)
        )

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return self.base.extra_metrics()


class GE2E(_PairLoss):
    """Generalized end-to-end loss (Wan, Wang, Papir & Lopez Moreno 2018, ICASSP, "Generalized End-to-End Loss for
    Speaker Verification"), softmax form, eqs. 5–6: ``L_ji = −S_ji,j + log sum_k exp(S_ji,k)``,
    ``S_ji,k = w cos(e_ji, c_k) + b``, on L2-normalised embeddings ``e`` (the paper's d-vectors).

    ``c_k`` is the mean embedding of class k in the batch; for the anchor's own class it is the mean of the
    class's other samples, ``c_j^(−i) = (sum_m e_jm − e_ji) / (M − 1)`` (eq. 8). ``w`` (kept > 0) and ``b`` are
    learned with the network from the paper's ``w_init = 10``, ``b_init = −5``. ``variant=contrast`` is the
    paper's other form, eq. 7: ``1 − σ(S_ji,j) + max_{k≠j} σ(S_ji,k)``. The batch's classes play the paper's
    speakers; an anchor whose class has no other sample has no own centroid and is left out (counted), but
    its class still serves as a centroid for the others. Averaged over the anchors (the paper sums).
    """

    def __init__(self, w_init: float = 10.0, b_init: float = -5.0, variant: str = "softmax") -> None:
        super().__init__()
        _check_choice("variant", variant, GE2E_VARIANTS)
        if w_init <= 0:
            raise ConfigError(f"loss.w_init={w_init}: must be > 0 (the paper constrains w > 0)")
        self.w_init, self.b_init, self.variant = float(w_init), float(b_init), variant
        self.w = nn.Parameter(torch.tensor(self.w_init))
        self.b = nn.Parameter(torch.tensor(self.b_init))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features, _, _, _, kept = self._batch(embeddings, labels)
        if not kept.any():
            return features.sum() * 0.0
        _, labels = _flatten_views(embeddings, labels)
        classes, own = torch.unique(labels, return_inverse=True)
        with torch.autocast(features.device.type, enabled=False):
            e = F.normalize(features, dim=-1)
            sums = e.new_zeros(len(classes), e.shape[1]).index_add(0, own, e)
            counts = torch.bincount(own, minlength=len(classes)).to(e.dtype)
            centroids = F.normalize(sums / counts[:, None], dim=-1)
            own_centroid = (sums[own] - e) / (counts[own] - 1).clamp_min(1)[:, None]
            own_cosine = (e * F.normalize(own_centroid, dim=-1)).sum(dim=1)
            cosine = (e @ centroids.T).scatter(1, own[:, None], own_cosine[:, None])
        w, b = self.w.clamp_min(1e-6).to(cosine.dtype), self.b.to(cosine.dtype)
        similarity, own = (w * cosine + b)[kept], own[kept]
        if self.variant == "softmax":
            return F.cross_entropy(similarity, own)
        own_similarity = similarity.gather(1, own[:, None]).squeeze(1)
        others = similarity.scatter(1, own[:, None], float("-inf")).amax(dim=1)
        return (1.0 - torch.sigmoid(own_similarity) + torch.sigmoid(others)).mean()

    def extra_repr(self) -> str:
        return f"variant={self.variant}, w_init={self.w_init:g}, b_init={self.b_init:g}"
