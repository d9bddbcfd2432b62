"""Properties every loss of tests/losses/test_baselines.py and test_polynomial.py must have, tested once over
both files' registries of (loss, float64 loop reference): value and gradient against the reference, gradcheck,
finite results for logits of magnitude 1e4, absent and single-class batches, half-precision inputs."""

import pytest
import test_baselines
import test_polynomial
import torch

from reference import finite_difference_gradient

CASES = {
    **{f"baselines/{key}": case for key, case in test_baselines.CASES.items()},
    **{f"polynomial/{key}": case for key, case in test_polynomial.CASES.items()},
}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("name", CASES)
def test_value_matches_loop_reference(name, batch):
    loss, reference = CASES[name]
    logits, labels = batch
    assert loss(logits, labels).item() == pytest.approx(reference(logits, labels), rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_finite_differences_of_loop_reference(name, batch):
    loss, reference = CASES[name]
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    loss(logits, labels).backward()
    expected = finite_difference_gradient(lambda z: reference(z, labels), logits.detach())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_in_float64(name, batch):
    loss, _ = CASES[name]
    logits, labels = batch
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("name", CASES)
def test_logits_of_magnitude_1e4_give_finite_value_and_gradient(name):
    loss, _ = CASES[name]
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.full((4, 5), -1e4)
    logits[0, 0] = logits[1, 1] = 1e4  # confidently right
    logits[2, 4] = logits[3, 0] = 1e4  # confidently wrong
    logits.requires_grad_()
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_class_absent_from_batch_matches_loop_reference(name, batch):
    loss, reference = CASES[name]
    logits, _ = batch
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])  # classes 2, 3 and 4 never occur
    assert loss(logits, labels).item() == pytest.approx(reference(logits, labels), rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_single_class_batch_matches_loop_reference(name, batch):
    loss, reference = CASES[name]
    logits, _ = batch
    labels = torch.full((7,), 2)
    assert loss(logits, labels).item() == pytest.approx(reference(logits, labels), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_inputs_are_computed_in_float32(name, dtype, batch):
    loss, _ = CASES[name]
    logits, labels = batch
    half = (logits * 10).to(dtype)  # large logits overflow exp() in half precision
    value = loss(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(half.double(), labels).item(), rel=1e-4, abs=1e-6)
