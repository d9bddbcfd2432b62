"""Losses with a memory (losslab/losses/memory.py): the pair losses' reference embeddings, XBM and MoCHi against
float64 loops over explicit candidate lists and a deque standing for the FIFO memory (value and gradient), the
memory's FIFO order and wrap-around, its buffers in checkpoints, and one tiny training run each."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from conftest import run_training
from losslab.errors import ConfigError
from losslab.losses import SimCLR
from losslab.losses.memory import CrossBatchMemory, MoCHi
from losslab.losses.pair import GE2E, Circle, Contrastive, MultiSimilarity, Triplet

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def batch(seed: int, n: int = 6, dim: int = 4) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- loop references over candidate lists

# A candidate is (vector, label, owner): owner is the index of the anchor it is a copy of (never paired with that
# anchor), or None for an entry of an earlier batch.


def number(tensor):
    return tensor.detach().item() if isinstance(tensor, torch.Tensor) else tensor


def unit(vector):
    return vector / torch.linalg.vector_norm(vector)


def cosine(a, b):
    return unit(a) @ unit(b)


def mean(terms):
    return sum(terms) / len(terms)


def sides(anchor, label, index, candidates):
    """The anchor's positive and negative candidate vectors."""
    others = [(v, y) for v, y, owner in candidates if owner != index]
    return [v for v, y in others if y == label], [v for v, y in others if y != label]


def loop_multi_similarity(x, y, candidates, alpha=2.0, beta=50.0, lambda_=1.0, epsilon=0.1):
    terms = []
    for a in range(len(x)):
        positives, negatives = sides(x[a], int(y[a]), a, candidates)
        if not positives or not negatives:
            continue
        s_p, s_n = [cosine(x[a], v) for v in positives], [cosine(x[a], v) for v in negatives]
        kept_n = [s for s in s_n if number(s) > min(number(t) for t in s_p) - epsilon]
        kept_p = [s for s in s_p if number(s) < max(number(t) for t in s_n) + epsilon]
        positive_sum = sum((torch.exp(-alpha * (s - lambda_)) for s in kept_p), torch.tensor(0.0))
        negative_sum = sum((torch.exp(beta * (s - lambda_)) for s in kept_n), torch.tensor(0.0))
        terms.append(torch.log(1 + positive_sum) / alpha + torch.log(1 + negative_sum) / beta)
    return mean(terms)


def loop_contrastive(x, y, candidates, margin=1.0, distance="euclidean", normalize=True):
    terms = []
    for a in range(len(x)):
        for v, label, owner in candidates:
            if owner == a:
                continue
            if distance == "cosine":
                d = 1 - cosine(x[a], v)
            else:
                d = torch.linalg.vector_norm(unit(x[a]) - unit(v) if normalize else x[a] - v)
            terms.append(0.5 * d**2 if label == int(y[a]) else 0.5 * torch.clamp(margin - d, min=0) ** 2)
    return mean(terms)


def loop_triplet(x, y, candidates, margin=0.2, mining="batch_hard", soft_margin=True):
    def term(difference):
        return torch.log(1 + torch.exp(difference)) if soft_margin else torch.clamp(margin + difference, min=0)

    terms = []
    for a in range(len(x)):
        positives, negatives = sides(x[a], int(y[a]), a, candidates)
        if not positives or not negatives:
            continue
        d_p = [torch.linalg.vector_norm(x[a] - v) for v in positives]
        d_n = [torch.linalg.vector_norm(x[a] - v) for v in negatives]
        if mining == "batch_hard":
            terms.append(term(max(d_p, key=number) - min(d_n, key=number)))
        elif mining == "batch_all":
            terms += [term(p - n) for p in d_p for n in d_n]
        else:  # semi_hard
            for p in d_p:
                farther = [n for n in d_n if number(n) > number(p)]
                if farther:
                    terms.append(term(p - min(farther, key=number)))
    if mining == "batch_all" and not soft_margin:
        terms = [t for t in terms if number(t) > 0]
    return mean(terms)


def loop_circle(x, y, candidates, margin=0.4, gamma=80.0):
    terms = []
    for a in range(len(x)):
        positives, negatives = sides(x[a], int(y[a]), a, candidates)
        if not positives or not negatives:
            continue
        exponents_p = []
        for v in positives:
            s = cosine(x[a], v)
            exponents_p.append(-gamma * torch.clamp(1 + margin - s.detach(), min=0) * (s - (1 - margin)))
        exponents_n = []
        for v in negatives:
            s = cosine(x[a], v)
            exponents_n.append(gamma * torch.clamp(s.detach() + margin, min=0) * (s - margin))
        log_product = torch.logsumexp(torch.stack(exponents_p), 0) + torch.logsumexp(torch.stack(exponents_n), 0)
        terms.append(F.softplus(log_product))
    return mean(terms)


def in_batch(x, y):
    """The batch as its own candidates, with gradients through both ends."""
    return [(x[j], int(y[j]), j) for j in range(len(x))]


BASES = {
    "multi_similarity": (lambda: MultiSimilarity(), loop_multi_similarity),
    "multi_similarity_half_lambda": (lambda: MultiSimilarity(lambda_=0.5, epsilon=0.5),
                                     lambda *a: loop_multi_similarity(*a, lambda_=0.5, epsilon=0.5)),
    "contrastive": (lambda: Contrastive(), loop_contrastive),
    "contrastive_raw": (lambda: Contrastive(margin=3.0, normalize=False),
                        lambda *a: loop_contrastive(*a, margin=3.0, normalize=False)),
    "contrastive_cosine": (lambda: Contrastive(0.5, "cosine"), lambda *a: loop_contrastive(*a, 0.5, "cosine")),
    "triplet_batch_hard": (lambda: Triplet(), loop_triplet),
    "triplet_batch_all": (lambda: Triplet(mining="batch_all", soft_margin=False, margin=1.0),
                          lambda *a: loop_triplet(*a, margin=1.0, mining="batch_all", soft_margin=False)),
    "triplet_semi_hard": (lambda: Triplet(mining="semi_hard"), lambda *a: loop_triplet(*a, mining="semi_hard")),
    "circle": (lambda: Circle(), loop_circle),
}  # fmt: skip


def assert_value_and_gradient(value, reference, x, x_reference):
    (gradient,) = torch.autograd.grad(value, x)
    (expected_gradient,) = torch.autograd.grad(reference, x_reference)
    assert value.item() == pytest.approx(reference.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- reference embeddings of the pair losses


@pytest.mark.parametrize("key", sorted(BASES))
def test_pair_loss_against_reference_embeddings_matches_loop(key):
    make, loop = BASES[key]
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    stored, stored_labels = batch(1, 5), torch.tensor([0, 2, 3, 4, 1])  # 4: a label no anchor has
    x, x_reference = batch(0).requires_grad_(), batch(0).requires_grad_()
    references = torch.cat([x.detach(), stored])
    value = make()(x, y, references, torch.cat([y, stored_labels]))
    candidates = in_batch(x_reference.detach(), y) + [(v, int(label), None) for v, label in zip(stored, stored_labels)]
    assert_value_and_gradient(value, loop(x_reference, y, candidates), x, x_reference)


@pytest.mark.parametrize("key", sorted(BASES))
def test_the_batch_as_its_own_references_gives_the_plain_loss(key):
    make, _ = BASES[key]
    x, y = batch(2, 8), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    assert make()(x, y, x.clone(), y.clone()).item() == pytest.approx(make()(x, y).item(), rel=1e-9)


def test_anchor_is_never_paired_with_its_own_reference_row():
    # One anchor per class in the batch: its only positive would be its own copy, so it has none.
    x, y = batch(3, 4), torch.tensor([0, 1, 2, 3])
    loss = MultiSimilarity()
    value = loss(x.requires_grad_(), y, x.detach(), y)
    assert value.item() == 0.0 and value.requires_grad
    assert loss.extra_metrics()["anchors_without_positives"].item() == 4


# ---------------------------------------------------------------- XBM


def xbm(key="multi_similarity", memory_size=7, start_iteration=0, weight=1.0):
    return CrossBatchMemory(BASES[key][0](), memory_size, start_iteration, weight).double()


BATCH_LABELS = [torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([1, 2, 2, 3, 0, 4]), torch.tensor([3, 3, 0, 1, 4, 4])]


@pytest.mark.parametrize("key", ["multi_similarity", "contrastive", "triplet_batch_hard", "circle"])
@pytest.mark.parametrize(("memory_size", "weight"), [(7, 1.0), (20, 0.5), (4, 1.0)])
def test_xbm_equals_batch_loss_plus_loss_against_the_fifo_memory(key, memory_size, weight):
    """Three steps of 6 samples: the memory wraps around (7), never fills (20), or is smaller than a batch (4)."""
    loss, loop = xbm(key, memory_size, weight=weight), BASES[key][1]
    memory = deque(maxlen=memory_size)
    for step, y in enumerate(BATCH_LABELS):
        x, x_reference = batch(10 + step).requires_grad_(), batch(10 + step).requires_grad_()
        value = loss(x, y)
        kept = list(memory)[max(0, len(memory) + len(y) - memory_size):] if len(y) < memory_size else []
        memory.extend((v, int(label)) for v, label in zip(x_reference.detach(), y))
        stored = [(v, label, None) for v, label in kept]
        expected = (loop(x_reference, y, in_batch(x_reference, y))
                    + weight * loop(x_reference, y, in_batch(x_reference.detach(), y) + stored))  # fmt: skip
        assert_value_and_gradient(value, expected, x, x_reference)


@pytest.mark.parametrize("key", ["multi_similarity", "contrastive"])
def test_xbm_before_start_iteration_is_the_base_loss_and_stores_nothing(key):
    loss, base = xbm(key, start_iteration=2), BASES[key][0]()
    for step in range(2):
        x, y = batch(step).requires_grad_(), BATCH_LABELS[step]
        x_reference = batch(step).requires_grad_()
        assert_value_and_gradient(loss(x, y), base(x_reference, y), x, x_reference)
    assert loss.filled.item() == 0 and loss.iteration.item() == 2
    loss(batch(2), BATCH_LABELS[2])
    assert loss.filled.item() == 6  # the third call is past the warm-up


def test_xbm_in_eval_mode_is_the_base_loss_and_leaves_the_memory_alone():
    loss = xbm()
    loss(batch(0), BATCH_LABELS[0])
    stored = [t.clone() for t in loss.memory()]
    loss.eval()
    x, y = batch(1), BATCH_LABELS[1]
    assert loss(x, y).item() == MultiSimilarity()(x, y).item()
    assert loss.iteration.item() == 1
    for before, after in zip(stored, loss.memory()):
        assert torch.equal(before, after)


def test_memory_is_fifo_and_wraps_around():
    loss = xbm(memory_size=5)
    first, second = batch(0, 3), batch(1, 3)
    loss(first, torch.tensor([0, 0, 1]))
    embeddings, labels = loss.memory()
    assert torch.equal(embeddings, first) and labels.tolist() == [0, 0, 1]
    loss(second, torch.tensor([1, 2, 2]))
    embeddings, labels = loss.memory()
    assert torch.equal(embeddings, torch.cat([first[1:], second])) and labels.tolist() == [0, 1, 1, 2, 2]
    # The ring: the second batch went to slots 3, 4 and then 0, the oldest.
    assert torch.equal(loss.memory_embeddings, torch.cat([second[2:], first[1:], second[:2]]))
    assert loss.pointer.item() == 1 and loss.filled.item() == 5
    loss(batch(2, 7), torch.tensor([0, 1, 2, 3, 4, 0, 1]))  # more than the memory holds: the last 5 stay
    embeddings, labels = loss.memory()
    assert torch.equal(embeddings, batch(2, 7)[2:]) and labels.tolist() == [2, 3, 4, 0, 1]


def test_memory_stores_detached_flattened_views():
    loss = xbm(memory_size=10)
    views = batch(0, 6).view(3, 2, 4).requires_grad_()
    loss(views, torch.tensor([0, 0, 1]))
    embeddings, labels = loss.memory()
    assert not embeddings.requires_grad and torch.equal(embeddings, views.detach().reshape(6, 4))
    assert labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_xbm_memory_is_in_the_state_dict_and_a_fresh_loss_resumes_from_it():
    loss = xbm(memory_size=9)
    loss.setup_embedding(4, 5)
    for step in range(2):
        loss(batch(step), BATCH_LABELS[step])
    state = loss.state_dict()
    assert {"memory_embeddings", "memory_labels", "pointer", "filled", "iteration"} <= set(state)
    resumed = CrossBatchMemory(MultiSimilarity(), memory_size=9, start_iteration=0).double()  # sized on load
    resumed.load_state_dict(state)
    for before, after in zip(loss.memory(), resumed.memory()):
        assert torch.equal(before, after)
    x, y = batch(5), BATCH_LABELS[2]
    assert resumed(x, y).item() == pytest.approx(loss(x, y).item(), rel=1e-12)
    assert resumed.iteration.item() == 3


def test_setup_embedding_sizes_the_memory_for_the_embedding_dimension():
    loss = CrossBatchMemory(memory_size=11)
    loss.setup_embedding(16, 10)
    assert loss.memory_embeddings.shape == (11, 16) and loss.memory_labels.shape == (11,)
    assert loss.double().memory_embeddings.dtype == torch.float64


def test_xbm_batch_without_positives_gives_zero_with_graph_and_counts_the_batch_term():
    loss = xbm()
    x = batch(0).requires_grad_()
    value = loss(x, torch.arange(6))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 6


def test_xbm_counters_are_the_batch_terms():
    loss = xbm(memory_size=20)
    loss(batch(0), torch.tensor([0, 0, 1, 1, 2, 3]))
    loss(batch(1), torch.tensor([2, 3, 5, 6, 7, 8]))  # 2 and 3 find positives in the memory only
    assert loss.extra_metrics()["anchors_without_positives"].item() == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xbm_half_precision_embeddings_are_computed_in_float32(dtype):
    loss = CrossBatchMemory(memory_size=20, start_iteration=0)
    for step, y in enumerate(BATCH_LABELS):
        half = (batch(step) * 3).to(dtype).requires_grad_()
        value = loss(half, y)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()
    assert loss.memory_embeddings.dtype == torch.float32


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CrossBatchMemory(memory_size=0), "loss.memory_size=0"),
    (lambda: CrossBatchMemory(start_iteration=-1), "loss.start_iteration=-1"),
    (lambda: CrossBatchMemory(weight=-0.5), "loss.weight=-0.5"),
    (lambda: CrossBatchMemory(GE2E()), "loss.base=GE2E: XBM needs a labelled pair loss that takes reference"),
    (lambda: CrossBatchMemory(SimCLR()), "loss.base=SimCLR"),
])  # fmt: skip
def test_xbm_bad_options_name_the_option(make, message):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value).startswith(message)


def test_xbm_declares_what_its_base_consumes():
    loss = CrossBatchMemory(Triplet())
    assert loss.kind == "embedding" and loss.needs_labels and loss.needs_positives and loss.n_views == 1


def test_xbm_trains_one_batch_with_its_memory(tmp_path):
    results = run_training(["dataset=digits", "loss=xbm", "loss.start_iteration=0", "loss.memory_size=64",
                            "debug=fdr", *QUIET], tmp_path / "run")  # fmt: skip
    assert results["status"] == "completed" and math.isfinite(results["test"]["loss"])


# ---------------------------------------------------------------- MoCHi


def mochi(**options):
    defaults = {"temperature": 0.2, "queue_size": 12, "hard_negatives": 5, "mixed_negatives": 6,
                "query_mixed_negatives": 3}  # fmt: skip
    return MoCHi(**{**defaults, **options}).double()


def views(seed: int, n: int = 4, dim: int = 3) -> torch.Tensor:
    return torch.randn(n, 2, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop_hardest(query, queue, n):
    """The indices of the n queue entries most similar to the query, most similar first."""
    return sorted(range(len(queue)), key=lambda k: -number(query @ queue[k]))[:n]


def loop_synthetic(query, queue, n, draws, b):
    """Query b's synthetic negatives, from the draws, written out one at a time."""
    hardest = [queue[k] for k in loop_hardest(query, queue, n)]
    mixed = [unit(number(alpha) * hardest[i] + (1 - number(alpha)) * hardest[j])
             for i, j, alpha in zip(draws.first[b], draws.second[b], draws.alpha[b])]  # fmt: skip
    query_mixed = [unit(number(beta) * query + (1 - number(beta)) * hardest[j])
                   for j, beta in zip(draws.partner[b], draws.beta[b])]  # fmt: skip
    return mixed + query_mixed


def loop_info_nce(embeddings, queue, temperature, synthetic=None):
    """-log of the positive's share, over [positive, queue, synthetic], averaged over the queries."""
    terms = []
    for b in range(len(embeddings)):
        q, k = unit(embeddings[b, 0]), unit(embeddings[b, 1])
        negatives = list(queue) + ([] if synthetic is None else synthetic[b])
        positive = torch.exp(q @ k / temperature)
        terms.append(-torch.log(positive / (positive + sum(torch.exp(q @ n / temperature) for n in negatives))))
    return mean(terms)


def test_queue_starts_as_the_same_random_unit_vectors_everywhere():
    first, second = mochi(), mochi()
    first.setup_embedding(3, 10)
    second.setup_embedding(3, 10)
    assert first.queue.shape == (12, 3) and torch.equal(first.queue, second.queue)
    torch.testing.assert_close(first.queue.norm(dim=1), torch.ones(12, dtype=torch.float64))


def test_synthetic_negatives_are_unit_mixtures_of_each_querys_hardest_negatives():
    loss = mochi(queue_size=20)
    queue = F.normalize(batch(0, 20, 3), dim=1)
    query = F.normalize(batch(1, 4, 3), dim=1)
    torch.manual_seed(0)
    draws = loss.draw_mixing(4, torch.device("cpu"))
    assert ((draws.alpha >= 0) & (draws.alpha < 1)).all() and ((draws.beta >= 0) & (draws.beta < 0.5)).all()
    assert int(draws.first.max()) < 5 and int(draws.partner.max()) < 5
    synthetic = loss.synthetic_negatives(query, queue, query @ queue.T, draws)
    assert synthetic.shape == (4, 6 + 3, 3)
    torch.testing.assert_close(synthetic.norm(dim=-1), torch.ones(4, 9, dtype=torch.float64))
    for b in range(4):
        torch.testing.assert_close(synthetic[b], torch.stack(loop_synthetic(query[b], queue, 5, draws, b)))


def test_mochi_equals_info_nce_over_positive_queue_and_synthetic_negatives():
    loss = mochi()
    loss.setup_embedding(3, 10)
    queue = loss.queue.clone()
    x, x_reference = views(0).requires_grad_(), views(0).requires_grad_()
    torch.manual_seed(1)
    value = loss(x)
    torch.manual_seed(1)
    draws = loss.draw_mixing(4, torch.device("cpu"))
    queries = F.normalize(x_reference[:, 0].detach(), dim=-1)
    synthetic = [loop_synthetic(queries[b], queue, 5, draws, b) for b in range(4)]  # constants, as in the paper
    assert_value_and_gradient(value, loop_info_nce(x_reference, queue, 0.2, synthetic), x, x_reference)


def test_mochi_without_mixing_is_info_nce_against_the_queue():
    loss = mochi(mixed_negatives=0, query_mixed_negatives=0, temperature=0.5)
    loss.setup_embedding(3, 10)
    for step in range(4):  # the queue fills with keys and wraps around
        queue = loss.queue.clone()
        x, x_reference = views(step).requires_grad_(), views(step).requires_grad_()
        assert_value_and_gradient(loss(x), loop_info_nce(x_reference, queue, 0.5), x, x_reference)


def test_mochi_queue_holds_the_last_keys_fifo():
    loss = mochi(queue_size=5)
    loss.setup_embedding(3, 10)
    initial = loss.queue.clone()
    first, second = views(0, 3), views(1, 3)
    loss(first)
    keys = F.normalize(first[:, 1], dim=-1)
    assert torch.equal(loss.queue, torch.cat([keys, initial[3:]])) and loss.pointer.item() == 3
    loss(second)
    new_keys = F.normalize(second[:, 1], dim=-1)
    assert torch.equal(loss.queue, torch.cat([new_keys[2:], keys[1:], new_keys[:2]])) and loss.pointer.item() == 1
    assert not loss.queue.requires_grad


def test_mochi_in_eval_mode_uses_the_queue_without_mixing_and_keeps_it():
    loss = mochi()
    loss.setup_embedding(3, 10)
    loss(views(0))
    queue = loss.queue.clone()
    loss.eval()
    x = views(1)
    assert loss(x).item() == pytest.approx(loop_info_nce(x, queue, 0.2).item(), rel=1e-12)
    assert torch.equal(loss.queue, queue)


def test_mochi_queue_is_in_the_state_dict():
    loss = mochi()
    loss(views(0))
    resumed = mochi()  # not set up: sized on load
    resumed.load_state_dict(loss.state_dict())
    assert torch.equal(resumed.queue, loss.queue) and resumed.pointer.item() == 4
    loss.eval(), resumed.eval()
    assert resumed(views(1)).item() == loss(views(1)).item()


def test_mochi_one_view_has_no_key_gives_zero_with_graph_and_counts():
    loss = mochi()
    x = batch(0, 5, 3).requires_grad_()
    value = loss(x)
    assert value.item() == 0.0 and value.requires_grad
    assert loss.extra_metrics()["anchors_without_positives"].item() == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mochi_half_precision_embeddings_are_computed_in_float32(dtype):
    loss = MoCHi(queue_size=12, hard_negatives=5, mixed_negatives=6, query_mixed_negatives=3)
    half = (views(0) * 3).to(dtype).requires_grad_()
    value = loss(half)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": 0.0}, "loss.temperature=0.0"),
    ({"queue_size": 0}, "loss.queue_size=0"),
    ({"hard_negatives": 13}, "loss.hard_negatives=13: must be between 0 and loss.queue_size=12"),
    ({"mixed_negatives": -1}, "loss.mixed_negatives=-1"),
    ({"hard_negatives": 0}, "loss.hard_negatives=0: loss.mixed_negatives=6 mixes hard negatives"),
])  # fmt: skip
def test_mochi_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError) as error:
        mochi(**options)
    assert str(error.value).startswith(message)


def test_mochi_is_self_supervised_on_two_views():
    assert MoCHi.kind == "embedding" and MoCHi.n_views == 2 and not MoCHi.needs_labels


def test_mochi_trains_one_batch(tmp_path):
    results = run_training(["dataset=digits", "loss=mochi", "loss.queue_size=64", "loss.hard_negatives=16",
                            "loss.mixed_negatives=8", "loss.query_mixed_negatives=4", "debug=fdr", *QUIET],
                           tmp_path / "run")  # fmt: skip
    assert results["status"] == "completed" and math.isfinite(results["test"]["loss"])
