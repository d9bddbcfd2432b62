"""Harmonic loss and its head of class centres against a float64 loop computation of HarMax,
p_c = d_c^-n / sum_j d_j^-n with d_c = ||w_c - x||_2, and the heads the training module builds."""

import math

import pytest
import torch
from torch import nn

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy, SupCon
from losslab.losses.harmonic import Harmonic, HarmonicHead
from losslab.objective import Objective
from reference import finite_difference_gradient

FEATURES, CLASSES = 6, 4


def loop_harmax(features, centres, n):
    """Rows of p_c = d_c^-n / sum_j d_j^-n, distances taken coordinate by coordinate."""
    rows = []
    for x in features.tolist():
        distances = [math.sqrt(sum((wi - xi) ** 2 for wi, xi in zip(w, x))) for w in centres.tolist()]
        inverse_powers = [d ** (-n) for d in distances]
        rows.append([v / sum(inverse_powers) for v in inverse_powers])
    return rows


def loop_harmonic_loss(features, centres, labels, n):
    rows = loop_harmax(features, centres, n)
    return sum(-math.log(row[y]) for row, y in zip(rows, labels.tolist())) / len(rows)


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    loss = Harmonic(n=3.0)
    head = loss.build_head(FEATURES, CLASSES).double()
    features = torch.randn(7, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (7,), generator=generator)
    return loss, head, features, labels


def test_softmax_of_head_logits_is_harmax(setup):
    _, head, features, _ = setup
    probabilities = head(features).softmax(dim=1)
    expected = torch.tensor(loop_harmax(features, head.weight.detach(), 3.0), dtype=torch.float64)
    torch.testing.assert_close(probabilities, expected, rtol=1e-10, atol=1e-12)


def test_value_matches_loop(setup):
    loss, head, features, labels = setup
    expected = loop_harmonic_loss(features, head.weight.detach(), labels, 3.0)
    assert loss(head(features), labels).item() == pytest.approx(expected, rel=1e-10)


def test_gradients_to_features_and_centres_match_finite_differences_of_loop(setup):
    loss, head, features, labels = setup
    centres = head.weight.detach().clone()
    features = features.clone().requires_grad_()
    loss(head(features), labels).backward()
    expected_features = finite_difference_gradient(
        lambda x: loop_harmonic_loss(x, centres, labels, 3.0), features.detach()
    )
    expected_centres = finite_difference_gradient(
        lambda w: loop_harmonic_loss(features.detach(), w, labels, 3.0), centres
    )
    torch.testing.assert_close(features.grad, expected_features, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(head.weight.grad, expected_centres, rtol=1e-5, atol=1e-8)


def test_gradcheck_in_float64(setup):
    loss, head, features, labels = setup
    assert torch.autograd.gradcheck(lambda x: loss(head(x), labels), (features.clone().requires_grad_(),))


def test_harmax_is_scale_invariant(setup):
    """Scaling features and centres together scales every distance alike: HarMax does not change."""
    _, head, features, _ = setup
    scaled = HarmonicHead(FEATURES, CLASSES, n=3.0).double()
    with torch.no_grad():
        scaled.weight.copy_(head.weight * 100.0)
    torch.testing.assert_close(scaled(features * 100.0).softmax(1), head(features).softmax(1))


def test_soft_one_hot_targets_give_the_hard_target_loss(setup):
    loss, head, features, labels = setup
    logits = head(features)
    one_hot = nn.functional.one_hot(labels, CLASSES).double()
    assert loss(logits, one_hot).item() == pytest.approx(loss(logits, labels).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_on_its_centre_gives_finite_loss_and_gradients(dtype, setup):
    loss, head, features, labels = setup
    head = head.to(dtype)
    features = features.to(dtype)
    features[0] = head.weight.detach()[labels[0]]  # distance exactly 0
    features.requires_grad_()
    logits = head(features)
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(value)
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.weight.grad).all()
    assert logits.softmax(1)[0, labels[0]].item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_computed_in_float32(dtype, setup):
    loss, head, features, labels = setup
    head = head.float()
    half = features.to(dtype)
    logits = head(half)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    expected = loop_harmonic_loss(half.double(), head.weight.detach().double(), labels, 3.0)
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-4)
    # Under autocast the distances are not computed in half precision either.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = head(half.float())
    assert autocast_logits.dtype == torch.float32
    torch.testing.assert_close(autocast_logits, head(half.float()))


def test_default_exponent_is_the_square_root_of_the_feature_dimension():
    assert Harmonic().n is None
    assert Harmonic().build_head(64, 10).n == pytest.approx(8.0)
    assert Harmonic(n=2.5).build_head(64, 10).n == 2.5


@pytest.mark.parametrize("n", [0.0, -1.0])
def test_non_positive_exponent_raises_config_error(n):
    with pytest.raises(ConfigError, match="loss.n"):
        Harmonic(n=n)


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, FEATURES)
        self.feature_dim = FEATURES

    def forward(self, x):
        return self.linear(x.flatten(1))


def module_for(loss):
    return Objective(TinyBackbone(), loss, num_classes=CLASSES, projection_dim=4,
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1))  # fmt: skip


def test_objective_trains_the_harmonic_centres_as_its_head():
    module = module_for(Harmonic(n=2.0))
    assert isinstance(module.head, HarmonicHead) and module.head.weight.shape == (CLASSES, FEATURES)
    assert any(p is module.head.weight for p in module.parameters())  # the optimizer gets the centres
    images, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0])
    module._step((images, labels), "train").backward()
    assert module.head.weight.grad is not None and module.head.weight.grad.abs().sum() > 0
    expected = loop_harmax(
        module.features(images).detach().double(), module.head.weight.detach().double(), 2.0
    )
    torch.testing.assert_close(
        module(images).softmax(1).double(), torch.tensor(expected, dtype=torch.float64)
    )


@pytest.mark.parametrize("loss", [CrossEntropy(), SupCon(0.5)])
def test_other_losses_get_a_linear_head(loss):
    assert type(module_for(loss).head) is nn.Linear
