"""Paradigms on scikit-learn's digits: linear evaluation and fine-tuning of an earlier run's backbone, and the
two-stage chain (experiment=supcon_two_stage)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fake_formats
from conftest import REPO, compose_config, run_training
from losslab import paradigm
from losslab.errors import ConfigError
from losslab.train import build

SHORT = ["dataset=digits", "trainer.max_epochs=1", "+trainer.limit_train_batches=10", "~callbacks.rich_progress_bar",
         "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A SupCon run's directory (small_cnn, whose BatchNorm layers have running statistics)."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    run_training([*SHORT, "loss=supcon"], run_dir)
    return run_dir


def _from(run_dir: Path, paradigm: str = "linear_eval") -> list[str]:
    return [f"paradigm={paradigm}", f"paradigm.from_run={run_dir}"]


def _backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {
        key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")
    }


def test_the_pretrained_backbone_is_loaded(pretrained, tmp_path):
    _, module, _, _ = build(compose_config([*SHORT, *_from(pretrained, "finetune")], tmp_path))
    pretrained_weights = _backbone(pretrained / "checkpoints" / "last.ckpt")
    name = next(key for key in pretrained_weights if key.endswith("running_mean"))
    assert torch.equal(module.backbone.state_dict()[name], pretrained_weights[name])
    assert not torch.equal(pretrained_weights[name], torch.zeros_like(pretrained_weights[name]))


def test_linear_eval_trains_a_classifier_on_the_frozen_backbone(pretrained, tmp_path):
    results = run_training([*SHORT, *_from(pretrained)], tmp_path)
    before = _backbone(pretrained / "checkpoints" / "last.ckpt")
    after = _backbone(tmp_path / "checkpoints" / "last.ckpt")
    assert before.keys() == after.keys() and any(key.endswith("running_var") for key in before)
    for key in before:  # weights and BatchNorm running statistics alike
        assert torch.equal(before[key], after[key]), key
    assert results["choices"]["paradigm"] == "linear_eval" and results["choices"]["loss"] == "ce"
    assert (
        results["test"]["acc"] > 0.2
    )  # the classifier learned (chance: 0.1) on features it could not change
    parameters = results["parameters"]
    assert parameters["trainable"] == parameters["total"] - parameters["backbone"]


def test_results_record_which_checkpoint_the_backbone_came_from(pretrained, tmp_path):
    run_training([*SHORT, *_from(pretrained), "paradigm.checkpoint=best"], tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())["pretrained"]
    checkpoint = pretrained / "checkpoints" / "best.ckpt"
    assert record["paradigm"] == "linear_eval" and record["frozen"] is True and record["checkpoint"] == "best"
    assert record["run_dir"] == str(pretrained) and record["checkpoint_path"] == str(checkpoint)
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["run"]["choices"]["loss"] == "supcon"


def test_finetune_trains_the_pretrained_backbone(pretrained, tmp_path):
    results = run_training([*SHORT, *_from(pretrained, "finetune")], tmp_path)
    before = _backbone(pretrained / "checkpoints" / "last.ckpt")
    after = _backbone(tmp_path / "checkpoints" / "last.ckpt")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert any(key.endswith("weight") for key in changed) and any(
        key.endswith("running_mean") for key in changed
    )
    assert results["pretrained"]["paradigm"] == "finetune" and results["pretrained"]["frozen"] is False


def test_a_changed_pretrained_checkpoint_makes_a_completed_run_train_again(pretrained, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(pretrained, source)
    first = run_training([*SHORT, *_from(source)], tmp_path / "eval")
    assert run_training([*SHORT, *_from(source)], tmp_path / "eval")["finished_at"] == first["finished_at"]
    shutil.copy(pretrained / "checkpoints" / "best.ckpt", source / "checkpoints" / "last.ckpt")
    again = run_training([*SHORT, *_from(source)], tmp_path / "eval")
    assert again["pretrained"]["checkpoint_sha256"] != first["pretrained"]["checkpoint_sha256"]


def test_linear_eval_refuses_an_embedding_loss(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"paradigm=linear_eval .* loss=supcon is an embedding loss"):
        run_training([*SHORT, *_from(pretrained), "loss=supcon"], tmp_path)


def test_a_different_backbone_is_refused_naming_both(pretrained, tmp_path):
    with pytest.raises(
        ConfigError, match=r"pretrained with backbone=small_cnn, but this run has backbone=mlp"
    ):
        run_training([*SHORT, *_from(pretrained), "backbone=mlp"], tmp_path)


def test_a_dataset_with_other_channels_is_refused_naming_both(pretrained, tmp_path):
    fake_formats.write_cifar10(tmp_path / "data", n_train=40, n_test=20)
    cifar10 = ["dataset=cifar10", f"paths.data_dir={tmp_path / 'data'}", "dataset.download=false"]
    with pytest.raises(
        ConfigError, match=r"dataset=digits \(1-channel images\), but this run's dataset=cifar10 has 3"
    ):
        run_training([*SHORT, *cifar10, *_from(pretrained)], tmp_path / "run")


def test_a_missing_run_directory_or_checkpoint_is_refused_naming_option_and_path(pretrained, tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(ConfigError, match=f"paradigm.from_run={missing}: no run directory"):
        run_training([*SHORT, *_from(missing)], tmp_path / "a")
    (tmp_path / "crashed").mkdir()
    shutil.copy(pretrained / "config.yaml", tmp_path / "crashed" / "config.yaml")
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=f"paradigm.checkpoint=last: {last} does not exist"):
        run_training([*SHORT, *_from(tmp_path / "crashed")], tmp_path / "b")
    with pytest.raises(ConfigError, match="paradigm=finetune .* paradigm.from_run=outputs/runs/<run>"):
        run_training([*SHORT, "paradigm=finetune"], tmp_path / "c")


def test_the_command_line_exits_2_on_a_missing_run_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "dataset=digits", "paradigm=linear_eval",
         f"paradigm.from_run={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"],
        check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"paradigm.from_run={tmp_path / 'nowhere'}: no run directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_two_stage_chain_pretrains_evaluates_and_skips_completed_stages(tmp_path):
    overrides = ["experiment=supcon_two_stage", *SHORT, "seed=1"]
    results = run_training(overrides, tmp_path)
    stage = json.loads((tmp_path / "pretrain" / "results.json").read_text())
    assert stage["choices"]["loss"] == "supcon" and stage["choices"]["paradigm"] == "joint"
    assert stage["choices"]["experiment"] == "fashion_mnist_supcon"
    assert stage["seed"] == 1 and stage["config"]["dataset"]["name"] == "digits"
    assert stage["epochs_completed"] == 1 and stage["config"]["trainer"]["limit_train_batches"] == 10
    assert results["choices"]["loss"] == "ce" and results["choices"]["paradigm"] == "linear_eval"
    assert results["pretrained"]["run_dir"] == str(tmp_path / "pretrain")
    assert results["pretrained"]["checkpoint_path"] == str(
        tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    )
    assert 0 <= results["test"]["acc"] <= 1
    # Stage 2 crashed before writing its results: launching again skips stage 1 and trains stage 2 only.
    (tmp_path / "results.json").unlink()
    again = run_training(overrides, tmp_path)
    assert (
        json.loads((tmp_path / "pretrain" / "results.json").read_text())["finished_at"]
        == stage["finished_at"]
    )
    assert again["test"] == results["test"]
    assert run_training(overrides, tmp_path)["finished_at"] == again["finished_at"]


def test_two_stage_chain_runs_as_a_fast_dev_run_smoke_test(tmp_path):
    """debug=fdr saves no checkpoint: the second stage then runs on the backbone's initial weights."""
    results = run_training(
        ["experiment=supcon_two_stage", "dataset=digits", "debug=fdr", *SHORT[-2:]], tmp_path
    )
    assert results["status"] == "completed" and results["pretrained"]["checkpoint_path"] is None
    assert (tmp_path / "pretrain" / "results.json").is_file()


def test_pretrain_stage_shares_the_command_line_except_what_a_stage_trains(tmp_path):
    stage = '["experiment=fashion_mnist_supcon","trainer.max_epochs=2"]'
    cfg = compose_config(["experiment=supcon_two_stage", "dataset=digits", "seed=3", "loss=focal",
                          "trainer.max_epochs=1", f"paradigm.pretrain={stage}"], tmp_path)  # fmt: skip
    overrides = paradigm._stage_overrides(list(cfg.paradigm.pretrain))
    assert [override for override in overrides if not override.startswith("paths.")] == [
        "dataset=digits", "seed=3", "experiment=fashion_mnist_supcon", "trainer.max_epochs=2",
    ]  # fmt: skip
