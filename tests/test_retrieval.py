"""Representation metrics (losslab.retrieval) against their definitions, written as plain Python loops, on a
hand-computed case with ties and a one-sample class, on random data (and, for what torchmetrics' retrieval
functions define, against those too)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_precision, retrieval_r_precision

from losslab.retrieval import (
    EvaluationFeatures,
    RepresentationMetrics,
    alignment,
    knn_accuracy,
    nearest_neighbours,
    retrieval_metrics,
    uniformity,
)

NAMES = ["precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8"]


def ranked(similarity_row: list[float], exclude: int | None = None) -> list[int]:
    """Indices by decreasing similarity, ties by lower index, without ``exclude``."""
    order = sorted(range(len(similarity_row)), key=lambda j: (-similarity_row[j], j))
    return [j for j in order if j != exclude]


def similarities(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    return [[sum(float(x) * float(y) for x, y in zip(row, column)) for column in b] for row in a]


def reference_retrieval(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Musgrave et al. 2020's definitions, one query at a time; queries alone in their class are skipped."""
    labels = labels.tolist()
    sims = similarities(embeddings, embeddings)
    per_query = {name: [] for name in NAMES}
    for i, label in enumerate(labels):
        r = labels.count(label) - 1
        if r == 0:
            continue
        relevant = [labels[j] == label for j in ranked(sims[i], exclude=i)]
        per_query["precision_at_1"].append(float(relevant[0]))
        per_query["r_precision"].append(sum(relevant[:r]) / r)
        precision_at = [sum(relevant[: k + 1]) / (k + 1) for k in range(r)]
        per_query["map_at_r"].append(sum(p for p, hit in zip(precision_at, relevant[:r]) if hit) / r)
        for k in (1, 2, 4, 8):
            per_query[f"recall_at_{k}"].append(float(any(relevant[:k])))
    return {name: sum(values) / len(values) for name, values in per_query.items()}


# Six unit vectors in 2-D with exact dot products (0, +-1): ties everywhere, and class 2 has a single sample.
TIED = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
TIED_LABELS = torch.tensor([0, 1, 0, 0, 1, 2])
# By hand, ranking ties by index. Query 0 (R=2) ranks 1 | 2 3 5 (all 0) | 4: hits 0 1 1 0 0, so P@1 0,
# R-precision 1/2, MAP@R (0 + 1/2) / 2. Query 1 (R=1) ranks 0 | 2 3 5 | 4: its positive comes last. Queries 2
# and 3 find each other first, then 0: everything 1. Query 4 (R=1) ranks 2 3 5 | 0 1: its positive is fifth.
# Query 5 is alone in class 2 and is no query.
TIED_EXPECTED = {
    "precision_at_1": 2 / 5, "r_precision": (0.5 + 0 + 1 + 1 + 0) / 5, "map_at_r": (0.25 + 0 + 1 + 1 + 0) / 5,
    "recall_at_1": 2 / 5, "recall_at_2": 3 / 5, "recall_at_4": 3 / 5, "recall_at_8": 1.0,
}  # fmt: skip


def test_retrieval_metrics_match_a_hand_computed_case_with_ties_and_a_lone_sample():
    assert reference_retrieval(TIED, TIED_LABELS) == pytest.approx(TIED_EXPECTED)
    assert retrieval_metrics(TIED, TIED_LABELS) == pytest.approx(TIED_EXPECTED)


def test_ties_rank_by_dataset_order_whatever_the_block_size():
    for block_elements in (1, 5, 1 << 24):
        blocks = list(nearest_neighbours(TIED, TIED, 5, exclude_self=True, block_elements=block_elements))
        indices = torch.cat([found for _, _, found in blocks])
        assert indices[0].tolist() == [1, 2, 3, 5, 4] and indices[4].tolist() == [2, 3, 5, 0, 1]
        assert retrieval_metrics(TIED, TIED_LABELS, block_elements=block_elements) == pytest.approx(TIED_EXPECTED)


def test_retrieval_metrics_match_the_loop_on_random_embeddings_with_lone_samples():
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(60, 8, generator=generator), dim=1)
    labels = torch.randint(0, 6, (60,), generator=generator)
    labels[[7, 19]] = torch.tensor([10, 11])  # two classes of one sample
    expected = reference_retrieval(embeddings, labels)
    assert retrieval_metrics(embeddings, labels) == pytest.approx(expected)
    assert retrieval_metrics(embeddings, labels, block_elements=97) == pytest.approx(expected)


def test_retrieval_metrics_match_the_loop_on_embeddings_full_of_exact_ties():
    generator = torch.Generator().manual_seed(1)
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    embeddings = axes[torch.randint(0, 6, (40,), generator=generator)]
    labels = torch.randint(0, 4, (40,), generator=generator)
    labels[0] = 9
    assert retrieval_metrics(embeddings, labels, block_elements=64) == pytest.approx(
        reference_retrieval(embeddings, labels)
    )


def test_precision_r_precision_and_recall_agree_with_torchmetrics_per_query():
    generator = torch.Generator().manual_seed(2)
    embeddings = F.normalize(torch.randn(50, 6, generator=generator), dim=1)
    labels = torch.randint(0, 5, (50,), generator=generator)
    sims = embeddings @ embeddings.T
    expected = {name: [] for name in ("precision_at_1", "r_precision", *(f"recall_at_{k}" for k in (1, 2, 4, 8)))}
    for i in range(50):
        others = torch.arange(50) != i
        preds, target = sims[i, others], labels[others] == labels[i]
        expected["precision_at_1"].append(float(retrieval_precision(preds, target, top_k=1)))
        expected["r_precision"].append(float(retrieval_r_precision(preds, target)))
        for k in (1, 2, 4, 8):
            expected[f"recall_at_{k}"].append(float(retrieval_hit_rate(preds, target, top_k=k)))
    values = retrieval_metrics(embeddings, labels)
    for name, per_query in expected.items():
        assert values[name] == pytest.approx(sum(per_query) / len(per_query)), name


def test_retrieval_without_any_query_is_nan():
    values = retrieval_metrics(TIED[:3], torch.tensor([0, 1, 2]))
    assert set(values) == set(NAMES) and all(math.isnan(v) for v in values.values())


def test_perfectly_clustered_classes_score_one():
    embeddings = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert retrieval_metrics(embeddings, labels) == pytest.approx(dict.fromkeys(NAMES, 1.0))


# ---- kNN -----------------------------------------------------------------------------------------------------


def reference_knn(features, labels, bank, bank_labels, k, temperature):
    """solo-learn's weighted kNN, one query at a time: the k most similar bank samples (ties by index) add
    exp(sim / T) to their label; the highest score wins, the lower label on a tie."""
    sims = similarities(features, bank)
    correct = 0
    for i, row in enumerate(sims):
        scores = {}
        for j in ranked(row)[:k]:
            label = int(bank_labels[j])
            scores[label] = scores.get(label, 0.0) + math.exp(row[j] / temperature)
        best = max(sorted(scores), key=lambda label: scores[label])
        correct += best == int(labels[i])
    return correct / len(labels)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_accuracy_matches_the_loop(k):
    generator = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(80, 5, generator=generator), dim=1)
    bank_labels = torch.randint(0, 4, (80,), generator=generator)
    features = F.normalize(torch.randn(30, 5, generator=generator), dim=1)
    labels = torch.randint(0, 4, (30,), generator=generator)
    expected = reference_knn(features, labels, bank, bank_labels, k, 0.07)
    assert knn_accuracy(features, labels, bank, bank_labels, k=k, temperature=0.07) == pytest.approx(expected)
    assert knn_accuracy(features, labels, bank, bank_labels, k=k, block_elements=160) == pytest.approx(expected)


def test_knn_weights_votes_by_similarity_and_breaks_ties_by_index():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    # k=1: bank rows 0 and 3 tie at cos 1, and row 0 comes first.
    assert knn_accuracy(query, torch.tensor([0]), bank, bank_labels, k=1) == 1.0
    # k=3: rows 0, 3 (cos 1) and 1 (cos 0): labels 0 and 2 tie on exp(1/T), above label 1: the lower, 0, wins.
    assert knn_accuracy(query, torch.tensor([0]), bank, bank_labels, k=3) == 1.0
    # With a weak temperature the two label-1 rows at cos 0 still lose to one row at cos 1.
    assert knn_accuracy(query, torch.tensor([1]), bank, bank_labels, k=4, temperature=0.5) == 0.0


# ---- Alignment and uniformity ---------------------------------------------------------------------------------


def reference_alignment(embeddings, labels):
    distances = [float((embeddings[i] - embeddings[j]).pow(2).sum()) for i in range(len(labels))
                 for j in range(len(labels)) if i != j and labels[i] == labels[j]]  # fmt: skip
    return sum(distances) / len(distances)


def reference_uniformity(embeddings, t=2.0):
    n = len(embeddings)
    kernel = [math.exp(-t * float((embeddings[i] - embeddings[j]).pow(2).sum())) for i in range(n)
              for j in range(n) if i != j]  # fmt: skip
    return math.log(sum(kernel) / len(kernel))


def test_alignment_and_uniformity_match_the_pairwise_loops():
    generator = torch.Generator().manual_seed(4)
    embeddings = F.normalize(torch.randn(40, 6, generator=generator), dim=1)
    labels = torch.randint(0, 5, (40,), generator=generator)
    labels[0] = 7  # a lone sample has no positive pair and adds nothing to alignment
    assert alignment(embeddings, labels) == pytest.approx(reference_alignment(embeddings, labels), rel=1e-6)
    assert uniformity(embeddings) == pytest.approx(reference_uniformity(embeddings), rel=1e-5)
    assert uniformity(embeddings, block_elements=50) == pytest.approx(reference_uniformity(embeddings), rel=1e-5)
    assert uniformity(embeddings, t=0.5) == pytest.approx(reference_uniformity(embeddings, t=0.5), rel=1e-5)


def test_alignment_and_uniformity_at_their_extremes():
    collapsed = torch.tensor([[1.0, 0.0]] * 4)
    assert alignment(collapsed, torch.tensor([0, 0, 1, 1])) == 0.0
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)  # log E exp(0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert alignment(opposite, torch.tensor([0, 0])) == pytest.approx(4.0)
    assert uniformity(opposite) == pytest.approx(-8.0)  # log exp(-2 * 4)
    assert math.isnan(alignment(opposite, torch.tensor([0, 1]))) and math.isnan(uniformity(opposite[:1]))


# ---- The epoch accumulator ------------------------------------------------------------------------------------


def test_representation_metrics_normalise_accumulate_and_reset():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(30, 4, generator=generator) * 5  # not unit rows: normalised on the way in
    labels = torch.randint(0, 3, (30,), generator=generator)
    metrics = RepresentationMetrics(knn_k=7, knn_temperature=0.1)
    metrics.update("test", features[:20], labels[:20])
    metrics.update("test", features[20:], labels[20:])
    bank = (F.normalize(features, dim=1), labels)
    values = metrics.compute("test", bank)
    unit = F.normalize(features, dim=1)
    assert {name: values[name] for name in NAMES} == pytest.approx(retrieval_metrics(unit, labels))
    assert values["alignment"] == pytest.approx(alignment(unit, labels))
    assert values["uniformity"] == pytest.approx(uniformity(unit))
    assert values["knn_acc"] == pytest.approx(knn_accuracy(unit, labels, *bank, k=7, temperature=0.1))
    assert metrics.compute("test") is None  # reset after compute
    metrics.update("val", features, labels)
    assert "knn_acc" not in metrics.compute("val")  # no bank: an unseen-class stage


def test_evaluation_features_keep_rows_and_labels_in_order():
    state = EvaluationFeatures()
    state.update(torch.tensor([[3.0, 4.0]]), torch.tensor([2]))
    state.update(torch.tensor([[0.0, -2.0]]), torch.tensor([5]))
    features, labels = state.compute()
    torch.testing.assert_close(features, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert labels.tolist() == [2, 5]
