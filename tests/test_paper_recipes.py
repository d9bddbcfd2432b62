"""The recipes for PolyLoss (Leng et al. 2022), the normalized losses (Ma et al. 2020) and the
multi-similarity loss (Wang et al. 2019): every row states its published number and source and composes with
its overrides, one row of each runs one batch on generated files in the dataset's real on-disk format, and
losslab-reproduce plans them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import fake_formats
from conftest import CONFIG_DIR, REPO, compose_config, run_training
from losslab.reproduce import compare_with_paper, main, to_markdown

RECIPES = ("polyloss_epsilon", "normalized_loss_cifar10", "multi_similarity_cub")
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]
# One batch on the CPU: the recipes' GPU trainer and precision would not run here.
ONE_BATCH = ["debug=fdr", "trainer.accelerator=cpu", "trainer.precision=32-true", *QUIET]


def recipe_file(name: str) -> dict:
    return OmegaConf.to_container(
        OmegaConf.load(REPO / "configs" / "experiment" / "paper" / f"{name}.yaml").paper
    )


def pending_rows(paper: dict) -> dict[str, list[str]]:
    """The settings a recipe states without a published number yet: ``<loss>_sym<rate in %>``."""
    pending = paper.get("pending") or {}
    losses, rates = pending.get("losses", {}), pending.get("noise_rates", [])
    return {f"{loss}_sym{round(100 * rate)}": [*overrides, f"dataset.label_noise.rate={rate}"]
            for loss, overrides in losses.items() for rate in rates}  # fmt: skip


def all_rows(name: str) -> dict[str, list[str]]:
    paper = recipe_file(name)
    return {**{row: spec["overrides"] for row, spec in paper["rows"].items()}, **pending_rows(paper)}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Every row (and pending row) of the three recipes, composed once: (name, row) -> config."""
    output = tmp_path_factory.mktemp("compose")
    GlobalHydra.instance().clear()
    configs = {}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name in RECIPES:
            configs[name, None] = compose_config([f"experiment=paper/{name}"], output, initialized=True)
            for row, overrides in all_rows(name).items():
                configs[name, row] = compose_config(
                    [f"experiment=paper/{name}", f"paper_row={row}", *overrides], output, initialized=True
                )
    return configs


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_states_its_source_and_a_published_number_with_its_table_cell_per_row(name, composed):
    paper = OmegaConf.to_container(composed[name, None].paper, resolve=True)
    assert (
        paper["name"] == name and paper["source"] and paper["metric"].startswith("test/") and paper["seeds"]
    )
    for row, spec in paper["rows"].items():
        assert 0 < spec["published"] <= 1, row
        assert spec["label"] and spec["source_row"] and spec["overrides"], row


def test_every_row_composes_with_its_overrides(composed):
    for name in RECIPES:
        for row, overrides in all_rows(name).items():
            cfg = composed[name, row]
            assert cfg.paper_row == row
            for override in overrides:
                key, _, value = override.partition("=")
                if key != "loss":  # a group choice, checked through its target below
                    assert str(OmegaConf.select(cfg, key)) == value, (name, row, key)


def test_polyloss_baseline_fine_tunes_the_imagenet21k_efficientnetv2_with_cross_entropy(composed):
    cfg = composed["polyloss_epsilon", "ce"]
    assert cfg.dataset.name == "imagenet" and cfg.dataset.test_dir == "val" and cfg.dataset.image_size == 384
    assert cfg.backbone.name == "tf_efficientnetv2_l.in21k" and cfg.backbone.pretrained
    assert cfg.loss._target_ == "losslab.losses.CrossEntropy"
    assert cfg.paper.rows.ce.published == pytest.approx(0.868)


def test_poly1_epsilon_is_the_loss_option_a_poly1_row_would_set(tmp_path):
    cfg = compose_config(["experiment=paper/polyloss_epsilon", "loss=poly1", "loss.epsilon=2.0"], tmp_path)
    assert cfg.loss._target_ == "losslab.losses.polynomial.Poly1" and cfg.loss.epsilon == 2.0


def test_normalized_loss_settings_follow_the_authors_code(composed):
    rows = pending_rows(recipe_file("normalized_loss_cifar10"))
    assert len(rows) == 8 * 4 and not recipe_file("normalized_loss_cifar10")["rows"]
    for row in rows:
        cfg = composed["normalized_loss_cifar10", row]
        assert cfg.dataset.name == "cifar10" and cfg.dataset.label_noise.kind == "symmetric"
        assert cfg.dataset.label_noise.rate == int(row.rsplit("_sym", 1)[1]) / 100
        assert (
            cfg.dataset.val_fraction == 0 and cfg.eval_checkpoint == "last" and cfg.dataset.batch_size == 128
        )
        assert list(cfg.backbone.channels) == [64, 128, 196] and cfg.backbone.convs_per_block == 2
        assert cfg.optimizer.lr == 0.01 and cfg.optimizer.weight_decay == 1e-4 and not cfg.optimizer.nesterov
        assert cfg.trainer.max_epochs == 120 and cfg.trainer.gradient_clip_val == 5.0
    assert composed["normalized_loss_cifar10", "focal_sym40"].loss.gamma == 0.5
    assert composed["normalized_loss_cifar10", "nce_rce_sym80"].loss.rce_form == "code"


def test_multi_similarity_rows_train_their_embedding_size_with_the_official_loss_values(composed):
    for row, dim in (("ms_512", 512), ("ms_64", 64)):
        cfg = composed["multi_similarity_cub", row]
        assert cfg.objective.projection_dim == dim and cfg.dataset.name == "cub200"
        assert cfg.loss._target_ == "losslab.losses.pair.MultiSimilarity"
        assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.lambda_, cfg.loss.epsilon) == (2.0, 40.0, 0.5, 0.1)
        assert (
            cfg.dataset.sampler == "m_per_class"
            and cfg.dataset.batch_size == 80
            and cfg.dataset.m_per_class == 5
        )
    assert composed["multi_similarity_cub", None].paper.metric == "test/recall_at_1"


def run_one_batch(name: str, row: str, overrides: list[str], tmp_path: Path) -> dict:
    results = run_training(
        [f"experiment=paper/{name}", f"paper_row={row}", *overrides, *ONE_BATCH], tmp_path / "run"
    )
    assert results["config"]["paper_row"] == row and results["status"] == "completed"
    return results


def test_polyloss_backbone_names_timm_weights_that_exist(composed):
    timm = pytest.importorskip("timm")
    name = composed["polyloss_epsilon", "ce"].backbone.name
    assert timm.is_model(name) and name in timm.list_pretrained(name.split(".")[0] + "*")


def test_polyloss_row_runs_one_batch_on_an_imagenet_folder(fake_image_folder, tmp_path):
    # The smallest EfficientNetV2 stands in for -L (117M parameters: 20 s on one CPU core); no download.
    data = [
        f"dataset.root={fake_image_folder}",
        "dataset.num_workers=0",
        "dataset.image_size=32",
        "dataset.batch_size=4",
    ]
    overrides = [
        *all_rows("polyloss_epsilon")["ce"],
        *data,
        "backbone.name=tf_efficientnetv2_b0",
        "backbone.pretrained=false",
    ]
    results = run_one_batch("polyloss_epsilon", "ce", overrides, tmp_path)
    assert 0.0 <= results["test"]["acc"] <= 1.0


def test_normalized_loss_setting_runs_one_batch_on_noisy_cifar10_pickles(fake_data_dir, tmp_path):
    data = [f"paths.data_dir={fake_data_dir}", "dataset.download=false", "dataset.batch_size=8"]
    overrides = [*all_rows("normalized_loss_cifar10")["nce_rce_sym40"], *data]
    results = run_one_batch("normalized_loss_cifar10", "nce_rce_sym40", overrides, tmp_path)
    assert 0.0 <= results["test"]["acc"] <= 1.0


def test_multi_similarity_row_runs_one_batch_on_a_cub_folder(tmp_path):
    fake_formats.write_cub200(tmp_path / "data")
    data = [f"dataset.root={tmp_path / 'data'}", "dataset.num_workers=0", "dataset.image_size=16",
            "dataset.batch_size=8", "dataset.m_per_class=4"]  # fmt: skip
    overrides = [*all_rows("multi_similarity_cub")["ms_512"], *data, "backbone.weights=null"]
    results = run_one_batch("multi_similarity_cub", "ms_512", overrides, tmp_path)
    assert 0.0 <= results["test"]["recall_at_1"] <= 1.0


@pytest.mark.parametrize(("name", "expected"), [
    ("polyloss_epsilon", ["paper_row=ce", "loss=ce"]),
    ("multi_similarity_cub", ["paper_row=ms_512", "objective.projection_dim=512", "paper_row=ms_64"]),
])  # fmt: skip
def test_reproduce_plans_one_multirun_per_row(name, expected, capsys):
    assert main([f"paper/{name}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert all(part in printed for part in expected) and f"experiment=paper/{name}" in printed


def test_reproduce_prints_the_published_numbers_before_any_run(tmp_path):
    paper = recipe_file("multi_similarity_cub")
    markdown = to_markdown(paper, compare_with_paper(paper, tmp_path / "none", list(paper["rows"])))
    assert "| MS loss, 512-d embedding | 65.70 | not run |" in markdown and "57.40" in markdown
