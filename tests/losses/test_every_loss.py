"""What every classification loss of configs/loss/ must do, whatever its family: stay finite on logits of
magnitude 1e4 and on bf16/fp16 inputs, and either accept [N, C] probability targets (one-hot probabilities
then give exactly its value on class indices) or refuse them with a clear error; training refuses such a
loss at start-up when a config choice makes the targets soft (mixing, distillation)."""

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.base import SoftTargetError
from losslab.losses.baselines import SquaredHinge
from losslab.train import check_compatible, soft_target_source

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"


def classification_losses():
    losses = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        loss = hydra.utils.instantiate(OmegaConf.load(path))
        # Distillation losses take a teacher's outputs too: the same checks are in test_distillation.py.
        if loss.kind == "classification" and not loss.needs_teacher:
            if loss.needs_class_counts:
                loss.set_class_counts(torch.tensor([30, 20, 10, 5, 2]))
            losses[path.stem] = loss
    return losses


LOSSES = classification_losses()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_loss_honours_its_soft_target_declaration(key, batch):
    loss = LOSSES[key]
    logits, labels = batch
    one_hot = F.one_hot(labels, 5).double()
    if loss.accepts_soft_targets or loss.multi_label:  # multi-label losses take [N, C] label sets natively
        assert loss(logits, one_hot).item() == pytest.approx(loss(logits, labels).item(), rel=1e-10, abs=1e-12)
    else:
        with pytest.raises(SoftTargetError, match=f"{type(loss).__name__} .*refuses"):
            loss(logits, one_hot)


@pytest.mark.parametrize("key", sorted(LOSSES))
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_logits_of_magnitude_1e4_give_finite_value_and_gradient(key, scale, batch):
    _, labels = batch
    logits = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0]] * 8, dtype=torch.float32) * scale
    logits[::2, 0] = 0.0  # some rows confidently right, others confidently wrong
    logits.requires_grad_()
    value = LOSSES[key](logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all(), key


@pytest.mark.parametrize("key", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_finite_value_close_to_float32(key, dtype, batch):
    logits, labels = batch
    half = (logits * 4).to(dtype).requires_grad_()
    value = LOSSES[key](half, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(half.grad.float()).all(), key
    reference = LOSSES[key](half.detach().float(), labels)
    assert value.float().item() == pytest.approx(reference.item(), rel=2e-2, abs=2e-2)


def test_soft_targets_follow_the_probabilities_where_accepted(batch):
    # Cross-entropy on a mixed target is the mixture of the two cross-entropies (it is linear in the target).
    logits, labels = batch
    mixed = 0.3 * F.one_hot(labels, 5).double() + 0.7 * F.one_hot(labels.roll(1), 5).double()
    ce = CrossEntropy()
    expected = 0.3 * ce(logits, labels) + 0.7 * ce(logits, labels.roll(1))
    assert ce(logits, mixed).item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_choice_that_makes_targets_soft_is_named():
    assert soft_target_source({"loss": "ce", "mixing": "none"}) is None
    assert soft_target_source({"loss": "ce", "mixing": "mixup"}) == "mixing=mixup"
    # A teacher reaches its distillation loss as an argument of its own, not as soft targets.
    assert soft_target_source({"loss": "kd", "teacher": "run"}) is None


DATA = SimpleNamespace(name="fashion_mnist", batch_size=8, n_views=1, sampler="random", multi_label=False,
                       num_classes=10)  # fmt: skip


def test_start_up_refuses_a_loss_without_soft_targets_when_mixing_makes_them():
    with pytest.raises(ConfigError, match=r"mixing=cutmix .*loss=l2svm refuses them; use one of: .*\bce\b.*supcon"):
        check_compatible(SquaredHinge(), DATA, {"loss": "l2svm", "dataset": "fashion_mnist", "mixing": "cutmix"})
    check_compatible(CrossEntropy(), DATA, {"loss": "ce", "dataset": "fashion_mnist", "mixing": "cutmix"})
    check_compatible(SquaredHinge(), DATA, {"loss": "l2svm", "dataset": "fashion_mnist", "mixing": "none"})
