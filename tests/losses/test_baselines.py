"""Focal, FLSD-53, one-vs-rest BCE, MAE and L2-SVM against float64 loop computations of their formulas."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.baselines import BinaryCrossEntropy, Focal, FocalAdaptive, MeanAbsoluteError, SquaredHinge


def loop_softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def loop_focal(logits, labels, gamma=2.0, alpha=None):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p = loop_softmax(row)[label]
        weight = 1.0 if alpha is None else alpha[label]
        total += -weight * (1 - p) ** gamma * math.log(p)
    return total / len(logits)


def loop_focal_adaptive(logits, labels):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p = loop_softmax(row)[label]
        gamma = 5.0 if p < 0.2 else 3.0
        total += -((1 - p) ** gamma) * math.log(p)
    return total / len(logits)


def loop_bce(logits, target_probabilities):
    total = 0.0
    for row, targets in zip(logits.tolist(), target_probabilities.tolist()):
        for z, t in zip(row, targets):
            sigmoid = 1 / (1 + math.exp(-z))
            total += -(t * math.log(sigmoid) + (1 - t) * math.log(1 - sigmoid))
    return total / len(logits)


def loop_mae(logits, target_probabilities):
    total = 0.0
    for row, targets in zip(logits.tolist(), target_probabilities.tolist()):
        total += sum(abs(p - t) for p, t in zip(loop_softmax(row), targets))
    return total / len(logits)


def loop_squared_hinge(logits, labels, margin=1.0):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        for c, z in enumerate(row):
            sign = 1.0 if c == label else -1.0
            total += max(0.0, margin - sign * z) ** 2
    return total / len(logits)


def one_hot(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).double()




# (loss, reference(logits, labels)); soft-target references are given one-hot targets here
CASES = {
    "focal": (Focal(gamma=2.0), loop_focal),
    "focal_alpha": (
        Focal(gamma=1.5, alpha=[0.5, 1.0, 2.0, 0.25, 1.0]),
        lambda z, y: loop_focal(z, y, 1.5, [0.5, 1.0, 2.0, 0.25, 1.0]),
    ),
    "focal_adaptive": (FocalAdaptive(), loop_focal_adaptive),
    "bce": (BinaryCrossEntropy(), lambda z, y: loop_bce(z, one_hot(y, z.shape[1]))),
    "mae": (MeanAbsoluteError(), lambda z, y: loop_mae(z, one_hot(y, z.shape[1]))),
    "l2svm": (SquaredHinge(), loop_squared_hinge),
    "l2svm_margin": (SquaredHinge(margin=2.5), lambda z, y: loop_squared_hinge(z, y, 2.5)),
}
def loop_soft_focal(logits, targets, gamma=2.0, alpha=None):
    """Expected focal term under the target distribution, sum_c t_c alpha_c (1 - p_c)^gamma (-log p_c)."""
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist()):
        probabilities = loop_softmax(row)
        for c, (p, t) in enumerate(zip(probabilities, target)):
            weight = 1.0 if alpha is None else alpha[c]
            total += -t * weight * (1 - p) ** gamma * math.log(p)
    return total / len(logits)


SOFT = {
    "bce": (BinaryCrossEntropy(), loop_bce),
    "mae": (MeanAbsoluteError(), loop_mae),
    "focal": (Focal(gamma=2.0), loop_soft_focal),
    "focal_alpha": (
        Focal(gamma=1.5, alpha=[0.5, 1.0, 2.0, 0.25, 1.0]),
        lambda z, t: loop_soft_focal(z, t, 1.5, [0.5, 1.0, 2.0, 0.25, 1.0]),
    ),
}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


def test_focal_with_gamma_zero_is_cross_entropy(batch):
    logits, labels = batch
    assert Focal(gamma=0.0)(logits, labels).item() == pytest.approx(CrossEntropy()(logits, labels).item())


def test_focal_alpha_from_a_hydra_list_weights_each_sample_by_its_class(batch):
    logits, labels = batch
    alpha = OmegaConf.create([0.5, 1.0, 2.0, 0.25, 1.0])
    per_sample = [Focal()(logits[i : i + 1], labels[i : i + 1]).item() for i in range(len(labels))]
    expected = sum(alpha[label] * value for label, value in zip(labels.tolist(), per_sample)) / len(labels)
    assert Focal(alpha=alpha)(logits, labels).item() == pytest.approx(expected)


def test_focal_adaptive_uses_gamma_5_below_p_0_2_and_gamma_3_above():
    # p_y = 0.1 in the first row, 0.6 in the second (3 classes)
    logits = torch.log(torch.tensor([[0.1, 0.45, 0.45], [0.6, 0.3, 0.1]], dtype=torch.float64))
    labels = torch.tensor([0, 0])
    expected = (-(0.9**5) * math.log(0.1) - 0.4**3 * math.log(0.6)) / 2
    assert FocalAdaptive()(logits, labels).item() == pytest.approx(expected)


def test_mae_is_twice_one_minus_p_y(batch):
    logits, labels = batch
    p_y = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert MeanAbsoluteError()(logits, labels).item() == pytest.approx((2 * (1 - p_y)).mean().item())


@pytest.mark.parametrize("name", SOFT)
def test_soft_targets_match_loop_reference_and_one_hot_equals_hard_labels(name, batch):
    loss, reference = SOFT[name]
    logits, labels = batch
    assert loss.accepts_soft_targets
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    assert loss(logits, soft).item() == pytest.approx(reference(logits, soft), rel=1e-10)
    assert torch.autograd.gradcheck(lambda z: loss(z, soft), logits.clone().requires_grad_())
    assert loss(logits, one_hot(labels, 5)).item() == pytest.approx(loss(logits, labels).item(), rel=1e-12)


@pytest.mark.parametrize("loss", [FocalAdaptive(), SquaredHinge()])
def test_losses_defined_on_class_indices_refuse_soft_targets(loss):
    assert not loss.accepts_soft_targets


@pytest.mark.parametrize(
    ("loss", "fill", "expected"),
    [  # softmax losses see only logit differences; BCE and L2-SVM see the logits themselves
        (Focal(gamma=2.0), 3.0, 0.9**2 * math.log(10)),
        (FocalAdaptive(), 3.0, 0.9**5 * math.log(10)),
        (MeanAbsoluteError(), 3.0, 2 * 0.9),
        (BinaryCrossEntropy(), 0.0, 10 * math.log(2)),
        (SquaredHinge(), 0.0, 10.0),
        (SquaredHinge(), 0.5, 0.5**2 + 9 * 1.5**2),
    ],
)
def test_all_equal_logits_give_the_closed_form_value(loss, fill, expected):
    logits = torch.full((4, 10), fill)
    labels = torch.tensor([0, 3, 3, 9])
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: Focal(gamma=-1), "loss.gamma"),
        (lambda: Focal(alpha=[1.0, -0.5]), "loss.alpha"),
        (lambda: Focal(alpha=[]), "loss.alpha"),
        (lambda: FocalAdaptive(gamma_low=-1), "loss.gamma_low"),
        (lambda: FocalAdaptive(gamma_high=-1), "loss.gamma_high"),
        (lambda: FocalAdaptive(p_threshold=1.0), "loss.p_threshold"),
        (lambda: SquaredHinge(margin=0.0), "loss.margin"),
    ],
)
def test_bad_hyperparameter_raises_config_error_naming_the_option(make, option):
    with pytest.raises(ConfigError, match=option):
        make()


def test_focal_alpha_with_wrong_number_of_classes_raises_config_error(batch):
    logits, labels = batch
    with pytest.raises(ConfigError, match="loss.alpha"):
        Focal(alpha=[1.0, 1.0])(logits, labels)
