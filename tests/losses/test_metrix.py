"""Metrix (losslab/losses/metrix.py): the mixed loss against float64 loops that build every mixture of an anchor's
positive and negative (value and gradient), the clean loss when mixing is off, the draw of λ, the chunked
computation, the edge cases and one tiny training run."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_training
from losslab.errors import ConfigError
from losslab.losses import metrix
from losslab.losses.metrix import Metrix
from losslab.losses.pair import Contrastive, MultiSimilarity, Triplet

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4])  # class 4 has one sample: no positive


def embeddings(seed: int = 0, n: int = 11, dim: int = 4) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def number(tensor):
    return tensor.detach().item() if isinstance(tensor, torch.Tensor) else tensor


def unit(vector):
    return vector / torch.linalg.vector_norm(vector)


def cosine(a, b):
    return unit(a) @ unit(b)


def mixtures(x, y, a, lam, normalize):
    """Every mixture lam z_p + (1 - lam) z_n of anchor a's positives p and negatives n, with (p, n)."""
    z = [unit(v) for v in x] if normalize else list(x)
    positives = [p for p in range(len(x)) if p != a and y[p] == y[a]]
    negatives = [n for n in range(len(x)) if y[n] != y[a]]
    return [(p, n, lam * z[p] + (1 - lam) * z[n]) for p in positives for n in negatives]


def loop_mixed_multi_similarity(x, y, lam, alpha=2.0, beta=50.0, lambda_=1.0, epsilon=0.1):
    """Per anchor: the multi-similarity mining of its clean pairs, then 1/α log(1 + Σ_u lam e^{-α(S - λ)})
    + 1/β log(1 + Σ_u (1 - lam) e^{β(S - λ)}) over the mixtures u of its mined positives and negatives."""
    y = y.tolist()
    terms = []
    for a in range(len(x)):
        s = {k: cosine(x[a], x[k]) for k in range(len(x)) if k != a}
        positives = [k for k in s if y[k] == y[a]]
        negatives = [k for k in s if y[k] != y[a]]
        if not positives or not negatives:
            continue
        kept_p = {k for k in positives if number(s[k]) < max(number(s[n]) for n in negatives) + epsilon}
        kept_n = {k for k in negatives if number(s[k]) > min(number(s[p]) for p in positives) - epsilon}
        positive_sum, negative_sum = torch.tensor(0.0), torch.tensor(0.0)
        for p, n, u in mixtures(x, y, a, lam, normalize=True):
            if p in kept_p and n in kept_n:
                similarity = cosine(x[a], u)
                positive_sum = positive_sum + lam * torch.exp(-alpha * (similarity - lambda_))
                negative_sum = negative_sum + (1 - lam) * torch.exp(beta * (similarity - lambda_))
        terms.append(torch.log(1 + positive_sum) / alpha + torch.log(1 + negative_sum) / beta)
    return sum(terms) / len(terms)


def loop_mixed_contrastive(x, y, lam, margin=1.0, distance="euclidean", normalize=True):
    """lam ½ D² + (1 - lam) ½ max(0, m - D)² averaged over every (anchor, positive, negative)."""
    y = y.tolist()
    terms = []
    for a in range(len(x)):
        for _, _, u in mixtures(x, y, a, lam, normalize=normalize or distance == "cosine"):
            if distance == "cosine":
                d = 1 - cosine(x[a], u)
            elif normalize:
                d = torch.linalg.vector_norm(unit(x[a]) - unit(u))
            else:
                d = torch.linalg.vector_norm(x[a] - u)
            terms.append(lam * 0.5 * d**2 + (1 - lam) * 0.5 * torch.clamp(margin - d, min=0) ** 2)
    return sum(terms) / len(terms)


BASES = {
    "multi_similarity": (lambda: MultiSimilarity(), loop_mixed_multi_similarity),
    "multi_similarity_wide_mining": (lambda: MultiSimilarity(2.0, 10.0, 0.5, 1.0),
                                     lambda x, y, lam: loop_mixed_multi_similarity(x, y, lam, 2.0, 10.0, 0.5, 1.0)),
    "contrastive": (lambda: Contrastive(), loop_mixed_contrastive),
    "contrastive_raw": (lambda: Contrastive(margin=3.0, normalize=False),
                        lambda x, y, lam: loop_mixed_contrastive(x, y, lam, margin=3.0, normalize=False)),
    "contrastive_cosine": (lambda: Contrastive(0.5, "cosine"),
                           lambda x, y, lam: loop_mixed_contrastive(x, y, lam, 0.5, "cosine")),
}  # fmt: skip


def assert_value_and_gradient(function, reference, x):
    x, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    value, expected = function(x), reference(x_reference)
    (gradient,) = torch.autograd.grad(value, x)
    (expected_gradient,) = torch.autograd.grad(expected, x_reference)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("key", sorted(BASES))
@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_mixed_loss_matches_loop_over_every_mixture(key, lam):
    make, loop = BASES[key]
    loss = Metrix(make())
    assert_value_and_gradient(lambda x: loss.mixed_loss(x, LABELS, lam), lambda x: loop(x, LABELS, lam),
                              embeddings())  # fmt: skip


@pytest.mark.parametrize("key", sorted(BASES))
def test_metrix_is_clean_loss_plus_mixing_strength_times_mixed_loss_at_the_drawn_lambda(key):
    make, loop = BASES[key]
    loss = Metrix(make(), alpha=2.0, mixing_strength=0.4)
    torch.manual_seed(3)
    lam = loss.draw_lambda()
    assert 0 < lam < 1
    torch.manual_seed(3)
    assert_value_and_gradient(lambda x: loss(x, LABELS), lambda x: make()(x, LABELS) + 0.4 * loop(x, LABELS, lam),
                              embeddings(1))  # fmt: skip


@pytest.mark.parametrize("key", sorted(BASES))
def test_zero_mixing_strength_and_eval_mode_give_the_base_loss(key):
    make, _ = BASES[key]
    x = embeddings(2)
    assert_value_and_gradient(lambda e: Metrix(make(), mixing_strength=0.0)(e, LABELS), lambda e: make()(e, LABELS), x)
    assert_value_and_gradient(lambda e: Metrix(make()).eval()(e, LABELS), lambda e: make()(e, LABELS), x)


def test_lambda_follows_beta_alpha_alpha():
    torch.manual_seed(0)
    draws = torch.tensor([Metrix(alpha=2.0).draw_lambda() for _ in range(2000)])
    assert ((draws > 0) & (draws < 1)).all()
    # Beta(2, 2): mean 1/2, variance 1/20.
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02) and draws.var().item() == pytest.approx(0.05, abs=0.01)


def test_lambda_one_mixes_the_positives_only():
    # lam = 1: every mixture is the anchor's positive, so each (a, p, n) costs ½ D_ap²: classes {0, 1} and {2, 3}
    # give every anchor one positive and two negatives, 8 terms in all.
    x, labels = embeddings(4, 4), torch.tensor([0, 0, 1, 1])
    distance = torch.cdist(torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x, dim=1))
    expected = (4 * 0.5 * distance[0, 1] ** 2 + 4 * 0.5 * distance[2, 3] ** 2).item() / 8
    assert Metrix(Contrastive()).mixed_loss(x, labels, 1.0).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("key", sorted(BASES))
def test_chunks_of_anchors_give_the_unchunked_value_and_gradient(key, monkeypatch):
    loss, x = Metrix(BASES[key][0]()), embeddings(5).requires_grad_()
    whole = loss.mixed_loss(x, LABELS, 0.6)
    (whole_gradient,) = torch.autograd.grad(whole, x)
    monkeypatch.setattr(metrix, "TRIPLET_CHUNK", 150)  # one anchor per chunk (11² = 121 terms)
    chunked = loss.mixed_loss(x, LABELS, 0.6)
    (chunked_gradient,) = torch.autograd.grad(chunked, x)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(chunked_gradient, whole_gradient)


@pytest.mark.parametrize("key", sorted(BASES))
@pytest.mark.parametrize("labels", [torch.arange(11), torch.zeros(11, dtype=torch.long)])
def test_no_anchor_with_a_positive_and_a_negative_gives_zero_mixed_loss_with_graph(key, labels):
    x = embeddings(6).requires_grad_()
    value = Metrix(BASES[key][0]()).mixed_loss(x, labels, 0.5)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_views_are_flattened_each_an_anchor_with_its_image_label():
    views = embeddings(7, 12).view(6, 2, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    loss = Metrix()
    assert loss.mixed_loss(views, labels, 0.4).item() == pytest.approx(
        loss.mixed_loss(views.reshape(12, 4), labels.repeat_interleave(2), 0.4).item(), rel=1e-12
    )


@pytest.mark.parametrize("key", sorted(BASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_are_computed_in_float32(key, dtype):
    loss = Metrix(BASES[key][0]())
    half = (embeddings(8) * 3).to(dtype).requires_grad_()
    value = loss.mixed_loss(half, LABELS, 0.3)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()
    assert value.item() == pytest.approx(loss.mixed_loss(half.detach().float(), LABELS, 0.3).item(), rel=1e-6)


def test_counters_are_the_base_losss():
    loss = Metrix()
    loss(embeddings(), LABELS)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 1


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Metrix(Triplet()), "loss.base=Triplet: Metrix's mixed loss is defined for"),
    (lambda: Metrix(alpha=0.0), "loss.alpha=0.0"),
    (lambda: Metrix(mixing_strength=-0.1), "loss.mixing_strength=-0.1"),
])  # fmt: skip
def test_bad_options_name_the_option(make, message):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value).startswith(message)


def test_metrix_declares_a_labelled_pair_loss():
    loss = Metrix()
    assert loss.kind == "embedding" and loss.needs_labels and loss.needs_positives and loss.n_views == 1


def test_metrix_trains_one_batch(tmp_path):
    results = run_training(["dataset=digits", "loss=metrix", "debug=fdr", "trainer.enable_progress_bar=false",
                            "~callbacks.rich_progress_bar"], tmp_path / "run")  # fmt: skip
    assert results["status"] == "completed" and math.isfinite(results["test"]["loss"])
