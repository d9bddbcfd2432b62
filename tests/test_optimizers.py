"""The optimizers of losslab.optimizers against hand-computed updates, their configs, the linear schedule and
the EMA callback (its evaluated weights against the EMA recurrence in float64)."""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIG_DIR, compose_config
from losslab import optim
from losslab.errors import ConfigError
from losslab.optimizers import ASAM, LARS, SAM, SWATS, EMAWeightAveraging, Lion, MoMo

CONFIGS = Path(CONFIG_DIR)
NEW_OPTIMIZERS = ("lion", "lars", "sam", "asam", "swats", "momo")


def parameter(values, grad=None) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    if grad is not None:
        p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def tiny_regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    return model, torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(mse(model, x, y), list(model.parameters())))


def closure_for(optimizer, model, x, y):
    def closure():
        optimizer.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    return closure


# Lion


def test_lion_two_steps_match_the_paper_update():
    lr, beta1, beta2, wd = 0.1, 0.9, 0.99, 0.5
    w = parameter([1.0, -2.0, 0.0, 3.0])
    optimizer = Lion([w], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    g1, g2 = torch.tensor([0.3, -0.1, 0.0, 2.0]).double(), torch.tensor([-1.0, -0.2, 0.5, -0.01]).double()
    expected = w.detach().clone()
    m = torch.zeros(4, dtype=torch.float64)
    for g in (g1, g2):
        w.grad = g.clone()
        optimizer.step()
        update = torch.sign(beta1 * m + (1 - beta1) * g)
        expected = expected - lr * (update + wd * expected)
        m = beta2 * m + (1 - beta2) * g
        torch.testing.assert_close(w.detach(), expected)


# LARS


def test_lars_scales_matrices_by_the_trust_ratio_and_leaves_biases_to_plain_momentum_sgd():
    lr, momentum, wd, eta = 0.5, 0.9, 0.01, 0.001
    weight = parameter([[3.0, 4.0], [0.0, 0.0]], grad=[[0.6, 0.0], [0.0, 0.8]])
    bias = parameter([1.0, -1.0], grad=[0.5, 0.25])
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    optimizer = LARS([weight, bias], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    optimizer.step()
    trust = eta * 5.0 / (1.0 + wd * 5.0)  # ||w|| = 5, ||g|| = 1
    velocity_w = lr * trust * (weight.grad + wd * w0)
    velocity_b = lr * bias.grad  # excluded: no trust ratio, no weight decay
    torch.testing.assert_close(weight.detach(), w0 - velocity_w)
    torch.testing.assert_close(bias.detach(), b0 - velocity_b)
    # Second step with the same gradients: the velocities accumulate with momentum.
    w1, b1 = weight.detach().clone(), bias.detach().clone()
    optimizer.step()
    trust = eta * w1.norm() / (weight.grad.norm() + wd * w1.norm())
    torch.testing.assert_close(
        weight.detach(), w1 - (momentum * velocity_w + lr * trust * (weight.grad + wd * w1))
    )
    torch.testing.assert_close(bias.detach(), b1 - (momentum * velocity_b + lr * bias.grad))


def test_lars_adapts_biases_too_when_exclusion_is_off():
    bias = parameter([3.0, 4.0], grad=[0.0, 2.0])
    LARS([bias], lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.1, exclude_bias_and_norm=False).step()
    torch.testing.assert_close(bias.detach(), torch.tensor([3.0, 4.0]).double() - 0.1 * 5.0 / 2.0 * bias.grad)


# SAM and ASAM


class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the weights and gradients it stepped from."""

    def step(self, closure=None):
        self.seen = [
            (p.detach().clone(), p.grad.detach().clone()) for g in self.param_groups for p in g["params"]
        ]
        return super().step(closure)


def manual_sam_gradients(model, x, y, rho, eta=None):
    """The gradient at w + e, e = rho g/||g|| (SAM) or rho T²g/||Tg||, T = |w| + eta (ASAM), on a copy."""
    copy_ = copy.deepcopy(model)
    g = gradients(copy_, x, y)
    scales = [torch.ones_like(p) if eta is None else p.detach().abs() + eta for p in copy_.parameters()]
    norm = torch.sqrt(sum(((s * gi) ** 2).sum() for s, gi in zip(scales, g)))
    perturbations = [rho * s * s * gi / norm for s, gi in zip(scales, g)]
    with torch.no_grad():
        for p, e in zip(copy_.parameters(), perturbations):
            p.add_(e)
    return gradients(copy_, x, y), perturbations


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_base_step_uses_the_gradient_at_the_perturbed_weights_from_the_restored_weights(adaptive):
    model, x, y = tiny_regression()
    rho, eta, lr = 0.3, 0.05, 0.1
    original = [p.detach().clone() for p in model.parameters()]
    expected_grads, _ = manual_sam_gradients(model, x, y, rho, eta if adaptive else None)
    factory = partial(RecordingSGD, lr=lr)
    optimizer = (
        ASAM(model.parameters(), factory, rho=rho, eta=eta)
        if adaptive
        else SAM(model.parameters(), factory, rho=rho)
    )
    loss = optimizer.step(closure_for(optimizer, model, x, y))
    assert torch.isfinite(loss)  # the loss at w, from the first pass
    for (weights_seen, grad_seen), w0, g_expected, p in zip(
        optimizer.base_optimizer.seen, original, expected_grads, model.parameters()
    ):
        torch.testing.assert_close(weights_seen, w0)  # restored before the base step
        torch.testing.assert_close(grad_seen, g_expected)
        torch.testing.assert_close(p.detach(), w0 - lr * g_expected)


def test_sam_first_step_adds_the_perturbation_and_second_step_restores_exactly():
    model, x, y = tiny_regression(1)
    original = [p.detach().clone() for p in model.parameters()]
    _, perturbations = manual_sam_gradients(model, x, y, rho=0.05)
    optimizer = SAM(model.parameters(), partial(torch.optim.SGD, lr=0.0), rho=0.05)
    mse(model, x, y).backward()
    optimizer.first_step()
    assert optimizer.perturbed
    for p, w0, e in zip(model.parameters(), original, perturbations):
        torch.testing.assert_close(p.detach(), w0 + e)
        assert p.grad is None  # zeroed for the second backward
    mse(model, x, y).backward()
    optimizer.second_step()  # lr 0: only the restore shows
    assert not optimizer.perturbed
    for p, w0 in zip(model.parameters(), original):
        assert torch.equal(p.detach(), w0)


def test_asam_first_step_perturbs_by_the_adaptive_formula():
    w = parameter([2.0, -0.5, 0.0], grad=[1.0, 1.0, -3.0])
    rho, eta = 0.5, 0.01
    ASAM([w], partial(torch.optim.SGD, lr=0.1), rho=rho, eta=eta).first_step()
    t = torch.tensor([2.0, 0.5, 0.0]).double() + eta
    g = torch.tensor([1.0, 1.0, -3.0]).double()
    expected = torch.tensor([2.0, -0.5, 0.0]).double() + rho * t * t * g / torch.linalg.norm(t * g)
    torch.testing.assert_close(w.detach(), expected)


def test_sam_with_zero_gradient_does_not_perturb_or_produce_nan():
    w = parameter([1.0, 2.0], grad=[0.0, 0.0])
    optimizer = SAM([w], partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)
    optimizer.first_step(zero_grad=False)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]).double())
    optimizer.second_step()
    assert torch.isfinite(w).all() and torch.equal(w.detach(), torch.tensor([1.0, 2.0]).double())


def test_sam_shares_param_groups_with_its_base_optimizer_so_schedulers_act_on_it():
    model, _, _ = tiny_regression()
    optimizer = SAM(model.parameters(), partial(torch.optim.SGD, lr=0.2, momentum=0.9), rho=0.05)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.param_groups[0]["rho"] == 0.05 and optimizer.param_groups[0]["momentum"] == 0.9
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert scheduler.get_last_lr() == [pytest.approx(0.1)]


def test_sam_state_dict_round_trip_resumes_identically():
    model, x, y = tiny_regression()
    factory = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    optimizer = SAM(model.parameters(), factory, rho=0.05)
    for _ in range(3):
        optimizer.step(closure_for(optimizer, model, x, y))
    resumed_model = copy.deepcopy(model)
    resumed = SAM(resumed_model.parameters(), factory, rho=0.05)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    optimizer.step(closure_for(optimizer, model, x, y))
    resumed.step(closure_for(resumed, resumed_model, x, y))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q)


def test_sam_declares_two_passes_and_momo_declares_it_needs_the_loss():
    assert SAM.two_pass and ASAM.two_pass and MoMo.needs_loss
    assert not getattr(Lion, "two_pass", False) and not getattr(SWATS, "needs_loss", False)


# SWATS


def reference_swats_switch(w0, a, lr, betas, eps, switch_epsilon, max_steps):
    """Keskar & Socher's Algorithm 1 on f(w) = ½ Σ a w², float64: (step of the switch, Λ)."""
    beta1, beta2 = betas
    w, m, v, lam = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), 0.0
    for k in range(1, max_steps + 1):
        g = a * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = -lr * math.sqrt(1 - beta2**k) / (1 - beta1**k) * m / (v.sqrt() + eps)
        w = w + p
        if float(p @ g) != 0:
            gamma = float(p @ p) / -float(p @ g)
            lam = beta2 * lam + (1 - beta2) * gamma
            if k > 1 and abs(lam / (1 - beta2**k) - gamma) < switch_epsilon:
                return k, lam / (1 - beta2**k)
    return None, None


def test_swats_switches_on_a_quadratic_and_then_follows_momentum_sgd():
    a = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    settings = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "switch_epsilon": 1e-5}
    expected_step, expected_lr = reference_swats_switch(w0, a, max_steps=500, **settings)
    assert expected_step is not None and expected_step > 2
    w = nn.Parameter(w0.clone())
    optimizer = SWATS([w], **settings)

    def step():
        optimizer.zero_grad()
        loss = 0.5 * (a * w * w).sum()
        loss.backward()
        optimizer.step()
        return loss.item()

    while optimizer.switched_at is None:
        step()
        assert optimizer.param_groups[0]["step"] <= expected_step
    assert optimizer.switched_at == expected_step
    assert optimizer.param_groups[0]["sgd_lr"] == pytest.approx(expected_lr, rel=1e-9)
    loss_at_switch = 0.5 * float((a * w.detach() ** 2).sum())
    velocity = torch.zeros_like(w0)
    for _ in range(5):
        before = w.detach().clone()
        step()
        velocity = 0.9 * velocity + a * before
        torch.testing.assert_close(w.detach(), before - 0.1 * expected_lr * velocity)
    for _ in range(300):
        last = step()
    assert last < loss_at_switch / 2


def test_swats_switch_survives_a_state_dict_round_trip():
    w = parameter([1.0])
    optimizer = SWATS([w])
    optimizer.param_groups[0].update(switched_at=7, sgd_lr=0.3, lr_at_switch=1e-3)
    restored = SWATS([parameter([1.0])])
    restored.load_state_dict(optimizer.state_dict())
    assert restored.switched_at == 7 and restored.param_groups[0]["sgd_lr"] == 0.3


# MoMo


def test_momo_first_step_is_the_truncated_polyak_step_with_decoupled_weight_decay():
    lr, wd, lb = 0.8, 0.1, 0.2
    w = parameter([1.0, -2.0])
    optimizer = MoMo([w], lr=lr, momentum=0.9, lb=lb, weight_decay=wd)

    def closure():
        optimizer.zero_grad()
        loss = (w[0] - 3.0) ** 2 + 0.5 * w[1] ** 2
        loss.backward()
        return loss

    w0 = w.detach().clone()
    f0 = float((w0[0] - 3.0) ** 2 + 0.5 * w0[1] ** 2)
    g0 = torch.stack([2 * (w0[0] - 3.0), w0[1]])
    decay = 1 + lr * wd
    # First step: f̄ = f, d = g, γ̄ = <g, w>.
    tau = min(lr, max(decay * (f0 - lb - float(g0 @ w0)) + float(g0 @ w0), 0.0) / float(g0 @ g0))
    optimizer.step(closure)
    w1 = (w0 - tau * g0) / decay
    torch.testing.assert_close(w.detach(), w1)
    # Second step: the momentum averages with beta.
    f1 = float((w1[0] - 3.0) ** 2 + 0.5 * w1[1] ** 2)
    g1 = torch.stack([2 * (w1[0] - 3.0), w1[1]])
    f_bar, d, gamma = 0.9 * f0 + 0.1 * f1, 0.9 * g0 + 0.1 * g1, 0.9 * float(g0 @ w0) + 0.1 * float(g1 @ w1)
    tau = min(lr, max(decay * (f_bar - lb - gamma) + float(d @ w1), 0.0) / float(d @ d))
    optimizer.step(closure)
    torch.testing.assert_close(w.detach(), (w1 - tau * d) / decay)


def test_momo_reduces_a_quadratic_and_needs_a_closure():
    torch.manual_seed(0)
    a, b = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = MoMo([w], lr=1.0)
    minimum = float(0.5 * ((a @ torch.linalg.lstsq(a, b).solution - b) ** 2).sum())

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * ((a @ w - b) ** 2).sum()
        loss.backward()
        return loss

    start = float(closure())
    for _ in range(100):
        optimizer.step(closure)
    assert float(closure()) - minimum < 0.05 * (start - minimum)
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step()


# Validation


@pytest.mark.parametrize(
    "build, option",
    [
        (lambda p: Lion(p, lr=-1.0), "optimizer.lr"),
        (lambda p: Lion(p, betas=(1.0, 0.99)), "optimizer.betas"),
        (lambda p: LARS(p, eta=0.0), "optimizer.eta"),
        (lambda p: LARS(p, momentum=1.0), "optimizer.momentum"),
        (lambda p: SAM(p, partial(torch.optim.SGD, lr=0.1), rho=-0.1), "optimizer.rho"),
        (lambda p: SAM(p, base_optimizer=None), "optimizer.base_optimizer"),
        (lambda p: ASAM(p, partial(torch.optim.SGD, lr=0.1), eta=-1.0), "optimizer.eta"),
        (lambda p: SWATS(p, switch_epsilon=0.0), "optimizer.switch_epsilon"),
        (lambda p: SWATS(p, weight_decay=-1e-4), "optimizer.weight_decay"),
        (lambda p: MoMo(p, momentum=1.0), "optimizer.momentum"),
        (lambda p: MoMo(p, lb=float("nan")), "optimizer.lb"),
        (lambda p: EMAWeightAveraging(decay=1.5), "callbacks.ema.decay"),
        (lambda p: EMAWeightAveraging(update_every_n_steps=0), "callbacks.ema.update_every_n_steps"),
    ],
)
def test_bad_hyperparameters_raise_config_errors_naming_the_option(build, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.") + "="):
        build([parameter([1.0])])


# Configs


@pytest.mark.parametrize("name", NEW_OPTIMIZERS)
def test_every_new_optimizer_config_instantiates_and_steps(name):
    factory = hydra.utils.instantiate(OmegaConf.load(CONFIGS / "optimizer" / f"{name}.yaml"))
    model, x, y = tiny_regression()
    optimizer = factory(params=model.parameters())
    assert type(optimizer).__name__.lower() == name
    if name in ("sam", "asam"):
        assert isinstance(optimizer.base_optimizer, torch.optim.SGD)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step(closure_for(optimizer, model, x, y))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["linear", "constant"])
def test_new_scheduler_configs_instantiate(name):
    factory = hydra.utils.instantiate(OmegaConf.load(CONFIGS / "scheduler" / f"{name}.yaml"))
    optimizer = torch.optim.SGD([parameter([1.0])], lr=0.5)
    scheduler = factory(optimizer, total_steps=20, steps_per_epoch=10)
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.LRScheduler)


def test_linear_schedule_warms_up_then_decays_linearly_to_the_floor():
    optimizer = torch.optim.SGD([parameter([1.0])], lr=2.0)
    scheduler = optim.linear(
        optimizer, total_steps=100, steps_per_epoch=10, warmup_epochs=1, min_lr_ratio=0.1
    )
    assert scheduler["interval"] == "step"
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    expected = {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 55: 2.0 * (1 - 0.9 * 45 / 90), 100: 0.2, 109: 0.2}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr), step
    with pytest.raises(ConfigError, match="scheduler.min_lr_ratio"):
        optim.linear(optimizer, total_steps=10, steps_per_epoch=1, min_lr_ratio=1.5)


def test_callbacks_ema_composes_to_the_default_callbacks_plus_ema(tmp_path):
    default = compose_config([], tmp_path).callbacks
    with_ema = compose_config(["callbacks=ema"], tmp_path).callbacks
    assert list(with_ema) == [*default, "ema"]
    assert all(with_ema[name] == default[name] for name in default)
    callback = hydra.utils.instantiate(with_ema.ema)
    assert isinstance(callback, EMAWeightAveraging) and callback.decay == 0.999


# EMA


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.raw_after_step, self.seen_in_validation, self.seen_in_test = [], [], []

    def weights(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.layer(x) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.raw_after_step.append(self.weights())

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.weights())

    def test_step(self, batch, batch_idx):
        self.seen_in_test.append(self.weights())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ema_callback_evaluates_the_float64_ema_recurrence(tmp_path):
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(5, 3), torch.randn(5, 1))
    loader = DataLoader(data, batch_size=1)
    decay = 0.6
    module = TinyRegression()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, limit_test_batches=1,
        callbacks=[EMAWeightAveraging(decay=decay), checkpoint],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert len(module.raw_after_step) == 5
    ema = module.raw_after_step[0]
    for raw in module.raw_after_step[1:]:
        ema = decay * ema + (1 - decay) * raw
    assert not torch.allclose(ema, module.raw_after_step[-1], atol=1e-4)
    torch.testing.assert_close(module.seen_in_validation[-1], ema)  # validation during fit
    torch.testing.assert_close(module.weights(), ema)  # the weights after fit
    with torch.no_grad():  # test from the checkpoint, not from what fit left in the module
        for p in module.parameters():
            p.zero_()
    trainer.test(module, dataloaders=loader, ckpt_path=checkpoint.best_model_path, verbose=False)
    torch.testing.assert_close(module.seen_in_test[-1], ema)


class ManualSAM(L.LightningModule):
    """The training step the objective needs for SAM: first_step() between the two backwards, then the
    Lightning optimizer's step() (so that global_step, AMP and the hooks see a step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer, (x, y) = self.optimizers(), batch
        optimizer.zero_grad()
        self.manual_backward(((self.layer(x) - y) ** 2).mean())
        optimizer.optimizer.first_step()
        self.manual_backward(((self.layer(x) - y) ** 2).mean())
        optimizer.step()

    def configure_optimizers(self):
        return SAM(self.parameters(), partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)


def test_sam_under_lightning_manual_optimisation_matches_the_closure_loop_and_counts_steps():
    torch.manual_seed(1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    module = ManualSAM()
    reference = copy.deepcopy(module.layer)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=1))
    assert trainer.global_step == 4
    optimizer = SAM(reference.parameters(), partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)
    for i in range(4):
        optimizer.step(closure_for(optimizer, reference, x[i : i + 1], y[i : i + 1]))
    for p, q in zip(module.layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def _sam_objective():
    from losslab.losses import CrossEntropy
    from losslab.objective import Objective
    from reference import TinyBackbone

    torch.manual_seed(0)
    optimizer = partial(SAM, base_optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.05)
    return Objective(TinyBackbone(), CrossEntropy(), num_classes=3, optimizer=optimizer)


def _fit_fp16(module, scale: float | None) -> tuple[L.Trainer, torch.amp.GradScaler | None]:
    """SAM's two passes under fp16 autocast on CPU, with a GradScaler of fixed ``scale`` (None: no scaler)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from reference import Batches

    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
    torch.manual_seed(1)
    images, labels = torch.randn(12, 3, 2, 2), torch.randint(0, 3, (12,))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    trainer.fit(module, datamodule=Batches(images, labels))
    return trainer, scaler


def test_sam_under_an_fp16_grad_scaler_steps_as_without_one():
    """Both passes scaled by a power of two: e is scale-free and the scaler unscales once, so three steps land on
    the weights of the unscaled fp16 run (to fp16's rounding of the scaled losses), whatever the scale."""
    unscaled = _sam_objective()
    trainer, _ = _fit_fp16(unscaled, None)
    start = _sam_objective()
    for scale in (2.0**4, 2.0**12):
        module = _sam_objective()
        trainer, scaler = _fit_fp16(module, scale)
        assert trainer.global_step == 3 and scaler.get_scale() == scale  # no overflow, no skipped step
        for p, q, r in zip(module.parameters(), unscaled.parameters(), start.parameters()):
            assert not torch.equal(p, r)  # it trained
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_sam_step_skipped_by_an_overflowing_grad_scaler_leaves_the_weights_unperturbed():
    """A scale that overflows fp16 (2^40): the scaler skips every step and halves its scale each time; SAM's
    perturbation must not stay in the weights, which end exactly where they started."""
    module, start = _sam_objective(), _sam_objective()
    trainer, scaler = _fit_fp16(module, 2.0**40)
    assert trainer.global_step == 3 and scaler.get_scale() == 2.0**37
    for p, q in zip(module.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not module.optimizers().optimizer.perturbed
