"""KD, DKD, DHKD and KD++ (ND) against float64 loop computations of their papers' formulas, with gradient checks,
the identities the papers state, and the edge cases every classification loss must survive."""

import math

import pytest
import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.distillation import (
    DecoupledKD,
    DistillationLoss,
    DualHead,
    DualHeadKD,
    KnowledgeDistillation,
    NormDirectionKD,
    TeacherOutputs,
    decoupled_kd_terms,
    kd_divergence,
)

N, C, D = 6, 5, 4


def loop_softmax(row, temperature=1.0):
    scaled = [z / temperature for z in row]
    top = max(scaled)
    exps = [math.exp(z - top) for z in scaled]
    return [e / sum(exps) for e in exps]


def loop_kl(q, p):
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)


def loop_cross_entropy(row, target):
    return -sum(t * math.log(p) for t, p in zip(target, loop_softmax(row)) if t > 0)


def loop_kd(student, teacher, targets, alpha, temperature):
    total = 0.0
    for s, t, target in zip(student.tolist(), teacher.tolist(), targets.tolist()):
        kl = loop_kl(loop_softmax(t, temperature), loop_softmax(s, temperature))
        total += (1 - alpha) * loop_cross_entropy(s, target) + alpha * temperature**2 * kl
    return total / len(student)


def loop_tckd_nckd(s, t, c, temperature):
    """The paper's definitions for target class c: binary b = [p_c, 1 - p_c], p_hat over the other classes."""
    p, q = loop_softmax(s, temperature), loop_softmax(t, temperature)
    p_rest, q_rest = sum(p[:c] + p[c + 1 :]), sum(q[:c] + q[c + 1 :])
    tckd = loop_kl([q[c], q_rest], [p[c], p_rest])
    p_hat = [pj / p_rest for j, pj in enumerate(p) if j != c]
    q_hat = [qj / q_rest for j, qj in enumerate(q) if j != c]
    return temperature**2 * tckd, temperature**2 * loop_kl(q_hat, p_hat)


def loop_dkd(student, teacher, targets, alpha, beta, temperature):
    total = 0.0
    for s, t, target in zip(student.tolist(), teacher.tolist(), targets.tolist()):
        total += loop_cross_entropy(s, target)
        for c, weight in enumerate(target):
            if weight > 0:
                tckd, nckd = loop_tckd_nckd(s, t, c, temperature)
                total += weight * (alpha * tckd + beta * nckd)
    return total / len(student)


def loop_dhkd(student, auxiliary, teacher, targets, alpha, temperature):
    total = 0.0
    for s, a, t, target in zip(student.tolist(), auxiliary.tolist(), teacher.tolist(), targets.tolist()):
        binary_kl = 0.0
        for ac, tc in zip(a, t):
            sigma = 1 / (1 + math.exp(-(ac - tc) / temperature))
            binary_kl += 0.5 * math.log(0.5 / sigma) + 0.5 * math.log(0.5 / (1 - sigma))
        total += loop_cross_entropy(s, target) + alpha * temperature**2 * binary_kl
    return total / len(student)


def loop_nd_kd(student, teacher, f_s, f_t, means, targets, kd_weight, temperature, nd_weight):
    total = 0.0
    directions = [[m / math.sqrt(sum(x * x for x in mean)) for m in mean] for mean in means.tolist()]
    for s, t, fs, ft, target in zip(
        student.tolist(), teacher.tolist(), f_s.tolist(), f_t.tolist(), targets.tolist()
    ):
        kl = loop_kl(loop_softmax(t, temperature), loop_softmax(s, temperature))
        scale = max(math.sqrt(sum(x * x for x in fs)), math.sqrt(sum(x * x for x in ft)))
        nd = 0.0
        for c, weight in enumerate(target):
            nd += weight * (1 - sum(a * b for a, b in zip(fs, directions[c])) / scale)
        total += loop_cross_entropy(s, target) + kd_weight * temperature**2 * kl + nd_weight * nd
    return total / len(student)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(N, C, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(N, C, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    soft = torch.softmax(torch.randn(N, C, generator=generator, dtype=torch.float64), dim=1)
    f_s = torch.randn(N, D, generator=generator, dtype=torch.float64)
    f_t = torch.randn(N, D, generator=generator, dtype=torch.float64) * 2
    means = torch.randn(C, D, generator=generator, dtype=torch.float64)
    return student, teacher, labels, soft, f_s, f_t, means


def one_hot(labels):
    return F.one_hot(labels, C).double()


def nd_kd(means, **kwargs):
    loss = NormDirectionKD(**kwargs)
    loss.set_teacher_class_means(means)
    loss.class_directions = loss.class_directions.double()
    return loss


def dhkd(**kwargs):
    loss = DualHeadKD(**kwargs)
    loss.build_head(D, C).double()
    return loss


def all_losses(means):
    """Each loss (warm-up done) and how it is called on the batch fixture's tensors."""
    return {
        "kd": KnowledgeDistillation(),
        "dkd": DecoupledKD(warmup_epochs=0),
        "dhkd": dhkd(),
        "nd_kd": nd_kd(means, warmup_epochs=0),
    }


# value and gradient against the loops -----------------------------------------------------------------------------


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("alpha,temperature", [(0.9, 4.0), (0.5, 1.0), (1.0, 2.5)])
def test_kd_matches_loop_reference_and_gradcheck(batch, soft_targets, alpha, temperature):
    student, teacher, labels, soft, *_ = batch
    target = soft if soft_targets else labels
    loss = KnowledgeDistillation(alpha=alpha, temperature=temperature)
    value = loss(student, target, TeacherOutputs(teacher, teacher))
    reference = loop_kd(student, teacher, soft if soft_targets else one_hot(labels), alpha, temperature)
    assert value.item() == pytest.approx(reference, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda z: loss(z, target, TeacherOutputs(teacher, teacher)), student.clone().requires_grad_()
    )


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_loop_reference_and_gradcheck(batch, soft_targets, alpha, beta, temperature):
    student, teacher, labels, soft, *_ = batch
    target = soft if soft_targets else labels
    loss = DecoupledKD(alpha=alpha, beta=beta, temperature=temperature, warmup_epochs=0)
    value = loss(student, target, TeacherOutputs(teacher, teacher))
    reference = loop_dkd(
        student, teacher, soft if soft_targets else one_hot(labels), alpha, beta, temperature
    )
    assert value.item() == pytest.approx(reference, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda z: loss(z, target, TeacherOutputs(teacher, teacher)), student.clone().requires_grad_()
    )


def test_dkd_terms_match_the_papers_definitions_for_every_target_class(batch):
    student, teacher, *_ = batch
    tckd, nckd = decoupled_kd_terms(student, teacher, 4.0)
    for i in range(N):
        for c in range(C):
            expected = loop_tckd_nckd(student[i].tolist(), teacher[i].tolist(), c, 4.0)
            assert (tckd[i, c].item(), nckd[i, c].item()) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_kd_is_tckd_plus_one_minus_teacher_target_probability_times_nckd(batch):
    # Zhao et al. 2022: KD = TCKD + (1 - p_t^T) NCKD, whichever class is the target
    student, teacher, *_ = batch
    tckd, nckd = decoupled_kd_terms(student, teacher, 4.0)
    q = torch.softmax(teacher / 4.0, dim=1)
    kd = kd_divergence(student, teacher, 4.0)
    torch.testing.assert_close(tckd + (1 - q) * nckd, kd[:, None].expand(N, C), rtol=1e-12, atol=1e-12)


def test_dkd_with_alpha_1_and_beta_1_minus_q_t_is_kd_with_alpha_1(batch):
    student, teacher, labels, *_ = batch
    tckd, nckd = decoupled_kd_terms(student, teacher, 4.0)
    q_t = torch.softmax(teacher / 4.0, dim=1).gather(1, labels[:, None]).squeeze(1)
    coupled = tckd.gather(1, labels[:, None]).squeeze(1) + (1 - q_t) * nckd.gather(
        1, labels[:, None]
    ).squeeze(1)
    kd = KnowledgeDistillation(alpha=1.0, temperature=4.0)
    assert coupled.mean().item() == pytest.approx(
        kd(student, labels, TeacherOutputs(teacher, teacher)).item()
    )


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("alpha,temperature", [(1.0, 2.0), (0.1, 4.0)])
def test_dhkd_matches_loop_reference_and_gradcheck(batch, soft_targets, alpha, temperature):
    _student_logits, teacher, labels, soft, f_s, *_ = batch
    target = soft if soft_targets else labels
    loss = dhkd(alpha=alpha, temperature=temperature)
    main, auxiliary = loss.head(f_s), loss.head.auxiliary(f_s)
    value = loss(main, target, TeacherOutputs(teacher, teacher), features=f_s)
    reference = loop_dhkd(
        main, auxiliary, teacher, soft if soft_targets else one_hot(labels), alpha, temperature
    )
    assert value.item() == pytest.approx(reference, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda f: loss(loss.head(f), target, TeacherOutputs(teacher, teacher), features=f),
        f_s.clone().requires_grad_(),
    )


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize(
    "kd_weight,temperature,nd_weight", [(1.0, 4.0, 2.0), (0.0, 4.0, 1.0), (3.5, 2.0, 0.5)]
)
def test_nd_kd_matches_loop_reference_and_gradcheck(batch, soft_targets, kd_weight, temperature, nd_weight):
    student, teacher, labels, soft, f_s, f_t, means = batch
    target = soft if soft_targets else labels
    loss = nd_kd(means, kd_weight=kd_weight, temperature=temperature, nd_weight=nd_weight, warmup_epochs=0)
    value = loss(student, target, TeacherOutputs(teacher, f_t), features=f_s)
    reference = loop_nd_kd(student, teacher, f_s, f_t, means, soft if soft_targets else one_hot(labels), kd_weight,
                           temperature, nd_weight)  # fmt: skip
    assert value.item() == pytest.approx(reference, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda z, f: loss(z, target, TeacherOutputs(teacher, f_t), features=f),
        (student.clone().requires_grad_(), f_s.clone().requires_grad_()),
    )


# hand-made cases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd"])
def test_distillation_term_is_zero_with_zero_gradient_when_student_equals_teacher(batch, key):
    student, _, labels, _, f_s, _, means = batch
    loss = all_losses(means)[key]
    logits = loss.head.auxiliary(f_s).detach() if key == "dhkd" else student
    features = f_s.clone().requires_grad_()
    z = logits.clone().requires_grad_()
    _, distillation = loss.distillation_terms(z, labels, TeacherOutputs(logits, f_s), features=features)
    assert distillation.item() == pytest.approx(0.0, abs=1e-12)
    distillation.backward()
    gradient = features.grad if key == "dhkd" else z.grad
    assert gradient.abs().max().item() < 1e-12


def test_nd_is_zero_for_features_along_the_class_mean_longer_than_the_teachers(batch):
    *_, means = batch
    labels = torch.arange(C)
    direction = F.normalize(means, dim=1)
    teacher = TeacherOutputs(torch.zeros(C, C, dtype=torch.float64), 2.0 * direction)  # teacher norm 2
    loss = nd_kd(means, kd_weight=0.0, nd_weight=1.0, warmup_epochs=0)
    uniform = torch.zeros(C, C, dtype=torch.float64)
    ce = math.log(C)
    assert loss(uniform, labels, teacher, features=3.0 * direction).item() == pytest.approx(ce)  # ND = 0
    # shorter than the teacher's: ND = 1 - |f_s| / |f_t| rewards the norm
    assert loss(uniform, labels, teacher, features=0.5 * direction).item() == pytest.approx(ce + 0.75)
    # opposite direction: ND = 1 + 1
    assert loss(uniform, labels, teacher, features=-3.0 * direction).item() == pytest.approx(ce + 2.0)


def test_nd_kd_projects_student_features_of_another_width_with_a_trained_linear_layer(batch):
    student, teacher, labels, *_ = batch
    loss = NormDirectionKD(warmup_epochs=0)
    loss.setup_distillation(student_feature_dim=3, teacher_feature_dim=D)
    loss.set_teacher_class_means(torch.randn(C, D))
    assert [tuple(p.shape) for p in loss.parameters()] == [(D, 3), (D,)]
    features = torch.randn(N, 3, requires_grad=True)
    value = loss(
        student.float(), labels, TeacherOutputs(teacher.float(), torch.randn(N, D)), features=features
    )
    value.backward()
    assert loss.projection.weight.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    same_width = NormDirectionKD()
    same_width.setup_distillation(D, D)
    assert list(same_width.parameters()) == []


def test_nd_kd_refuses_features_it_cannot_compare_with_the_class_means(batch):
    student, teacher, labels, *_ = batch
    loss = NormDirectionKD()
    loss.set_teacher_class_means(torch.randn(C, D))
    with pytest.raises(TypeError, match="setup_distillation"):
        loss(
            student.float(),
            labels,
            TeacherOutputs(teacher.float(), torch.randn(N, D)),
            features=torch.randn(N, 3),
        )
    with pytest.raises(TypeError, match="set_teacher_class_means"):
        NormDirectionKD()(student, labels, TeacherOutputs(teacher, teacher), features=torch.randn(N, D))


def test_class_means_are_not_saved_in_checkpoints_but_the_projection_is():
    loss = NormDirectionKD()
    loss.setup_distillation(3, D)
    loss.set_teacher_class_means(torch.randn(C, D))
    assert set(loss.state_dict()) == {"projection.weight", "projection.bias"}


def test_dhkd_metrics_see_the_main_head_and_distillation_reaches_only_the_auxiliary_head(batch):
    _, teacher, labels, _, f_s, *_ = batch
    loss = dhkd()
    head = loss.head
    assert isinstance(head, DualHead) and list(loss.parameters()) == []  # the training module owns the head
    features = f_s.clone().requires_grad_()
    logits = head(features)
    torch.testing.assert_close(logits, head.main(features))
    task, distillation = loss.distillation_terms(
        logits, labels, TeacherOutputs(teacher, teacher), features=features
    )
    distillation.backward(retain_graph=True)
    assert all(p.grad is None for p in head.main.parameters())
    assert all(p.grad.abs().sum() > 0 for p in head.auxiliary.parameters())
    assert features.grad.abs().sum() > 0  # the backbone learns from the teacher
    head.zero_grad(set_to_none=True)
    task.backward()
    assert all(p.grad is None for p in head.auxiliary.parameters())
    assert all(p.grad.abs().sum() > 0 for p in head.main.parameters())


def test_dhkd_nonlinear_auxiliary_head_is_the_authors_classifier():
    head = DualHeadKD(auxiliary_head="nonlinear").build_head(16, C)
    layers = [type(layer).__name__ for layer in head.auxiliary]
    assert (
        layers == ["Linear", "Dropout", "BatchNorm1d", "ReLU", "Linear"]
        and head.auxiliary[0].out_features == 200
    )


def test_dkd_and_nd_kd_warm_up_the_distillation_term_linearly_over_the_first_epochs(batch):
    student, teacher, labels, *_ = batch
    outputs = TeacherOutputs(teacher, teacher)
    for loss in (DecoupledKD(warmup_epochs=20), NormDirectionKD(warmup_epochs=20, nd_weight=0.0)):
        if isinstance(loss, NormDirectionKD):
            loss.set_teacher_class_means(torch.randn(C, C, dtype=torch.float64))
            loss.class_directions = loss.class_directions.double()
        full = (
            loss.distillation_terms(student, labels, outputs, features=teacher)[1].item() * 20
        )  # epoch 0: 1/20
        for epoch, scale in [(0, 1 / 20), (4, 5 / 20), (19, 1.0), (100, 1.0)]:
            loss.set_epoch(epoch, 240)
            assert loss.distillation_terms(student, labels, outputs, features=teacher)[
                1
            ].item() == pytest.approx(scale * full)
    no_warmup = DecoupledKD(warmup_epochs=None)
    assert no_warmup.distillation_scale == 1.0


# what every distillation loss must do --------------------------------------------------------------------------------


def test_every_distillation_loss_declares_a_teacher_and_soft_targets(batch):
    *_, means = batch
    for key, loss in all_losses(means).items():
        assert isinstance(loss, DistillationLoss) and loss.needs_teacher and loss.kind == "classification", (
            key
        )
        assert loss.accepts_soft_targets, key
        assert loss.needs_teacher_class_means == (key == "nd_kd"), key


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd", "nd_kd"])
def test_forward_is_the_sum_of_the_task_and_distillation_terms(batch, key):
    student, teacher, labels, _, f_s, f_t, means = batch
    loss = all_losses(means)[key]
    outputs = TeacherOutputs(teacher, f_t)
    task, distillation = loss.distillation_terms(student, labels, outputs, features=f_s)
    assert loss(student, labels, outputs, features=f_s).item() == pytest.approx((task + distillation).item())


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd", "nd_kd"])
def test_one_hot_probabilities_give_exactly_the_value_on_class_indices(batch, key):
    student, teacher, labels, _, f_s, f_t, means = batch
    loss = all_losses(means)[key]
    outputs = TeacherOutputs(teacher, f_t)
    assert loss(student, one_hot(labels), outputs, features=f_s).item() == pytest.approx(
        loss(student, labels, outputs, features=f_s).item(), rel=1e-12
    )


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd", "nd_kd"])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_logits_of_magnitude_1e4_give_finite_value_and_gradient(batch, key, scale):
    _, _, labels, _, f_s, f_t, means = batch
    loss = all_losses(means.float())[key]
    logits = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0]] * N) * scale
    logits[::2, 0] = 0.0
    teacher = logits.flip(1) * 2  # confidently disagreeing
    features = (f_s.float() * scale).requires_grad_()
    logits.requires_grad_()
    if key == "dhkd":
        loss.head.float()
    value = loss(logits, labels, TeacherOutputs(teacher, f_t.float() * scale), features=features)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert features.grad is None or torch.isfinite(features.grad).all()  # kd and dkd do not use the features


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd", "nd_kd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(batch, key, dtype):
    student, teacher, labels, _, f_s, f_t, means = batch
    loss = all_losses(means.float())[key]
    if key == "dhkd":
        loss.head.float()
    half = (student * 4).to(dtype).requires_grad_()
    outputs = TeacherOutputs(teacher.to(dtype), f_t.to(dtype))
    value = loss(half, labels, outputs, features=f_s.to(dtype) if key == "nd_kd" else f_s.float())
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(half.grad.float()).all()
    reference = loss(half.detach().float(), labels, TeacherOutputs(outputs.logits.float(), outputs.features.float()),
                     features=f_s.to(dtype).float() if key == "nd_kd" else f_s.float())  # fmt: skip
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("key", ["kd", "dkd", "dhkd", "nd_kd"])
def test_all_equal_logits_give_finite_values_and_no_distillation_from_a_uniform_teacher(batch, key):
    _, _, labels, _, f_s, f_t, means = batch
    loss = all_losses(means)[key]
    equal = torch.full((N, C), 2.0, dtype=torch.float64, requires_grad=True)
    task, distillation = loss.distillation_terms(
        equal, labels, TeacherOutputs(equal.detach(), f_t), features=f_s
    )
    (task + distillation).backward()
    ce_weight = 1 - loss.alpha if key == "kd" else 1.0
    assert task.item() == pytest.approx(ce_weight * math.log(C)) and torch.isfinite(equal.grad).all()
    if key in ("kd", "dkd"):
        assert distillation.item() == pytest.approx(0.0, abs=1e-12)
    else:  # compared with the auxiliary head's logits (dhkd) or the features (nd_kd)
        assert torch.isfinite(distillation)


@pytest.mark.parametrize("key", ["kd", "dkd", "nd_kd"])
def test_a_single_class_gives_zero_loss_and_finite_gradient(key):
    logits = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    loss = {"kd": KnowledgeDistillation(), "dkd": DecoupledKD(warmup_epochs=0), "nd_kd": nd_kd(torch.ones(1, 2),
            nd_weight=0.0, warmup_epochs=0)}[key]  # fmt: skip
    teacher = TeacherOutputs(torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    value = loss(
        logits, torch.zeros(4, dtype=torch.long), teacher, features=torch.randn(4, 2, dtype=torch.float64)
    )
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(logits.grad).all()


def test_a_single_class_dhkd_is_finite():
    loss = dhkd()
    loss.build_head(D, 1).double()
    features = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    value = loss(loss.head(features), torch.zeros(4, dtype=torch.long),
                 TeacherOutputs(torch.randn(4, 1, dtype=torch.float64), features), features=features)  # fmt: skip
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(features.grad).all()


@pytest.mark.parametrize(
    "build,option",
    [
        (lambda: KnowledgeDistillation(temperature=0.0), "loss.temperature"),
        (lambda: KnowledgeDistillation(alpha=1.5), "loss.alpha"),
        (lambda: KnowledgeDistillation(alpha=-0.1), "loss.alpha"),
        (lambda: DecoupledKD(temperature=-1.0), "loss.temperature"),
        (lambda: DecoupledKD(alpha=-1.0), "loss.alpha"),
        (lambda: DecoupledKD(beta=-1.0), "loss.beta"),
        (lambda: DecoupledKD(warmup_epochs=2.5), "loss.warmup_epochs"),
        (lambda: DecoupledKD(warmup_epochs=-1), "loss.warmup_epochs"),
        (lambda: DualHeadKD(temperature=0.0), "loss.temperature"),
        (lambda: DualHeadKD(alpha=-1.0), "loss.alpha"),
        (lambda: DualHeadKD(auxiliary_head="mlp"), "loss.auxiliary_head"),
        (lambda: NormDirectionKD(temperature=0.0), "loss.temperature"),
        (lambda: NormDirectionKD(kd_weight=-1.0), "loss.kd_weight"),
        (lambda: NormDirectionKD(nd_weight=-1.0), "loss.nd_weight"),
    ],
)
def test_invalid_hyperparameters_are_refused_naming_the_option(build, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        build()
