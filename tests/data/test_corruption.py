"""Label noise and class imbalance: exact rates, the papers' maps, seeding, and what a run records."""

import pytest
import torch

from conftest import run_training
from losslab.data.corruption import (
    ASYMMETRIC_MAPS,
    CIFAR100_COARSE,
    add_label_noise,
    cifar100_superclass_map,
    long_tail_counts,
    subsample_long_tail,
)
from losslab.errors import ConfigError

LABELS = torch.arange(1000) % 10


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_noise_flips_exactly_the_rate_per_class(kind, rate):
    noisy, record = add_label_noise(LABELS, 10, kind, rate, seed=0, dataset="cifar10")
    for cls in range(10):
        assert int((noisy[LABELS == cls] != cls).sum()) == round(rate * 100)
    assert record["realised_rate"] == pytest.approx(rate) and record["n_noisy"] == round(rate * 1000)


def test_symmetric_noise_spreads_over_the_other_classes():
    noisy, _ = add_label_noise(torch.zeros(9000, dtype=torch.long), 10, "symmetric", 0.9, seed=1, dataset="x")
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 900 and counts[1:].min() > 800  # ~900 each, never back to the true class


def test_pairflip_moves_to_the_next_class():
    noisy, _ = add_label_noise(LABELS, 10, "pairflip", 0.4, seed=0, dataset="x")
    changed = noisy != LABELS
    assert torch.equal(noisy[changed], (LABELS[changed] + 1) % 10)


def test_asymmetric_cifar10_follows_the_papers_map():
    noisy, record = add_label_noise(LABELS, 10, "asymmetric", 0.4, seed=0, dataset="cifar10")
    expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    for source in range(10):
        moved = noisy[(LABELS == source) & (noisy != LABELS)]
        if source in expected:
            assert len(moved) == 40 and set(moved.tolist()) == {expected[source]}
        else:
            assert len(moved) == 0
    assert record["realised_rate"] == pytest.approx(0.4 * 5 / 10)
    assert ASYMMETRIC_MAPS["cifar10"] == expected


def test_cifar100_map_stays_within_each_super_class():
    assert sorted(torch.bincount(torch.tensor(CIFAR100_COARSE)).tolist()) == [5] * 20
    mapping = cifar100_superclass_map()
    assert all(CIFAR100_COARSE[a] == CIFAR100_COARSE[b] and a != b for a, b in mapping.items())
    assert sorted(mapping.values()) == list(range(100))  # a permutation: each class receives from one


def test_noise_is_seeded():
    first, _ = add_label_noise(LABELS, 10, "symmetric", 0.5, seed=3, dataset="x")
    assert torch.equal(first, add_label_noise(LABELS, 10, "symmetric", 0.5, seed=3, dataset="x")[0])
    assert not torch.equal(first, add_label_noise(LABELS, 10, "symmetric", 0.5, seed=4, dataset="x")[0])


@pytest.mark.parametrize(
    ("kind", "rate", "dataset", "option"),
    [("uniform", 0.2, "x", "label_noise.kind"), ("symmetric", 1.0, "x", "label_noise.rate"),
     ("asymmetric", 0.2, "svhn", "label_noise.kind=asymmetric")],
)  # fmt: skip
def test_bad_noise_settings_name_the_option(kind, rate, dataset, option):
    with pytest.raises(ConfigError, match=option):
        add_label_noise(LABELS, 10, kind, rate, seed=0, dataset=dataset)


def test_long_tail_counts_follow_the_exponential_profile():
    counts = long_tail_counts(torch.full((10,), 5000), 100)
    assert counts[0] == 5000 and counts[-1] == 50
    expected = [int(5000 * 100 ** (-c / 9)) for c in range(10)]
    assert counts.tolist() == expected
    kept = subsample_long_tail(torch.arange(50000) % 10, 100, seed=0)
    assert torch.bincount(torch.arange(50000)[kept] % 10).tolist() == expected
    with pytest.raises(ConfigError, match="imbalance_factor"):
        long_tail_counts(torch.full((10,), 10), 0.5)


def test_noisy_run_records_the_realised_rate_and_memorisation(tmp_path):
    results = run_training(["dataset=digits", "dataset.label_noise.rate=0.4", "trainer.max_epochs=2",
                            "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"], tmp_path)  # fmt: skip
    noise = results["label_noise"]
    assert noise["kind"] == "symmetric" and noise["realised_rate"] == pytest.approx(0.4, abs=0.01)
    assert 0 <= noise["memorised"] <= 1 and 0 <= noise["corrected"] <= 1
    assert noise["memorised"] + noise["corrected"] <= 1 + 1e-6
    assert results["data"]["split"]["label_noise"]["n_noisy"] == noise["n_noisy"]


def test_long_tailed_run_reports_shot_accuracies_on_a_balanced_validation_split(tmp_path):
    results = run_training(["dataset=digits", "dataset.imbalance_factor=10", "trainer.max_epochs=2",
                            "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"], tmp_path)  # fmt: skip
    counts = results["data"]["split"]["train_class_counts"]
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    assert {"acc_many_shot", "acc_few_shot"} <= set(results["test"])
    assert len(results["per_class_accuracy"]["test"]) == 10
