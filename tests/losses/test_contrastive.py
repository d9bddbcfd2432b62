"""SupCon (L_out of Khosla et al. 2020) against a float64 loop over anchors written from eq. 2."""

import math

import pytest
import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses import SupCon
from reference import finite_difference_gradient


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


def loop_soft_supcon(embeddings, targets, temperature):
    """Eq. 2 with each other sample p a positive of weight w_ip = sum_c y_ic y_pc, averaged by those weights."""
    n, views, _ = embeddings.shape
    z = F.normalize(embeddings.double(), dim=-1).reshape(n * views, -1).tolist()
    y = targets.double().repeat_interleave(views, dim=0).tolist()
    total, anchors = 0.0, 0
    for i in range(len(z)):
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / temperature for j in range(len(z))]
        log_denominator = math.log(sum(math.exp(sims[a]) for a in range(len(z)) if a != i))
        weights = {p: sum(a * b for a, b in zip(y[i], y[p])) for p in range(len(z)) if p != i}
        if sum(weights.values()) <= 1e-6:
            continue
        total += -sum(w * (sims[p] - log_denominator) for p, w in weights.items()) / sum(weights.values())
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


# DCL, DCLW, alignment-uniformity, SigLIP and SupCon-ReLU, each against a float64 loop written from its paper.


def _unit_rows(embeddings):
    """``[N, V, D]`` → nested lists of L2-normalised float64 vectors, ``z[image][view]``."""
    return F.normalize(embeddings.double(), dim=-1).tolist()


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _squared_distance(a, b):
    return sum((p - q) ** 2 for p, q in zip(a, b))


def loop_dcl(embeddings, temperature, sigma=None):
    """Yeh et al. eq. 6 (DCLW with ``sigma``): for image k and view i,
    -w_k <z_k^i, z_k^(3-i)>/τ + log sum_{l in views, j != k} exp(<z_k^i, z_j^l>/τ), averaged over the 2N terms."""
    z = _unit_rows(embeddings)
    n = len(z)
    weights = [1.0] * n
    if sigma is not None:
        expected = sum(math.exp(_dot(z[k][0], z[k][1]) / sigma) for k in range(n)) / n
        weights = [2 - math.exp(_dot(z[k][0], z[k][1]) / sigma) / expected for k in range(n)]
    total = 0.0
    for k in range(n):
        for i in (0, 1):
            positive = _dot(z[k][i], z[k][1 - i]) / temperature
            negatives = sum(
                math.exp(_dot(z[k][i], z[j][l]) / temperature) for l in (0, 1) for j in range(n) if j != k
            )
            total += -weights[k] * positive + math.log(negatives)
    return total / (2 * n)


def loop_align_uniform(embeddings, alpha=2.0, t=2.0, lam_align=1.0, lam_uniform=1.0):
    """Wang & Isola: lam_align · mean_i ||x_i - y_i||^α + lam_uniform · mean over views of
    log( mean_{i<j} exp(-t ||z_i - z_j||²) )."""
    z = _unit_rows(embeddings)
    n = len(z)
    align = sum(_squared_distance(z[i][0], z[i][1]) ** (alpha / 2) for i in range(n)) / n
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    uniform = 0.0
    for view in (0, 1):
        mean = sum(math.exp(-t * _squared_distance(z[i][view], z[j][view])) for i, j in pairs) / len(pairs)
        uniform += math.log(mean) / 2
    return lam_align * align + lam_uniform * uniform


def loop_siglip(embeddings, labels, temperature, bias):
    """Zhai et al.: -1/N sum_i sum_j log 1 / (1 + exp(z_ij (-t x_i·y_j - b))), z_ij = 1 for positives."""
    z = _unit_rows(embeddings)
    n = len(z)
    y = list(range(n)) if labels is None else labels.tolist()
    total = 0.0
    for i in range(n):
        for j in range(n):
            sign = 1.0 if y[i] == y[j] else -1.0
            total += -math.log(1 / (1 + math.exp(sign * (-temperature * _dot(z[i][0], z[j][1]) - bias))))
    return total / n


def value_and_gradient(loss, embeddings, labels=None):
    embeddings = embeddings.clone().requires_grad_()
    value = loss(embeddings, labels)
    value.backward()
    return value.item(), embeddings.grad


@pytest.fixture
def pairs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(5, 2, 6, generator=generator, dtype=torch.float64)


def _contrastive_losses():
    from losslab.losses.contrastive import DCL, DCLW, AlignUniform, SigLIP, SupConReLU

    return {
        "dcl": DCL,
        "dclw": DCLW,
        "align_uniform": AlignUniform,
        "siglip": SigLIP,
        "supcon_relu": SupConReLU,
    }


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_dcl_matches_paper_loop_in_value_and_gradient(pairs, temperature):
    from losslab.losses.contrastive import DCL

    value, gradient = value_and_gradient(DCL(temperature), pairs)
    assert value == pytest.approx(loop_dcl(pairs, temperature), rel=1e-10)
    expected = finite_difference_gradient(lambda e: loop_dcl(e, temperature), pairs)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_dclw_matches_paper_loop_in_value_and_gradient(pairs, sigma):
    from losslab.losses.contrastive import DCLW

    value, gradient = value_and_gradient(DCLW(0.1, sigma), pairs)
    assert value == pytest.approx(loop_dcl(pairs, 0.1, sigma), rel=1e-10)
    expected = finite_difference_gradient(lambda e: loop_dcl(e, 0.1, sigma), pairs)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_dcl_is_nt_xent_without_the_positive_in_the_denominator(pairs):
    from losslab.losses import SimCLR
    from losslab.losses.contrastive import DCL

    # NT-Xent_i = -s_ip + log(e^s_ip + sum_neg e^s_ia), so DCL_i = NT-Xent_i + log(1 - p_i), p_i the positive's
    # softmax probability; DCL is therefore strictly below NT-Xent at the same temperature.
    z = F.normalize(pairs, dim=-1)
    flat = torch.cat([z[:, 0], z[:, 1]])
    sims = flat @ flat.T / 0.2
    sims.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(5, 10), torch.arange(0, 5)])
    positive_probability = sims.softmax(dim=1)[torch.arange(10), partner]
    nt_xent = SimCLR(0.2)(pairs).item()
    expected = nt_xent + torch.log1p(-positive_probability).mean().item()
    assert DCL(0.2)(pairs).item() == pytest.approx(expected, rel=1e-10)
    assert DCL(0.2)(pairs).item() < nt_xent


def test_dclw_is_dcl_when_the_weights_are_flat(pairs):
    from losslab.losses.contrastive import DCL, DCLW

    # sigma → ∞ flattens the von Mises-Fisher weights to 1; so does an equal similarity for every positive pair.
    assert DCLW(0.1, sigma=1e9)(pairs).item() == pytest.approx(DCL(0.1)(pairs).item(), rel=1e-8)
    identical_views = pairs[:, :1].expand(5, 2, 6)  # every positive similarity is 1
    assert DCLW(0.1)(identical_views).item() == pytest.approx(DCL(0.1)(identical_views).item(), rel=1e-10)


def test_dcl_ignores_labels(pairs):
    from losslab.losses.contrastive import DCL, DCLW

    labels = torch.tensor([0, 0, 1, 1, 0])
    for loss in (DCL(0.1), DCLW(0.1)):
        assert loss(pairs, labels).item() == loss(pairs).item()
        assert loss.needs_labels is False and loss.n_views == 2


def test_dcl_with_every_embedding_equal_is_log_of_the_negatives():
    from losslab.losses.contrastive import DCL, DCLW

    # Every similarity is 1: -1/τ + log(2(N-1) e^(1/τ)) = log(2(N-1)), whatever τ; DCLW's weights are all 1.
    embeddings = torch.ones(4, 2, 3, dtype=torch.float64)
    assert DCL(0.1)(embeddings).item() == pytest.approx(math.log(6), rel=1e-10)
    assert DCLW(0.1)(embeddings).item() == pytest.approx(math.log(6), rel=1e-10)


def test_dcl_with_duplicate_images_matches_loop(pairs):
    from losslab.losses.contrastive import DCL, DCLW

    duplicated = pairs.clone()
    duplicated[1] = duplicated[0]  # two images with the same embeddings: each is the other's hardest negative
    assert DCL(0.1)(duplicated).item() == pytest.approx(loop_dcl(duplicated, 0.1), rel=1e-10)
    assert DCLW(0.1)(duplicated).item() == pytest.approx(loop_dcl(duplicated, 0.1, 0.5), rel=1e-10)


@pytest.mark.parametrize("name", ["dcl", "dclw"])
def test_dcl_gradcheck(pairs, name):
    loss = _contrastive_losses()[name]()
    assert torch.autograd.gradcheck(lambda e: loss(e), (pairs.clone().requires_grad_(),))


@pytest.mark.parametrize("name", ["dcl", "dclw"])
def test_dcl_one_view_has_no_positive_and_one_image_no_negative(pairs, name):
    loss = _contrastive_losses()[name]()
    single_view = pairs[:, 0].clone().requires_grad_()
    value = loss(single_view)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(single_view.grad, torch.zeros_like(single_view))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 5
    one_image = pairs[:1].clone().requires_grad_()
    value = loss(one_image)
    value.backward()
    assert value.item() == 0.0 and torch.equal(one_image.grad, torch.zeros_like(one_image))
    assert loss.extra_metrics()["anchors_without_negatives"].item() == 2
    assert loss.extra_metrics()["anchors_without_positives"].item() == 0


@pytest.mark.parametrize(
    ("alpha", "t", "lam_align", "lam_uniform"), [(2.0, 2.0, 1.0, 1.0), (1.0, 3.0, 0.5, 2.0)]
)
def test_align_uniform_matches_paper_loop_in_value_and_gradient(pairs, alpha, t, lam_align, lam_uniform):
    from losslab.losses.contrastive import AlignUniform

    loss = AlignUniform(alpha, t, lam_align, lam_uniform)
    value, gradient = value_and_gradient(loss, pairs)
    assert value == pytest.approx(loop_align_uniform(pairs, alpha, t, lam_align, lam_uniform), rel=1e-10)
    expected = finite_difference_gradient(
        lambda e: loop_align_uniform(e, alpha, t, lam_align, lam_uniform), pairs
    )
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_align_uniform_equals_the_papers_pdist_code(pairs):
    from losslab.losses.contrastive import AlignUniform

    # The paper's reference code: lalign(x, y) + (lunif(x) + lunif(y)) / 2 with torch.pdist.
    x, y = F.normalize(pairs[:, 0], dim=-1), F.normalize(pairs[:, 1], dim=-1)
    align = (x - y).norm(dim=1).pow(2).mean()
    uniform = [torch.pdist(v, p=2).pow(2).mul(-2).exp().mean().log() for v in (x, y)]
    assert AlignUniform()(pairs).item() == pytest.approx((align + sum(uniform) / 2).item(), rel=1e-10)


def test_align_uniform_alignment_vanishes_at_identical_views(pairs):
    from losslab.losses.contrastive import AlignUniform

    same = pairs[:, :1].expand(5, 2, 6).clone()
    for alpha in (1.0, 2.0):
        embeddings = same.clone().requires_grad_()
        value = AlignUniform(alpha=alpha, lam_uniform=0.0)(embeddings)
        value.backward()
        assert value.item() == 0.0 and torch.isfinite(embeddings.grad).all()
    uniform_only = AlignUniform(lam_align=0.0)(same).item()
    assert AlignUniform()(same).item() == pytest.approx(uniform_only, rel=1e-12)
    assert AlignUniform()(same).item() == pytest.approx(loop_align_uniform(same), rel=1e-10)


def test_align_uniform_with_every_embedding_equal_is_zero():
    from losslab.losses.contrastive import AlignUniform

    # Aligned (distance 0) and as far from uniform as possible: log mean exp(0) = 0.
    assert AlignUniform()(torch.ones(4, 2, 3, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)


def test_align_uniform_with_duplicate_images_matches_loop(pairs):
    from losslab.losses.contrastive import AlignUniform

    duplicated = pairs.clone()
    duplicated[2] = duplicated[0]
    value, gradient = value_and_gradient(AlignUniform(), duplicated)
    assert value == pytest.approx(loop_align_uniform(duplicated), rel=1e-10)
    torch.testing.assert_close(gradient, finite_difference_gradient(loop_align_uniform, duplicated),
                               rtol=1e-5, atol=1e-7)  # fmt: skip


def test_align_uniform_gradcheck(pairs):
    from losslab.losses.contrastive import AlignUniform

    for loss in (AlignUniform(), AlignUniform(alpha=1.0, t=1.0)):
        assert torch.autograd.gradcheck(loss, (pairs.clone().requires_grad_(),))


def test_align_uniform_one_view_keeps_uniformity_and_counts_anchors(pairs):
    from losslab.losses.contrastive import AlignUniform

    loss = AlignUniform()
    single = pairs[:, 0]
    x = F.normalize(single, dim=-1)
    expected = torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log()
    assert loss(single).item() == pytest.approx(expected.item(), rel=1e-10)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 5
    # One image: no pair for uniformity, only the alignment of its two views.
    one = pairs[:1].clone().requires_grad_()
    value = loss(one)
    value.backward()
    expected = (F.normalize(pairs[0, 0], dim=0) - F.normalize(pairs[0, 1], dim=0)).pow(2).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10) and torch.isfinite(one.grad).all()
    # One image, one view: nothing to compare, a zero that keeps its graph.
    lone = pairs[:1, 0].clone().requires_grad_()
    value = loss(lone)
    value.backward()
    assert value.item() == 0.0 and torch.equal(lone.grad, torch.zeros_like(lone))


@pytest.mark.parametrize(("log_temperature", "bias"), [(math.log(10.0), -10.0), (0.3, 1.5)])
def test_siglip_matches_paper_loop_in_value_and_gradient(pairs, log_temperature, bias):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP().double()
    with torch.no_grad():
        loss.log_temperature.fill_(log_temperature)
        loss.bias.fill_(bias)
    value, gradient = value_and_gradient(loss, pairs)
    assert value == pytest.approx(loop_siglip(pairs, None, math.exp(log_temperature), bias), rel=1e-10)
    expected = finite_difference_gradient(
        lambda e: loop_siglip(e, None, math.exp(log_temperature), bias), pairs
    )
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_siglip_learns_its_temperature_and_bias(pairs):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP().double()
    assert {name for name, _ in loss.named_parameters()} == {"log_temperature", "bias"}
    assert loss.log_temperature.exp().item() == pytest.approx(10.0) and loss.bias.item() == -10.0
    # As a submodule (the training module's self.loss), they are among the parameters the optimizer gets.
    holder = torch.nn.ModuleDict({"loss": loss})
    assert any(p is loss.bias for p in holder.parameters()) and any(
        p is loss.log_temperature for p in holder.parameters()
    )
    loss(pairs).backward()
    step = 1e-6
    t_prime, b = loss.log_temperature.item(), loss.bias.item()

    def reference(t_prime, b):
        return loop_siglip(pairs, None, math.exp(t_prime), b)

    expected_t = (reference(t_prime + step, b) - reference(t_prime - step, b)) / (2 * step)
    expected_b = (reference(t_prime, b + step) - reference(t_prime, b - step)) / (2 * step)
    assert loss.log_temperature.grad.item() == pytest.approx(expected_t, rel=1e-5)
    assert loss.bias.grad.item() == pytest.approx(expected_b, rel=1e-5)
    assert expected_b != 0.0 and expected_t != 0.0


def test_siglip_gradcheck(pairs):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP(temperature_init=2.0, bias_init=0.5).double()

    def with_parameters(embeddings, log_temperature, bias):
        return torch.func.functional_call(
            loss, {"log_temperature": log_temperature, "bias": bias}, (embeddings,)
        )

    inputs = (pairs.clone().requires_grad_(), torch.tensor(0.7, dtype=torch.float64, requires_grad=True),
              torch.tensor(-0.4, dtype=torch.float64, requires_grad=True))  # fmt: skip
    assert torch.autograd.gradcheck(with_parameters, inputs)


def test_siglip_is_symmetric_in_the_two_views(pairs):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP().double()
    assert loss(pairs.flip(1)).item() == pytest.approx(loss(pairs).item(), rel=1e-12)


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 1, 0, 2, 1]), torch.tensor([0, 1, 1, 1, 2]), torch.zeros(5, dtype=torch.long)],
    ids=["random", "one_sample_classes", "one_class"],
)
def test_siglip_with_labels_makes_same_label_pairs_positive(pairs, labels):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP().double()
    # t' = log 10 is stored in float32, so the reference uses the stored t rather than 10 itself.
    temperature, bias = loss.log_temperature.exp().item(), loss.bias.item()
    value, gradient = value_and_gradient(loss, pairs, labels)
    assert value == pytest.approx(loop_siglip(pairs, labels, temperature, bias), rel=1e-10)
    expected = finite_difference_gradient(lambda e: loop_siglip(e, labels, temperature, bias), pairs)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)
    assert loss(pairs, torch.arange(5)).item() == pytest.approx(loss(pairs).item(), rel=1e-12)


def test_siglip_with_duplicate_images_matches_loop(pairs):
    from losslab.losses.contrastive import SigLIP

    duplicated = pairs.clone()
    duplicated[3] = duplicated[1]
    loss = SigLIP().double()
    expected = loop_siglip(duplicated, None, loss.log_temperature.exp().item(), loss.bias.item())
    assert loss(duplicated).item() == pytest.approx(expected, rel=1e-10)


def test_siglip_one_view_gives_zero_with_graph_and_counts_anchors(pairs):
    from losslab.losses.contrastive import SigLIP

    loss = SigLIP()
    single = pairs[:, 0].clone().requires_grad_()
    value = loss(single)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(single.grad, torch.zeros_like(single))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 5
    loss(pairs)
    assert loss.extra_metrics()["anchors_without_positives"].item() == 0


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 1, 0, 2, 1]), torch.tensor([0, 1, 1, 1, 2]), torch.zeros(5, dtype=torch.long)],
    ids=["random", "one_sample_classes", "one_class"],
)
def test_supcon_relu_is_supcon_on_relu_embeddings(pairs, labels):
    from losslab.losses.contrastive import SupConReLU

    def reference(embeddings):
        return loop_supcon(embeddings.clamp_min(0.0), labels, 0.1)

    value, gradient = value_and_gradient(SupConReLU(0.1), pairs, labels)
    assert value == pytest.approx(reference(pairs), rel=1e-10)
    torch.testing.assert_close(gradient, finite_difference_gradient(reference, pairs), rtol=1e-5, atol=1e-7)
    assert torch.equal(gradient[pairs < 0], torch.zeros_like(gradient[pairs < 0]))


def test_supcon_relu_equals_supcon_on_non_negative_embeddings(pairs):
    from losslab.losses.contrastive import SupConReLU

    labels = torch.tensor([0, 1, 0, 2, 1])
    positive = pairs.abs()
    assert SupConReLU(0.1)(positive, labels).item() == SupCon(0.1)(positive, labels).item()
    assert SupConReLU(0.1)(pairs, labels).item() != SupCon(0.1)(pairs, labels).item()
    duplicated = positive.clone()
    duplicated[1] = duplicated[0]
    assert SupConReLU(0.1)(duplicated, labels).item() == pytest.approx(
        loop_supcon(duplicated, labels, 0.1), rel=1e-10
    )


def test_supcon_relu_gradcheck_and_no_positive(pairs):
    from losslab.losses.contrastive import SupConReLU

    labels = torch.tensor([0, 1, 0, 2, 1])
    assert torch.autograd.gradcheck(lambda e: SupConReLU(0.5)(e, labels), (pairs.clone().requires_grad_(),))
    loss = SupConReLU(0.1)
    single = pairs[:, 0].clone().requires_grad_()
    value = loss(single, torch.arange(5))
    value.backward()
    assert value.item() == 0.0 and value.requires_grad and torch.equal(single.grad, torch.zeros_like(single))
    assert loss.extra_metrics()["anchors_without_positives"].item() == 5


@pytest.mark.parametrize("name", ["dcl", "dclw", "align_uniform", "siglip", "supcon_relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_new_losses_on_half_precision_embeddings(pairs, name, dtype):
    loss = _contrastive_losses()[name]()
    labels = torch.tensor([0, 1, 0, 2, 1])
    half = (pairs * 3).to(dtype).requires_grad_()
    value = loss(half, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()
    assert value.item() == pytest.approx(loss(half.detach().float(), labels).item(), rel=1e-6)
    assert value.item() == pytest.approx(loss((pairs * 3).float(), labels).item(), rel=2e-2, abs=2e-2)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("dcl", "temperature", 0.0), ("dclw", "temperature", -0.1), ("dclw", "sigma", 0.0), ("align_uniform", "alpha", 0.0),
     ("align_uniform", "t", -1.0), ("align_uniform", "lam_align", -1.0), ("align_uniform", "lam_uniform", -0.5),
     ("siglip", "temperature_init", 0.0), ("supcon_relu", "temperature", 0.0)],
)  # fmt: skip
def test_new_losses_reject_bad_options_naming_them(name, option, value):
    with pytest.raises(ConfigError, match=rf"loss\.{option}={value}: must be"):
        _contrastive_losses()[name](**{option: value})


def test_supcon_with_probability_labels_matches_the_weighted_loop(views):
    mixed = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    loss = SupCon(0.2)
    assert loss.accepts_soft_targets
    assert loss(views, mixed).item() == pytest.approx(loop_soft_supcon(views, mixed, 0.2), rel=1e-9)
    assert torch.autograd.gradcheck(lambda z: loss(z, mixed), views.clone().requires_grad_())


def test_supcon_with_one_hot_labels_equals_hard_labels(views):
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    one_hot = F.one_hot(labels, 4).double()
    assert SupCon(0.1)(views, one_hot).item() == pytest.approx(SupCon(0.1)(views, labels).item(), rel=1e-12)
    # single view: the class-3 sample has no positive in either form, and both count it
    loss = SupCon(0.1)
    assert loss(views[:, :1], one_hot).item() == pytest.approx(SupCon(0.1)(views[:, :1], labels).item(), rel=1e-12)
    assert loss.anchors_without_positives.item() == 2  # labels 2 and 3 occur once


def test_supcon_with_disjoint_probability_labels_has_no_positive_but_keeps_its_graph(views):
    disjoint = torch.eye(6, dtype=torch.float64)
    embeddings = views[:, :1].clone().requires_grad_()
    loss = SupCon(0.1)
    value = loss(embeddings, disjoint)
    assert value.item() == 0.0 and value.requires_grad
    assert loss.anchors_without_positives.item() == 6
