"""Pair and triplet losses against float64 loops written from the papers' equations (value and gradient), their
mining on hand-made 1-D batches, the edge cases (no positive, one class, duplicates, half precision), memory
without N×N×N tensors, and the m-per-class sampler that training picks for them."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, run_training
from losslab.errors import ConfigError
from losslab.largest_tensor import LargestTensor
from losslab.losses import pair
from losslab.losses.pair import GE2E, Circle, Contrastive, MultiSimilarity, ThresholdConsistentMargin, Triplet
from losslab.train import build

LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])  # class 4 has one sample: no positive


@pytest.fixture
def embeddings():
    return torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ---------------------------------------------------------------- loop references (float64, from the papers)


def rows(embeddings, labels):
    """One vector per view, each with its image's label, as Python lists."""
    if embeddings.dim() == 2:
        return list(embeddings), labels.tolist()
    return [embeddings[i, v] for i in range(embeddings.shape[0]) for v in range(embeddings.shape[1])], [
        int(labels[i]) for i in range(embeddings.shape[0]) for _ in range(embeddings.shape[1])
    ]


def unit(vector):
    return vector / torch.linalg.vector_norm(vector)


def cosine(a, b):
    return unit(a) @ unit(b)


def anchors_with_both(y):
    n = len(y)
    return [
        a for a in range(n)
        if any(y[p] == y[a] for p in range(n) if p != a) and any(y[k] != y[a] for k in range(n))
    ]  # fmt: skip


def mean(terms):
    return sum(terms) / len(terms)


def loop_contrastive(embeddings, labels, margin=1.0, distance="euclidean", normalize=True):
    """Hadsell et al. eq. 4, (1 - Y) ½ D² + Y ½ max(0, m - D)², averaged over every ordered pair i != j."""
    z, y = rows(embeddings, labels)
    terms = []
    for i in range(len(z)):
        for j in range(len(z)):
            if i == j:
                continue
            if distance == "cosine":
                d = 1 - cosine(z[i], z[j])
            else:
                a, b = (unit(z[i]), unit(z[j])) if normalize else (z[i], z[j])
                d = torch.linalg.vector_norm(a - b)
            terms.append(0.5 * d**2 if y[i] == y[j] else 0.5 * torch.clamp(margin - d, min=0) ** 2)
    return mean(terms)


def loop_triplet(embeddings, labels, margin=0.2, mining="batch_hard", soft_margin=True, normalize=False,
                 squared=False):  # fmt: skip
    """Hermans et al.'s L_BH and L_BA≠0, and FaceNet's semi-hard negatives, one anchor, positive and negative
    at a time."""
    z, y = rows(embeddings, labels)
    if normalize:
        z = [unit(v) for v in z]

    def distance(i, j):
        d = torch.linalg.vector_norm(z[i] - z[j])
        return d**2 if squared else d

    def term(x):
        return torch.log(1 + torch.exp(x)) if soft_margin else torch.clamp(margin + x, min=0)

    terms = []
    for a in anchors_with_both(y):
        positives = [p for p in range(len(z)) if p != a and y[p] == y[a]]
        negatives = [k for k in range(len(z)) if y[k] != y[a]]
        if mining == "batch_hard":
            hardest_positive = max((distance(a, p) for p in positives), key=float)
            hardest_negative = min((distance(a, k) for k in negatives), key=float)
            terms.append(term(hardest_positive - hardest_negative))
        for p in positives:
            if mining == "batch_all":
                terms += [term(distance(a, p) - distance(a, k)) for k in negatives]
            elif mining == "semi_hard":
                farther = [distance(a, k) for k in negatives if float(distance(a, k)) > float(distance(a, p))]
                if farther:
                    terms.append(term(distance(a, p) - min(farther, key=float)))
    if mining == "batch_all":
        terms = [t for t in terms if float(t) > 0]  # L_BA≠0: the mean over the active triplets
    return mean(terms) if terms else torch.zeros((), dtype=torch.float64)


def log_sum_exp(exponents):
    """log sum_k exp(x_k), shifted by the largest x_k: γ = 256 overflows exp in float64."""
    largest = max(float(x) for x in exponents)
    return largest + torch.log(sum(torch.exp(x - largest) for x in exponents))


def loop_circle(embeddings, labels, margin=0.4, gamma=80.0):
    """Sun et al. eq. 6 per anchor, log[1 + sum_n exp(.) sum_p exp(.)], the weights α taken as constants."""
    z, y = rows(embeddings, labels)
    terms = []
    for a in anchors_with_both(y):
        negative_exponents, positive_exponents = [], []
        for k in range(len(z)):
            s = cosine(z[a], z[k])
            if k != a and y[k] == y[a]:
                alpha_p = torch.clamp(1 + margin - s.detach(), min=0)
                positive_exponents.append(-gamma * alpha_p * (s - (1 - margin)))
            elif y[k] != y[a]:
                alpha_n = torch.clamp(s.detach() + margin, min=0)
                negative_exponents.append(gamma * alpha_n * (s - margin))
        log_product = log_sum_exp(negative_exponents) + log_sum_exp(positive_exponents)
        terms.append(log_product + torch.log(1 + torch.exp(-log_product)))  # log(1 + product)
    return mean(terms)


def loop_multi_similarity(embeddings, labels, alpha=2.0, beta=50.0, lambda_=1.0, epsilon=0.1):
    """Wang et al.'s pair mining, then the loss per anchor."""
    z, y = rows(embeddings, labels)
    terms = []
    for a in anchors_with_both(y):
        s = {k: cosine(z[a], z[k]) for k in range(len(z)) if k != a}
        positives = [k for k in s if y[k] == y[a]]
        negatives = [k for k in s if y[k] != y[a]]
        least_similar_positive = min(float(s[k]) for k in positives)
        most_similar_negative = max(float(s[k]) for k in negatives)
        kept_negatives = [k for k in negatives if float(s[k]) > least_similar_positive - epsilon]
        kept_positives = [k for k in positives if float(s[k]) < most_similar_negative + epsilon]
        positive_sum = sum((torch.exp(-alpha * (s[k] - lambda_)) for k in kept_positives), torch.tensor(0.0))
        negative_sum = sum((torch.exp(beta * (s[k] - lambda_)) for k in kept_negatives), torch.tensor(0.0))
        terms.append(torch.log(1 + positive_sum) / alpha + torch.log(1 + negative_sum) / beta)
    return mean(terms)


def loop_tcm_term(embeddings, labels, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5):
    z, y = rows(embeddings, labels)
    hard_positive, hard_negative = [], []
    for i in range(len(z)):
        for j in range(len(z)):
            s = cosine(z[i], z[j])
            if i != j and y[i] == y[j] and float(s) <= margin_plus:
                hard_positive.append(margin_plus - s)
            elif y[i] != y[j] and float(s) >= margin_minus:
                hard_negative.append(s - margin_minus)
    total = torch.zeros((), dtype=torch.float64)
    if hard_positive:
        total = total + lambda_plus * mean(hard_positive)
    if hard_negative:
        total = total + lambda_minus * mean(hard_negative)
    return total


def loop_ge2e(embeddings, labels, w, b, variant="softmax"):
    """Wan et al. eqs. 5-8: similarity to each class centroid, the anchor's own centroid without the anchor."""
    z, y = rows(embeddings, labels)
    z = [unit(v) for v in z]
    classes = sorted(set(y))
    terms = []
    for i in range(len(z)):
        own_class = [m for m in range(len(z)) if y[m] == y[i]]
        if len(own_class) < 2 or len(classes) < 2:
            continue
        similarity = {}
        for k in classes:
            members = [m for m in range(len(z)) if y[m] == k and not (k == y[i] and m == i)]
            centroid = sum(z[m] for m in members) / len(members)
            similarity[k] = w * cosine(z[i], centroid) + b
        if variant == "softmax":
            terms.append(-similarity[y[i]] + torch.log(sum(torch.exp(s) for s in similarity.values())))
        else:
            others = max((torch.sigmoid(similarity[k]) for k in classes if k != y[i]), key=float)
            terms.append(1 - torch.sigmoid(similarity[y[i]]) + others)
    return mean(terms)


def assert_value_and_gradient(loss, reference, embeddings, labels):
    x = embeddings.clone().requires_grad_()
    value = loss(x, labels)
    (gradient,) = torch.autograd.grad(value, x)
    x_ref = embeddings.clone().requires_grad_()
    expected = reference(x_ref, labels)
    (expected_gradient,) = torch.autograd.grad(expected, x_ref)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- against the loops


@pytest.mark.parametrize(("distance", "normalize"), [("euclidean", True), ("euclidean", False), ("cosine", True)])
@pytest.mark.parametrize("margin", [0.5, 1.0, 3.0])
def test_contrastive_matches_loop(embeddings, distance, normalize, margin):
    loss = Contrastive(margin, distance, normalize)
    assert_value_and_gradient(loss, lambda e, y: loop_contrastive(e, y, margin, distance, normalize), embeddings, LABELS)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize("soft_margin", [True, False])
@pytest.mark.parametrize(("normalize", "squared", "margin"), [(False, False, 0.2), (False, False, 1.0),
                                                              (True, True, 0.2)])  # fmt: skip
def test_triplet_matches_loop(embeddings, mining, soft_margin, normalize, squared, margin):
    loss = Triplet(margin, mining, soft_margin, normalize, squared)
    reference = lambda e, y: loop_triplet(e, y, margin, mining, soft_margin, normalize, squared)
    assert_value_and_gradient(loss, reference, embeddings, LABELS)


@pytest.mark.parametrize(("margin", "gamma"), [(0.4, 80.0), (0.25, 256.0), (0.1, 4.0)])
def test_circle_matches_loop(embeddings, margin, gamma):
    loss = Circle(margin, gamma)
    assert_value_and_gradient(loss, lambda e, y: loop_circle(e, y, margin, gamma), embeddings, LABELS)


@pytest.mark.parametrize(("alpha", "beta", "lambda_", "epsilon"), [(2.0, 50.0, 1.0, 0.1), (2.0, 40.0, 0.5, 0.1),
                                                                   (1.0, 10.0, 0.2, 0.0), (2.0, 50.0, 0.5, 2.0)])
def test_multi_similarity_matches_loop(embeddings, alpha, beta, lambda_, epsilon):
    loss = MultiSimilarity(alpha, beta, lambda_, epsilon)
    reference = lambda e, y: loop_multi_similarity(e, y, alpha, beta, lambda_, epsilon)
    assert_value_and_gradient(loss, reference, embeddings, LABELS)


def test_multi_similarity_mining_drops_the_easy_negative():
    # Four unit vectors at angles 0, φ (class 0) and π, π + φ (class 1), cos φ = -0.1: every anchor sees its
    # positive at S = -0.1 and negatives at S = 0.1 and -1. The negative at -1 is easy (-1 <= -0.1 - ε) and is
    # dropped; the other pairs are kept (0.1 > -0.1 - ε, -0.1 < 0.1 + ε).
    phi = math.acos(-0.1)
    angles = torch.tensor([0.0, phi, math.pi, math.pi + phi], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    alpha, beta, lambda_ = 2.0, 1.0, 1.0
    positive_term = math.log1p(math.exp(-alpha * (-0.1 - lambda_))) / alpha
    mined = positive_term + math.log1p(math.exp(beta * (0.1 - lambda_))) / beta
    unmined = positive_term + math.log1p(math.exp(beta * (0.1 - lambda_)) + math.exp(beta * (-1 - lambda_))) / beta
    assert MultiSimilarity(alpha, beta, lambda_, epsilon=0.1)(x, labels).item() == pytest.approx(mined, rel=1e-12)
    assert MultiSimilarity(alpha, beta, lambda_, epsilon=1.0)(x, labels).item() == pytest.approx(unmined, rel=1e-12)


@pytest.mark.parametrize("base", [MultiSimilarity, lambda: Triplet(mining="batch_all", soft_margin=False)])
@pytest.mark.parametrize(("margin_plus", "margin_minus"), [(0.9, 0.5), (0.5, -0.2)])
def test_tcm_is_base_loss_plus_hard_pair_margins(embeddings, base, margin_plus, margin_minus):
    loss = ThresholdConsistentMargin(base(), 1.0, 0.5, margin_plus, margin_minus)
    base_reference = loop_multi_similarity if base is MultiSimilarity else (
        lambda e, y: loop_triplet(e, y, 0.2, "batch_all", False))  # fmt: skip

    def reference(e, y):
        return base_reference(e, y) + loop_tcm_term(e, y, 1.0, 0.5, margin_plus, margin_minus)

    assert_value_and_gradient(loss, reference, embeddings, LABELS)


@pytest.mark.parametrize("variant", ["softmax", "contrast"])
@pytest.mark.parametrize(("w", "b"), [(10.0, -5.0), (3.0, 1.0)])
def test_ge2e_matches_loop_with_exclusive_own_centroid(embeddings, variant, w, b):
    loss = GE2E(w, b, variant).double()
    assert_value_and_gradient(loss, lambda e, y: loop_ge2e(e, y, w, b, variant), embeddings, LABELS)


def test_ge2e_learns_w_and_b(embeddings):
    loss = GE2E().double()
    loss(embeddings, LABELS).backward()
    w = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    loop_ge2e(embeddings, LABELS, w, b).backward()
    assert {name for name, _ in loss.named_parameters()} == {"w", "b"}
    assert loss.w.grad.item() == pytest.approx(w.grad.item(), rel=1e-9)
    assert loss.b.grad.item() == pytest.approx(b.grad.item(), rel=1e-9, abs=1e-12)


def test_ge2e_own_centroid_excludes_the_anchor():
    # Two classes of two: with the anchor in its own centroid, cos(e, c) would include cos(e, e) = 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = GE2E(w_init=1.0, b_init=0.0).double()
    # Anchor 0: own centroid (0, 1) → cos 0; class 1's centroid (-½, -½) → cos -1/√2.
    expected = -0.0 + math.log(math.exp(0.0) + math.exp(-1 / math.sqrt(2)))
    assert loss(x, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("make_loss", [
    lambda: Contrastive(), lambda: Triplet(), lambda: Circle(), lambda: MultiSimilarity(),
    lambda: ThresholdConsistentMargin(), lambda: GE2E().double(),
])  # fmt: skip
def test_views_are_flattened_each_an_anchor_with_its_image_label(make_loss):
    views = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    flat = views.reshape(12, 4)
    loss = make_loss()
    assert loss(views, labels).item() == pytest.approx(make_loss()(flat, labels.repeat_interleave(2)).item(),
                                                       rel=1e-12)  # fmt: skip


def test_views_match_loop_references():
    views = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert_value_and_gradient(Triplet(mining="batch_all"), lambda e, y: loop_triplet(e, y, mining="batch_all"),
                              views, labels)  # fmt: skip
    assert_value_and_gradient(Circle(), loop_circle, views, labels)


LOSSES = {
    "contrastive": lambda: Contrastive(),
    "contrastive_cosine": lambda: Contrastive(0.5, "cosine"),
    "triplet_batch_hard": lambda: Triplet(),
    "triplet_batch_hard_hinge": lambda: Triplet(soft_margin=False, margin=0.5),
    "triplet_batch_all": lambda: Triplet(mining="batch_all"),
    "triplet_batch_all_hinge": lambda: Triplet(mining="batch_all", soft_margin=False, margin=1.0),
    "triplet_semi_hard": lambda: Triplet(mining="semi_hard", margin=1.0, soft_margin=False),
    "triplet_facenet": lambda: Triplet(mining="semi_hard", normalize=True, squared=True, soft_margin=False),
    "circle": lambda: Circle(),
    "multi_similarity": lambda: MultiSimilarity(),
    "tcm": lambda: ThresholdConsistentMargin(),
    "ge2e": lambda: GE2E().double(),
    "ge2e_contrast": lambda: GE2E(variant="contrast").double(),
}


# Circle loss is left out: its weights α are constants for the gradient (as in the official code), so its
# gradient is not the derivative of its value; test_circle_matches_loop checks it against the loop instead.
@pytest.mark.parametrize("key", sorted(set(LOSSES) - {"circle"}))
def test_gradcheck(key, embeddings):
    x = embeddings[:8].clone().requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    loss = LOSSES[key]()
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x,))


# ---------------------------------------------------------------- mining on hand-made 1-D batches

# Class 0 at 0, 1 and 3.4; class 1 at 2 and 5; class 2 (one sample, no positive) at -4.
LINE = torch.tensor([[0.0], [1.0], [3.4], [2.0], [5.0], [-4.0]], dtype=torch.float64)
LINE_LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


def triplets_loss(x, triplets, term):
    return mean([term((x[a] - x[p]).abs().sum() - (x[a] - x[n]).abs().sum()) for a, p, n in triplets])


def test_batch_hard_picks_farthest_positive_and_closest_negative():
    # Anchor: (farthest positive, closest negative), read off the line.
    picked = [(0, 2, 3), (1, 2, 3), (2, 0, 3), (3, 4, 1), (4, 3, 2)]
    loss = Triplet(margin=0.2, mining="batch_hard", soft_margin=False)
    assert_value_and_gradient(loss, lambda x, _: triplets_loss(x, picked, lambda d: F.relu(0.2 + d)), LINE,
                              LINE_LABELS)  # fmt: skip
    assert loss(LINE, LINE_LABELS).item() == pytest.approx((1.6 + 1.6 + 2.2 + 2.2 + 1.6) / 5, rel=1e-12)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 1


def test_semi_hard_picks_closest_negative_strictly_farther_than_the_positive():
    # Anchor 1 with positive 0 (distance 1): negative 3 is at distance 1 too, not farther, so negative 4 is picked.
    picked = [(0, 1, 3), (0, 2, 5), (1, 0, 4), (1, 2, 4), (2, 0, 5), (2, 1, 5), (3, 4, 5), (4, 3, 1)]
    for soft_margin in (True, False):
        loss = Triplet(margin=1.5, mining="semi_hard", soft_margin=soft_margin)
        term = F.softplus if soft_margin else (lambda d: F.relu(1.5 + d))
        assert_value_and_gradient(loss, lambda x, _, f=term: triplets_loss(x, picked, f), LINE, LINE_LABELS)
        assert loss.extra_metrics()["positive_pairs_without_semi_hard_negative"].item() == 0


def test_semi_hard_leaves_out_pairs_without_a_farther_negative():
    x = torch.tensor([[0.0], [10.0], [1.0], [2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = Triplet(mining="semi_hard")
    assert_value_and_gradient(loss, lambda e, _: triplets_loss(e, [(2, 3, 1), (3, 2, 0)], F.softplus), x, labels)
    assert loss.extra_metrics()["positive_pairs_without_semi_hard_negative"].item() == 2


def test_batch_all_hinge_averages_over_active_triplets_only():
    loss = Triplet(margin=0.2, mining="batch_all", soft_margin=False)
    x = LINE.clone().requires_grad_()
    value = loss(x, LINE_LABELS)
    value.backward()
    all_triplets = [(a, p, n) for a in range(5) for p in range(5) for n in range(6)
                    if a != p and LINE_LABELS[a] == LINE_LABELS[p] and LINE_LABELS[n] != LINE_LABELS[a]]  # fmt: skip
    terms = [0.2 + abs(LINE[a] - LINE[p]).item() - abs(LINE[a] - LINE[n]).item() for a, p, n in all_triplets]
    active = [t for t in terms if t > 0]
    assert 0 < len(active) < len(terms)
    assert value.item() == pytest.approx(sum(active) / len(active), rel=1e-12)
    assert x.grad[5].item() == 0.0  # the point at -4 is in no active triplet


def test_soft_margin_is_softplus_of_the_hinge_argument_and_never_zero():
    # Two well separated classes: every triplet satisfies the margin, so the hinge is 0; the soft margin is not.
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    hardest = [-9.9, -9.8, -9.8, -9.9]  # D_ap - D_an per anchor, closest negative (also the semi-hard one)
    every = [-9.9, -10.0, -9.8, -9.9, -9.9, -9.8, -10.0, -9.9]  # every triplet, anchor by anchor
    for mining, differences in (("batch_hard", hardest), ("semi_hard", hardest), ("batch_all", every)):
        hinge = Triplet(margin=0.2, mining=mining, soft_margin=False)(x, labels)
        soft = Triplet(mining=mining, soft_margin=True)(x, labels)
        assert hinge.item() == 0.0 and hinge.requires_grad
        expected = sum(math.log1p(math.exp(d)) for d in differences) / len(differences)
        assert soft.item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- edge cases

NEEDS_NEGATIVES = [key for key in sorted(LOSSES) if not key.startswith(("contrastive", "tcm"))]


@pytest.mark.parametrize("key", NEEDS_NEGATIVES)
def test_batch_without_positives_gives_zero_with_graph_and_counts_every_anchor(key, embeddings):
    x = embeddings.clone().requires_grad_()
    loss = LOSSES[key]()
    value = loss(x, torch.arange(12))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 12


@pytest.mark.parametrize("key", NEEDS_NEGATIVES)
def test_one_class_batch_gives_zero_with_graph_and_counts_anchors_without_negatives(key, embeddings):
    x = embeddings.clone().requires_grad_()
    loss = LOSSES[key]()
    value = loss(x, torch.zeros(12, dtype=torch.long))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    metrics = loss.extra_metrics()
    assert metrics["anchors_without_negatives"].item() == 12 and metrics["anchors_without_positives"].item() == 0


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_anchor_alone_in_its_class_is_counted(key, embeddings):
    loss = LOSSES[key]()
    loss(embeddings, LABELS)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 1


def test_contrastive_keeps_every_pair_whatever_the_anchors_have(embeddings):
    for labels in (torch.arange(12), torch.zeros(12, dtype=torch.long)):
        loss = Contrastive()
        assert_value_and_gradient(loss, loop_contrastive, embeddings, labels)
    assert loss.extra_metrics()["anchors_without_negatives"].item() == 12


def test_tcm_without_positives_keeps_its_negative_term(embeddings):
    loss = ThresholdConsistentMargin(margin_minus=-0.2)
    assert_value_and_gradient(loss, lambda e, y: loop_tcm_term(e, y, margin_minus=-0.2), embeddings,
                              torch.arange(12))  # fmt: skip
    assert loss.extra_metrics()["anchors_without_positives"].item() == 12


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_duplicate_embeddings_give_finite_values_and_gradients(key, embeddings):
    x = embeddings.clone()
    x[1] = x[0]  # same label
    x[3] = x[0]  # another label
    x[7] = x[6]
    x = x.requires_grad_()
    value = LOSSES[key]()(x, LABELS)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_duplicate_embeddings_match_loops(embeddings):
    x = embeddings.clone()
    x[1], x[3], x[7] = x[0], x[0], x[6]
    for loss, reference in [(Contrastive(), loop_contrastive), (Triplet(mining="batch_all"),
                            lambda e, y: loop_triplet(e, y, mining="batch_all")), (Circle(), loop_circle),
                            (MultiSimilarity(), loop_multi_similarity),
                            (GE2E().double(), lambda e, y: loop_ge2e(e, y, 10.0, -5.0))]:  # fmt: skip
        assert loss(x, LABELS).item() == pytest.approx(reference(x, LABELS).item(), rel=1e-9), type(loss).__name__


@pytest.mark.parametrize("key", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_are_computed_in_float32(key, dtype, embeddings):
    loss = LOSSES[key]()
    if isinstance(loss, GE2E):
        loss = loss.float()
    half = (embeddings * 3).to(dtype).requires_grad_()
    value = loss(half, LABELS)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()
    assert value.item() == pytest.approx(loss(half.detach().float(), LABELS).item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_autocast_does_not_lower_the_distances_to_bfloat16(key, embeddings):
    loss = LOSSES[key]()
    if isinstance(loss, GE2E):
        loss = loss.float()
    x = embeddings.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x, LABELS)
    assert value.item() == pytest.approx(loss(x, LABELS).item(), rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- memory: no N×N×N tensor



@pytest.mark.parametrize("key", sorted(LOSSES))
def test_no_loss_builds_an_n_cubed_tensor(key, monkeypatch):
    n = 64
    monkeypatch.setattr(pair, "TRIPLET_CHUNK", n * n)  # batch-all with a soft margin: one anchor per chunk
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    labels = torch.arange(n) % 8
    with LargestTensor() as record:
        LOSSES[key]()(x, labels).backward()
    assert record.largest <= 2 * n * (n + 1), key


def test_soft_batch_all_chunks_give_the_unchunked_value_and_gradient(embeddings, monkeypatch):
    x = embeddings.clone().requires_grad_()
    whole = Triplet(mining="batch_all")(x, LABELS)
    (whole_gradient,) = torch.autograd.grad(whole, x)
    monkeypatch.setattr(pair, "TRIPLET_CHUNK", 100)  # one anchor per chunk (12² > 100)
    chunked = Triplet(mining="batch_all")(x, LABELS)
    (chunked_gradient,) = torch.autograd.grad(chunked, x)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(chunked_gradient, whole_gradient)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("make", "option"), [
    (lambda: Contrastive(distance="manhattan"), "loss.distance='manhattan': allowed values are euclidean, cosine"),
    (lambda: Contrastive(margin=0.0), "loss.margin=0.0"),
    (lambda: Triplet(mining="hardest"), "loss.mining='hardest': allowed values are batch_hard, batch_all, semi_hard"),
    (lambda: Triplet(margin=-0.1), "loss.margin=-0.1"),
    (lambda: Circle(margin=0.5), "loss.margin=0.5"),
    (lambda: Circle(gamma=0.0), "loss.gamma=0.0"),
    (lambda: MultiSimilarity(alpha=0.0), "loss.alpha=0.0"),
    (lambda: MultiSimilarity(beta=-1.0), "loss.beta=-1.0"),
    (lambda: MultiSimilarity(epsilon=-0.1), "loss.epsilon=-0.1"),
    (lambda: ThresholdConsistentMargin(margin_plus=1.5), "loss.margin_plus=1.5"),
    (lambda: ThresholdConsistentMargin(lambda_minus=-1.0), "loss.lambda_minus=-1.0"),
    (lambda: GE2E(variant="triplet"), "loss.variant='triplet': allowed values are softmax, contrast"),
    (lambda: GE2E(w_init=0.0), "loss.w_init=0.0"),
])  # fmt: skip
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value).startswith(option)


def test_tcm_refuses_a_base_loss_without_labels():
    from losslab.losses import SimCLR

    with pytest.raises(ConfigError, match="loss.base=SimCLR"):
        ThresholdConsistentMargin(SimCLR())


def test_pair_losses_declare_they_need_positives():
    for make in LOSSES.values():
        loss = make()
        assert loss.needs_positives and loss.needs_labels and loss.kind == "embedding" and loss.n_views == 1


@pytest.mark.parametrize(("overrides", "sampler"), [
    (["loss=triplet"], "m_per_class"),
    (["loss=multi_similarity", "dataset.sampler=sequential"], "sequential"),
    (["loss=circle", "dataset.sampler=random"], "random"),
    (["loss=ce"], "random"),
])  # fmt: skip
def test_losses_needing_positives_get_m_per_class_batches_unless_the_sampler_is_given(overrides, sampler, tmp_path):
    datamodule, *_ = build(compose_config(["dataset=digits", *overrides], tmp_path))
    assert datamodule.sampler == sampler


def test_automatic_m_per_class_sampler_must_divide_the_batch_size(tmp_path):
    cfg = compose_config(["dataset=digits", "loss=contrastive", "dataset.batch_size=30"], tmp_path)
    with pytest.raises(ConfigError, match="dataset.m_per_class=4 must be >= 2 and divide dataset.batch_size=30"):
        build(cfg)


def test_tiny_triplet_run_trains_on_m_per_class_batches(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="losslab"):
        results = run_training(["dataset=digits", "loss=triplet", "debug=fdr", "trainer.enable_progress_bar=false",
                                "~callbacks.rich_progress_bar"], tmp_path / "run")  # fmt: skip
    assert results["status"] == "completed" and math.isfinite(results["test"]["loss"])
    assert "loss=triplet needs positives in every batch: batches come from dataset.sampler=m_per_class" in caplog.text
