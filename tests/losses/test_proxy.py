"""Proxy losses (ArcFace, CosFace, NormFace, Proxy Anchor) against float64 loops written from the papers'
equations, hand-made 2-D cases, and the training module's hook that creates and trains the proxies."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import run_training
from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.base import Loss
from losslab.losses.proxy import ArcFace, CosFace, NormFace, ProxyAnchor
from losslab.objective import Objective
from losslab.optim import cosine
from reference import TinyBackbone

N_CLASSES, DIM = 4, 5


def cosine_of(x, w):
    return (x @ w) / (x.norm() * w.norm())


def loop_margin_softmax(embeddings, proxies, labels, s, target_logit):
    """Mean over samples of -log(e^{s ψ(θ_y)} / (e^{s ψ(θ_y)} + sum_{j≠y} e^{s cos θ_j})), one sample and one
    class at a time; ``target_logit(θ_y)`` is ψ, written from the angle."""
    total = 0.0
    for x, y in zip(embeddings, labels.tolist()):
        logits = []
        for j, w in enumerate(proxies):
            cos = cosine_of(x, w)
            logits.append(s * (target_logit(torch.acos(cos)) if j == y else cos))
        total = total - torch.log(torch.exp(logits[y]) / sum(torch.exp(logit) for logit in logits))
    return total / len(labels)


def arcface_target(m, margin_form="paper"):
    def target(theta):
        if margin_form == "official" and theta + m > math.pi:
            return torch.cos(theta) - m * math.sin(m)
        if margin_form == "easy_margin" and theta > math.pi / 2:
            return torch.cos(theta)
        return torch.cos(theta + m)

    return target


def cosface_target(m):
    return lambda theta: torch.cos(theta) - m


def loop_proxy_anchor(embeddings, proxies, labels, alpha, delta):
    """The Proxy Anchor loss as printed: positives averaged over the proxies of the classes in the batch,
    negatives over all proxies."""
    labels = labels.tolist()
    positive_term, negative_term = 0.0, 0.0
    present = sorted(set(labels))
    zero = torch.zeros((), dtype=torch.float64)
    for p, w in enumerate(proxies):
        positives = sum(
            (torch.exp(-alpha * (cosine_of(x, w) - delta)) for x, y in zip(embeddings, labels) if y == p),
            zero,
        )
        negatives = sum(
            (torch.exp(alpha * (cosine_of(x, w) + delta)) for x, y in zip(embeddings, labels) if y != p), zero
        )
        if p in present:
            positive_term = positive_term + torch.log(1 + positives)
        negative_term = negative_term + torch.log(1 + negatives)
    return positive_term / len(present) + negative_term / len(proxies)


def with_proxies(loss, proxies):
    loss.setup_embedding(proxies.shape[1], proxies.shape[0])
    loss.double()
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    return loss


def call(loss, embeddings, proxies, labels):
    """The loss as a function of the embeddings and the proxies (for gradients and gradcheck)."""
    return functional_call(loss, {"proxies": proxies}, (embeddings, labels), strict=False)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(6, DIM, generator=generator, dtype=torch.float64)
    proxies = torch.randn(N_CLASSES, DIM, generator=generator, dtype=torch.float64)
    return embeddings, proxies, torch.tensor([0, 1, 0, 2, 1, 0])  # class 3 absent from the batch


def margin_softmax_reference(s, target_logit):
    return lambda embeddings, proxies, labels: loop_margin_softmax(
        embeddings, proxies, labels, s, target_logit
    )


def proxy_anchor_reference(alpha, delta):
    return lambda embeddings, proxies, labels: loop_proxy_anchor(embeddings, proxies, labels, alpha, delta)


# name: (the loss, its float64 loop reference)
CASES = {
    "arcface": (lambda: ArcFace(s=4.0, m=0.5), margin_softmax_reference(4.0, arcface_target(0.5))),
    "arcface_s64": (lambda: ArcFace(), margin_softmax_reference(64.0, arcface_target(0.5))),
    "arcface_official": (lambda: ArcFace(s=4.0, m=1.2, margin_form="official"),
                         margin_softmax_reference(4.0, arcface_target(1.2, "official"))),
    "arcface_easy_margin": (lambda: ArcFace(s=4.0, m=0.5, margin_form="easy_margin"),
                            margin_softmax_reference(4.0, arcface_target(0.5, "easy_margin"))),
    "cosface": (lambda: CosFace(s=4.0, m=0.35), margin_softmax_reference(4.0, cosface_target(0.35))),
    "cosface_s64": (lambda: CosFace(), margin_softmax_reference(64.0, cosface_target(0.35))),
    "normface": (lambda: NormFace(s=10.0), margin_softmax_reference(10.0, torch.cos)),
    "proxy_anchor": (lambda: ProxyAnchor(), proxy_anchor_reference(32.0, 0.1)),
    "proxy_anchor_small_alpha": (lambda: ProxyAnchor(alpha=2.0, delta=0.3), proxy_anchor_reference(2.0, 0.3)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradients_match_the_loop_over_the_papers_equation(case, batch):
    make, reference = CASES[case]
    embeddings, proxies, labels = batch
    if case == "arcface_official":  # put one target angle beyond pi - m, where the official code changes it
        embeddings = embeddings.clone()
        embeddings[3] = -proxies[2] + 0.1 * embeddings[3]
        assert torch.acos(cosine_of(embeddings[3], proxies[2])) > math.pi - 1.2
    if case == "arcface_easy_margin":
        assert any(cosine_of(x, proxies[y]) < 0 for x, y in zip(embeddings, labels.tolist()))
    loss = with_proxies(make(), proxies)
    x, w = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
    value = call(loss, x, w, labels)
    value.backward()
    x_ref, w_ref = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
    expected = reference(x_ref, w_ref, labels)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-12)
    assert w.grad[3].abs().sum() > 0  # the absent class's proxy still learns (softmax or negative term)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck_in_float64(case, batch):
    make, _ = CASES[case]
    embeddings, proxies, labels = batch
    loss = with_proxies(make(), proxies)
    inputs = (embeddings.clone().requires_grad_(), proxies.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w: call(loss, x, w, labels), inputs)


def on_circle(*degrees):
    return torch.tensor(
        [[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64
    )


def hand_ce(target_logit, other_logits):
    return -math.log(
        math.exp(target_logit) / (math.exp(target_logit) + sum(math.exp(z) for z in other_logits))
    )


# One embedding at 0 degrees (norm 3), of class 0; proxies at 60, 150 and 270 degrees (any norm).
EMBEDDING, PROXIES = (
    3.0 * on_circle(0),
    on_circle(60, 150, 270) * torch.tensor([[2.0], [0.5], [1.0]], dtype=torch.float64),
)
THETA_Y, OTHER_COSINES = math.radians(60), (math.cos(math.radians(150)), 0.0)


def test_arcface_adds_the_margin_to_the_angle_in_2d():
    loss = with_proxies(ArcFace(s=2.0, m=0.5), PROXIES)
    expected = hand_ce(2.0 * math.cos(THETA_Y + 0.5), [2.0 * c for c in OTHER_COSINES])
    assert loss(EMBEDDING, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_cosface_subtracts_the_margin_from_the_cosine_in_2d():
    loss = with_proxies(CosFace(s=2.0, m=0.35), PROXIES)
    expected = hand_ce(2.0 * (math.cos(THETA_Y) - 0.35), [2.0 * c for c in OTHER_COSINES])
    assert loss(EMBEDDING, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_normface_is_cross_entropy_on_scaled_cosines_in_2d():
    loss = with_proxies(NormFace(s=2.0, learn_s=False), PROXIES)
    expected = hand_ce(2.0 * math.cos(THETA_Y), [2.0 * c for c in OTHER_COSINES])
    assert loss(EMBEDDING, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_proxy_anchor_in_2d():
    # Embeddings at 0 and 90 degrees, classes 0 and 1; proxies at 60 (class 0), 150 (1) and 270 (2) degrees.
    loss = with_proxies(ProxyAnchor(alpha=2.0, delta=0.1), PROXIES)
    embeddings, labels = on_circle(0, 90), torch.tensor([0, 1])
    cos = [[math.cos(math.radians(a - p)) for p in (60, 150, 270)] for a in (0, 90)]
    positive = (
        math.log(1 + math.exp(-2.0 * (cos[0][0] - 0.1))) + math.log(1 + math.exp(-2.0 * (cos[1][1] - 0.1)))
    ) / 2
    negative = (
        math.log(1 + math.exp(2.0 * (cos[1][0] + 0.1)))
        + math.log(1 + math.exp(2.0 * (cos[0][1] + 0.1)))
        + math.log(1 + math.exp(2.0 * (cos[0][2] + 0.1)) + math.exp(2.0 * (cos[1][2] + 0.1)))
    ) / 3
    assert loss(embeddings, labels).item() == pytest.approx(positive + negative, rel=1e-12)


@pytest.mark.parametrize("theta_degrees", [10, 60, 100, 150, 175])
def test_arcface_margin_forms_by_angle(theta_degrees):
    m, theta = 0.5, math.radians(theta_degrees)
    cos_y = torch.tensor([[math.cos(theta)]], dtype=torch.float64)
    paper = ArcFace(m=m).target_cosine(cos_y).item()
    official = ArcFace(m=m, margin_form="official").target_cosine(cos_y).item()
    easy = ArcFace(m=m, margin_form="easy_margin").target_cosine(cos_y).item()
    assert paper == pytest.approx(math.cos(theta + m), abs=1e-12)
    # The official code replaces cos(theta + m) only where theta + m > pi (here 175 degrees).
    expected_official = math.cos(theta) - m * math.sin(m) if theta + m > math.pi else math.cos(theta + m)
    assert official == pytest.approx(expected_official, abs=1e-12)
    assert easy == pytest.approx(math.cos(theta) if theta > math.pi / 2 else math.cos(theta + m), abs=1e-12)


def test_official_arcface_target_keeps_decreasing_where_the_papers_turns_back_up():
    angles = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    cos_y = torch.cos(angles)[:, None]
    paper = ArcFace(m=0.5).target_cosine(cos_y).squeeze(1)
    official = ArcFace(m=0.5, margin_form="official").target_cosine(cos_y).squeeze(1)
    assert (official.diff() < 0).all()
    assert (paper.diff()[angles[1:] > math.pi - 0.5 + 0.01] > 0).all()


def test_zero_margin_arcface_equals_zero_margin_cosface_equals_fixed_scale_normface(batch):
    embeddings, proxies, labels = batch
    losses = ArcFace(s=3.0, m=0.0), CosFace(s=3.0, m=0.0), NormFace(s=3.0, learn_s=False), NormFace(s=3.0)
    values = [with_proxies(loss, proxies)(embeddings, labels) for loss in losses]
    cross_entropy = F.cross_entropy(
        3.0 * F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T, labels
    )
    for value in values:
        assert value.item() == pytest.approx(cross_entropy.item(), rel=1e-12)


def test_margins_raise_the_loss(batch):
    embeddings, proxies, labels = batch
    plain = with_proxies(NormFace(s=4.0, learn_s=False), proxies)(embeddings, labels)
    assert with_proxies(ArcFace(s=4.0, m=0.3), proxies)(embeddings, labels) > plain
    assert with_proxies(CosFace(s=4.0, m=0.3), proxies)(embeddings, labels) > plain


def test_normface_learns_its_scale(batch):
    embeddings, proxies, labels = batch
    loss = with_proxies(NormFace(s=10.0), proxies)
    assert isinstance(loss.learned_s, nn.Parameter) and loss.learned_s.item() == 10.0
    loss(embeddings, labels).backward()
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    reference = loop_margin_softmax(embeddings, proxies, labels, s, torch.cos)
    (expected_grad,) = torch.autograd.grad(reference, s)
    assert loss.learned_s.grad.item() == pytest.approx(expected_grad.item(), rel=1e-10)
    with torch.no_grad():
        loss.learned_s.fill_(-5.0)  # kept at the official prototxt's minimum, 0.01
    expected = loop_margin_softmax(embeddings, proxies, labels, 0.01, torch.cos)
    assert loss(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-10)
    assert "learned_s" not in dict(NormFace(learn_s=False).named_parameters())


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
def test_views_are_flattened_with_their_labels(make, batch):
    # [N, V, D] with labels [N]: every view is an anchor with its image's label.
    embeddings, proxies, labels = batch
    loss = with_proxies(make(), proxies)
    views = torch.stack([embeddings, 2.0 * embeddings.roll(1, dims=1)], dim=1)
    expected = loss(views.flatten(0, 1), labels.repeat_interleave(2))
    assert loss(views, labels).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_give_a_finite_float32_value(make, dtype, batch):
    embeddings, proxies, labels = batch
    loss = make()
    loss.setup_embedding(DIM, N_CLASSES)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    half = embeddings.to(dtype).requires_grad_()
    value = loss(half, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(half.grad.float()).all()
    reference = loss(half.detach().float(), labels)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
def test_cosines_are_not_autocast_to_bfloat16(make, batch):
    # With s = 64, a bf16 cosine (8 bits of mantissa) would move the logits by up to 0.25.
    embeddings, proxies, labels = batch
    loss = make()
    loss.setup_embedding(DIM, N_CLASSES)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    embeddings = embeddings.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(embeddings, labels)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(loss(embeddings, labels).item(), rel=1e-6)


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
@pytest.mark.parametrize("scale", [1e4, 1e-4])
@pytest.mark.parametrize("axis_proxies", [False, True])
def test_extreme_embedding_norms_and_aligned_embeddings_stay_finite(make, scale, axis_proxies, batch):
    _, proxies, labels = batch
    if axis_proxies:  # cosines of exactly 1 and -1
        proxies = torch.eye(N_CLASSES, DIM, dtype=torch.float64)
    loss = make()
    loss.setup_embedding(DIM, N_CLASSES)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    # Each embedding on its proxy (theta = 0, where d cos(theta + m) / d cos is infinite) or opposite it.
    embeddings = (scale * torch.cat([proxies[labels[:3]], -proxies[labels[3:]]])).float().requires_grad_()
    value = loss(embeddings, labels)
    value.backward()
    assert (
        torch.isfinite(value)
        and torch.isfinite(embeddings.grad).all()
        and torch.isfinite(loss.proxies.grad).all()
    )


def test_proxy_anchor_one_class_batch_has_no_negatives_and_no_nan(batch):
    embeddings, proxies, _ = batch
    loss = with_proxies(ProxyAnchor(), proxies)
    labels = torch.ones(6, dtype=torch.long)
    x, w = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
    value = call(loss, x, w, labels)
    value.backward()
    x_ref, w_ref = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
    loop_proxy_anchor(x_ref, w_ref, labels, 32.0, 0.1).backward()
    assert value.item() == pytest.approx(
        loop_proxy_anchor(embeddings, proxies, labels, 32.0, 0.1).item(), rel=1e-10
    )
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
def test_declares_a_labelled_single_view_embedding_loss_and_needs_its_proxies(make):
    assert make.kind == "embedding" and make.n_views == 1 and make.needs_labels
    with pytest.raises(RuntimeError, match="setup_embedding"):
        make()(torch.randn(2, DIM), torch.tensor([0, 1]))
    loss = make()
    loss.setup_embedding(DIM, N_CLASSES)
    assert loss.proxies.shape == (N_CLASSES, DIM) and dict(loss.named_parameters())["proxies"] is loss.proxies


def test_proxies_start_as_kaiming_normal_fan_out():
    loss = ProxyAnchor()
    loss.setup_embedding(512, 200)
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 200), rel=0.02)
    assert loss.proxies.mean().item() == pytest.approx(0.0, abs=3e-3)


@pytest.mark.parametrize("make, kwargs, option", [
    (ArcFace, {"s": 0.0}, "loss.s"),
    (ArcFace, {"m": -0.1}, "loss.m"),
    (ArcFace, {"m": math.pi}, "loss.m"),
    (ArcFace, {"margin_form": "insightface"}, "loss.margin_form='insightface': allowed values are paper, official"),
    (ArcFace, {"lr_multiplier": 0.0}, "loss.lr_multiplier"),
    (CosFace, {"s": -1.0}, "loss.s"),
    (CosFace, {"m": -0.35}, "loss.m"),
    (NormFace, {"s": 0.0}, "loss.s"),
    (NormFace, {"learn_s": "yes"}, "loss.learn_s='yes': allowed values are true, false"),
    (ProxyAnchor, {"alpha": 0.0}, "loss.alpha"),
    (ProxyAnchor, {"delta": -0.1}, "loss.delta"),
    (ProxyAnchor, {"lr_multiplier": -100.0}, "loss.lr_multiplier"),
])  # fmt: skip
def test_bad_hyperparameters_name_their_option(make, kwargs, option):
    with pytest.raises(ConfigError, match=option):
        make(**kwargs)


# The training module: the hook, the proxies as trained parameters, their learning rate.


def module_for(loss, projection_dim=4):
    optimizer = partial(torch.optim.SGD, lr=0.1)
    return Objective(TinyBackbone(), loss, num_classes=3, optimizer=optimizer, projection_dim=projection_dim)


def test_objective_calls_the_hook_for_embedding_losses_only():
    seen = []

    class Recording(Loss):
        kind = "embedding"

        def setup_embedding(self, embedding_dim, num_classes):
            seen.append((embedding_dim, num_classes))

    module_for(Recording(), projection_dim=7)
    assert seen == [(7, 3)]

    class RecordingClassifier(CrossEntropy):
        def setup_embedding(self, embedding_dim, num_classes):
            seen.append("classification")

    module_for(RecordingClassifier())
    assert seen == [(7, 3)]


@pytest.mark.parametrize("make", [ArcFace, CosFace, NormFace, ProxyAnchor])
def test_a_training_step_moves_the_proxies(make):
    module = module_for(make())
    proxies = module.loss.proxies
    assert proxies.shape == (3, 4)
    assert any(parameter is proxies for parameter in module.parameters())
    assert "loss.proxies" in module.state_dict()
    optimizer = module.configure_optimizers()
    before = proxies.detach().clone()
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 1])
    module._step((images, labels), "train").backward()
    optimizer.step()
    assert not torch.equal(proxies.detach(), before)


def test_loss_lr_multiplier_gives_its_parameters_their_own_group():
    module = module_for(ProxyAnchor())  # lr_multiplier 100, the paper's
    optimizer = module.configure_optimizers()
    base, own = optimizer.param_groups
    assert base["lr"] == pytest.approx(0.1) and own["lr"] == pytest.approx(10.0)
    assert own["params"] == [module.loss.proxies]
    assert {id(p) for p in base["params"]} == {id(p) for p in module.parameters()} - {id(module.loss.proxies)}

    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 1])
    before = module.loss.proxies.detach().clone()
    module._step((images, labels), "train").backward()
    grad = module.loss.proxies.grad.clone()
    optimizer.step()
    torch.testing.assert_close(module.loss.proxies.detach(), before - 10.0 * grad)


def test_loss_without_a_multiplier_keeps_one_parameter_group():
    assert len(module_for(ArcFace()).configure_optimizers().param_groups) == 1
    assert len(module_for(CrossEntropy()).configure_optimizers().param_groups) == 1


def test_any_loss_parameter_follows_its_lr_multiplier_under_a_schedule():
    class LearnedTemperature(CrossEntropy):
        lr_multiplier = 3.0

        def __init__(self):
            super().__init__()
            self.log_temperature = nn.Parameter(torch.zeros(()))

    module = Objective(TinyBackbone(), LearnedTemperature(), num_classes=3, scheduler=cosine,
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.2))  # fmt: skip

    class Trainer:
        estimated_stepping_batches, max_epochs = 10, 2

    module.trainer = Trainer()
    optimizer = module.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([0.2, 0.6])
    assert optimizer.param_groups[1]["params"] == [module.loss.log_temperature]


@pytest.mark.parametrize("key", ["arcface", "cosface", "normface", "proxy_anchor"])
def test_one_batch_run(key, tmp_path: Path):
    results = run_training([f"loss={key}", "dataset=digits", "debug=fdr", "trainer.enable_progress_bar=false",
                            "~callbacks.rich_progress_bar"], tmp_path / "run")  # fmt: skip
    assert results["status"] == "completed"
    assert math.isfinite(results["test"]["loss"]) and "probe_loss" in results["test"]


def test_proxy_anchor_run_learns_with_its_100x_proxies(tmp_path: Path):
    results = run_training(["dataset=digits", "loss=proxy_anchor", "trainer.max_epochs=2",
                            "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"], tmp_path / "run")  # fmt: skip
    assert results["test"]["acc"] > 0.5  # the online probe, on features the proxies' loss shaped
