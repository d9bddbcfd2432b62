"""Logit adjustment, balanced softmax, LDAM-DRW and VS-loss against float64 loop computations of their
formulas, their identities with cross-entropy and with each other, and the class-count plumbing."""

import math
from pathlib import Path

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.long_tail import LDAM, BalancedSoftmax, LogitAdjust, VectorScaling
from reference import finite_difference_gradient

COUNTS = [500, 120, 30, 7, 1]  # long-tailed, with a class of a single sample
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"


def loop_cross_entropy(row, label):
    top = max(row)
    return -(row[label] - top - math.log(sum(math.exp(z - top) for z in row)))


def loop_logit_adjust(logits, labels, counts, tau=1.0):
    priors = [n / sum(counts) for n in counts]
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += loop_cross_entropy([z + tau * math.log(p) for z, p in zip(row, priors)], label)
    return total / len(logits)


def loop_balanced_softmax(logits, labels, counts):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        denominator = sum(n * math.exp(z) for n, z in zip(counts, row))
        total += -math.log(counts[label] * math.exp(row[label]) / denominator)
    return total / len(logits)


def loop_cui_weights(counts, beta=0.9999):
    weights = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w * len(counts) / sum(weights) for w in weights]


def loop_ldam(logits, labels, counts, max_margin=0.5, s=30.0, weights=None):
    raw = [n**-0.25 for n in counts]
    margins = [m * max_margin / max(raw) for m in raw]
    weights = weights or [1.0] * len(counts)
    total = weight_sum = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        shifted = [s * (z - (margins[label] if c == label else 0.0)) for c, z in enumerate(row)]
        total += weights[label] * loop_cross_entropy(shifted, label)
        weight_sum += weights[label]
    return total / weight_sum


def loop_vs(logits, labels, counts, gamma=0.2, tau=1.5):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        scaled = [
            (n / max(counts)) ** gamma * z + tau * math.log(n / sum(counts)) for n, z in zip(counts, row)
        ]
        total += loop_cross_entropy(scaled, label)
    return total / len(logits)


def with_counts(loss, counts=COUNTS, dtype=torch.float64):
    """Converts first, so the class statistics are computed straight into ``dtype``."""
    loss.to(dtype).set_class_counts(torch.tensor(counts))
    return loss


def ldam_after_drw_start():
    loss = with_counts(LDAM())
    loss.set_epoch(9, 10)
    return loss


# name: (fresh loss with class counts, reference(logits, labels, counts))
CASES = {
    "logit_adjust": (lambda: with_counts(LogitAdjust()), loop_logit_adjust),
    "logit_adjust_tau_2": (
        lambda: with_counts(LogitAdjust(tau=2.0)),
        lambda z, y, n: loop_logit_adjust(z, y, n, 2.0),
    ),
    "balanced_softmax": (lambda: with_counts(BalancedSoftmax()), loop_balanced_softmax),
    "ldam": (lambda: with_counts(LDAM()), loop_ldam),
    "ldam_margin_1_s_5": (
        lambda: with_counts(LDAM(max_margin=1.0, s=5.0)),
        lambda z, y, n: loop_ldam(z, y, n, 1.0, 5.0),
    ),
    "ldam_drw": (ldam_after_drw_start, lambda z, y, n: loop_ldam(z, y, n, weights=loop_cui_weights(n))),
    "vs_loss": (lambda: with_counts(VectorScaling()), loop_vs),
    "vs_loss_gamma_1_tau_1": (
        lambda: with_counts(VectorScaling(gamma=1.0, tau=1.0)),
        lambda z, y, n: loop_vs(z, y, n, 1.0, 1.0),
    ),
}
CLASSES = [LogitAdjust, BalancedSoftmax, LDAM, VectorScaling]


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 4])
    return logits, labels


@pytest.mark.parametrize("cls", CLASSES)
def test_long_tail_losses_are_classification_losses_that_need_class_counts(cls):
    assert cls.kind == "classification" and cls.needs_class_counts and not cls.accepts_soft_targets


@pytest.mark.parametrize("name", CASES)
def test_value_matches_loop_reference(name, batch):
    make, reference = CASES[name]
    logits, labels = batch
    assert make()(logits, labels).item() == pytest.approx(reference(logits, labels, COUNTS), rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_finite_differences_of_loop_reference(name, batch):
    make, reference = CASES[name]
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    make()(logits, labels).backward()
    expected = finite_difference_gradient(lambda z: reference(z, labels, COUNTS), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_in_float64(name, batch):
    make, _ = CASES[name]
    loss = make()
    logits, labels = batch
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits.clone().requires_grad_(),))


def test_balanced_softmax_equals_logit_adjust_with_tau_1(batch):
    logits, labels = batch
    balanced = with_counts(BalancedSoftmax())(logits, labels)
    assert balanced.item() == pytest.approx(
        with_counts(LogitAdjust(tau=1.0))(logits, labels).item(), rel=1e-12
    )


def test_logit_adjust_with_tau_0_is_cross_entropy(batch):
    logits, labels = batch
    assert with_counts(LogitAdjust(tau=0.0))(logits, labels).item() == pytest.approx(
        CrossEntropy()(logits, labels).item(), rel=1e-12
    )


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_vs_loss_with_gamma_0_is_logit_adjust_with_the_same_tau(tau, batch):
    logits, labels = batch
    assert with_counts(VectorScaling(gamma=0.0, tau=tau))(logits, labels).item() == pytest.approx(
        with_counts(LogitAdjust(tau=tau))(logits, labels).item(), rel=1e-12
    )


def test_vs_loss_with_gamma_0_and_tau_0_is_cross_entropy(batch):
    logits, labels = batch
    assert with_counts(VectorScaling(gamma=0.0, tau=0.0))(logits, labels).item() == pytest.approx(
        CrossEntropy()(logits, labels).item(), rel=1e-12
    )


def test_ldam_with_max_margin_0_and_s_1_is_cross_entropy(batch):
    logits, labels = batch
    assert with_counts(LDAM(max_margin=0.0, s=1.0, drw=False))(logits, labels).item() == pytest.approx(
        CrossEntropy()(logits, labels).item(), rel=1e-12
    )


@pytest.mark.parametrize("make", [lambda: LogitAdjust(tau=1.5), BalancedSoftmax, VectorScaling])
def test_balanced_classes_make_prior_adjusted_losses_cross_entropy(make, batch):
    logits, labels = batch
    loss = with_counts(make(), counts=[40] * 5)
    assert loss(logits, labels).item() == pytest.approx(CrossEntropy()(logits, labels).item(), rel=1e-12)


def test_ldam_margins_scale_as_n_to_the_minus_quarter_with_the_largest_at_max_margin():
    margins = with_counts(LDAM(max_margin=0.5)).margins
    expected = torch.tensor([(1 / n) ** 0.25 * 0.5 for n in COUNTS], dtype=torch.float64)
    torch.testing.assert_close(margins, expected, rtol=1e-12, atol=0)
    assert margins.max().item() == pytest.approx(0.5) and margins.argmax().item() == COUNTS.index(1)


def test_drw_weights_are_1_before_the_start_epoch_and_cui_class_balanced_weights_from_it():
    loss = with_counts(LDAM())  # default start: round(0.8 * 200) = epoch 160
    cui = torch.tensor(loop_cui_weights(COUNTS), dtype=torch.float64)
    torch.testing.assert_close(loss.class_weights, torch.ones(5, dtype=torch.float64))
    loss.set_epoch(159, 200)
    torch.testing.assert_close(loss.class_weights, torch.ones(5, dtype=torch.float64))
    loss.set_epoch(160, 200)
    torch.testing.assert_close(loss.class_weights, cui, rtol=1e-12, atol=0)
    assert loss.class_weights.sum().item() == pytest.approx(5) and loss.class_weights.argmax().item() == 4


def test_set_epoch_switches_the_ldam_value_from_unweighted_to_class_balanced(batch):
    logits, labels = batch
    loss = with_counts(LDAM())
    loss.set_epoch(7, 10)
    assert loss(logits, labels).item() == pytest.approx(loop_ldam(logits, labels, COUNTS), rel=1e-10)
    loss.set_epoch(8, 10)
    weighted = loop_ldam(logits, labels, COUNTS, weights=loop_cui_weights(COUNTS))
    assert loss(logits, labels).item() == pytest.approx(weighted, rel=1e-10)


def test_drw_start_epoch_overrides_the_fraction_and_drw_false_never_reweights():
    loss = with_counts(LDAM(drw_start_epoch=3))
    loss.set_epoch(2, 100)
    assert not loss.reweighting
    loss.set_epoch(3, 100)
    assert loss.reweighting
    never = with_counts(LDAM(drw=False))
    never.set_epoch(99, 100)
    torch.testing.assert_close(never.class_weights, torch.ones(5, dtype=torch.float64))


def test_class_with_a_single_sample_gets_finite_value_and_gradient():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    for make, reference in CASES.values():
        loss = make()
        loss.set_class_counts(torch.tensor([1000, 1]))
        value = loss(logits, labels)
        assert value.item() == pytest.approx(reference(logits.detach(), labels, [1000, 1]), rel=1e-10)
        (gradient,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("make", [LogitAdjust, BalancedSoftmax])
def test_all_equal_logits_give_minus_log_prior_of_the_target(make):
    logits = torch.full((4, 5), 3.0, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3, 4])
    expected = sum(-math.log(COUNTS[y] / sum(COUNTS)) for y in labels.tolist()) / 4
    assert with_counts(make())(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def test_all_equal_logits_give_ldam_log_of_1_plus_others_times_exp_of_scaled_margin():
    logits = torch.full((2, 5), 3.0, dtype=torch.float64)
    labels = torch.tensor([0, 4])  # margins 0.5 / 500^0.25 and 0.5
    margins = [0.5 * (1 / 500) ** 0.25, 0.5]
    expected = sum(math.log(1 + 4 * math.exp(30 * m)) for m in margins) / 2
    assert with_counts(LDAM())(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def test_zero_logits_give_vs_loss_minus_log_of_prior_to_the_tau_normalised():
    logits = torch.zeros(2, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4])
    powered = [(n / sum(COUNTS)) ** 1.5 for n in COUNTS]
    expected = sum(-math.log(powered[y] / sum(powered)) for y in labels.tolist()) / 2
    assert with_counts(VectorScaling())(logits, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_logits_of_magnitude_1e4_give_finite_value_and_gradient(name):
    make, _ = CASES[name]
    labels = torch.tensor([0, 1, 2, 4])
    logits = torch.full((4, 5), -1e4, dtype=torch.float64)
    logits[0, 0] = logits[1, 1] = 1e4  # confidently right
    logits[2, 4] = logits[3, 0] = 1e4  # confidently wrong, one of them on the rarest class
    logits.requires_grad_()
    value = make()(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_single_class_batch_matches_loop_reference(name, batch):
    make, reference = CASES[name]
    logits, _ = batch
    labels = torch.full((9,), 3)
    assert make()(logits, labels).item() == pytest.approx(reference(logits, labels, COUNTS), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_inputs_are_computed_in_float32(name, dtype, batch):
    make, _ = CASES[name]
    loss = make().float()
    logits, labels = batch
    half = (logits * 10).to(dtype)  # large logits overflow exp() in half precision
    value = loss(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(half.double(), labels).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_using_the_loss_before_set_class_counts_raises_runtime_error(cls, batch):
    logits, labels = batch
    with pytest.raises(RuntimeError, match="set_class_counts"):
        cls()(logits, labels)


@pytest.mark.parametrize("cls", CLASSES)
def test_class_counts_for_another_number_of_classes_raise_config_error(cls, batch):
    logits, labels = batch
    with pytest.raises(ConfigError, match="4 classes but the classifier has 5"):
        with_counts(cls(), counts=[9, 5, 3, 1])(logits, labels)


@pytest.mark.parametrize("counts", [[10, 0, 3], [[10, 3]], []])
def test_class_counts_with_an_empty_class_or_wrong_shape_raise_config_error(counts):
    with pytest.raises(ConfigError, match="LogitAdjust"):
        LogitAdjust().set_class_counts(torch.tensor(counts, dtype=torch.long))


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: LogitAdjust(tau=-1), "loss.tau=-1: must be >= 0"),
        (lambda: LDAM(max_margin=-0.1), "loss.max_margin"),
        (lambda: LDAM(s=0.0), "loss.s"),
        (lambda: LDAM(drw_start_fraction=1.5), "loss.drw_start_fraction"),
        (lambda: LDAM(drw_start_epoch=-1), "loss.drw_start_epoch"),
        (lambda: LDAM(drw_start_epoch=2.5), "loss.drw_start_epoch"),
        (lambda: LDAM(beta=1.0), "loss.beta"),
        (lambda: VectorScaling(gamma=-0.2), "loss.gamma"),
        (lambda: VectorScaling(tau=-1.5), "loss.tau"),
    ],
)
def test_bad_hyperparameter_raises_config_error_naming_the_option(make, option):
    with pytest.raises(ConfigError, match=option):
        make()


@pytest.mark.parametrize("cls", CLASSES)
def test_class_statistics_are_buffers_that_move_with_to_float64(cls):
    loss = with_counts(cls(), dtype=torch.float32)
    buffers = dict(loss.named_buffers())
    assert "prior" in buffers and all(b.dtype == torch.float32 and len(b) == 5 for b in buffers.values())
    loss.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in loss.buffers())
    torch.testing.assert_close(loss.prior, torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS))


def test_class_statistics_are_computed_in_the_module_dtype_it_has_when_counts_arrive():
    prior = with_counts(LogitAdjust(), dtype=torch.float64).prior
    expected = torch.tensor([n / sum(COUNTS) for n in COUNTS], dtype=torch.float64)
    torch.testing.assert_close(prior, expected, rtol=0, atol=0)
