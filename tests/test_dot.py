"""DOT (losslab.optimizers.DOT) against the official update computed by hand in float64, its config, the training
module's DOT step (distillation gradient first, then the task's) and the start-up checks naming optimizer=dot."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import CONFIG_DIR, run_training
from losslab.errors import ConfigError
from losslab.losses.distillation import DualHeadKD
from losslab.objective import Objective, separates_distillation
from losslab.optimizers import DOT
from losslab.teacher import Teacher
from reference import Batches, TinyBackbone

FAST = ["dataset=digits", "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_two_dot_steps_match_the_official_update_for_shared_task_only_and_distillation_only_tensors():
    lr, mu, delta, wd = 0.1, 0.9, 0.075, 0.01
    shared, task_only, kd_only = (nn.Parameter(tensor(v)) for v in ([1.0, -2.0], [0.5, 3.0], [-1.0, 4.0]))
    optimizer = DOT([shared, task_only, kd_only], lr=lr, momentum=mu, delta=delta, weight_decay=wd)
    gradients = [  # (task gradient of shared, distillation gradient of shared, task_only's, kd_only's) per step
        (tensor([0.3, -0.1]), tensor([1.0, 0.2]), tensor([-0.4, 0.7]), tensor([0.05, -2.0])),
        (tensor([-0.6, 0.8]), tensor([0.1, -0.5]), tensor([0.9, 0.2]), tensor([1.5, 0.25])),
    ]
    w_shared, w_task, w_kd = (p.detach().clone() for p in (shared, task_only, kd_only))
    for step, (g_task, g_kd, g_task_only, g_kd_only) in enumerate(gradients):
        shared.grad, task_only.grad, kd_only.grad = g_kd.clone(), None, g_kd_only.clone()
        optimizer.step_kd()
        shared.grad, task_only.grad, kd_only.grad = g_task.clone(), g_task_only.clone(), None
        optimizer.step()
        # The official rule (mdistiller/engine/dot.py): weight decay joins the task gradient; a tensor with both
        # gradients keeps mu - delta and mu + delta, one with a single gradient mu; buffers start at the gradient.
        if step == 0:
            b_task, b_kd = g_task + wd * w_shared, g_kd.clone()
            b_task_only = g_task_only + wd * w_task
            b_kd_only = g_kd_only.clone()  # no weight decay on a distillation-only first step
        else:
            b_task, b_kd = (mu - delta) * b_task + g_task + wd * w_shared, (mu + delta) * b_kd + g_kd
            b_task_only = mu * b_task_only + g_task_only + wd * w_task
            b_kd_only = mu * b_kd_only + g_kd_only + wd * w_kd
        w_shared, w_task, w_kd = w_shared - lr * (b_task + b_kd), w_task - lr * b_task_only, w_kd - lr * b_kd_only
        torch.testing.assert_close(shared.detach(), w_shared)
        torch.testing.assert_close(task_only.detach(), w_task)
        torch.testing.assert_close(kd_only.detach(), w_kd)


def test_with_delta_zero_dot_is_sgd_momentum_on_the_summed_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    reference = copy.deepcopy(model)
    dot = DOT(model.parameters(), lr=0.05, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def terms(net, x, y):
        out = net(x)
        return ((out - y) ** 2).mean(), out.logsumexp(dim=1).mean()

    for _ in range(4):
        batch = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        task, distillation = terms(model, *batch)
        dot.zero_grad()
        distillation.backward(retain_graph=True)
        dot.step_kd()
        dot.zero_grad()
        task.backward()
        dot.step()
        sgd.zero_grad()
        sum(terms(reference, *batch)).backward()
        sgd.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q)


def test_dot_state_dict_round_trip_resumes_identically():
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    optimizer = DOT(model.parameters(), lr=0.1)

    def step(net, opt, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        opt.step_kd()
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        opt.step()

    step(model, optimizer, 0)
    resumed_model = copy.deepcopy(model)
    resumed = DOT(resumed_model.parameters(), lr=0.5)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.param_groups[0]["lr"] == 0.1 and resumed.param_groups[0]["delta"] == 0.075
    for seed in (1, 2):
        step(model, optimizer, seed)
        step(resumed_model, resumed, seed)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    ("options", "option"),
    [({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"delta": -0.01}, "delta"),
     ({"momentum": 0.95, "delta": 0.06}, "delta"), ({"weight_decay": -1e-4}, "weight_decay")],
)  # fmt: skip
def test_bad_dot_hyperparameters_raise_config_errors_naming_the_option(options, option):
    with pytest.raises(ConfigError, match=rf"optimizer\.{option}="):
        DOT([nn.Parameter(tensor([1.0]))], **options)


def test_dot_config_has_the_official_cifar_defaults_and_declares_separate_distillation():
    factory = hydra.utils.instantiate(OmegaConf.load(Path(CONFIG_DIR) / "optimizer" / "dot.yaml"))
    optimizer = factory(params=[nn.Parameter(tensor([1.0]))])
    assert isinstance(optimizer, DOT) and separates_distillation(factory)
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "delta", "weight_decay")} == {
        "lr": 0.05, "momentum": 0.9, "delta": 0.075, "weight_decay": 5e-4
    }  # fmt: skip


def test_the_module_steps_dot_with_the_distillation_gradient_first_and_counts_steps():
    """DHKD: the backbone gets both gradients, the main head the task's only, the auxiliary head the
    distillation's only. The module's steps equal DOT driven by hand on the two terms."""
    torch.manual_seed(2)
    teacher = Teacher(TinyBackbone(), nn.Linear(6, 3), feature_dim=6, num_classes=3, source="test")
    module = Objective(TinyBackbone(), DualHeadKD(), num_classes=3, optimizer=partial(DOT, lr=0.1, weight_decay=1e-3),
                       teacher=teacher)  # fmt: skip
    assert not module.automatic_optimization
    reference = copy.deepcopy(module)
    images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=Batches(images, labels))
    assert trainer.global_step == 2 and "train/loss" in trainer.callback_metrics

    params = list(reference.parameters())
    optimizer = DOT(params, lr=0.1, weight_decay=1e-3)
    for x, y in zip(images.split(4), labels.split(4)):
        features = reference.features(x)
        task, distillation = reference.loss.distillation_terms(reference.head(features), y, teacher(x), features)
        for term, take in ((distillation, optimizer.step_kd), (task, optimizer.step)):
            for p, grad in zip(params, torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)):
                p.grad = grad
            take()
    for (name, p), q in zip(module.named_parameters(), params):
        torch.testing.assert_close(p, q, msg=name)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run_training([*FAST, "backbone=mlp", "trainer.max_epochs=1"], run_dir)
    return run_dir


def test_dot_trains_a_kd_student_and_counts_its_steps(teacher_run, tmp_path):
    overrides = [*FAST, "optimizer=dot", "loss=kd", "teacher=run", f"teacher.run_dir={teacher_run}",
                 "trainer.max_epochs=1", "+trainer.limit_train_batches=2"]  # fmt: skip
    results = run_training(overrides, tmp_path / "run")
    assert results["status"] == "completed" and np.isfinite(results["test"]["loss"])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.parametrize("loss", ["dkd", "dhkd", "nd_kd"])
def test_dot_combines_with_every_distillation_loss_and_mixup(loss, teacher_run, tmp_path):
    overrides = [*FAST, "debug=fdr", "optimizer=dot", f"loss={loss}", "teacher=run", f"teacher.run_dir={teacher_run}",
                 "mixing=mixup"]  # fmt: skip
    results = run_training(overrides, tmp_path / "run")
    assert results["status"] == "completed" and np.isfinite(results["test"]["loss"])


def test_dot_without_a_distillation_loss_stops_at_start_up_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer=dot separates the distillation gradient .*loss=ce has none; "
                                          r"use loss=.*\bkd\b"):  # fmt: skip
        run_training([*FAST, "debug=fdr", "optimizer=dot"], tmp_path / "run")


def test_dot_is_refused_with_fp16_loss_scaling(teacher_run, tmp_path):
    overrides = [*FAST, "debug=fdr", "optimizer=dot", "loss=kd", "teacher=run", f"teacher.run_dir={teacher_run}",
                 "trainer.precision=16-mixed"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer=dot .*trainer\.precision=16-mixed"):
        run_training(overrides, tmp_path / "run")
