"""SupCon (L_out of Khosla et al. 2020) against a float64 loop over anchors written from eq. 2."""

import math

import pytest
import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses import SupCon


def loop_supcon(embeddings, labels, temperature):
    """Eq. 2 literally: for each anchor i, average over positives p of -log(exp(s_ip) / sum_{a != i} exp(s_ia))."""
    if embeddings.dim() == 2:
        embeddings = embeddings[:, None]
    n, views, _ = embeddings.shape
    if labels is None:
        labels = torch.arange(n)
    z = F.normalize(embeddings.double(), dim=-1).reshape(n * views, -1).tolist()
    y = labels.repeat_interleave(views).tolist()
    total, anchors = 0.0, 0
    for i in range(len(z)):
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / temperature for j in range(len(z))]
        denominator = sum(math.exp(sims[a]) for a in range(len(z)) if a != i)
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        total += -sum(math.log(math.exp(sims[p]) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


@pytest.fixture
def views():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, 8, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_supcon_matches_loop_with_labels(views, temperature):
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    expected = loop_supcon(views, labels, temperature)
    assert SupCon(temperature)(views, labels).item() == pytest.approx(expected, rel=1e-9)


def test_supcon_without_labels_is_nt_xent(views):
    expected = loop_supcon(views, None, 0.5)
    assert SupCon(0.5)(views, None).item() == pytest.approx(expected, rel=1e-9)
    # NT-Xent (Chen et al. 2020) closed form for 2 views: positive is the other view of the same image.
    z = F.normalize(views, dim=-1)
    flat = torch.cat([z[:, 0], z[:, 1]])
    sims = flat @ flat.T / 0.5
    sims.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    nt_xent = F.cross_entropy(sims, partner)
    assert SupCon(0.5)(views, None).item() == pytest.approx(nt_xent.item(), rel=1e-9)


def test_supcon_single_view_uses_same_label_samples(views):
    single = views[:, 0]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    assert SupCon(0.1)(single, labels).item() == pytest.approx(loop_supcon(single, labels, 0.1), rel=1e-9)


def test_supcon_gradcheck(views):
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    embeddings = views.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: SupCon(0.5)(e, labels), (embeddings,))


def test_anchors_without_positive_are_excluded_and_counted(views):
    single = views[:, 0]
    labels = torch.tensor([0, 1, 0, 2, 1, 3])  # samples 3 and 5 have no positive
    loss = SupCon(0.1)
    value = loss(single, labels)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 2
    assert value.item() == pytest.approx(loop_supcon(single, labels, 0.1), rel=1e-9)


def test_batch_without_any_positive_gives_zero_with_graph(views):
    single = views[:, 0].clone().requires_grad_()
    loss = SupCon(0.1)
    value = loss(single, torch.arange(6))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(single.grad, torch.zeros_like(single))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 6


def test_one_class_batch(views):
    labels = torch.zeros(6, dtype=torch.long)
    assert SupCon(0.1)(views, labels).item() == pytest.approx(loop_supcon(views, labels, 0.1), rel=1e-9)


def test_all_equal_embeddings_give_log_of_other_samples():
    # All similarities equal: every positive has probability 1 / (2N - 1).
    embeddings = torch.ones(4, 2, 3)
    assert SupCon(0.1)(embeddings, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(math.log(7), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings(views, dtype):
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    value = SupCon(0.05)(views.to(dtype), labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(SupCon(0.05)(views.to(dtype).double(), labels).item(), rel=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_supcon_rejects_non_positive_temperature(temperature):
    with pytest.raises(ConfigError, match="loss.temperature"):
        SupCon(temperature)


def test_simclr_ignores_labels_and_equals_unlabelled_supcon(views):
    from losslab.losses import SimCLR

    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    expected = loop_supcon(views, None, 0.5)
    assert SimCLR()(views, labels).item() == pytest.approx(expected, rel=1e-9)
    assert SimCLR()(views).item() == pytest.approx(expected, rel=1e-9)
    assert SimCLR.needs_labels is False and SimCLR().temperature == 0.5
