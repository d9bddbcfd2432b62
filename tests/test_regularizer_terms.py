"""The regularisers that probe the network (vat, sla) or read the logits or features (entropy_min,
logit_penalty), each against an independent float64 computation, plus their configs. The group's wiring
into the training module is tested in tests/test_regularizers.py."""

import math
import re

import hydra
import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from conftest import CONFIG_DIR, compose_config
from losslab.errors import ConfigError
from losslab.regularizers import (
    EntropyMinimizationRegularizer,
    LogitPenaltyRegularizer,
    PaLMZLossRegularizer,
    RegularizerContext,
    SLARegularizer,
    VATRegularizer,
)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def softmax(row):
    top = max(row)
    exps = [math.exp(z - top) for z in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def matvec(matrix, vector):
    return [sum(m * v for m, v in zip(row, vector)) for row in matrix]


def unit(vector):
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector]


class LinearSoftmax:
    """z = W vec(x) in float64: KL(p(x) || p(x + r)) has gradient W^T (softmax(W(x + r)) - p) in r, and
    Hessian W^T (diag p - p p^T) W at r = 0."""

    def __init__(self, classes=4, dims=(1, 2, 3), seed=0):
        self.weight = torch.randn(classes, math.prod(dims), generator=generator(seed), dtype=torch.float64)
        self.dims = dims

    def __call__(self, images):
        return images.flatten(1) @ self.weight.T

    def images(self, n, seed=1):
        return torch.randn(n, *self.dims, generator=generator(seed), dtype=torch.float64)

    def context(self, images):
        return RegularizerContext(images=images, features=images.flatten(1), classify=self, embed=None)


def hand_perturbation(model, images, direction, xi, eps):
    """One power step by hand, per sample: r = eps * g / ||g||,
    g = W^T (softmax(W(x + xi d / ||d||)) - p(x))."""
    weight = model.weight.tolist()
    transposed = [list(column) for column in zip(*weight)]
    result = []
    for x, d in zip(images.flatten(1).tolist(), direction.flatten(1).tolist()):
        shifted = [a + xi * b for a, b in zip(x, unit(d))]
        difference = [q - p for q, p in zip(softmax(matvec(weight, shifted)), softmax(matvec(weight, x)))]
        result.append([eps * g for g in unit(matvec(transposed, difference))])
    return result


def hand_lds(model, images, perturbation):
    weight = model.weight.tolist()
    total = 0.0
    for x, r in zip(images.flatten(1).tolist(), perturbation):
        total += kl(softmax(matvec(weight, x)), softmax(matvec(weight, [a + b for a, b in zip(x, r)])))
    return total / len(images)


# --- vat ---------------------------------------------------------------------------------------------------


def test_vat_perturbation_has_norm_eps_for_every_sample():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    images = torch.randn(6, 3, 4, 4, generator=generator())
    vat = VATRegularizer(eps=2.5)
    perturbation = vat.adversarial_perturbation(images, model(images), model, torch.randn_like(images))
    assert perturbation.shape == images.shape
    assert torch.allclose(perturbation.flatten(1).norm(dim=1), torch.full((6,), 2.5), rtol=1e-5)


def test_vat_one_power_step_matches_the_closed_form_gradient_of_a_linear_softmax_model():
    model = LinearSoftmax()
    images = model.images(5)
    direction = torch.randn(images.shape, generator=generator(2), dtype=torch.float64)
    vat = VATRegularizer(eps=3.0, xi=1e-3)
    perturbation = vat.adversarial_perturbation(images, model(images), model, direction)
    expected = torch.tensor(
        hand_perturbation(model, images, direction, xi=1e-3, eps=3.0), dtype=torch.float64
    )
    assert torch.allclose(perturbation.flatten(1), expected, rtol=1e-9, atol=1e-12)


def test_vat_term_is_alpha_times_the_kl_to_the_prediction_at_x_plus_r_adv():
    model = LinearSoftmax()
    images = model.images(5)
    vat = VATRegularizer(coefficient=0.7, eps=2.0, xi=1e-6)
    torch.manual_seed(3)
    term = vat(model(images), torch.tensor([0, 1, 2, 3, 0]), model.context(images))
    torch.manual_seed(3)
    direction = torch.randn_like(images)  # the start forward drew
    expected = 0.7 * hand_lds(model, images, hand_perturbation(model, images, direction, xi=1e-6, eps=2.0))
    assert term.item() == pytest.approx(expected, rel=1e-6)


def test_vat_lds_for_a_fixed_direction_matches_the_hand_kl():
    model = LinearSoftmax(classes=3, dims=(2, 2, 2))
    images = model.images(4)
    direction = torch.randn(images.shape, generator=generator(5), dtype=torch.float64)
    vat = VATRegularizer(eps=1.5, xi=1e-4)
    lds = vat.local_distributional_smoothness(model(images), model.context(images), direction)
    expected = hand_lds(model, images, hand_perturbation(model, images, direction, xi=1e-4, eps=1.5))
    assert lds.item() == pytest.approx(expected, rel=1e-9)


def test_vat_power_iteration_converges_to_the_top_eigenvector_of_the_kl_hessian():
    model = LinearSoftmax(classes=4, dims=(1, 2, 3))
    images = model.images(3)
    vat = VATRegularizer(eps=1.0, power_iterations=200)
    direction = torch.randn(images.shape, generator=generator(7), dtype=torch.float64)
    perturbation = vat.adversarial_perturbation(images, model(images), model, direction).flatten(1)
    for x, r in zip(images.flatten(1), perturbation):
        p = torch.softmax(model.weight @ x, dim=0)
        hessian = model.weight.T @ (torch.diag(p) - torch.outer(p, p)) @ model.weight
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        assert eigenvalues[-1] > 1.5 * eigenvalues[-2]  # a gap, so the power method has one limit
        assert abs(torch.dot(r, eigenvectors[:, -1]).item()) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("as_method", [False, True])
def test_vat_leaves_no_gradient_on_parameters_and_batchnorm_statistics_unchanged(as_method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    images = torch.randn(8, 3, 4, 4)
    logits = model(images)  # the main pass records its statistics, as in training
    statistics = {name: buffer.clone() for name, buffer in model[1].named_buffers()}
    classify = model.forward if as_method else model
    context = RegularizerContext(images=images, features=images.flatten(1), classify=classify, embed=None)
    vat = VATRegularizer()
    vat.adversarial_perturbation(images, logits, classify, torch.randn_like(images))
    assert all(parameter.grad is None for parameter in model.parameters())
    term = vat(logits, torch.zeros(8, dtype=torch.long), context)
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, buffer in model[1].named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    assert model[1].track_running_stats
    term.backward()  # the term trains the network through the perturbed pass
    assert all(parameter.grad is not None for parameter in model.parameters())


# --- sla ---------------------------------------------------------------------------------------------------


def sla_setup(num_classes=3, n=4, seed=0):
    embedder = nn.Linear(2 * 3 * 3, 5).double()
    torch.nn.init.normal_(embedder.weight, generator=generator(seed))
    images = torch.randn(n, 2, 3, 3, generator=generator(seed + 1), dtype=torch.float64)
    sla = SLARegularizer()
    sla.build(feature_dim=5, num_classes=num_classes)
    sla.double()
    torch.nn.init.normal_(sla.joint_head.weight, generator=generator(seed + 2))

    def embed(batch):
        return embedder(batch.flatten(1))

    context = RegularizerContext(images=images, features=embed(images), classify=None, embed=embed)
    return sla, context


def hand_joint_log_probabilities(sla, context):
    """[i][r] -> the 4C joint log-probabilities of image i rotated by r quarter turns, one image at a time."""
    rows = []
    for image in context.images:
        per_rotation = []
        for r in range(4):
            joint = sla.joint_head(context.embed(torch.rot90(image, r, dims=(1, 2)).unsqueeze(0)))[0].tolist()
            per_rotation.append([math.log(p) for p in softmax(joint)])
        rows.append(per_rotation)
    return rows


def test_sla_build_creates_a_joint_head_with_four_outputs_per_class():
    sla = SLARegularizer()
    sla.build(feature_dim=7, num_classes=10)
    assert (sla.joint_head.in_features, sla.joint_head.out_features) == (7, 40)
    assert sum(p.numel() for p in sla.parameters()) == 7 * 40 + 40  # registered, so the optimizer trains it


def test_sla_joint_cross_entropy_with_class_indices_matches_a_loop_over_rotations():
    sla, context = sla_setup()
    target = torch.tensor([0, 2, 1, 2])
    logp = hand_joint_log_probabilities(sla, context)
    expected = -sum(logp[i][r][int(y) * 4 + r] for i, y in enumerate(target) for r in range(4)) / (4 * 4)
    term = sla(torch.zeros(4, 3, dtype=torch.float64), target, context)
    assert term.item() == pytest.approx(expected, rel=1e-10)


def test_sla_soft_targets_use_the_joint_target_y_outer_onehot_rotation():
    sla, context = sla_setup()
    target = torch.softmax(torch.randn(4, 3, generator=generator(9), dtype=torch.float64), dim=1)
    logp = hand_joint_log_probabilities(sla, context)
    expected = 0.0
    for i in range(4):
        for r in range(4):
            joint_target = [target[i, c].item() * (rotation == r) for c in range(3) for rotation in range(4)]
            expected -= sum(t * lp for t, lp in zip(joint_target, logp[i][r]))
    term = SLARegularizer.forward(sla, torch.zeros(4, 3, dtype=torch.float64), target, context)
    assert term.item() == pytest.approx(expected / 16, rel=1e-10)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 2]), 3).double()
    assert sla(None, one_hot, context).item() == pytest.approx(
        sla(None, torch.tensor([0, 2, 1, 2]), context).item()
    )


def hand_aggregated(sla, context):
    aggregated = []
    for image in context.images:
        logits = [0.0] * 3
        for r in range(4):
            joint = sla.joint_head(context.embed(torch.rot90(image, r, dims=(1, 2)).unsqueeze(0)))[0].tolist()
            for c in range(3):
                logits[c] += joint[c * 4 + r] / 4
        aggregated.append(logits)
    return aggregated


def test_sla_aggregated_inference_averages_the_joint_logits_of_each_rotation_at_its_rotation():
    sla, context = sla_setup()
    logits = sla.evaluation_logits(context.images, context)
    assert torch.allclose(
        logits, torch.tensor(hand_aggregated(sla, context), dtype=torch.float64), rtol=1e-12
    )


def test_sla_self_distillation_adds_t_squared_kl_from_the_aggregated_to_the_main_head():
    sla, context = sla_setup()
    distilled = SLARegularizer(coefficient=0.5, self_distillation=True, temperature=2.0)
    distilled.joint_head = sla.joint_head
    main_logits = torch.randn(4, 3, generator=generator(4), dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 0, 2, 2])
    term = distilled(main_logits, target, context)
    kl_sum = sum(kl(softmax([z / 2 for z in agg]), softmax([z / 2 for z in main]))
                 for agg, main in zip(hand_aggregated(sla, context), main_logits.tolist()))  # fmt: skip
    expected = 0.5 * (sla(main_logits, target, context).item() + 4.0 * kl_sum / 4)
    assert term.item() == pytest.approx(expected, rel=1e-10)
    term.backward()
    assert main_logits.grad is not None and main_logits.grad.abs().sum() > 0


def test_sla_refuses_non_square_images():
    sla, context = sla_setup()
    with pytest.raises(ValueError, match="regularizer=sla.*square"):
        sla.evaluation_logits(torch.zeros(2, 2, 3, 4, dtype=torch.float64), context)


# --- entropy_min and logit_penalty -------------------------------------------------------------------------


@pytest.mark.parametrize("coefficient", [0.1, -0.3])
def test_entropy_min_is_the_coefficient_times_the_mean_entropy(coefficient):
    logits = torch.randn(6, 5, generator=generator(), dtype=torch.float64) * 3
    entropy = sum(-sum(p * math.log(p) for p in softmax(row)) for row in logits.tolist()) / 6
    term = EntropyMinimizationRegularizer(coefficient)(logits, torch.zeros(6, dtype=torch.long))
    assert term.item() == pytest.approx(coefficient * entropy, rel=1e-10)


def test_logit_penalty_on_logits_is_the_mean_squared_norm_and_needs_no_context():
    logits = torch.randn(6, 5, generator=generator(), dtype=torch.float64)
    penalty = LogitPenaltyRegularizer(0.01)
    assert not penalty.needs_context
    expected = 0.01 * sum(sum(z * z for z in row) for row in logits.tolist()) / 6
    assert penalty(logits, torch.zeros(6, dtype=torch.long)).item() == pytest.approx(expected, rel=1e-12)


def test_logit_penalty_on_features_uses_the_context_features():
    features = torch.randn(6, 9, generator=generator(), dtype=torch.float64)
    penalty = LogitPenaltyRegularizer(0.01, norm_of="features")
    assert penalty.needs_context
    context = RegularizerContext(images=None, features=features, classify=None, embed=None)
    expected = 0.01 * sum(sum(v * v for v in row) for row in features.tolist()) / 6
    term = penalty(torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, dtype=torch.long), context)
    assert term.item() == pytest.approx(expected, rel=1e-12)


def test_every_term_accepts_soft_targets():
    model = LinearSoftmax(classes=3, dims=(1, 3, 3))
    images = model.images(4)
    hard = torch.tensor([0, 1, 2, 1])
    soft = torch.softmax(torch.randn(4, 3, generator=generator(), dtype=torch.float64), dim=1)
    sla = SLARegularizer()
    sla.build(9, 3)
    context = RegularizerContext(images=images, features=images.flatten(1), classify=model,
                                 embed=lambda batch: batch.flatten(1).float())  # fmt: skip
    logits = model(images)
    for term in (
        VATRegularizer(),
        sla,
        EntropyMinimizationRegularizer(),
        LogitPenaltyRegularizer(norm_of="features"),
    ):
        for target in (hard, soft):
            value = term(logits, target, context) if term.needs_context else term(logits, target)
            assert value.dim() == 0 and torch.isfinite(value), (type(term).__name__, target.dtype)


# --- configs -----------------------------------------------------------------------------------------------

TERMS = {
    "vat": (VATRegularizer, {"coefficient": 1.0, "eps": 8.0, "xi": 1e-6, "power_iterations": 1}),
    "sla": (SLARegularizer, {"coefficient": 1.0, "self_distillation": False, "temperature": 1.0}),
    "entropy_min": (EntropyMinimizationRegularizer, {"coefficient": 0.1}),
    "logit_penalty": (LogitPenaltyRegularizer, {"coefficient": 1e-4, "norm_of": "logits"}),
}


def test_each_yaml_instantiates_its_term_with_the_documented_defaults(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name, (cls, defaults) in TERMS.items():
            cfg = compose_config([f"regularizer={name}"], tmp_path, initialized=True)
            assert list(cfg.regularizer) == [name]
            term = hydra.utils.instantiate(cfg.regularizer[name])
            assert type(term) is cls
            assert {key: getattr(term, key) for key in defaults} == defaults


def test_terms_compose_together_with_palm_zloss(tmp_path):
    cfg = compose_config(["regularizer=[palm_zloss,vat]", "regularizer.vat.eps=2.0"], tmp_path)
    assert list(cfg.regularizer) == ["palm_zloss", "vat"]
    terms = {name: hydra.utils.instantiate(node) for name, node in cfg.regularizer.items()}
    assert isinstance(terms["palm_zloss"], PaLMZLossRegularizer) and not terms["palm_zloss"].needs_context
    assert isinstance(terms["vat"], VATRegularizer) and terms["vat"].eps == 2.0 and terms["vat"].needs_context
    cfg = compose_config(["regularizer=[palm_zloss,vat,sla,entropy_min,logit_penalty]"], tmp_path)
    assert list(cfg.regularizer) == ["palm_zloss", "vat", "sla", "entropy_min", "logit_penalty"]


@pytest.mark.parametrize(
    ("cls", "kwargs", "option"),
    [
        (VATRegularizer, {"coefficient": -1.0}, "vat.coefficient"),
        (VATRegularizer, {"eps": 0.0}, "vat.eps"),
        (VATRegularizer, {"xi": -1e-6}, "vat.xi"),
        (VATRegularizer, {"power_iterations": 0}, "vat.power_iterations"),
        (VATRegularizer, {"power_iterations": 1.5}, "vat.power_iterations"),
        (SLARegularizer, {"coefficient": -0.1}, "sla.coefficient"),
        (SLARegularizer, {"self_distillation": "yes"}, "sla.self_distillation"),
        (SLARegularizer, {"temperature": 0.0}, "sla.temperature"),
        (EntropyMinimizationRegularizer, {"coefficient": float("nan")}, "entropy_min.coefficient"),
        (LogitPenaltyRegularizer, {"coefficient": -1e-4}, "logit_penalty.coefficient"),
        (LogitPenaltyRegularizer, {"norm_of": "weights"}, "logit_penalty.norm_of"),
    ],
)
def test_bad_option_raises_config_error_naming_it(cls, kwargs, option):
    with pytest.raises(ConfigError, match=re.escape(f"regularizer.{option}=")):
        cls(**kwargs)
