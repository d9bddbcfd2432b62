"""Batch mixing, regularisers, optimisers and distillation combine with the losses through the one training module:
each runs a fast_dev_run with ce, focal and supcon (digits), and combinations without a meaning stop at start-up
with a message naming both choices. Their formulas are tested beside their modules (test_mixing.py,
test_regularizer_terms.py, test_optimizers.py, losses/test_distillation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIG_DIR, run_training
from losslab.errors import ConfigError

FAST = ["dataset=digits", "debug=fdr", "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]
LOSSES = ["ce", "focal", "supcon"]


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if p.stem != "none")


def run(overrides: list[str], tmp_path: Path) -> dict:
    results = run_training([*FAST, *overrides], tmp_path / "run")
    assert results["status"] == "completed" and np.isfinite(results["test"]["loss"])
    return results


@pytest.fixture
def label_embedding(tmp_path) -> str:
    """A [10, 2] embedding of digits' classes: their positions on a circle, so neighbouring digits are close."""
    angles = np.arange(10) * 2 * np.pi / 10
    path = tmp_path / "digits_circle.npy"
    np.save(path, np.stack([np.cos(angles), np.sin(angles)], axis=1))
    return str(path)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mixing", choices("mixing"))
def test_every_mixing_combines_with_ce_focal_and_supcon(mixing, loss, label_embedding, tmp_path):
    overrides = [f"mixing={mixing}", f"loss={loss}"]
    if mixing == "c_mixup":
        overrides.append(f"mixing.label_embedding={label_embedding}")
    if mixing in ("rankmixup", "decoupled_mixup") and loss == "supcon":
        with pytest.raises(ConfigError, match=rf"mixing={mixing} adds a term on class logits, but loss=supcon"):
            run(overrides, tmp_path)
        return
    results = run(overrides, tmp_path)
    assert results["choices"]["mixing"] == mixing


def test_c_mixup_on_hard_labels_without_a_label_embedding_stops_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"mixing=c_mixup .*mixing\.label_embedding"):
        run(["mixing=c_mixup"], tmp_path)


def test_soft_targets_from_mixing_are_refused_by_a_loss_defined_on_class_indices(tmp_path):
    with pytest.raises(ConfigError, match=r"mixing=cutmix trains on \[N, C\] probability targets, but loss=l2svm"):
        run(["mixing=cutmix", "loss=l2svm"], tmp_path)


@pytest.mark.parametrize("loss", ["ce", "focal"])
@pytest.mark.parametrize("regularizer", choices("regularizer"))
def test_every_regularizer_combines_with_ce_and_focal(regularizer, loss, tmp_path):
    results = run([f"regularizer={regularizer}", f"loss={loss}"], tmp_path)
    assert list(results["config"]["regularizer"]) == [regularizer]


def test_regularizers_are_refused_with_supcon_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"regularizer=vat adds a term on class logits, but loss=supcon"):
        run(["regularizer=vat", "loss=supcon"], tmp_path)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("optimizer", ["lion", "lars", "sam", "asam", "swats", "momo"])
def test_every_new_optimizer_combines_with_ce_focal_and_supcon(optimizer, loss, tmp_path):
    run([f"optimizer={optimizer}", f"loss={loss}"], tmp_path)


def test_sam_steps_under_manual_optimisation_and_keeps_checkpoints(tmp_path):
    """Two epochs with SAM and mixup: the steps are counted (checkpoints, schedules) as with any optimiser."""
    overrides = ["dataset=digits", "optimizer=sam", "mixing=mixup", "trainer.max_epochs=2",
                 "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]  # fmt: skip
    results = run_training(overrides, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    steps_per_epoch = results["data"]["split"]["n_train"] // 128 + 1  # digits' default batch size
    assert checkpoint["global_step"] >= 2 * (steps_per_epoch - 1)
    assert results["evaluated_checkpoint"].endswith("best.ckpt") and results["test"]["acc"] > 0.5


def test_sam_trains_under_fp16_autocast(tmp_path):
    # On CPU Lightning's 16-mixed autocasts without a GradScaler; the scaled path is tested in test_optimizers.py.
    results = run(["optimizer=sam", "trainer.precision=16-mixed"], tmp_path)
    assert results["config"]["trainer"]["precision"] == "16-mixed"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run_training(["dataset=digits", "backbone=mlp", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                  "~callbacks.rich_progress_bar"], run_dir)  # fmt: skip
    return run_dir


@pytest.mark.parametrize("loss", ["kd", "dkd", "dhkd", "nd_kd"])
def test_every_distillation_loss_trains_a_student_of_a_run_teacher(loss, teacher_run, tmp_path):
    results = run([f"loss={loss}", "teacher=run", f"teacher.run_dir={teacher_run}", "mixing=mixup"], tmp_path)
    assert results["teacher"].startswith(f"run {teacher_run}")


@pytest.mark.parametrize(("limit", "sampled"), [(1, "one batch"), (None, "the whole split")])
def test_nd_kd_class_means_cover_the_training_split_or_the_batches_a_limit_allows(limit, sampled, teacher_run,
                                                                                  tmp_path, monkeypatch):  # fmt: skip
    from losslab.teacher import Teacher

    seen: list[torch.Tensor] = []
    means = Teacher.class_means

    def spy(self, batches, num_classes):
        def counted():
            for images, labels in batches:
                seen.append(labels)
                yield images, labels

        return means(self, counted(), num_classes)

    monkeypatch.setattr(Teacher, "class_means", spy)
    overrides = ["loss=nd_kd", "teacher=run", f"teacher.run_dir={teacher_run}"]
    if limit is None:  # one epoch of one batch, but no integer limit: the means still see every training sample
        overrides = ["dataset=digits", "trainer.max_epochs=1", "+trainer.limit_train_batches=0.03",
                     "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", *overrides[:1], *overrides[1:],
                     "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]  # fmt: skip
        results = run_training(overrides, tmp_path / "run")
    else:
        results = run(overrides, tmp_path)
    labels = torch.cat(seen)
    assert set(labels.tolist()) == set(range(10))
    n_train, batch = results["data"]["split"]["n_train"], results["config"]["dataset"]["eval_batch_size"]
    assert batch < n_train
    assert len(labels) == (n_train if limit is None else batch), sampled  # fast_dev_run: one batch had every class


def test_the_teacher_is_not_saved_with_the_student(teacher_run, tmp_path):
    overrides = ["dataset=digits", "loss=kd", "teacher=run", f"teacher.run_dir={teacher_run}", "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=2", "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]  # fmt: skip
    run_training(overrides, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(key.startswith("teacher") for key in state)


def test_a_distillation_loss_without_a_teacher_stops_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"loss=kd distils a teacher, but teacher=none"):
        run(["loss=kd"], tmp_path)


def test_manifold_mixup_is_refused_with_distillation(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"mixing=manifold_mixup .*teacher=run"):
        run(["loss=kd", "teacher=run", f"teacher.run_dir={teacher_run}", "mixing=manifold_mixup"], tmp_path)


def test_distill_experiment_trains_its_teacher_once_and_every_student_loads_it(tmp_path):
    """experiment=distill_fashion_mnist on digits, with a one-epoch MLP teacher: the first student trains the teacher
    in teacher.run_dir, the next one (another seed) finds it complete and reuses it."""
    stage = 'teacher_stage=["backbone=mlp","loss=ce","seed=0","trainer.max_epochs=1"]'
    common = ["experiment=distill_fashion_mnist", "dataset=digits", f"paths.log_dir={tmp_path}", stage,
              "trainer.max_epochs=1", "~callbacks.rich_progress_bar"]  # fmt: skip
    teacher_results = tmp_path / "multirun" / "distill_fashion_mnist" / "teacher_resnet18" / "results.json"
    first = run_training([*common, "loss=kd", "seed=0"], tmp_path / "kd0")
    written = teacher_results.stat().st_mtime_ns
    second = run_training([*common, "loss=dkd", "seed=1"], tmp_path / "dkd1")
    assert teacher_results.stat().st_mtime_ns == written
    assert first["teacher"] == second["teacher"] and "teacher_resnet18 (best.ckpt)" in first["teacher"]
