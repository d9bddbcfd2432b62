"""Multi-label losses: ASL against its formula and the official code, BCE and the sigmoid focal loss on
multi-hot targets, and the hook that tells a loss it runs on a multi-label dataset."""

import math

import pytest
import torch
import torchvision

from losslab.errors import ConfigError
from losslab.losses import CrossEntropy
from losslab.losses.baselines import BinaryCrossEntropy, Focal
from losslab.losses.multilabel import AsymmetricLoss


def multi_hot(n=6, c=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, c, generator=generator) < 0.4).double()
    target[0] = 0.0  # an image without any class
    target[1] = 1.0  # an image with every class
    return target


def logits_for(n=6, c=5, seed=1, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, c, generator=generator, dtype=torch.float64)).requires_grad_()


def asl_loop(logits, target, gamma_neg, gamma_pos, clip):
    """ASL by its definition, one (sample, class) pair at a time in float64 scalars:
    -[t (1-p)^g+ log p + (1-t) p_m^g- log(1-p_m)], p_m = max(p - m, 0), summed over classes, mean over samples."""
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        for k in range(c):
            p = 1.0 / (1.0 + torch.exp(-logits[i, k]))
            if target[i, k] == 1:
                total = total - (1.0 - p) ** gamma_pos * torch.log(p)
            else:
                shifted = torch.clamp(p - clip, min=0.0)
                total = total - shifted**gamma_neg * torch.log(1.0 - shifted)
    return total / n


def official_code(x, y, gamma_neg, gamma_pos, clip, eps=1e-8):
    """The reduction and detached focusing weights of Alibaba-MIIL/ASL's AsymmetricLoss
    (disable_torch_grad_focal_loss=True), transcribed."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos, xs_neg = x_sigmoid, (1 - x_sigmoid + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    with torch.no_grad():
        pt = xs_pos * y + xs_neg * (1 - y)
        weight = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * weight).sum()


@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), [(4.0, 0.0, 0.05), (2.0, 1.0, 0.2), (3.0, 0.5, 0.0)])
def test_asl_value_and_gradient_match_the_formula_computed_pair_by_pair(gamma_neg, gamma_pos, clip):
    logits, target = logits_for(), multi_hot()
    loss = AsymmetricLoss(gamma_neg, gamma_pos, clip)(logits, target)
    (gradient,) = torch.autograd.grad(loss, logits)
    reference = asl_loop(logits, target, gamma_neg, gamma_pos, clip)
    (reference_gradient,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-10, atol=1e-12)


def test_asl_gradient_passes_a_finite_difference_check():
    # Logits away from p = clip, where the clip makes the loss non-differentiable.
    logits, target = logits_for(4, 3, seed=3, scale=1.0), multi_hot(4, 3)
    logits = logits.detach().where((logits.sigmoid() - 0.05).abs() > 0.01, torch.tensor(1.0, dtype=torch.float64))
    loss = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits.requires_grad_(),))


def test_asl_without_focusing_or_clip_is_binary_cross_entropy():
    logits, target = logits_for(), multi_hot()
    torch.testing.assert_close(
        AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, target), BinaryCrossEntropy()(logits, target)
    )


def test_asl_code_options_reproduce_the_official_implementation():
    logits, target = logits_for(8, 4, seed=5, scale=2.0), multi_hot(8, 4, seed=5)
    ours = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="sum", detach_focusing_weights=True)
    value = ours(logits, target)
    (gradient,) = torch.autograd.grad(value, logits)
    reference = official_code(logits, target, 4.0, 1.0, 0.05)
    (reference_gradient,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(gradient, reference_gradient)
    # The paper's form (weights differentiated) has another gradient: the option is not a no-op.
    (paper_gradient,) = torch.autograd.grad(AsymmetricLoss(4.0, 1.0, 0.05, reduction="sum")(logits, target), logits)
    assert not torch.allclose(paper_gradient, gradient)


def test_asl_sum_reduction_is_batch_size_times_the_mean():
    logits, target = logits_for(), multi_hot()
    torch.testing.assert_close(
        AsymmetricLoss(reduction="sum")(logits, target), len(logits) * AsymmetricLoss()(logits, target)
    )


def test_asl_discards_negatives_whose_probability_is_below_the_clip():
    logits = torch.tensor([[math.log(0.04 / 0.96), 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.zeros(1, 2, dtype=torch.float64)
    loss = AsymmetricLoss(gamma_neg=4.0, clip=0.05)(logits, target)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient[0, 0] == 0.0 and gradient[0, 1] > 0.0
    torch.testing.assert_close(loss, -(0.45**4) * torch.log(torch.tensor(0.55, dtype=torch.float64)))


def test_sigmoid_focal_is_torchvision_sigmoid_focal_loss_summed_over_classes():
    logits, target = logits_for(), multi_hot()
    loss = Focal(gamma=2.0)
    loss.set_multi_label(True)
    expected = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(loss(logits, target), expected.sum(dim=1).mean())


def test_sigmoid_focal_with_gamma_zero_is_bce_and_alpha_one_half_halves_it():
    logits, target = logits_for(), multi_hot()
    bce = BinaryCrossEntropy()(logits, target)
    for sigmoid_alpha, scale in ((None, 1.0), (0.5, 0.5)):
        loss = Focal(gamma=0.0, sigmoid_alpha=sigmoid_alpha)
        loss.set_multi_label(True)
        torch.testing.assert_close(loss(logits, target), scale * bce)


def test_focal_keeps_its_softmax_form_on_single_label_data():
    logits, target = logits_for(), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(Focal(gamma=0.0)(logits, target), CrossEntropy()(logits, target))


def test_focal_refuses_per_class_softmax_weights_on_a_multi_label_dataset():
    with pytest.raises(ConfigError, match="loss.alpha"):
        Focal(alpha=[1.0, 2.0]).set_multi_label(True)


def multi_label_losses():
    focal = Focal()
    focal.set_multi_label(True)
    return {"asl": AsymmetricLoss(), "asl_clip0": AsymmetricLoss(clip=0.0), "bce": BinaryCrossEntropy(), "focal": focal}


@pytest.mark.parametrize("name", sorted(multi_label_losses()))
def test_multi_label_losses_stay_finite_for_extreme_logits_and_label_sets(name):
    loss = multi_label_losses()[name]
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4], [1e4, -1e4, 0.0, 3.0], [-1e4, 1e4, 0.0, -3.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    value = loss(logits, target)
    (gradient,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(value) and torch.isfinite(gradient).all()
    # A confident right answer costs nothing; a confident wrong one costs a lot and is pushed back.
    assert loss(torch.tensor([[1e4, -1e4]]), torch.tensor([[1.0, 0.0]])) < 1e-6
    assert loss(torch.tensor([[-1e4, 1e4]]), torch.tensor([[1.0, 0.0]])) > 1.0
    assert gradient[0, 3] < 0 and gradient[2, 0] < 0  # wrong on a positive: the logit must rise


@pytest.mark.parametrize("name", sorted(multi_label_losses()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_label_losses_compute_half_precision_inputs_in_float32(name, dtype):
    loss = multi_label_losses()[name]
    logits, target = (4 * torch.randn(16, 5, generator=torch.Generator().manual_seed(0))).to(dtype), multi_hot(16, 5)
    value = loss(logits.requires_grad_(), target.to(dtype))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.detach().float(), target.float()))
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_asl_rejects_invalid_hyperparameters():
    for kwargs, key in (({"gamma_neg": -1.0}, "gamma_neg"), ({"clip": 1.0}, "clip"), ({"reduction": "none"}, "reduction")):
        with pytest.raises(ConfigError, match=f"loss.{key}"):
            AsymmetricLoss(**kwargs)


def test_a_loss_without_multi_label_support_refuses_to_be_switched():
    assert not CrossEntropy.supports_multi_label
    with pytest.raises(TypeError, match="supports_multi_label"):
        CrossEntropy().set_multi_label(True)
