"""Multi-label runs end to end: the metrics on a hand-computed case, the module on multi-hot batches, the
start-up refusal of single-label losses, and short trainings on both multi-label datasets."""

import json
import math

import pytest
import torch

from conftest import run_training
from losslab.errors import ConfigError
from losslab.losses import CrossEntropy, SupCon
from losslab.losses.multilabel import AsymmetricLoss
from losslab.metrics import MultilabelMeanAveragePrecision, MultiLabelStageMetrics
from losslab.objective import Objective
from reference import TinyBackbone

# 4 images, 3 classes; the third class has no positive.
PROBABILITIES = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.4, 0.3], [0.2, 0.7, 0.05]])
TARGET = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
# By hand. AP, ranking by score: class 0: + - - + -> (1/1 + 2/4) / 2; class 1: + - + - -> (1/1 + 2/3) / 2;
# class 2: no positive, no AP. Predictions p >= 0.5: rows 0 and 1 exactly right, rows 2 and 3 each wrong on
# two labels. F1: class 0 and 1 have TP 1, FP 1, FN 1 -> 1/2; class 2 nothing -> 0.
EXPECTED = {
    "map": (0.75 + 5 / 6) / 2,
    "f1_macro": (0.5 + 0.5 + 0.0) / 3,
    "f1_micro": 2 * 2 / (2 * 2 + 2 + 2),
    "acc_subset": 2 / 4,
    "hamming": 4 / 12,
}


def test_multi_label_metrics_match_a_hand_computed_case():
    metrics = MultiLabelStageMetrics(num_classes=3)
    logits = torch.logit(PROBABILITIES)
    metrics.update(logits[:3], TARGET[:3].float(), evaluation=True)  # two batches accumulate
    metrics.update(logits[3:], TARGET[3:].float(), evaluation=True)
    values = {name: float(metric.compute()) for name, metric in metrics.items().items()}
    assert values == pytest.approx(EXPECTED)
    per_class = metrics.finish_evaluation()
    assert per_class[:2] == pytest.approx([0.75, 5 / 6]) and per_class[2] is None
    assert metrics.finish_evaluation() is None  # reset


def test_mean_average_precision_skips_classes_without_positives_where_torchmetrics_counts_zero():
    from torchmetrics.functional.classification import multilabel_average_precision

    mean_ap = MultilabelMeanAveragePrecision(num_classes=3)
    mean_ap.update(PROBABILITIES, TARGET)
    assert float(mean_ap.compute()) == pytest.approx(EXPECTED["map"])
    with pytest.warns(UserWarning):
        counted = multilabel_average_precision(PROBABILITIES, TARGET, num_labels=3)
    assert float(counted) == pytest.approx(EXPECTED["map"] * 2 / 3)


def module_for(loss, multi_label=True):
    return Objective(TinyBackbone(), loss, num_classes=3, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                     multi_label=multi_label)  # fmt: skip


def test_module_on_a_multi_label_dataset_passes_multi_hot_targets_and_uses_multi_label_metrics():
    seen = {}

    class Recording(AsymmetricLoss):
        def forward(self, logits, target):
            seen["target"] = target
            return super().forward(logits, target)

    module = module_for(Recording())
    assert isinstance(module.metrics["val_metrics"], MultiLabelStageMetrics)
    target = TARGET.float()
    module._step((torch.randn(4, 3, 2, 2), target), "val").backward()
    assert torch.equal(seen["target"], target)
    module._finish_evaluation("val")
    assert len(module.per_class_average_precision["val"]) == 3
    assert module.per_class_average_precision["val"][2] is None  # no positive of class 2
    assert set(module.metrics["val_metrics"].items()) == set(EXPECTED)


def test_module_refuses_a_loss_without_multi_label_support():
    for loss in (CrossEntropy(), SupCon(0.1)):
        with pytest.raises(TypeError, match="supports_multi_label"):
            module_for(loss)


# ---- Start-up and training ---------------------------------------------------------------------------------

QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def mosaic_overrides(data_dir):
    return ["dataset=fashion_mnist_mosaic", f"paths.data_dir={data_dir}", "dataset.download=false",
            "dataset.n_train=40", "dataset.n_test=16", "dataset.val_fraction=0.25", "dataset.batch_size=8", *QUIET]  # fmt: skip


@pytest.mark.parametrize("loss", ["ce", "supcon"])
def test_single_label_loss_on_a_multi_label_dataset_is_refused_at_start_up(loss, fake_data_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_training([*mosaic_overrides(fake_data_dir), f"loss={loss}"], tmp_path / "run")
    assert str(error.value).startswith(f"loss={loss} does not support multi-label targets")
    assert "dataset=fashion_mnist_mosaic is multi-label; use one of: asl, bce, focal" in str(error.value)
    assert not (tmp_path / "run" / "results.json").exists()


def check_multi_label_results(results, run_dir, num_classes):
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["test"] == pytest.approx(results["test"])
    for name in ("map", "f1_macro", "f1_micro", "acc_subset", "hamming"):
        assert 0.0 <= on_disk["test"][name] <= 1.0, name
    assert "acc" not in on_disk["test"] and math.isfinite(on_disk["test"]["loss"])
    assert len(on_disk["per_class_average_precision"]["test"]) == num_classes
    assert on_disk["config"]["optimized_metric"] == "val/map"
    return on_disk


def test_asl_trains_on_fashion_mnist_mosaics_and_selects_checkpoints_on_val_map(fake_data_dir, tmp_path):
    # One real epoch (not fast_dev_run, which skips checkpoints): the best checkpoint must find val/map.
    run_dir = tmp_path / "run"
    results = run_training([*mosaic_overrides(fake_data_dir), "loss=asl", "trainer.max_epochs=1",
                            "trainer.accelerator=cpu", "trainer.precision=32-true"], run_dir)  # fmt: skip
    on_disk = check_multi_label_results(results, run_dir, num_classes=10)
    assert on_disk["monitor"] == "val/map" and on_disk["evaluated_checkpoint"] == "best.ckpt"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert on_disk["data"]["split"]["n_train"] == 30


def test_bce_trains_on_a_labels_csv_folder(fake_multilabel_folder, tmp_path):
    overrides = ["dataset=multilabel_folder", f"dataset.root={fake_multilabel_folder.root}", "dataset.num_workers=0",
                 "dataset.image_size=16", "dataset.batch_size=4", "loss=bce", "debug=fdr", *QUIET]  # fmt: skip
    results = run_training(overrides, tmp_path / "run")
    check_multi_label_results(results, tmp_path / "run", num_classes=3)


def test_multi_label_runs_select_on_val_map_unless_told_another_metric(tmp_path):
    from conftest import compose_config
    from losslab.train import _validate

    def selection(overrides):
        cfg = compose_config(overrides, tmp_path)
        _validate(cfg)
        return cfg.optimized_metric, cfg.callbacks.best_checkpoint.monitor

    assert selection(["dataset=fashion_mnist_mosaic"]) == ("val/map", "val/map")
    assert selection(["dataset=multilabel_folder", "optimized_metric=val/f1_macro"]) == ("val/f1_macro", "val/map")
    assert selection(["dataset=fashion_mnist_mosaic", "callbacks.best_checkpoint.monitor=val/f1_micro"]) == (
        "val/map", "val/f1_micro")
    assert selection(["dataset=fashion_mnist"]) == ("val/acc", "val/acc")
