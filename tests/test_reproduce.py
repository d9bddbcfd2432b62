"""Paper recipes: they compose, every row runs one batch on generated files, and losslab-reproduce
prints ours beside the published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import REPO, compose_config, run_training
from losslab.reproduce import compare_with_paper, main, to_markdown

RECIPES = sorted(p.stem for p in (REPO / "configs" / "experiment" / "paper").glob("*.yaml"))
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def recipe(name: str, tmp_path: Path) -> dict:
    return OmegaConf.to_container(compose_config([f"experiment=paper/{name}"], tmp_path).paper, resolve=True)


def test_the_required_recipes_ship():
    assert {"fashion_mnist_benchmark", "supcon_cifar"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_states_its_source_and_published_numbers(name, tmp_path):
    paper = recipe(name, tmp_path)
    assert paper["source"] and paper["metric"].startswith("test/") and paper["seeds"]
    for row, spec in paper["rows"].items():
        assert 0 < spec["published"] <= 1, row
        assert spec["label"] and spec["source_row"] and spec["overrides"]


# Rows whose data the shared fake_data_dir holds; the ImageNet-folder and CUB recipes run their one batch in
# tests/test_paper_recipes.py, on folders generated there.
ONE_BATCH_HERE = ["fashion_mnist_benchmark", "supcon_cifar"]


def rows(name: str) -> list[str]:
    return list(OmegaConf.load(REPO / "configs" / "experiment" / "paper" / f"{name}.yaml").paper.rows)


@pytest.mark.parametrize(("name", "row"), [(name, row) for name in RECIPES for row in rows(name)])
def test_every_recipe_row_composes_with_its_overrides(name, row, tmp_path):
    spec = recipe(name, tmp_path)["rows"][row]
    config = compose_config([f"experiment=paper/{name}", f"paper_row={row}", *spec["overrides"]], tmp_path)
    assert config.paper_row == row
    choices = HydraConfig.get().runtime.choices
    for override in spec["overrides"]:
        key, value = override.lstrip("+~").split("=", 1)
        chosen = choices[key] if key in choices else OmegaConf.select(config, key)
        assert str(chosen).replace(" ", "") == value.replace(" ", ""), override


# The CIFAR-100 rows of supcon_cifar run the code of their CIFAR-10 twins (only the dataset, and with it the class
# count, differ): composing them above is enough, and their one batch would cost a ResNet-50 pass over 300 images.
@pytest.mark.parametrize(
    ("name", "row"),
    [(name, row) for name in ONE_BATCH_HERE for row in rows(name) if not row.endswith("_cifar100")],
)
def test_every_recipe_row_runs_one_batch_on_generated_files(name, row, fake_data_dir, tmp_path):
    spec = recipe(name, tmp_path)["rows"][row]
    overrides = [f"experiment=paper/{name}", f"paper_row={row}", *spec["overrides"], "debug=fdr",
                 f"paths.data_dir={fake_data_dir}", "dataset.download=false", "dataset.batch_size=8",
                 "trainer.accelerator=cpu", "trainer.precision=32-true", *QUIET]  # fmt: skip
    results = run_training(overrides, tmp_path / "run")
    assert results["config"]["paper_row"] == row and results["status"] == "completed"


def test_comparison_table_from_fixed_runs(tmp_path):
    paper = {"source": "Test 2024, Table 1", "metric": "test/acc",
             "rows": {"a": {"label": "A", "published": 0.90}, "b": {"label": "B", "published": 0.80}}}  # fmt: skip
    for seed, value in enumerate([0.91, 0.93]):
        run = tmp_path / f"a{seed}"
        run.mkdir()
        run.joinpath("results.json").write_text(json.dumps(
            {"status": "completed", "seed": seed, "test": {"acc": value}, "config": {"paper_row": "a"}}))  # fmt: skip
    table = compare_with_paper(paper, tmp_path, ["a", "b"])
    assert table[0]["n"] == 2 and table[0]["mean"] == pytest.approx(0.92)
    assert table[0]["difference"] == pytest.approx(0.02) and table[0]["std"] == pytest.approx(0.0141421356)
    assert table[1]["n"] == 0 and "not run" in to_markdown(paper, table)


def test_reproduce_runs_rows_and_writes_the_comparison(tmp_path, capsys):
    code = main(["paper/fashion_mnist_benchmark", "--rows", "two_conv", "--seeds", "0,1", "--",
                 "dataset=digits", "debug=fdr", *QUIET, f"paths.log_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    sweep_dir = tmp_path / "multirun" / "paper_fashion_mnist_benchmark"
    written = json.loads((sweep_dir / "reproduce.json").read_text())
    assert written["rows"][0]["row"] == "two_conv" and written["rows"][0]["n"] == 2
    assert "91.60" in (sweep_dir / "reproduce.md").read_text()


def test_unknown_row_is_a_clear_error(capsys):
    assert main(["paper/fashion_mnist_benchmark", "--rows", "nope", "--report-only"]) == 2
    assert "allowed values are two_conv, mlp, resnet18" in capsys.readouterr().err
