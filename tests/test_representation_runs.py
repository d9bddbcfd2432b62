"""The representation metrics in the training module and in runs: which runs get them, unseen-class stages that
have no class outputs, kNN accuracy and retrieval in results.json, and checkpoint selection on val/map_at_r for
class-disjoint datasets."""

import json
import math

import torch

import fake_formats
from conftest import compose_config, run_training
from losslab.losses import CrossEntropy, SupCon
from losslab.objective import Objective
from losslab.train import _validate
from reference import TinyBackbone

RETRIEVAL = ["precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8"]
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def module_for(loss, **options):
    return Objective(TinyBackbone(), loss, num_classes=3, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                     projection_dim=4, **options)  # fmt: skip


def test_embedding_losses_and_class_disjoint_datasets_get_the_representation_metrics():
    assert module_for(SupCon(0.1)).representation is not None
    assert module_for(CrossEntropy()).representation is None  # its runs stay as they were
    assert module_for(CrossEntropy(), unseen_class_stages=["test"]).representation is not None


def test_an_unseen_class_stage_keeps_features_and_computes_no_class_output():
    module = module_for(CrossEntropy(), unseen_class_stages=["test"])
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2]) + 40  # not the model's classes
    assert module._step((images, labels), "test") is None
    assert not module.metrics["test_metrics"].logits.update_called
    values = module.representation.compute("test")
    assert set(values) == {*RETRIEVAL, "alignment", "uniformity"}  # no bank: no kNN on unseen classes
    module._step((images, labels - 40), "val")  # a stage of training classes still gets everything
    assert module.metrics["val_metrics"].logits.update_called and module.representation.stages["val"].update_called


def test_class_disjoint_runs_select_on_val_map_at_r_unless_told_another_metric(tmp_path):
    def selection(overrides):
        cfg = compose_config(overrides, tmp_path)
        _validate(cfg)
        return cfg.optimized_metric, cfg.callbacks.best_checkpoint.monitor

    assert selection(["dataset=fashion_mnist_disjoint"]) == ("val/map_at_r", "val/map_at_r")
    assert selection(["dataset=cub200", "optimized_metric=val/recall_at_1"]) == ("val/recall_at_1", "val/map_at_r")
    assert selection(["dataset=sop", "callbacks.best_checkpoint.monitor=val/r_precision"]) == (
        "val/map_at_r", "val/r_precision")
    assert selection(["dataset=fashion_mnist"]) == ("val/acc", "val/acc")


def check_retrieval(values: dict[str, float]) -> None:
    for name in RETRIEVAL:
        assert 0.0 <= values[name] <= 1.0, name
    assert 0.0 <= values["alignment"] <= 4.0 and values["uniformity"] <= 0.0


def test_supcon_on_fashion_mnist_disjoint_reports_retrieval_on_unseen_test_classes(fake_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_training(["loss=supcon", "dataset=fashion_mnist_disjoint", f"paths.data_dir={fake_data_dir}",
                  "dataset.download=false", "dataset.val_fraction=0.5", "dataset.batch_size=8", "debug=fdr", *QUIET],
                 run_dir)  # fmt: skip
    results = json.loads((run_dir / "results.json").read_text())
    check_retrieval(results["test"])
    # The test classes were never trained on: no probe accuracy, loss or kNN accuracy there.
    assert not {"acc", "loss", "probe_loss", "knn_acc", "ece"} & set(results["test"])
    check_retrieval(results["val"])  # validation images of the training classes: the probe and kNN apply
    assert 0.0 <= results["val"]["acc"] <= 1.0 and 0.0 <= results["val"]["knn_acc"] <= 1.0
    assert results["config"]["optimized_metric"] == "val/map_at_r" and results["monitor"] == "val/map_at_r"
    assert results["data"]["split"]["classes"]["test"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_supcon_on_digits_reports_knn_accuracy_and_retrieval(tmp_path):
    run_dir = tmp_path / "run"
    run_training(["loss=supcon", "dataset=digits", "debug=fdr", *QUIET], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    for stage in ("val", "test"):
        assert 0.0 <= results[stage]["knn_acc"] <= 1.0 and 0.0 <= results[stage]["acc"] <= 1.0
        check_retrieval(results[stage])


def test_cross_entropy_on_a_class_disjoint_benchmark_is_judged_by_retrieval_and_selected_on_it(tmp_path):
    # One real epoch (fast_dev_run skips checkpoints): validation holds out whole classes, so it has no val/acc,
    # and the best checkpoint must find val/map_at_r.
    fake_formats.write_cub200(tmp_path / "data")
    run_dir = tmp_path / "run"
    results = run_training(["loss=ce", "dataset=cub200", f"dataset.root={tmp_path / 'data'}", "dataset.num_workers=0",
                            "dataset.image_size=16", "dataset.batch_size=4", "dataset.val_fraction=0.4",
                            "debug=default", *QUIET], run_dir)  # fmt: skip
    check_retrieval(results["test"])
    check_retrieval(results["val"])
    assert "acc" not in results["val"] and "acc" not in results["test"] and "knn_acc" not in results["val"]
    assert results["monitor"] == "val/map_at_r" and results["evaluated_checkpoint"] == "best.ckpt"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and math.isfinite(results["val"]["map_at_r"])
