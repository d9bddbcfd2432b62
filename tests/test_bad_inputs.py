"""Bad inputs through the real entry point: each is refused at start-up with exit code 2 and one line
``error: ...`` naming the option, the value and what is allowed, never a traceback.

The table runs in-process (``_hydra_entry`` with a patched ``sys.argv``: the CLI's path, without its start-up
time); a few cases run ``scripts/train.py`` as a subprocess too. ``{data}`` in an override is the folder of damaged
datasets written by the ``bad_data`` fixture.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

import fake_formats
from conftest import CONFIG_DIR, REPO
from losslab import train

D = "dataset=digits"  # sklearn's digits: in memory, no files to find, loaded in milliseconds

CASES = [  # (overrides, what the error line must contain: a regex)
    # Loss hyperparameters: range, type, choice and unknown options.
    ([D, "loss=supcon", "loss.temperature=0"], r"loss\.temperature=0: must be > 0"),
    ([D, "loss=focal", "loss.gamma=-1"], r"loss\.gamma=-1: must be >= 0"),
    ([D, "loss=focal", "loss.gamma=abc"], r"loss\.gamma='abc': must be a number"),
    ([D, "loss=focal", "+loss.focusing=2"], r"loss\.focusing=2: .*Focal has no option 'focusing'; its options are gamma"),
    ([D, "loss=label_smoothing", "loss.epsilon=1.5"], r"loss\.epsilon=1\.5: .*0 <= epsilon < 1"),
    ([D, "loss=poly1", "loss.epsilon=-2"], r"loss\.epsilon=-2: must be >= -1"),
    ([D, "loss=gce", "loss.q=0"], r"loss\.q=0: must be in \(0, 1\]"),
    ([D, "loss=nce_rce", "loss.alpha=-1"], r"loss\.alpha=-1: must be >= 0"),
    ([D, "loss=nce_mae", "loss.beta=-1"], r"loss\.beta=-1: must be >= 0"),
    ([D, "loss=sce", "loss.rce_form=official"], r"loss\.rce_form='official': must be 'paper' or 'code'"),
    ([D, "loss=l2svm", "loss.margin=0"], r"loss\.margin=0: must be > 0"),
    ([D, "loss=arcface", "loss.m=-1"], r"loss\.m=-1: the angular margin must be in \[0, pi\)"),
    ([D, "loss=arcface", "loss.margin_form=loose"], r"loss\.margin_form='loose': allowed values are paper, official"),
    ([D, "loss=circle", "loss.margin=0.6"], r"loss\.margin=0\.6: must be < 0\.5"),
    ([D, "loss=triplet", "loss.mining=hardest"], r"loss\.mining='hardest': allowed values are batch_hard, batch_all"),
    ([D, "loss=contrastive", "loss.distance=l1"], r"loss\.distance='l1': allowed values are euclidean, cosine"),
    ([D, "loss=ldam", "loss.max_margin=-1"], r"loss\.max_margin=-1: must be >= 0"),
    ([D, "loss=asl", "loss.clip=2"], r"loss\.clip=2: must be in \[0, 1\)"),
    ([D, "loss=kd", "loss.alpha=2"], r"loss\.alpha=2: .* must be in \[0, 1\]"),
    ([D, "loss=mochi", "loss.queue_size=0"], r"loss\.queue_size=0: must be >= 1"),
    # Data settings.
    ([D, "dataset.label_noise.rate=-0.1"], r"dataset\.label_noise\.rate=-0\.1: must be a number in \[0, 1\)"),
    ([D, "dataset.label_noise.kind=uniform"], r"label_noise\.kind='uniform': allowed values are symmetric, asym"),
    ([D, "dataset.imbalance_factor=0.5"], r"dataset\.imbalance_factor=0\.5: must be null or a number >= 1"),
    ([D, "dataset.val_fraction=1.0"], r"dataset\.val_fraction=1\.0: must be in \[0, 1\)"),
    ([D, "dataset.batch_size=0"], r"dataset\.batch_size=0: must be an integer >= 1"),
    ([D, "dataset.sampler=shuffled"], r"dataset\.sampler='shuffled': allowed values are random, m_per_class"),
    ([D, "dataset.image_size=0"], r"dataset\.image_size=0: must be null \(native size\) or an integer >= 1"),
    # Damaged dataset files, named with their path.
    (["paths.data_dir={data}/truncated", "dataset.download=false"],
     r"{data}/truncated/fashion-mnist/train-images-idx3-ubyte\.gz: cannot read \(EOFError"),
    (["paths.data_dir={data}/short", "dataset.download=false"],
     r"{data}/short/fashion-mnist/train-images-idx3-ubyte\.gz: wrong size"),
    (["dataset=multilabel_folder", "paths.data_dir={data}", "loss=bce"],
     r"{data}/multilabel_folder/labels\.csv line 3: column 'fox' holds '2'; labels must be 0 or 1"),
    (["dataset=image_folder", "paths.data_dir={data}"],
     r"dataset image_folder: {data}/image_folder/train: Found no valid file for the classes empty"),
    # Choices that cannot work together, both named.
    ([D, "loss=supcon", "dataset.batch_size=1"], r"loss=supcon compares samples .*batch_size=1 .*batch size >= 2"),
    ([D, "loss=triplet", "dataset.m_per_class=3"], r"loss=triplet .*m_per_class=3 must be >= 2 and divide .*=32"),
    ([D, "loss=simclr", "dataset.sampler=m_per_class"], r"sampler=m_per_class .*loss=simclr uses no labels; use"),
    ([D, "loss=l2svm", "mixing=cutmix"], r"mixing=cutmix .* loss=l2svm refuses them; use one of: .*\bce\b"),
    ([D, "loss=supcon", "regularizer=palm_zloss"], r"regularizer=palm_zloss .*loss=supcon is an embedding loss"),
    ([D, "loss=supcon", "mixing=rankmixup"], r"mixing=rankmixup adds a term on class logits, but loss=supcon"),
    ([D, "mixing=c_mixup"], r"mixing=c_mixup .*set mixing\.label_embedding=<file"),
    ([D, "loss=kd"], r"loss=kd distils a teacher, but teacher=none; choose teacher=run"),
    ([D, "loss=kd", "teacher=run", "teacher.run_dir={data}/no_such_run"],
     r"teacher\.run_dir={data}/no_such_run: no run directory"),
    ([D, "loss=kd", "teacher=run", "teacher.run_dir={data}/unfinished_run"],
     r"teacher\.checkpoint=best: {data}/unfinished_run/checkpoints/best\.ckpt does not exist"),
    ([D, "loss=kd", "teacher=run", "teacher.run_dir={data}/unfinished_run", "teacher.checkpoint=middle"],
     r"teacher\.checkpoint='middle': allowed values are best, last"),
    ([D, "paradigm=linear_eval"], r"paradigm=linear_eval .*paradigm\.from_run=outputs/runs/<run>"),
    ([D, "paradigm=linear_eval", "paradigm.from_run={data}/unfinished_run"],
     r"paradigm\.checkpoint=last: {data}/unfinished_run/checkpoints/last\.ckpt does not exist"),
    ([D, "optimizer=sam", "trainer.precision=16-mixed"], r"optimizer=sam .*trainer\.precision=16-mixed.*bf16-mixed"),
    ([D, "optimizer=dot"], r"optimizer=dot separates the distillation gradient .*loss=ce has none; use loss=.*kd"),
    # The optimizer and its schedule: refused before the trainer starts, not inside fit.
    ([D, "optimizer.lr=-1"], r"optimizer\.lr=-1: must be a number > 0"),
    ([D, "optimizer=sgd", "optimizer.lr=0"], r"optimizer\.lr=0: must be a number > 0"),
    ([D, "optimizer=sgd", "optimizer.momentum=-0.9"], r"optimizer\.momentum=-0\.9: must be a number >= 0"),
    ([D, "optimizer=adam", "optimizer.betas=[0.9,1.5]"], r"optimizer\.betas=\[0\.9, 1\.5\]: must be two numbers in"),
    ([D, "optimizer=sam", "optimizer.base_optimizer.lr=-1"], r"optimizer\.base_optimizer\.lr=-1: must be a number"),
    ([D, "scheduler.anneal_strategy=cosine"], r"scheduler\.anneal_strategy='cosine': allowed values are cos, linear"),
    ([D, "scheduler.pct_start=2"], r"scheduler\.pct_start=2: must be in \[0, 1\]"),
    ([D, "scheduler=step", "scheduler.milestones=[150,100]"], r"scheduler\.milestones=\[150, 100\]: must be incr"),
    ([D, "scheduler=step", "scheduler.gamma=0"], r"scheduler\.gamma=0: must be > 0"),
    ([D, "scheduler=step", "+scheduler.warmup_epochs=5"], r"warmup_epochs=5: .*its options are milestones, gamma"),
    # Batch mixing and regularisers.
    ([D, "mixing=mixup", "mixing.alpha=0"], r"mixing\.alpha=0: must be > 0"),
    ([D, "mixing=cutmix", "mixing.alpha=-1"], r"mixing\.alpha=-1: must be > 0"),
    ([D, "mixing=mixup_cutmix", "mixing.switch_prob=2"], r"mixing\.switch_prob=2: must be in \[0, 1\]"),
    ([D, "regularizer=vat", "regularizer.vat.eps=0"], r"regularizer\.vat\.eps=0: must be > 0"),
    ([D, "regularizer=logit_penalty", "regularizer.logit_penalty.coefficient=-1"],
     r"regularizer\.logit_penalty\.coefficient=-1: must be >= 0"),
    # Run settings, the trainer, the heads and the backbone.
    ([D, "eval_checkpoint=middle"], r"eval_checkpoint='middle': allowed values are best, last"),
    ([D, "resume=maybe"], r"resume='maybe': allowed values are auto, true, false"),
    ([D, "num_threads=0"], r"num_threads=0: must be null or an integer >= 1"),
    ([D, "optimized_metric=test/acc"], r"optimized_metric='test/acc': .*validation metrics \(val/\.\.\.\)"),
    ([D, "seed=abc"], r"seed='abc': must be an integer"),
    ([D, "trainer.max_epochs=0"], r"trainer\.max_epochs=0: must be an integer >= 1"),
    ([D, "loss=supcon", "objective.knn_k=0"], r"objective\.knn_k=0: must be an integer >= 1"),
    ([D, "loss=supcon", "objective.projection_dim=0"], r"objective\.projection_dim=0: must be an integer >= 1"),
    ([D, "backbone=torchvision", "backbone.name=squeezenet1_1"],
     r"backbone=torchvision cannot be built for dataset=digits \(1x8x8 images\).*dataset\.image_size"),
    ([D, "backbone=resnet18", "backbone.depth=19"], r"backbone=resnet18 .*depth must be one of \[18, 34, 50"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """Damaged datasets in their real formats, and run directories without checkpoints."""
    root = tmp_path_factory.mktemp("bad_data")
    images = "fashion-mnist/train-images-idx3-ubyte.gz"
    fake_formats.write_fashion_mnist(root / "truncated")
    path = root / "truncated" / images
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut inside the gzip stream
    fake_formats.write_fashion_mnist(root / "short")
    path = root / "short" / images
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))  # a whole gzip of cut IDX data
    labelled = fake_formats.write_multilabel_folder(root / "multilabel_folder", sizes=(6, 0, 3))
    csv = labelled.root / "labels.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2][:-1] + "2"  # a label outside {0, 1} on line 3, in the last column
    csv.write_text("\n".join(lines) + "\n")
    fake_formats.write_image_folder(root / "image_folder", per_class=2)
    (root / "image_folder" / "train" / "empty").mkdir()
    (root / "unfinished_run").mkdir()
    return root


@pytest.fixture(autouse=True)
def _restore_logging():
    """Each run configures logging to the captured streams; later tests must not log into closed ones."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def refused(overrides: list[str], tmp_path: Path, capsys, monkeypatch) -> str:
    """Run ``scripts/train.py`` in-process with ``overrides``; assert it exits 2 with one ``error:`` line and
    no traceback, and return that line."""
    monkeypatch.delenv("LOSSLAB_DATA_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides, f"paths.log_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train._hydra_entry()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(o).replace(f"{D} ", "") for o, _ in CASES])
def test_bad_input_is_one_line_naming_the_option(overrides, expected, bad_data, tmp_path, capsys, monkeypatch):
    overrides = [override.replace("{data}", str(bad_data)) for override in overrides]
    line = refused(overrides, tmp_path, capsys, monkeypatch)
    assert re.search(expected.replace("{data}", re.escape(str(bad_data))), line), line


def test_missing_dataset_names_every_searched_path_in_one_error(tmp_path, capsys, monkeypatch):
    # The one report that spans lines: where the files were looked for, one per line, and how to get them.
    monkeypatch.delenv("LOSSLAB_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    monkeypatch.setattr(sys, "argv", ["train.py", "dataset=cifar10", f"paths.data_dir={empty}",
                                      "dataset.download=false", f"paths.log_dir={tmp_path}"])  # fmt: skip
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        train._hydra_entry()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert stderr.startswith("error: Dataset 'cifar10' was not found") and stderr.count("error:") == 1
    assert f"{empty}/cifar-10-batches-py: no such directory" in stderr and "download" in stderr


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LOSSLAB_DATA_DIR"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args, f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False,
    )  # fmt: skip


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    # Formerly a traceback from inside fit, where torch builds the optimizer.
    done = _cli(D, "optimizer=sgd", "optimizer.lr=-0.1", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == "error: optimizer.lr=-0.1: must be a number > 0", done.stderr[-2000:]


def test_cli_typo_in_a_group_choice_lists_the_choices_from_our_configs(tmp_path):
    done = _cli(D, "loss=supcn", tmp_path=tmp_path)
    # Hydra refuses it while composing, before LossLab runs: its own message and exit code (1), no traceback.
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "Could not find 'loss/supcn'" in done.stderr and "Available options in 'loss':" in done.stderr
    listed = re.findall(r"^\t(\w+)$", done.stderr, re.MULTILINE)
    assert {"ce", "supcon", "label_smoothing"} <= set(listed)
    assert f"provider=main, path=file://{CONFIG_DIR}" in done.stderr
