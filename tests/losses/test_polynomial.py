"""Poly-1, Poly-1 focal, comp-sum, Z-loss, squentropy, StableMax and encouraging loss against float64 loop
computations of their formulas, and the identities their papers state."""

import math

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.baselines import Focal
from losslab.losses.polynomial import (
    CompSum,
    Encouraging,
    Poly1,
    Poly1Focal,
    Squentropy,
    StableMax,
    ZLossSpherical,
)
from reference import finite_difference_gradient


def loop_softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def loop_poly1(logits, target_probabilities, epsilon=1.0):
    total = 0.0
    for row, targets in zip(logits.tolist(), target_probabilities.tolist()):
        p = loop_softmax(row)
        cross_entropy = -sum(t * math.log(q) for t, q in zip(targets, p))
        p_t = sum(t * q for t, q in zip(targets, p))
        total += cross_entropy + epsilon * (1 - p_t)
    return total / len(logits)


def loop_poly1_focal(logits, labels, epsilon=1.0, gamma=2.0):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p = loop_softmax(row)[label]
        total += -((1 - p) ** gamma) * math.log(p) + epsilon * (1 - p) ** (gamma + 1)
    return total / len(logits)


def loop_comp_sum(logits, labels, tau):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        u = sum(math.exp(z - row[label]) for c, z in enumerate(row) if c != label)
        total += math.log(1 + u) if tau == 1 else ((1 + u) ** (1 - tau) - 1) / (1 - tau)
    return total / len(logits)


def loop_z_loss(logits, labels, a=1.0, b=1.0):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        mean = sum(row) / len(row)
        variance = sum((z - mean) ** 2 for z in row) / len(row)
        z_target = (row[label] - mean) / math.sqrt(variance + ZLossSpherical.variance_floor)
        total += math.log(1 + math.exp(a * (b - z_target))) / a
    return total / len(logits)


def loop_squentropy(logits, labels):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        square = sum(z**2 for c, z in enumerate(row) if c != label) / (len(row) - 1)
        total += -math.log(loop_softmax(row)[label]) + square
    return total / len(logits)


def loop_stablemax(logits, labels):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        s = [z + 1 if z >= 0 else 1 / (1 - z) for z in row]
        total += -math.log(s[label] / sum(s))
    return total / len(logits)


def loop_encouraging(logits, labels, log_end=0.75):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p = loop_softmax(row)[label]
        if log_end < 1 and p > log_end:
            bonus = (p - log_end) / (log_end - 1) + math.log(1 - log_end)
        else:
            bonus = math.log(max(1 - p, 1e-5))
        total += -math.log(p) + bonus
    return total / len(logits)


def one_hot(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).double()


CASES = {
    "poly1": (Poly1(), lambda z, y: loop_poly1(z, one_hot(y, z.shape[1]))),
    "poly1_negative_epsilon": (Poly1(epsilon=-0.5), lambda z, y: loop_poly1(z, one_hot(y, z.shape[1]), -0.5)),
    "poly1_focal": (Poly1Focal(), loop_poly1_focal),
    "poly1_focal_other": (Poly1Focal(epsilon=2.0, gamma=0.5), lambda z, y: loop_poly1_focal(z, y, 2.0, 0.5)),
    "comp_sum": (CompSum(), lambda z, y: loop_comp_sum(z, y, 1.5)),
    "comp_sum_tau_1": (CompSum(tau=1.0), lambda z, y: loop_comp_sum(z, y, 1.0)),
    "comp_sum_tau_2": (CompSum(tau=2.0), lambda z, y: loop_comp_sum(z, y, 2.0)),
    "zloss_spherical": (ZLossSpherical(), loop_z_loss),
    "zloss_spherical_other": (ZLossSpherical(a=0.3, b=-0.5), lambda z, y: loop_z_loss(z, y, 0.3, -0.5)),
    "squentropy": (Squentropy(), loop_squentropy),
    "stablemax": (StableMax(), loop_stablemax),
    "encouraging": (Encouraging(), loop_encouraging),
    "encouraging_plain_bonus": (Encouraging(log_end=1.0), lambda z, y: loop_encouraging(z, y, 1.0)),
}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


def cross_entropy(logits, labels):
    return CrossEntropy()(logits, labels).item()


def test_poly1_with_epsilon_zero_is_cross_entropy(batch):
    logits, labels = batch
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    assert Poly1(epsilon=0.0)(logits, labels).item() == pytest.approx(cross_entropy(logits, labels))
    assert Poly1(epsilon=0.0)(logits, soft).item() == pytest.approx(CrossEntropy()(logits, soft).item())


def test_poly1_soft_targets_match_loop_reference_and_one_hot_equals_hard_labels(batch):
    logits, labels = batch
    assert Poly1.accepts_soft_targets
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    assert Poly1()(logits, soft).item() == pytest.approx(loop_poly1(logits, soft), rel=1e-10)
    assert Poly1()(logits, one_hot(labels, 5)).item() == pytest.approx(
        Poly1()(logits, labels).item(), rel=1e-12
    )


@pytest.mark.parametrize(
    "loss", [Poly1Focal(), CompSum(), ZLossSpherical(), Squentropy(), StableMax(), Encouraging()]
)
def test_losses_defined_on_class_indices_refuse_soft_targets(loss):
    assert not loss.accepts_soft_targets


@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_poly1_focal_with_epsilon_zero_is_focal(gamma, batch):
    logits, labels = batch
    expected = Focal(gamma=gamma)(logits, labels).item()
    assert Poly1Focal(epsilon=0.0, gamma=gamma)(logits, labels).item() == pytest.approx(expected)


def test_comp_sum_with_tau_one_is_cross_entropy(batch):
    logits, labels = batch
    assert CompSum(tau=1.0)(logits, labels).item() == pytest.approx(cross_entropy(logits, labels))


def test_comp_sum_is_continuous_in_tau_at_cross_entropy(batch):
    logits, labels = batch
    for tau in (1 - 1e-7, 1 + 1e-7):
        assert CompSum(tau=tau)(logits, labels).item() == pytest.approx(
            cross_entropy(logits, labels), rel=1e-5
        )


def test_comp_sum_with_tau_two_is_one_minus_p_y(batch):
    logits, labels = batch
    p_y = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert CompSum(tau=2.0)(logits, labels).item() == pytest.approx((1 - p_y).mean().item())


def test_comp_sum_between_one_and_two_is_generalised_cross_entropy(batch):
    logits, labels = batch
    q = 0.7
    p_y = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert CompSum(tau=1 + q)(logits, labels).item() == pytest.approx(((1 - p_y**q) / q).mean().item())


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_comp_sum_below_tau_one_matches_loop_reference(tau, batch):
    logits, labels = batch
    assert CompSum(tau=tau)(logits, labels).item() == pytest.approx(
        loop_comp_sum(logits, labels, tau), rel=1e-10
    )


def test_squentropy_minus_cross_entropy_is_the_mean_square_of_incorrect_logits(batch):
    logits, labels = batch
    incorrect = 1 - one_hot(labels, 5)
    square = ((incorrect * logits**2).sum(1) / 4).mean().item()
    assert Squentropy()(logits, labels).item() - cross_entropy(logits, labels) == pytest.approx(square)


def test_z_loss_is_shift_and_scale_invariant(batch):
    logits, labels = batch
    loss = ZLossSpherical(a=0.5, b=2.0)
    expected = loss(logits, labels).item()
    assert loss(7.5 * logits - 40.0, labels).item() == pytest.approx(expected, rel=1e-6)


def test_stablemax_on_non_negative_logits_normalises_logits_plus_one():
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    expected = (-math.log(4 / 7) - math.log(3 / 7.5)) / 2
    assert StableMax()(logits, labels).item() == pytest.approx(expected)


def test_encouraging_loss_is_cross_entropy_plus_log_one_minus_p_below_log_end(batch):
    logits, labels = batch
    p_y = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert (p_y < 0.75).all()  # the batch lies on the log curve
    expected = cross_entropy(logits, labels) + torch.log1p(-p_y).mean().item()
    assert Encouraging()(logits, labels).item() == pytest.approx(expected)


@pytest.mark.parametrize("log_end", [0.75, 1.0])
def test_encouraging_on_well_classified_examples_matches_loop_reference_value_and_gradient(log_end, batch):
    logits, _ = batch
    labels = logits.argmax(1)  # p_y from 0.55 to 0.997: both sides of log_end = 0.75
    logits = logits.clone().requires_grad_()
    value = Encouraging(log_end)(logits, labels)
    value.backward()
    assert value.item() == pytest.approx(loop_encouraging(logits.detach(), labels, log_end), rel=1e-10)
    expected = finite_difference_gradient(lambda z: loop_encouraging(z, labels, log_end), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("log_end", [0.5, 0.75, 0.9])
def test_encouraging_bonus_of_a_certain_prediction_is_the_tangent_at_log_end(log_end):
    logits = torch.tensor([[1e4, -1e4, -1e4]])
    expected = (1 - log_end) / (log_end - 1) + math.log(1 - log_end)
    assert Encouraging(log_end)(logits, torch.tensor([0])).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("loss", "fill", "expected"),
    [  # ten classes, p_y = 0.1
        (Poly1(), 3.0, math.log(10) + 0.9),
        (Poly1Focal(), 3.0, 0.9**2 * math.log(10) + 0.9**3),
        (CompSum(), 3.0, 2 * (1 - 10**-0.5)),
        (ZLossSpherical(), 3.0, math.log(1 + math.e)),
        (Squentropy(), 3.0, math.log(10) + 9.0),
        (StableMax(), 3.0, math.log(10)),
        (StableMax(), -2.0, math.log(10)),
        (Encouraging(), 3.0, math.log(10) + math.log(0.9)),
    ],
)
def test_all_equal_logits_give_the_closed_form_value(loss, fill, expected):
    logits = torch.full((4, 10), fill, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 9])
    value = loss(logits, labels)
    value.backward()
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: Poly1(epsilon=-1.5), "loss.epsilon"),
        (lambda: Poly1Focal(epsilon=-1.5), "loss.epsilon"),
        (lambda: Poly1Focal(gamma=-1), "loss.gamma"),
        (lambda: CompSum(tau=-0.5), "loss.tau"),
        (lambda: ZLossSpherical(a=0.0), "loss.a"),
        (lambda: Encouraging(log_end=0.0), "loss.log_end"),
        (lambda: Encouraging(log_end=1.5), "loss.log_end"),
    ],
)
def test_bad_hyperparameter_raises_config_error_naming_the_option(make, option):
    with pytest.raises(ConfigError, match=option):
        make()
