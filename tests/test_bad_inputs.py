"""Bad inputs through the real entry point: each is refused at start-up with exit code 2 and one line
``error: ...`` naming the option, the value and what is allowed, never a traceback.

The table runs in-process (``train.main`` with a patched ``sys.argv``: the CLI's path, without its start-up
time); a few cases run ``scripts/train.py`` as a subprocess too. ``{data}`` in an override is the folder of damaged
datasets written by the ``bad_data`` fixture.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs import CASES, D, clear_refusal, refusal, write_bad_data
from conftest import CONFIG_DIR, REPO
from losslab import recording


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    return write_bad_data(tmp_path_factory.mktemp("bad_data"))


def refused(overrides: list[str], log_dir: Path) -> str:
    """Run ``scripts/train.py`` in-process with ``overrides``; assert it exits 2 with one ``error:`` line and no
    traceback, and return that line."""
    code, stderr = refusal(overrides, log_dir)
    line = clear_refusal(code, stderr)
    assert line is not None, f"exit {code}: {stderr[-3000:]}"
    return line


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(o).replace(f"{D} ", "") for o, _ in CASES])
def test_bad_input_is_one_line_naming_the_option(overrides, expected, bad_data, tmp_path):
    overrides = [override.replace("{data}", str(bad_data)) for override in overrides]
    line = refused(overrides, tmp_path)
    assert re.search(expected.replace("{data}", re.escape(str(bad_data))), line), line


def test_missing_dataset_names_every_searched_path_in_one_error(tmp_path):
    # The one report that spans lines: where the files were looked for, one per line, and how to get them.
    empty = tmp_path / "empty"
    code, stderr = refusal(["dataset=cifar10", f"paths.data_dir={empty}", "dataset.download=false"], tmp_path)
    assert code == 2 and "Traceback" not in stderr
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
    # Hydra refuses it while composing, before LossLab runs: its own message, no traceback, exit code 2 (input).
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Could not find 'loss/supcn'" in done.stderr and "Available options in 'loss':" in done.stderr
    listed = re.findall(r"^\t(\w+)$", done.stderr, re.MULTILINE)
    assert {"ce", "supcon", "label_smoothing"} <= set(listed)
    assert f"provider=main, path=file://{CONFIG_DIR}" in done.stderr


def test_cli_crash_inside_a_run_still_exits_1_with_its_traceback(tmp_path):
    # Exit 2 is kept for refused input: a failure inside the run (a fault hooked on a module that is not there,
    # raised at the first step) is a crash.
    broken = ["+callbacks.broken._target_=losslab.faults.InjectNonFiniteLoss", "+callbacks.broken.step=0",
              "+callbacks.broken.module=no_such_submodule", "trainer.max_epochs=1"]  # fmt: skip
    done = _cli(D, *broken, tmp_path=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "no_such_submodule" in done.stderr and not done.stderr.startswith("error: ")


def test_an_output_dir_inside_a_file_is_refused_before_hydra_creates_it(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    line = refused([D], blocker / "outputs")
    assert re.search(rf"hydra\.run\.dir={re.escape(str(blocker))}/outputs/runs/\S+: {re.escape(str(blocker))} is a "
                     "file, not a directory", line), line  # fmt: skip


def test_a_read_only_output_dir_is_refused_before_hydra_creates_it(tmp_path, monkeypatch):
    # Root ignores permission bits, so the read-only filesystem is simulated where the probe file is created.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(recording.tempfile, "mkstemp", read_only)
    line = refused([D], tmp_path / "outputs")
    assert re.search(r"hydra\.run\.dir=\S+: cannot write in \S+ \(Read-only file system\); choose a writable", line)
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_on_a_read_only_disk_is_refused_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setattr(recording.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "x")))
    line = refused(["-m", D, "seed=0,1"], tmp_path / "outputs")
    assert line.startswith(f"error: hydra.sweep.dir={tmp_path / 'outputs'}/multirun/") and "cannot write" in line


@pytest.mark.parametrize(("free_mib", "option", "needs"), [(10, "hydra.run.dir", 64), (100, "paths.output_dir", 448)])
def test_too_little_free_disk_is_refused_before_training(free_mib, option, needs, tmp_path, monkeypatch):
    # 10 MiB: less than any run's logs (checked before Hydra creates the directory); 100 MiB: less than resnet18's
    # three checkpoints with Adam's moments, 3 x 3 x 11.2 M parameters x 4 B + 64 MiB = 448 MiB (checked once the
    # model is built, before the first step).
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(recording.shutil, "disk_usage", lambda path: usage._replace(free=free_mib << 20))
    line = refused([D, "backbone=resnet18"], tmp_path)
    assert re.search(rf"{re.escape(option)}=\S+: {free_mib} MiB free on its disk, this run needs about {needs} MiB", line)
    assert not list(tmp_path.glob("runs/*/checkpoints"))
