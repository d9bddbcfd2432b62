"""Cross-entropy, label smoothing and PaLM's z-loss against float64 loop computations of their formulas."""

import math

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy, LabelSmoothing
from losslab.losses.classification import PaLMZLoss, palm_z_loss
from reference import finite_difference_gradient


def loop_cross_entropy(logits, target_probabilities):
    total = 0.0
    for row, target in zip(logits.tolist(), target_probabilities.tolist()):
        log_norm = math.log(sum(math.exp(z) for z in row))
        total += -sum(t * (z - log_norm) for z, t in zip(row, target))
    return total / len(logits)


def one_hot(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).double()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


def test_ce_matches_loop_on_hard_and_soft_targets(batch):
    logits, labels = batch
    assert CrossEntropy()(logits, labels).item() == pytest.approx(loop_cross_entropy(logits, one_hot(labels, 5)))
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    assert CrossEntropy()(logits, soft).item() == pytest.approx(loop_cross_entropy(logits, soft))


def test_label_smoothing_matches_smoothed_targets(batch):
    logits, labels = batch
    epsilon = 0.1
    smoothed = (1 - epsilon) * one_hot(labels, 5) + epsilon / 5
    expected = loop_cross_entropy(logits, smoothed)
    assert LabelSmoothing(epsilon)(logits, labels).item() == pytest.approx(expected)
    assert LabelSmoothing(epsilon)(logits, one_hot(labels, 5)).item() == pytest.approx(expected)


def test_label_smoothing_with_zero_epsilon_is_ce(batch):
    logits, labels = batch
    assert LabelSmoothing(0.0)(logits, labels).item() == pytest.approx(CrossEntropy()(logits, labels).item())


def test_ce_gradient_is_softmax_minus_target(batch):
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    CrossEntropy()(logits, labels).backward()
    expected = (torch.softmax(logits.detach(), 1) - one_hot(labels, 5)) / len(labels)
    torch.testing.assert_close(logits.grad, expected)


def test_label_smoothing_gradcheck(batch):
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: LabelSmoothing(0.2)(z, labels), (logits,))


@pytest.mark.parametrize("loss", [CrossEntropy(), LabelSmoothing(0.1)])
def test_all_equal_logits_give_log_num_classes(loss):
    logits = torch.zeros(4, 10)
    labels = torch.tensor([0, 3, 3, 9])
    assert loss(logits, labels).item() == pytest.approx(math.log(10), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", [CrossEntropy(), LabelSmoothing(0.1)])
def test_half_precision_inputs_are_computed_in_float32(loss, dtype, batch):
    logits, labels = batch
    half = (logits * 10).to(dtype)  # large logits overflow exp() in half precision
    value = loss(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(half.double(), labels).item(), rel=1e-4)


def test_single_class_batch(batch):
    logits, _ = batch
    labels = torch.full((7,), 2)
    assert CrossEntropy()(logits, labels).item() == pytest.approx(loop_cross_entropy(logits, one_hot(labels, 5)))


@pytest.mark.parametrize("epsilon", [-0.1, 1.0, 1.5])
def test_label_smoothing_rejects_epsilon_outside_unit_interval(epsilon):
    with pytest.raises(ConfigError, match="loss.epsilon"):
        LabelSmoothing(epsilon)


def loop_log_normaliser(row):
    top = max(row)
    return top + math.log(sum(math.exp(z - top) for z in row))


def loop_palm_z_loss(logits, labels, coefficient=1e-4):
    """-log p_y + coefficient * log^2 Z per sample, log Z = log sum_c exp(z_c), averaged over the batch."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        log_z = loop_log_normaliser(row)
        total += (log_z - row[label]) + coefficient * log_z**2
    return total / len(logits)


@pytest.mark.parametrize("coefficient", [1e-4, 0.3])
def test_palm_z_loss_matches_loop(coefficient, batch):
    logits, labels = batch
    logits = logits + 4.0  # log Z well away from 0, so the z-loss term is not negligible
    expected = loop_palm_z_loss(logits, labels, coefficient)
    assert PaLMZLoss(coefficient)(logits, labels).item() == pytest.approx(expected, rel=1e-10)
    z_term = coefficient * sum(loop_log_normaliser(row) ** 2 for row in logits.tolist()) / len(logits)
    assert palm_z_loss(logits, coefficient).item() == pytest.approx(z_term, rel=1e-10)


def test_palm_z_loss_gradient_matches_finite_differences_of_loop(batch):
    logits, labels = batch
    logits = (logits + 4.0).requires_grad_()
    PaLMZLoss(0.3)(logits, labels).backward()
    expected = finite_difference_gradient(lambda z: loop_palm_z_loss(z, labels, 0.3), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    # d/dz of c log^2 Z is 2 c log Z softmax(z): the z-loss pulls log Z towards 0.
    z = logits.detach()
    expected = z.softmax(1) - one_hot(labels, 5) + 0.6 * torch.logsumexp(z, 1, keepdim=True) * z.softmax(1)
    torch.testing.assert_close(logits.grad, expected / len(labels))
    fresh = logits.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: PaLMZLoss(0.3)(z, labels), (fresh,))


def test_palm_z_loss_with_zero_coefficient_is_ce(batch):
    logits, labels = batch
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    for target in (labels, soft):
        assert PaLMZLoss(0.0)(logits, target).item() == CrossEntropy()(logits, target).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_palm_z_loss_of_logits_of_magnitude_1e4_is_finite(dtype):
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.full((4, 5), -1e4)
    logits[0, 0] = logits[1, 1] = 1e4  # confidently right
    logits[2, 4] = logits[3, 0] = 1e4  # confidently wrong
    logits = logits.to(dtype).requires_grad_()
    value = PaLMZLoss()(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert value.item() == pytest.approx(loop_palm_z_loss(logits.detach().double(), labels), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_palm_z_loss_half_precision_inputs_are_computed_in_float32(dtype, batch):
    logits, labels = batch
    half = (logits * 10).to(dtype)  # large logits overflow exp() in half precision
    value = PaLMZLoss()(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loop_palm_z_loss(half.double(), labels), rel=1e-4)


def test_palm_z_loss_rejects_a_negative_coefficient():
    with pytest.raises(ConfigError, match="loss.coefficient"):
        PaLMZLoss(-1e-4)
