"""``losslab-compare`` end to end on synthetic run directories: exit codes, messages and files written."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from synthetic_runs import write_run, write_two_losses

from losslab.report.cli import main

FIGURES = ("metric", "learning_curves", "reliability")


def test_writes_tables_figures_and_a_self_contained_html(tmp_path, capsys):
    two_losses = write_two_losses(tmp_path / "runs")
    out = tmp_path / "report"
    assert main([str(two_losses), "--out", str(out)]) == 0
    for name in ("table.md", "table.csv", "table.tex", "report.html"):
        assert (out / name).is_file(), name
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert "92.00 ± 2.00" in html and str(two_losses / "focal_2") in html
    assert pd.read_csv(out / "table.csv")["group"].tolist() == ["ce", "focal"]
    assert "92.00 ± 2.00" in capsys.readouterr().out


def test_default_output_is_a_report_folder_in_the_first_input(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    assert main([f"{two_losses}/*_[02]", "--format", "md"]) == 0
    assert (two_losses / "report" / "table.md").is_file()
    assert not (two_losses / "report" / "table.csv").exists()


def test_mixed_learning_rates_exit_2_naming_the_key(tmp_path, capsys):
    two_losses = write_two_losses(tmp_path / "runs")
    write_run(two_losses / "ce_fast", seed=3, config={"optimizer.lr": 0.01})
    assert main([str(two_losses), "--out", str(two_losses / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert "optimizer.lr: 0.003 (ce_0), 0.01 (ce_fast)" in error
    assert not (two_losses / "out").exists()


def test_allowed_difference_is_accepted_and_noted_in_the_table(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    write_run(two_losses / "ce_fast", seed=3, config={"optimizer.lr": 0.01})
    out = two_losses / "out"
    assert main([str(two_losses), "--out", str(out), "--allow-differ", "optimizer.lr"]) == 0
    assert "optimizer.lr differs between runs (allowed): 0.003, 0.01" in (out / "table.md").read_text()


def test_no_results_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no completed runs" in capsys.readouterr().err


def test_nll_ranks_lower_first_unless_overridden(tmp_path):
    for seed, (ce, focal) in enumerate([(0.30, 0.25), (0.32, 0.29)]):
        write_run(tmp_path / f"ce_{seed}", seed=seed, test={"nll": ce})
        write_run(tmp_path / f"focal_{seed}", loss="focal", seed=seed, test={"nll": focal})
    out = tmp_path / "out"

    def ranks(*flags):
        assert main([str(tmp_path), "--metric", "test/nll", *flags, "--out", str(out), "--format", "csv"]) == 0
        return pd.read_csv(out / "table.csv")["rank"].tolist()

    assert ranks() == [2, 1]
    assert ranks("--higher-is-better") == [1, 2]
    assert main([str(tmp_path), "--metric", "test/made_up", "--out", str(out)]) == 2


def test_sweep_plot_with_two_grouping_keys(tmp_path):
    for loss in ("ce", "focal"):
        for lr in (0.001, 0.01, 0.1):
            for seed in (0, 1):
                write_run(tmp_path / f"{loss}_{lr}_{seed}", loss=loss, seed=seed,
                          config={"optimizer.lr": lr}, test={"acc": 0.9 - lr + 0.01 * seed * (1 + lr)},
                          calibration=False)
    out = tmp_path / "out"
    assert main([str(tmp_path), "--by", "loss", "--sweep-param", "optimizer.lr", "--out", str(out)]) == 0
    assert (out / "sweep.png").is_file() and (out / "sweep.pdf").is_file()
    assert not (out / "reliability.png").exists()
    assert "table rows pool every value of optimizer.lr" in (out / "table.md").read_text()
    assert main([str(tmp_path), "--by", "loss", "optimizer.lr", "--out", str(out), "--format", "csv"]) == 0
    assert len(pd.read_csv(out / "table.csv")) == 6


def test_groups_by_a_config_key(tmp_path):
    for temperature in (0.1, 0.5):
        for seed in (0, 1):
            write_run(tmp_path / f"t{temperature}_{seed}", loss="supcon", seed=seed,
                      config={"loss.temperature": temperature}, test={"acc": 0.8 + temperature / 10 + seed * temperature / 10})
    out = tmp_path / "out"
    assert main([str(tmp_path), "--by", "loss.temperature", "--baseline", "0.1", "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv")
    assert table["group"].tolist() == [0.1, 0.5] and table["delta"].tolist() == pytest.approx([0.0, 0.06])


def test_console_script_runs(tmp_path):
    two_losses = write_two_losses(tmp_path / "runs")
    script = Path(sys.executable).with_name("losslab-compare")
    command = [str(script)] if script.exists() else [shutil.which("losslab-compare") or "losslab-compare"]
    done = subprocess.run([*command, f"{two_losses}/focal_*", f"{two_losses}/ce_*", "--out", str(tmp_path / "r")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "focal" in done.stdout and (tmp_path / "r" / "report.html").is_file()
