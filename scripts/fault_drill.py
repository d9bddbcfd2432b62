"""Fault drill: kill, poison and corrupt small LossLab runs, and count what survives.

``python scripts/fault_drill.py [--kills 20] [--seed 0] [--out DIR] [--parts kills,nan,corrupt]``

* kills: one uninterrupted reference run, then ``--kills`` runs of the same command, each SIGKILLed at a random
  (seeded) moment of its training and evaluation and started again with the same command (``resume=auto``) to
  completion; a survivor's val and test metrics must equal the reference's exactly (CPU, one thread, fixed seed).
* nan: a NaN loss injected at global step 60 (epoch 1) under ``non_finite=stop`` (a one-line error naming the
  step, results.json ``status: failed`` with the last good checkpoint), then the same command under
  ``non_finite=skip``, which resumes from that checkpoint and completes with ``skipped_steps`` 1.
* inputs: every bad input of ``tests/bad_inputs.py`` (the table of ``tests/test_bad_inputs.py``: bad values, unknown
  options, incompatible choices, damaged dataset files), run in-process through the CLI's entry point; clear means
  exit code 2 and one ``error:`` line that says what its table row expects, with no traceback.
* disk: the disk fills up while epoch 1's checkpoint is written (``losslab.faults.FillDisk``): one clear error, no
  results.json and no half-written file left; the same command then resumes to the reference's result. And an
  output directory that cannot be written (under ``/proc``): refused before anything runs.
* corrupt: runs of the reference command, completed, then given a truncated ``last.ckpt`` (and no results.json,
  as if killed during the final evaluation), the temporary file of a half-written ``results.json`` (and none), or a
  truncated ``results.json``; each run again must reach the reference's result.

Every run is ``scripts/train.py`` in a subprocess, under ``--out`` (default: a new temporary directory). Exits 1
when anything was lost or differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN = ["dataset=digits", "backbone=mlp", "trainer.max_epochs=3", "trainer.accelerator=cpu", "num_threads=1", "seed=0",
       "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false"]  # fmt: skip
NAN_STEP = 60  # digits has 40 training batches per epoch: epoch 1, after last.ckpt of epoch 0
INJECT_NAN = ["+callbacks.inject_nan._target_=losslab.faults.InjectNonFiniteLoss", f"+callbacks.inject_nan.step={NAN_STEP}"]
FILL_DISK = ["+callbacks.fill_disk._target_=losslab.faults.FillDisk", "+callbacks.fill_disk.epoch=1"]
TIMEOUT_S = 600


def command(out: Path, run_name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), *RUN, f"paths.log_dir={out}", f"run_name={run_name}",
            *overrides]  # fmt: skip


def run_dir(out: Path, run_name: str) -> Path:
    return out / "runs" / run_name


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end; its output goes to ``log`` too."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_environment(), timeout=TIMEOUT_S)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n[exit {done.returncode}]\n{done.stdout}\n{done.stderr}")
    return done


def results(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "results.json").read_text())
    except (OSError, ValueError):
        return None


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint was saved at (None when missing or unreadable)."""
    import torch  # only here: the drill itself starts fast

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["epoch"])
    except Exception:
        return None


def _wait_for(path: Path, process: subprocess.Popen) -> bool:
    while not path.exists():
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    return True


def timed_run(cmd: list[str], directory: Path, log: Path) -> float:
    """Run ``cmd`` to its end; the seconds from the start of its training (``config.yaml`` written) until its
    ``results.json`` appears."""
    with open(log, "w") as stream:
        process = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO, env=_environment())
        _wait_for(directory / "config.yaml", process)
        started = time.perf_counter()
        _wait_for(directory / "results.json", process)
        window = time.perf_counter() - started
        if process.wait(timeout=TIMEOUT_S) != 0:
            raise RuntimeError(f"the reference run failed: see {log}")
    return window


def kill_during_training(
    cmd: list[str], directory: Path, delay: float, log: Path, after: Path | None = None
) -> str | None:
    """Start ``cmd``, SIGKILL it ``delay`` seconds after its training starts (``config.yaml`` written; or file
    ``after`` appears); returns where the kill landed ("before the first checkpoint", "after epoch N",
    "after results.json"), or None if it exited first."""
    with open(log, "w") as stream:
        process = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO, env=_environment())
        started = _wait_for(after or directory / "config.yaml", process)
        deadline = time.perf_counter() + delay
        while started and process.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.002)
        if process.poll() is not None:
            return None
        process.send_signal(signal.SIGKILL)
        process.wait()
    if (directory / "results.json").exists():
        return "after results.json"
    epoch = checkpoint_epoch(directory / "checkpoints" / "last.ckpt")
    return "before the first checkpoint" if epoch is None else f"after epoch {epoch + 1}"


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The ``error: ...`` lines a run printed on stderr (its log lines are there too)."""
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def same_metrics(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return bool(a and b) and a["test"] == b["test"] and a["val"] == b["val"]


@dataclass
class Drill:
    out: Path
    seed: int = 0
    reference: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kill_points: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, ok: bool = True) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(ok)

    def ensure_reference(self) -> tuple[dict[str, Any], float]:
        directory = run_dir(self.out, "reference")
        shutil.rmtree(directory, ignore_errors=True)
        window = timed_run(command(self.out, "reference"), directory, self.out / "logs" / "reference.log")
        self.reference = results(directory)
        if not self.reference or self.reference.get("status") != "completed":
            raise RuntimeError(f"the reference run left no completed results.json in {directory}")
        return self.reference, window

    def kills(self, n: int, window: float) -> None:
        """``n`` runs killed at a uniform random moment of the reference's training-to-exit window, each resumed."""
        rng = random.Random(self.seed)
        for index in range(n):
            name = f"kill_{index:02d}"
            directory = run_dir(self.out, name)
            shutil.rmtree(directory, ignore_errors=True)
            cmd = command(self.out, name)
            where = kill_during_training(cmd, directory, rng.uniform(0.0, window), self.out / "logs" / f"{name}.log")
            self.count("kills_attempted")
            if where is None:
                self.count("finished_before_kill")
                continue
            self.count("kills_injected")
            self.kill_points[where] = self.kill_points.get(where, 0) + 1
            done = run(cmd, self.out / "logs" / f"{name}.resume.log")
            resumed = results(directory)
            survived = done.returncode == 0 and bool(resumed) and resumed.get("status") == "completed"
            self.count("kills_survived", survived)
            self.count("kills_identical", survived and same_metrics(resumed, self.reference))
            self.count("kills_lost", not survived)
            if survived and not same_metrics(resumed, self.reference):
                self.notes.append(f"{name} (killed {where}): metrics differ from the reference")
            elif not survived:
                self.notes.append(f"{name} (killed {where}): not completed, see {self.out / 'logs'}")

    def nan(self) -> None:
        name = "nan"
        directory = run_dir(self.out, name)
        shutil.rmtree(directory, ignore_errors=True)
        stopped = run(command(self.out, name, *INJECT_NAN, "non_finite=stop"), self.out / "logs" / "nan.stop.log")
        failed = results(directory) or {}
        stop_lines = error_lines(stopped)
        last_good = failed.get("last_good_checkpoint")
        clear = (
            stopped.returncode == 2 and "Traceback" not in stopped.stderr and len(stop_lines) == 1
            and f"global step {NAN_STEP}" in stop_lines[0] and "loss=nan" in stop_lines[0]
            and failed.get("status") == "failed" and failed.get("error") == stop_lines[0].removeprefix("error: ")
            and bool(last_good) and checkpoint_epoch(Path(last_good)) == 0
        )  # fmt: skip
        self.count("nan_stopped_clearly", clear)
        if not clear:
            self.notes.append(f"non_finite=stop: no clear stop (exit {stopped.returncode}), see {self.out / 'logs'}")
        skipped = run(command(self.out, name, *INJECT_NAN, "non_finite=skip"), self.out / "logs" / "nan.skip.log")
        completed = results(directory) or {}
        ok = (
            skipped.returncode == 0 and f"resuming from {last_good}" in skipped.stderr + skipped.stdout
            and completed.get("status") == "completed" and completed.get("skipped_steps") == 1
            and completed.get("epochs_completed") == 3
        )  # fmt: skip
        self.count("nan_skipped", ok)
        if not ok:
            self.notes.append(f"non_finite=skip: did not resume and complete with skipped_steps=1 "
                              f"(got {completed.get('skipped_steps')}), see {self.out / 'logs'}")  # fmt: skip

    def _completed_run(self, name: str) -> Path:
        """The reference command run to completion in its own directory. (Not a copy of the reference's: a moved
        run directory resumes without its best checkpoint's score, which Lightning drops when dirpath changes.)"""
        directory = run_dir(self.out, name)
        shutil.rmtree(directory, ignore_errors=True)
        if run(command(self.out, name), self.out / "logs" / f"{name}.first.log").returncode != 0:
            raise RuntimeError(f"{name}: the run to corrupt failed, see {self.out / 'logs'}")
        return directory

    def _rerun(self, name: str, case: str, expect_in_log: str) -> bool:
        done = run(command(self.out, name), self.out / "logs" / f"{name}.log")
        directory = run_dir(self.out, name)
        ok = (
            done.returncode == 0 and same_metrics(results(directory), self.reference)
            and expect_in_log in done.stderr + done.stdout and not list(directory.glob("**/.*.tmp"))
        )  # fmt: skip
        if not ok:
            self.notes.append(f"{case}: not handled, see {self.out / 'logs' / f'{name}.log'}")
        return ok

    def corrupt(self) -> None:
        from losslab.faults import truncate

        # Killed during the final evaluation, with last.ckpt damaged: resumes from best.ckpt, repeats the epochs since.
        directory = self._completed_run("corrupt_checkpoint")
        (directory / "results.json").unlink()
        truncate(directory / "checkpoints" / "last.ckpt")
        self.count("corrupt_handled", self._rerun("corrupt_checkpoint", "truncated last.ckpt",
                                                        "cannot be read (truncated or corrupt): resuming from"))
        # Killed while writing results.json: the atomic writer's temporary file, half written, and no results.json.
        directory = self._completed_run("half_written_results")
        text = (directory / "results.json").read_text()
        (directory / "results.json").unlink()
        (directory / ".results.json.drill.tmp").write_text(text[: len(text) // 2])
        self.count("corrupt_handled", self._rerun("half_written_results", "half-written results.json", "resuming"))
        # A results.json truncated by something else than LossLab's writer: unreadable, so the run goes on again.
        directory = self._completed_run("truncated_results")
        truncate(directory / "results.json")
        self.count("corrupt_handled", self._rerun("truncated_results", "truncated results.json", "cannot be read"))
        self.count("corrupt_cases", 3)

    def inputs(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))  # the bad-input table and its damaged files live with the tests
        from bad_inputs import CASES, clear_refusal, refusal, write_bad_data

        data = write_bad_data(Path(tempfile.mkdtemp(prefix="bad_data_", dir=self.out)))
        logs = self.out / "logs" / "inputs.log"
        with open(logs, "w") as log:
            for index, (overrides, expected) in enumerate(CASES):
                overrides = [override.replace("{data}", str(data)) for override in overrides]
                code, stderr = refusal(overrides, self.out / "inputs" / f"{index:02d}")
                line = clear_refusal(code, stderr)
                clear = line is not None and re.search(expected.replace("{data}", re.escape(str(data))), line)
                self.count("inputs_tried")
                self.count("inputs_clear", bool(clear))
                log.write(f"$ {' '.join(overrides)}\n[exit {code}] {'clear' if clear else 'UNCLEAR'}\n{stderr}\n")
                if not clear:
                    self.notes.append(f"bad input {' '.join(overrides)}: exit {code}, {stderr.strip()[-300:]!r}")

    def disk(self) -> None:
        name = "disk_full"
        directory = run_dir(self.out, name)
        shutil.rmtree(directory, ignore_errors=True)
        full = run(command(self.out, name, *FILL_DISK), self.out / "logs" / f"{name}.log")
        line = error_lines(full)
        clear = (
            full.returncode == 2 and "Traceback" not in full.stderr and len(line) == 1
            and "No space left on device" in line[0] and str(directory / "checkpoints") in line[0]
            and not (directory / "results.json").exists() and not list(directory.glob("**/.*.tmp"))
            and checkpoint_epoch(directory / "checkpoints" / "last.ckpt") == 0
        )  # fmt: skip
        self.count("disk_full_clear", clear)
        if not clear:
            self.notes.append(f"disk full: no clear stop (exit {full.returncode}), see {self.out / 'logs'}")
        self.count("disk_full_resumed", self._rerun(name, "disk full", "resuming from"))
        unwritable = run([sys.executable, str(REPO / "scripts" / "train.py"), *RUN, "paths.log_dir=/proc/losslab_drill"],
                         self.out / "logs" / "unwritable.log")  # fmt: skip
        clear = unwritable.returncode == 2 and unwritable.stderr.strip().startswith("error: hydra.run.dir=/proc/")
        self.count("unwritable_refused", clear and "cannot write in /proc" in unwritable.stderr)
        if not clear:
            self.notes.append(f"unwritable output dir: not refused clearly (exit {unwritable.returncode})")

    def summary(self, parts: list[str]) -> str:
        c = self.counts.get
        lines = [f"fault drill: {' '.join(RUN)} (kill times seeded {self.seed}); runs under {self.out}"]
        if "kills" in parts:
            lines.append(f"kills    injected {c('kills_injected', 0):>3}  survived {c('kills_survived', 0):>3}  "
                         f"identical {c('kills_identical', 0):>3}  lost {c('kills_lost', 0):>3}"
                         f"   (exited before its kill: {c('finished_before_kill', 0)})")  # fmt: skip
            where = ", ".join(f"{point} {n}" for point, n in sorted(self.kill_points.items()))
            lines.append(f"         killed {where or '-'}")
        if "nan" in parts:
            lines.append(f"NaN      stopped clearly {c('nan_stopped_clearly', 0)}/1  "
                         f"skipped (resumed under non_finite=skip, skipped_steps=1) {c('nan_skipped', 0)}/1")  # fmt: skip
        if "inputs" in parts:
            lines.append(f"inputs   tried {c('inputs_tried', 0):>3}  rejected with a clear message {c('inputs_clear', 0):>3}  "
                         f"unclear {c('inputs_tried', 0) - c('inputs_clear', 0):>3}")  # fmt: skip
        if "disk" in parts:
            lines.append(f"disk     full mid-checkpoint: stopped clearly {c('disk_full_clear', 0)}/1, resumed identical "
                         f"{c('disk_full_resumed', 0)}/1; unwritable output dir refused {c('unwritable_refused', 0)}/1")  # fmt: skip
        if "corrupt" in parts:
            lines.append(f"corrupt  handled {c('corrupt_handled', 0)}/{c('corrupt_cases', 3)}  (truncated last.ckpt, "
                         "half-written results.json, truncated results.json)")  # fmt: skip
        lines += [f"  ! {note}" for note in self.notes]
        return "\n".join(lines)

    @property
    def passed(self) -> bool:
        c = self.counts.get
        return not self.notes and c("kills_lost", 0) == 0 and c("kills_identical", 0) == c("kills_injected", 0)


PARTS = ("inputs", "kills", "nan", "disk", "corrupt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="runs to kill and resume (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the runs (default: a new temporary one)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {','.join(unknown)}; choose from {','.join(PARTS)}")
    out = (args.out or Path(tempfile.mkdtemp(prefix="losslab_fault_drill_"))).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    drill = Drill(out, args.seed)
    started = time.perf_counter()
    if "inputs" in parts:
        drill.inputs()
    _, window = drill.ensure_reference()
    if "kills" in parts:
        drill.kills(args.kills, window)
    if "nan" in parts:
        drill.nan()
    if "disk" in parts:
        drill.disk()
    if "corrupt" in parts:
        drill.corrupt()
    print(drill.summary(parts))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if drill.passed else 1


if __name__ == "__main__":
    sys.exit(main())
