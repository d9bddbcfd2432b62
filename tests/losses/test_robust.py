"""Noise-robust losses against float64 loop computations of their papers' formulas."""

import math

import pytest
import torch

from losslab.errors import ConfigError
from losslab.losses.robust import GCE, LDRKL, SCE, NCEandMAE, NCEandRCE, NFLandMAE, NFLandRCE

A = -4.0  # log 0 in reverse cross-entropy


def softmax_row(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def one_hot_row(label, classes):
    return [1.0 if c == label else 0.0 for c in range(classes)]


def batch_mean(per_sample, logits, labels):
    rows = logits.tolist()
    return sum(per_sample(row, label) for row, label in zip(rows, labels.tolist())) / len(rows)


def loop_ce(row, target):
    return -sum(t * math.log(p) for p, t in zip(softmax_row(row), target))


def loop_gce(q):
    return lambda row, y: (1 - softmax_row(row)[y] ** q) / q


def loop_rce(row, target, form="paper"):
    probs = softmax_row(row)
    if form == "code":
        return -sum(min(max(p, 1e-7), 1.0) * math.log(min(max(t, 1e-4), 1.0)) for p, t in zip(probs, target))
    return -sum(p * (math.log(t) if t > 0 else A) for p, t in zip(probs, target))


def loop_mae(row, y, form="paper"):
    probs = softmax_row(row)
    if form == "code":
        return 1 - probs[y]
    return sum(abs(p - t) for p, t in zip(probs, one_hot_row(y, len(row))))


def loop_nce(row, y):
    logs = [math.log(p) for p in softmax_row(row)]
    return logs[y] / sum(logs)


def loop_nfl(gamma):
    def per_sample(row, y):
        focal = [-((1 - p) ** gamma) * math.log(p) for p in softmax_row(row)]
        return focal[y] / sum(focal)

    return per_sample


def loop_ldr(lambda_, margin, score_form="paper"):
    def per_sample(row, y):
        scores = row
        if score_form == "code":
            scores = [math.log1p(math.exp(z)) for z in row]
            mean = sum(scores) / len(scores)
            scores = [s / mean for s in scores]
        terms = [
            math.exp(((margin if k != y else 0.0) + s - scores[y]) / lambda_) for k, s in enumerate(scores)
        ]
        return lambda_ * math.log(sum(terms) / len(terms))

    return per_sample


def loop_apl(active, passive, alpha, beta):
    return lambda row, y: alpha * active(row, y) + beta * passive(row, y)


CASES = {
    "gce": (GCE(0.7), loop_gce(0.7)),
    "gce_q1": (GCE(1.0), loop_gce(1.0)),
    "sce": (
        SCE(0.1, 1.0),
        lambda r, y: 0.1 * loop_ce(r, one_hot_row(y, len(r))) + loop_rce(r, one_hot_row(y, len(r))),
    ),
    "sce_code": (
        SCE(6.0, 0.1, rce_form="code"),
        lambda r, y: (
            6.0 * loop_ce(r, one_hot_row(y, len(r))) + 0.1 * loop_rce(r, one_hot_row(y, len(r)), "code")
        ),
    ),
    "nce_rce": (
        NCEandRCE(1.0, 1.0),
        loop_apl(loop_nce, lambda r, y: loop_rce(r, one_hot_row(y, len(r))), 1.0, 1.0),
    ),
    "nce_rce_code": (
        NCEandRCE(10.0, 0.1, rce_form="code"),
        loop_apl(loop_nce, lambda r, y: loop_rce(r, one_hot_row(y, len(r)), "code"), 10.0, 0.1),
    ),
    "nce_mae": (NCEandMAE(1.0, 1.0), loop_apl(loop_nce, loop_mae, 1.0, 1.0)),
    "nce_mae_code": (
        NCEandMAE(2.0, 0.5, mae_form="code"),
        loop_apl(loop_nce, lambda r, y: loop_mae(r, y, "code"), 2.0, 0.5),
    ),
    "nfl_rce": (
        NFLandRCE(1.0, 1.0, 0.5),
        loop_apl(loop_nfl(0.5), lambda r, y: loop_rce(r, one_hot_row(y, len(r))), 1.0, 1.0),
    ),
    "nfl_rce_code": (
        NFLandRCE(1.0, 1.0, 2.0, nfl_form="code", rce_form="code"),
        loop_apl(loop_nfl(2.0), lambda r, y: loop_rce(r, one_hot_row(y, len(r)), "code"), 1.0, 1.0),
    ),
    "nfl_mae": (NFLandMAE(1.0, 1.0, 0.5), loop_apl(loop_nfl(0.5), loop_mae, 1.0, 1.0)),
    "nfl_mae_code": (
        NFLandMAE(3.0, 1.0, 1.0, nfl_form="code", mae_form="code"),
        loop_apl(loop_nfl(1.0), lambda r, y: loop_mae(r, y, "code"), 3.0, 1.0),
    ),
    "ldr_kl": (LDRKL(1.0, 0.1), loop_ldr(1.0, 0.1)),
    "ldr_kl_small_lambda": (LDRKL(0.1, 1.0), loop_ldr(0.1, 1.0)),
    "ldr_kl_code": (LDRKL(1.0, 2.0, score_form="code"), loop_ldr(1.0, 2.0, "code")),
}
LOSSES = [loss for loss, _ in CASES.values()]


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (7,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("name", CASES)
def test_value_matches_loop_over_samples(name, batch):
    loss, loop = CASES[name]
    logits, labels = batch
    assert loss(logits, labels).item() == pytest.approx(batch_mean(loop, logits, labels), rel=1e-10)


@pytest.mark.parametrize(
    "name", [name for name, (loss, _) in CASES.items() if getattr(loss, "nfl_form", "") != "code"]
)
def test_gradcheck_in_float64(name, batch):
    """nfl_form="code" detaches on purpose; its gradient is checked by hand below."""
    loss, _ = CASES[name]
    logits, labels = batch
    logits = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss(z, labels), (logits,))


def test_gce_tends_to_ce_as_q_tends_to_zero(batch):
    logits, labels = batch
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert GCE(1e-4)(logits, labels).item() == pytest.approx(ce, rel=1e-3)


def test_gce_with_q_one_is_one_minus_p_target(batch):
    logits, labels = batch
    p_target = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    assert GCE(1.0)(logits, labels).item() == pytest.approx((1 - p_target).mean().item(), rel=1e-12)


@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 1e4])
def test_nce_lies_in_unit_interval(scale):
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(1)) * scale
    labels = torch.randint(0, 10, (64,))
    per_sample = torch.stack([NCEandMAE(1.0, 0.0)(logits[i : i + 1], labels[i : i + 1]) for i in range(64)])
    assert torch.all((per_sample >= 0) & (per_sample <= 1))


@pytest.mark.parametrize("rce_form", ["paper", "code"])
def test_sce_with_zero_beta_is_alpha_times_ce(rce_form, batch):
    logits, labels = batch
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert SCE(0.3, 0.0, rce_form)(logits, labels).item() == pytest.approx(0.3 * ce, rel=1e-12)


def test_nce_mae_code_form_halves_the_mae_term(batch):
    logits, labels = batch
    active = NCEandMAE(1.0, 0.0)(logits, labels)
    paper_mae = NCEandMAE(1.0, 1.0, mae_form="paper")(logits, labels) - active
    code_mae = NCEandMAE(1.0, 1.0, mae_form="code")(logits, labels) - active
    assert paper_mae.item() == pytest.approx(2 * code_mae.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("loss", "active"),
    [
        (NCEandRCE(2.0, 0.0), loop_nce),
        (NCEandMAE(2.0, 0.0), loop_nce),
        (NFLandRCE(2.0, 0.0, 0.5), loop_nfl(0.5)),
        (NFLandMAE(2.0, 0.0, 0.5), loop_nfl(0.5)),
    ],
)
def test_apl_with_zero_beta_is_alpha_times_active(loss, active, batch):
    logits, labels = batch
    assert loss(logits, labels).item() == pytest.approx(2.0 * batch_mean(active, logits, labels), rel=1e-12)


def test_nfl_with_zero_gamma_is_nce(batch):
    logits, labels = batch
    assert NFLandMAE(1.0, 0.0, gamma=0.0)(logits, labels).item() == pytest.approx(
        NCEandMAE(1.0, 0.0)(logits, labels).item(), rel=1e-12
    )


def test_paper_rce_on_one_hot_is_four_times_one_minus_p_target_and_twice_paper_mae(batch):
    logits, labels = batch
    p_target = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    rce = NCEandRCE(0.0, 1.0)(logits, labels)
    assert rce.item() == pytest.approx(4 * (1 - p_target).mean().item(), rel=1e-12)
    assert rce.item() == pytest.approx(2 * NCEandMAE(0.0, 1.0)(logits, labels).item(), rel=1e-12)


def test_nfl_code_form_has_the_same_value_but_detaches_the_focal_factors(batch):
    logits, labels = batch
    values, grads = [], []
    for form in ("paper", "code"):
        z = logits.clone().requires_grad_()
        value = NFLandMAE(1.0, 0.0, 2.0, nfl_form=form)(z, labels)
        value.backward()
        values.append(value.item())
        grads.append(z.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert not torch.allclose(grads[0], grads[1])
    # With the factors w_k = (1 - p_k)^gamma held constant, NFL is sum_k a_k log p_k with a_k = w_y 1[k=y] / S
    # - w_y log p_y w_k / S^2 (S = sum_k w_k log p_k); the gradient of sum_k a_k log p_k is a - p sum_k a_k.
    p = logits.softmax(1)
    w = (1 - p) ** 2.0
    log_p = p.log()
    s = (w * log_p).sum(1, keepdim=True)
    w_y_log_p_y = (w * log_p).gather(1, labels[:, None])
    a = torch.nn.functional.one_hot(labels, 5) * w / s - w_y_log_p_y * w / s**2
    expected = (a - p * a.sum(1, keepdim=True)) / len(labels)
    torch.testing.assert_close(grads[1], expected)


def test_ldr_kl_without_margin_at_unit_lambda_is_ce_minus_log_num_classes(batch):
    logits, labels = batch
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert LDRKL(1.0, 0.0)(logits, labels).item() == pytest.approx(ce - math.log(5), rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_all_equal_logits_match_loop(loss):
    name = next(key for key, (candidate, _) in CASES.items() if candidate is loss)
    logits = torch.zeros(4, 10, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 9])
    assert loss(logits, labels).item() == pytest.approx(batch_mean(CASES[name][1], logits, labels), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_very_confident_logits_give_finite_value_and_gradient(loss, dtype):
    logits = torch.zeros(4, 10, dtype=dtype)
    labels = torch.tensor([0, 3, 3, 9])
    logits[0, 0] = 1e4  # confident and right
    logits[1, 5] = 1e4  # confident and wrong
    logits[2] = -1e4  # all very negative
    logits[3, 9], logits[3, 2] = 1e4, -1e4
    logits.requires_grad_()
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_class_absent_and_single_class_batches_match_loop(name, batch):
    loss, loop = CASES[name]
    logits, _ = batch
    for labels in (torch.tensor([0, 1, 0, 1, 3, 3, 1]), torch.full((7,), 2)):
        assert loss(logits, labels).item() == pytest.approx(batch_mean(loop, logits, labels), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_half_precision_inputs_are_computed_in_float32(loss, dtype, batch):
    logits, labels = batch
    half = (logits * 10).to(dtype)  # large logits overflow exp() in half precision
    value = loss(half, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(half.double(), labels).item(), rel=1e-4, abs=1e-6)


def test_sce_accepts_soft_targets_and_matches_loop(batch):
    logits, labels = batch
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), dim=1)
    soft[0] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # zeros take log 0 := A
    for form in ("paper", "code"):
        expected = sum(
            0.1 * loop_ce(row, target) + loop_rce(row, target, form)
            for row, target in zip(logits.tolist(), soft.tolist())
        ) / len(soft)
        assert SCE(0.1, 1.0, form)(logits, soft).item() == pytest.approx(expected, rel=1e-10)
    one_hot = torch.nn.functional.one_hot(labels, 5).double()
    assert SCE()(logits, one_hot).item() == pytest.approx(SCE()(logits, labels).item(), rel=1e-12)


def test_only_sce_declares_soft_targets():
    assert SCE.accepts_soft_targets
    assert not any(
        cls.accepts_soft_targets for cls in (GCE, NCEandRCE, NCEandMAE, NFLandRCE, NFLandMAE, LDRKL)
    )


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: GCE(0.0), "loss.q"),
        (lambda: GCE(1.5), "loss.q"),
        (lambda: SCE(-0.1, 1.0), "loss.alpha"),
        (lambda: SCE(0.1, -1.0), "loss.beta"),
        (lambda: SCE(0.0, 0.0), "loss.alpha"),
        (lambda: SCE(rce_form="pytorch"), "loss.rce_form"),
        (lambda: NCEandRCE(rce_form="Paper"), "loss.rce_form"),
        (lambda: NCEandMAE(mae_form="half"), "loss.mae_form"),
        (lambda: NFLandRCE(gamma=-1.0), "loss.gamma"),
        (lambda: NFLandRCE(nfl_form="detach"), "loss.nfl_form"),
        (lambda: NFLandMAE(alpha=-1.0), "loss.alpha"),
        (lambda: LDRKL(lambda_=0.0), "loss.lambda_"),
        (lambda: LDRKL(margin=-0.1), "loss.margin"),
        (lambda: LDRKL(score_form="softplus"), "loss.score_form"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_option(make, option):
    with pytest.raises(ConfigError, match=option):
        make()
