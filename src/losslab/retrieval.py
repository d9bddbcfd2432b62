"""How good a representation is, read from its geometry: kNN accuracy, retrieval metrics, alignment and
uniformity. The training module computes them at the end of every val and test epoch, on L2-normalised
backbone features (:class:`RepresentationMetrics`).

- kNN accuracy (Wu et al. 2018; solo-learn's ``WeightedKNNClassifier``): the ``k`` most cosine-similar
  training samples vote for their label with weight ``exp(sim / temperature)``.
- Retrieval, leave-one-out on the evaluated split (Musgrave et al. 2020, "A metric learning reality check"):
  every sample queries all the others. ``precision_at_1``; ``r_precision`` = the fraction of same-class
  samples among the ``R`` nearest, ``R`` = the number of other samples of the query's class; ``map_at_r`` =
  ``1/R sum_{i<=R} P@i * rel(i)``; ``recall_at_k`` = the fraction of queries with a same-class sample among
  their ``k`` nearest (Song et al. 2016). A query alone in its class cannot retrieve anything and counts in
  none of them, as in pytorch-metric-learning's ``AccuracyCalculator``.
- Alignment and uniformity (Wang & Isola 2020): ``E ||f(x) - f(y)||^2`` over positive pairs, here every
  pair of distinct same-label samples, and ``log E exp(-2 ||f(x) - f(y)||^2)`` over all pairs of distinct
  samples.

Neighbours of equal similarity are ranked by dataset order (lower index first), so the results never depend
on how a sort breaks ties. Similarities are computed a block of query rows at a time: the N x N matrix of a
10k test set alone would be 400 MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

RECALL_AT = (1, 2, 4, 8)
# Elements of one block of the similarity matrix (64 MB of float32, plus its int64 ranking keys).
BLOCK_ELEMENTS = 1 << 24


def _block_rows(n_columns: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_columns))


def _ranking_keys(similarity: torch.Tensor) -> torch.Tensor:
    """int64 keys that order a ``[Q, N]`` block of float32 similarities by similarity, then by lower column
    index: the float's bits mapped to an int32 of the same order, in the high half; ``N - 1 - column`` in the
    low half. ``topk`` over them is exact and reproducible, where ``topk`` over floats may order ties either
    way."""
    bits = (similarity.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, its equal
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # negative floats count down
    columns = torch.arange(similarity.shape[1] - 1, -1, -1, device=similarity.device)
    return ordered * (1 << 32) + columns


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False,
    block_elements: int = BLOCK_ELEMENTS,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """For blocks of query rows: ``(rows, similarities [q, k], indices [q, k])`` of the ``k`` bank rows most
    similar to each query (dot products, so cosine for normalised rows), most similar first, ties by index.
    ``exclude_self``: queries are the bank, and a row is never its own neighbour (then ``k < len(bank)``)."""
    rows = _block_rows(len(bank), block_elements)
    for start in range(0, len(queries), rows):
        block = slice(start, min(start + rows, len(queries)))
        similarity = queries[block] @ bank.T
        if exclude_self:
            own = torch.arange(block.start, block.stop, device=similarity.device)
            similarity[torch.arange(len(own), device=similarity.device), own] = -torch.inf
        indices = _ranking_keys(similarity).topk(k, dim=1).indices
        yield block, similarity.gather(1, indices), indices


def knn_accuracy(
    features: torch.Tensor, labels: torch.Tensor, bank_features: torch.Tensor, bank_labels: torch.Tensor,
    k: int = 200, temperature: float = 0.07, block_elements: int = BLOCK_ELEMENTS,
) -> float:  # fmt: skip
    """Weighted kNN classification (solo-learn): each of the ``min(k, len(bank))`` nearest bank samples adds
    ``exp(cos / temperature)`` to its label's score; the top score is the prediction (ties: lower label).
    ``features`` and ``bank_features`` are L2-normalised rows."""
    num_classes = int(max(labels.max(), bank_labels.max())) + 1
    k = min(k, len(bank_features))
    correct = 0
    for rows, similarity, indices in nearest_neighbours(features, bank_features, k, block_elements=block_elements):
        votes = torch.zeros(len(indices), num_classes, device=similarity.device)
        votes.scatter_add_(1, bank_labels[indices], (similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == labels[rows]).sum())
    return correct / len(labels)


def retrieval_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, recall_at: Sequence[int] = RECALL_AT,
    block_elements: int = BLOCK_ELEMENTS,
) -> dict[str, float]:  # fmt: skip
    """Leave-one-out retrieval on one split of L2-normalised ``embeddings``: ``precision_at_1``,
    ``r_precision``, ``map_at_r`` and ``recall_at_<k>``, averaged over the queries with at least one other
    sample of their class (NaN for every metric when there is none)."""
    names = ["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in recall_at)]
    _, label_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    relevant = counts[label_index] - 1  # R of every query
    queries = relevant > 0
    if not queries.any():
        return dict.fromkeys(names, float("nan"))
    depth = min(len(labels) - 1, max(int(relevant.max()), max(recall_at)))
    totals = torch.zeros(len(names), dtype=torch.float64, device=embeddings.device)
    for rows, _, indices in nearest_neighbours(embeddings, embeddings, depth, exclude_self=True,
                                               block_elements=block_elements):  # fmt: skip
        keep = queries[rows]
        hits = (label_index[indices] == label_index[rows, None])[keep]  # [q, depth]
        r = relevant[rows][keep]
        rank = torch.arange(1, depth + 1, device=hits.device)
        within_r = rank[None, :] <= r[:, None]
        hits_within_r = hits & within_r
        precision_at_rank = hits_within_r.cumsum(dim=1).double() / rank
        per_query = [
            hits[:, 0].double(),
            hits_within_r.sum(dim=1) / r,
            (precision_at_rank * hits_within_r).sum(dim=1) / r,
            *(hits[:, :k].any(dim=1).double() for k in recall_at),
        ]
        totals += torch.stack([values.double().sum() for values in per_query])
    return dict(zip(names, (totals / queries.sum()).tolist()))


def alignment(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Wang & Isola's alignment (alpha = 2) with same-label pairs as the positives: the mean of
    ``||f_i - f_j||^2`` over all ordered pairs ``i != j`` of equal label (NaN without any). A class's pairs
    sum to ``2 n sum_i ||f_i||^2 - 2 ||sum_i f_i||^2``, so no pair is ever formed."""
    _, label_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    embeddings = embeddings.double()
    sums = torch.zeros(len(counts), embeddings.shape[1], dtype=torch.float64, device=embeddings.device)
    sums.index_add_(0, label_index, embeddings)
    squared_norms = torch.zeros(len(counts), dtype=torch.float64, device=embeddings.device)
    squared_norms.index_add_(0, label_index, embeddings.square().sum(dim=1))
    counts = counts.double()
    pairs = (counts * (counts - 1)).sum()
    if pairs == 0:
        return float("nan")
    summed = 2 * counts * squared_norms - 2 * sums.square().sum(dim=1)
    return float(summed.sum().clamp_min(0) / pairs)


def uniformity(embeddings: torch.Tensor, t: float = 2.0, block_elements: int = BLOCK_ELEMENTS) -> float:
    """Wang & Isola's uniformity: ``log`` of the mean of ``exp(-t ||f_i - f_j||^2)`` over pairs ``i != j`` of
    unit rows (NaN below two rows)."""
    n = len(embeddings)
    if n < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    rows = _block_rows(n, block_elements)
    for start in range(0, n, rows):
        block = embeddings[start : start + rows]
        squared_distance = (2 - 2 * (block @ embeddings.T)).clamp_min(0)
        kernel = (-t * squared_distance).exp()
        own = torch.arange(len(block), device=block.device)
        kernel[own, own + start] = 0
        total += kernel.double().sum()
    return float((total / (n * (n - 1))).log())


class EvaluationFeatures(Metric):
    """Every L2-normalised feature row and label of an epoch, gathered across ranks (cat states)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features.append(F.normalize(features.detach().float(), dim=1))
        self.labels.append(labels.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.features), dim_zero_cat(self.labels)


class RepresentationMetrics(nn.Module):
    """The val and test features of an epoch and the kNN bank, and what is computed from them.

    :meth:`compute` returns, for one stage, the retrieval metrics, ``alignment`` and ``uniformity`` of that
    stage's features, and ``knn_acc`` against the bank when one is given (the training split's features:
    meaningful only when the evaluated classes are training classes)."""

    def __init__(self, knn_k: int = 200, knn_temperature: float = 0.07) -> None:
        super().__init__()
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self.stages = nn.ModuleDict({"val": EvaluationFeatures(), "test": EvaluationFeatures()})
        self.bank = EvaluationFeatures()

    def update(self, stage: str, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.stages[stage].update(features, labels)

    def compute(self, stage: str, bank: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float] | None:
        """The metrics of ``stage``'s epoch (None when it saw no sample); resets that stage's features."""
        features_state = self.stages[stage]
        if not features_state.update_called:
            return None
        features, labels = features_state.compute()
        features_state.reset()
        values = retrieval_metrics(features, labels)
        values["alignment"] = alignment(features, labels)
        values["uniformity"] = uniformity(features)
        if bank is not None and len(bank[0]):
            values["knn_acc"] = knn_accuracy(features, labels, *bank, k=self.knn_k, temperature=self.knn_temperature)
        return values

    def reset(self, stage: str) -> None:
        self.stages[stage].reset()
