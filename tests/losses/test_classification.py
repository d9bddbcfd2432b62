"""Cross-entropy and label smoothing against float64 loop computations of their formulas."""

import math

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy, LabelSmoothing


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
