"""Bad inputs, each with what its one-line refusal must say: the table of ``tests/test_bad_inputs.py`` and of
``scripts/fault_drill.py --parts inputs``. ``{data}`` in an override is the folder :func:`write_bad_data` fills."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

import numpy as np

import fake_formats
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
    (["paths.data_dir={data}/no_sandals", "dataset.download=false"],
     r"{data}/no_sandals/fashion-mnist/train-labels-idx1-ubyte\.gz: class 5 \('Sandal'\) has no training sample: none "
     r"in the training file"),
    (["paths.data_dir={data}/one_sandal", "dataset.download=false", "dataset.val_fraction=0.6"],
     r"one_sandal/fashion-mnist/train-labels-idx1-ubyte\.gz: class 5 \('Sandal'\) has no training sample: all went "
     r"to validation \(dataset\.val_fraction=0\.6"),
    (["paths.data_dir={data}/large_images", "dataset.download=false"],
     r"{data}/large_images/fashion-mnist/t10k-images-idx3-ubyte\.gz: images are 32x32, expected 28x28"),
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
    ([D, "optimizer=sam", "+trainer.gradient_clip_val=1.0"], r"optimizer=sam steps under manual optimisation, where "
     r"trainer\.gradient_clip_val=1\.0 does not apply"),
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


def write_bad_data(root: Path) -> Path:
    """Damaged datasets in their real formats, and run directories without checkpoints, under ``root``."""
    images = "fashion-mnist/train-images-idx3-ubyte.gz"
    fake_formats.write_fashion_mnist(root / "truncated")
    path = root / "truncated" / images
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut inside the gzip stream
    fake_formats.write_fashion_mnist(root / "short")
    path = root / "short" / images
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))  # a whole gzip of cut IDX data
    for name, keep in (("no_sandals", 0), ("one_sandal", 1)):  # class 5 kept `keep` times in the training labels
        fake_formats.write_fashion_mnist(root / name, n_train=40)
        path = root / name / "fashion-mnist/train-labels-idx1-ubyte.gz"
        labels = np.frombuffer(gzip.decompress(path.read_bytes())[8:], np.uint8).copy()
        sandals = np.flatnonzero(labels == 5)
        labels[sandals[keep:]] = 6
        fake_formats.write_idx(path, labels)
    fake_formats.write_fashion_mnist(root / "large_images")  # then 32x32 test images: CIFAR's size in an IDX file
    fake_formats.write_idx(root / "large_images/fashion-mnist/t10k-images-idx3-ubyte.gz", np.zeros((10, 32, 32)))
    labelled = fake_formats.write_multilabel_folder(root / "multilabel_folder", sizes=(6, 0, 3))
    csv = labelled.root / "labels.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2][:-1] + "2"  # a label outside {0, 1} on line 3, in the last column
    csv.write_text("\n".join(lines) + "\n")
    fake_formats.write_image_folder(root / "image_folder", per_class=2)
    (root / "image_folder" / "train" / "empty").mkdir()
    (root / "unfinished_run").mkdir()
    return root


def refusal(overrides: list[str], log_dir: Path) -> tuple[int | str | None, str]:
    """``scripts/train.py`` run in-process (its ``main``, the CLI's path without the interpreter's start-up) with
    ``overrides`` and ``paths.log_dir=log_dir``; returns its exit code and what it printed on stderr."""
    argv, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    data_dir = os.environ.pop("LOSSLAB_DATA_DIR", None)  # the overrides say where the data are
    sys.argv = ["train.py", *overrides, f"paths.log_dir={log_dir}"]
    GlobalHydra.instance().clear()
    stream = io.StringIO()
    code: int | str | None = 0
    try:
        with contextlib.redirect_stderr(stream):
            try:
                train.main()
            except SystemExit as exit:
                code = exit.code
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:  # each run configures logging to the redirected stream: undo it
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        if data_dir is not None:
            os.environ["LOSSLAB_DATA_DIR"] = data_dir
    return code, stream.getvalue()


def clear_refusal(code: int | str | None, stderr: str) -> str | None:
    """The one ``error: ...`` line of a clear refusal (exit code 2, no traceback, nothing else on stderr), else None."""
    lines = stderr.strip().splitlines()
    if code != 2 or "Traceback" in stderr or len(lines) != 1 or not lines[0].startswith("error: "):
        return None
    return lines[0]
