"""Dual focal loss against a float64 loop computation of the paper's formula."""

import math

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses.calibration import DualFocal


def loop_dual_focal(logits, labels, gamma):
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        exps = [math.exp(z - top) for z in row]
        probs = [e / sum(exps) for e in exps]
        below = [p for z, p in zip(row, probs) if z < row[y]]  # ranked after the ground truth
        p_j = max(below) if below else 0.0
        total += -((1 - probs[y] + p_j) ** gamma) * math.log(probs[y])
    return total / len(logits)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_dual_focal_matches_loop(gamma, batch):
    logits, labels = batch
    assert DualFocal(gamma)(logits, labels).item() == pytest.approx(
        loop_dual_focal(logits, labels, gamma), rel=1e-10
    )


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_dual_focal_gradcheck(gamma, batch):
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: DualFocal(gamma)(z, labels), (logits,))


def test_dual_focal_with_zero_gamma_is_ce(batch):
    logits, labels = batch
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert DualFocal(0.0)(logits, labels).item() == pytest.approx(ce, rel=1e-12)


def test_p_j_is_the_runner_up_when_the_target_ranks_first():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    p = logits.softmax(1)[0]
    expected = -((1 - p[0] + p[2]) ** 2) * p[0].log()
    assert DualFocal(2.0)(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-12)


def test_p_j_is_the_next_lower_class_not_the_top_one_when_the_target_is_not_first():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    p = logits.softmax(1)[0]
    expected = (
        -((1 - p[2] + p[1]) ** 2) * p[2].log()
    )  # class 1 ranks just below the target 2; class 0 is above it
    assert DualFocal(2.0)(logits, torch.tensor([2])).item() == pytest.approx(expected.item(), rel=1e-12)


def test_target_ranked_last_has_no_p_j_and_gives_focal_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    p = logits.softmax(1)[0]
    expected = -((1 - p[3]) ** 2) * p[3].log()
    assert DualFocal(2.0)(logits, torch.tensor([3])).item() == pytest.approx(expected.item(), rel=1e-12)


def test_all_equal_logits_have_no_class_below_the_target():
    logits = torch.zeros(4, 10)
    labels = torch.tensor([0, 3, 3, 9])
    assert DualFocal(5.0)(logits, labels).item() == pytest.approx(0.9**5 * math.log(10), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 5.0])
def test_very_confident_logits_give_finite_value_and_gradient(gamma, dtype):
    logits = torch.zeros(4, 10, dtype=dtype)
    labels = torch.tensor([0, 3, 3, 9])
    logits[0, 0] = 1e4  # confident and right: 1 - p_y + p_j rounds to 0
    logits[1, 5] = 1e4  # confident and wrong
    logits[2] = -1e4
    logits[3, 9], logits[3, 2] = 1e4, -1e4
    logits.requires_grad_()
    value = DualFocal(gamma)(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_class_absent_and_single_class_batches_match_loop(batch):
    logits, _ = batch
    for labels in (torch.tensor([0, 1, 0, 1, 3, 3, 1]), torch.full((7,), 2)):
        assert DualFocal(5.0)(logits, labels).item() == pytest.approx(
            loop_dual_focal(logits, labels, 5.0), rel=1e-10
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype, batch):
    logits, labels = batch
    half = (logits * 10).to(dtype)
    value = DualFocal(5.0)(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(DualFocal(5.0)(half.double(), labels).item(), rel=1e-4, abs=1e-6)


def test_dual_focal_refuses_soft_targets():
    assert not DualFocal.accepts_soft_targets


def test_negative_gamma_raises_config_error():
    with pytest.raises(ConfigError, match="loss.gamma"):
        DualFocal(-1.0)
