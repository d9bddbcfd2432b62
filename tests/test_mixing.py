"""Batch mixers (losslab.mixing): each mix recomputed by hand from the draws the mixer reports in ``state``."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from losslab.errors import ConfigError
from losslab.mixing import (
    CMixup,
    CutMix,
    DecoupledMixup,
    HybridAugment,
    ManifoldMixup,
    MixedBatch,
    Mixer,
    MixUp,
    MixUpCutMix,
    RankMixup,
    default_mixing_layers,
)
from losslab.models import MLP, ResNet, SmallCNN

MIXING_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mixing"
F64 = torch.float64


def batch_of(n: int = 6, shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, *shape, generator=generator, dtype=F64)
    labels = torch.arange(n) % num_classes
    return images, labels


def one_hot_row(label: int, num_classes: int) -> torch.Tensor:
    return torch.tensor([1.0 if c == label else 0.0 for c in range(num_classes)], dtype=F64)


# ---------------------------------------------------------------------------------------------
# mixup, CutMix and the switch
# ---------------------------------------------------------------------------------------------


def test_mixup_images_and_targets_are_lam_times_the_sample_plus_one_minus_lam_times_its_partner():
    images, labels = batch_of()
    torch.manual_seed(0)
    batch = MixUp(alpha=1.0)(images, labels, 4)
    lam, perm = batch.state["lam"], batch.state["perm"].tolist()
    assert sorted(perm) == list(range(6)) and 0.0 < lam < 1.0 and batch.loss_rows == 6
    for i in range(6):
        torch.testing.assert_close(batch.images[i], lam * images[i] + (1 - lam) * images[perm[i]])
        expected = lam * one_hot_row(int(labels[i]), 4) + (1 - lam) * one_hot_row(int(labels[perm[i]]), 4)
        torch.testing.assert_close(batch.target[i], expected)
    torch.testing.assert_close(batch.target.sum(dim=1), torch.ones(6, dtype=F64))
    assert batch.target.dtype == F64


def test_probability_and_multi_hot_targets_are_mixed_linearly():
    images, _ = batch_of(n=5)
    multi_hot = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    torch.manual_seed(1)
    batch = MixUp()(images.float(), multi_hot, 3)
    lam, perm = batch.state["lam"], batch.state["perm"]
    torch.testing.assert_close(batch.target, lam * multi_hot + (1 - lam) * multi_hot[perm])
    assert batch.target.dtype == torch.float32


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_pastes_the_partners_box_and_lam_is_the_clean_pixel_share(seed):
    images, labels = batch_of(n=5, shape=(2, 8, 10))
    torch.manual_seed(seed)
    batch = CutMix(alpha=1.0)(images, labels, 4)
    lam, perm, (y1, y2, x1, x2) = batch.state["lam"], batch.state["perm"].tolist(), batch.state["box"]
    for i in range(5):
        pasted = 0
        for y in range(8):
            for x in range(10):
                inside = y1 <= y < y2 and x1 <= x < x2
                source = images[perm[i]] if inside else images[i]
                torch.testing.assert_close(batch.images[i, :, y, x], source[:, y, x])
                pasted += inside
        assert lam == pytest.approx(1 - pasted / 80)
        expected = lam * one_hot_row(int(labels[i]), 4) + (1 - lam) * one_hot_row(int(labels[perm[i]]), 4)
        torch.testing.assert_close(batch.target[i], expected)
    torch.testing.assert_close(batch.target.sum(dim=1), torch.ones(5, dtype=F64))


def test_cutmix_box_stays_inside_the_image_and_lam_counts_its_clipped_area():
    images, labels = batch_of(n=4, shape=(1, 32, 32))
    for seed in range(30):
        torch.manual_seed(seed)
        batch = CutMix(alpha=1.0)(images, labels, 4)
        y1, y2, x1, x2 = batch.state["box"]
        assert 0 <= y1 <= y2 <= 32 and 0 <= x1 <= x2 <= 32
        assert batch.state["lam"] == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 1024)


@pytest.mark.parametrize(
    "mixer", [MixUp(), CutMix(), MixUpCutMix(switch_prob=1.0), MixUpCutMix(switch_prob=0.0)]
)
def test_every_view_gets_the_same_partner_lambda_and_box(mixer):
    views = torch.randn(6, 2, 3, 8, 8, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(4)
    batch = mixer(views, labels, 4)
    assert batch.images.shape == views.shape and batch.target.shape == (6, 4)
    lam, perm = batch.state["lam"], batch.state["perm"]
    for v in range(2):
        view = views[:, v]
        if "box" in batch.state:
            y1, y2, x1, x2 = batch.state["box"]
            expected = view.clone()
            expected[:, :, y1:y2, x1:x2] = view[perm][:, :, y1:y2, x1:x2]
        else:
            expected = lam * view + (1 - lam) * view[perm]
        torch.testing.assert_close(batch.images[:, v], expected)


def test_mixup_cutmix_switch_follows_switch_prob():
    images, labels = batch_of(n=4, shape=(1, 8, 8))
    torch.manual_seed(0)
    assert MixUpCutMix(switch_prob=1.0)(images, labels, 4).state["mode"] == "cutmix"
    assert MixUpCutMix(switch_prob=0.0)(images, labels, 4).state["mode"] == "mixup"
    modes = [MixUpCutMix(switch_prob=0.5)(images, labels, 4).state["mode"] for _ in range(200)]
    assert 60 < modes.count("cutmix") < 140


# ---------------------------------------------------------------------------------------------
# Manifold mixup
# ---------------------------------------------------------------------------------------------


def tiny_backbone() -> nn.Sequential:
    torch.manual_seed(123)
    return nn.Sequential(nn.Flatten(1), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_manifold_mixup_leaves_images_clean_and_mixes_exactly_the_chosen_layers_output():
    backbone = tiny_backbone()
    images = torch.randn(6, 1, 2, 2, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixer = ManifoldMixup(alpha=2.0, layers=["2"])
    torch.manual_seed(0)
    batch = mixer(images, labels, 3)
    assert batch.images is images and batch.target.shape == (6, 3)
    lam, perm = batch.state["lam"], batch.state["perm"]
    with mixer.hidden_mixing(backbone, batch):
        mixed_output = backbone(batch.images)
    assert batch.state["layer"] == "2"
    hidden = torch.tanh(backbone[1](images.flatten(1)))
    torch.testing.assert_close(mixed_output, backbone[3](lam * hidden + (1 - lam) * hidden[perm]))
    # The hook is gone once the context closes.
    assert not backbone[2]._forward_hooks
    torch.testing.assert_close(backbone(images), backbone[3](hidden))


def test_manifold_mixup_at_the_input_mixes_the_images():
    backbone = tiny_backbone()
    images, labels = torch.randn(5, 1, 2, 2, dtype=F64), torch.tensor([0, 1, 2, 0, 1])
    mixer = ManifoldMixup(layers=["input"])
    torch.manual_seed(2)
    batch = mixer(images, labels, 3)
    with mixer.hidden_mixing(backbone, batch):
        output = backbone(images)
    lam, perm = batch.state["lam"], batch.state["perm"]
    torch.testing.assert_close(output, backbone(lam * images + (1 - lam) * images[perm]))
    assert not backbone._forward_pre_hooks


def test_manifold_mixup_mixes_every_view_with_the_same_partner():
    backbone = tiny_backbone()
    views = torch.randn(
        4, 3, 1, 2, 2, dtype=F64
    )  # [B, V, C, H, W]; the training module flattens views sample-major
    mixer = ManifoldMixup(layers=["1"])
    torch.manual_seed(5)
    batch = mixer(views, torch.tensor([0, 1, 2, 0]), 3)
    with mixer.hidden_mixing(backbone, batch):
        output = backbone(views.flatten(0, 1))
    lam, perm = batch.state["lam"], batch.state["perm"].tolist()
    hidden = backbone[1](views.flatten(0, 1).flatten(1)).view(4, 3, 5)
    for b in range(4):
        for v in range(3):
            expected = backbone[3](torch.tanh(lam * hidden[b, v] + (1 - lam) * hidden[perm[b], v]))
            torch.testing.assert_close(output[b * 3 + v], expected)


def test_manifold_mixup_draws_each_layer_and_keeps_the_draw_for_a_second_pass_on_the_same_batch():
    backbone = tiny_backbone()
    images, labels = torch.randn(4, 1, 2, 2, dtype=F64), torch.tensor([0, 1, 2, 0])
    mixer = ManifoldMixup(layers=["input", "1", "2"])
    chosen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        batch = mixer(images, labels, 3)
        with mixer.hidden_mixing(backbone, batch):
            first = backbone(images)
        layer = batch.state["layer"]
        with mixer.hidden_mixing(backbone, batch):
            second = backbone(images)
        assert batch.state["layer"] == layer
        torch.testing.assert_close(first, second)
        chosen.add(layer)
    assert chosen == {"input", "1", "2"}


@pytest.mark.parametrize("backbone", [ResNet(3, 8, depth=18, width=4), SmallCNN(3, 8), MLP(3, 8)],
                         ids=["resnet18", "small_cnn", "mlp"])  # fmt: skip
def test_default_layers_of_losslabs_backbones_exist_and_mix(backbone):
    backbone.eval()  # batch norm on running statistics: one sample's output does not depend on the others
    layers = default_mixing_layers(backbone)
    assert layers[0] == "input" and len(layers) >= 2
    modules = dict(backbone.named_modules())
    assert all(name in modules for name in layers[1:])
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    clean = backbone(images)
    mixer = ManifoldMixup()
    for index, layer in enumerate(layers):
        torch.manual_seed(0)
        batch = mixer(images, labels, 4)
        batch.state["layer_draw"] = (index + 0.5) / len(layers)
        with mixer.hidden_mixing(backbone, batch):
            mixed = backbone(images)
        assert batch.state["layer"] == layer
        assert not torch.allclose(mixed, clean)
        torch.testing.assert_close(backbone(images), clean)
    if isinstance(backbone, ResNet):
        assert layers == ["input", "stages.0", "stages.1"]
        # stages.1's output mixed, by hand: the rest of the network applied to the mixed hidden state.
        lam, perm = batch.state["lam"], batch.state["perm"]
        hidden = backbone.stages[1](backbone.stages[0](backbone.stem(images)))
        expected = backbone.pool(backbone.stages[2:](lam * hidden + (1 - lam) * hidden[perm]))
        torch.testing.assert_close(mixed, expected)


def test_manifold_mixup_refuses_unknown_layers_and_backbones_without_defaults():
    backbone = tiny_backbone()
    batch = ManifoldMixup()(torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), 3)
    with pytest.raises(ConfigError, match=r"mixing\.layers"):
        ManifoldMixup(layers=["input", "nope"]).hidden_mixing(backbone, batch)
    with pytest.raises(ConfigError, match=r"mixing=manifold_mixup.*mixing\.layers"):
        ManifoldMixup().hidden_mixing(backbone, batch)


# ---------------------------------------------------------------------------------------------
# RankMixup
# ---------------------------------------------------------------------------------------------


def test_rankmixup_sees_clean_then_mixed_copies_and_keeps_the_hard_labels_for_the_loss():
    images, labels = batch_of(n=5)
    torch.manual_seed(0)
    mixer = RankMixup(mode="mndcg")
    batch = mixer(images, labels, 4)
    assert mixer.num_mixed == 3 and RankMixup(mode="mrl").num_mixed == 1
    assert not mixer.soft_targets and mixer.needs_logits
    assert batch.images.shape == (5 * 4, 3, 8, 8) and batch.loss_rows == 5
    assert torch.equal(batch.target, labels)
    torch.testing.assert_close(batch.images[:5], images)
    lams, perms = batch.state["lams"].tolist(), batch.state["perms"].tolist()
    for k in range(3):
        for i in range(5):
            j = perms[k][i]
            torch.testing.assert_close(
                batch.images[5 + 5 * k + i], lams[k] * images[i] + (1 - lams[k]) * images[j]
            )
            same = int(labels[i]) == int(labels[j])
            assert bool(batch.state["same_source"][k, i]) == same
            expected_relevance = 1.0 if same else max(lams[k], 1 - lams[k])
            assert float(batch.state["relevance"][k, i]) == pytest.approx(expected_relevance)


def rankmixup_logits(mixer: RankMixup, batch: MixedBatch, n_views: int, num_classes: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(9)
    rows = (1 + mixer.num_mixed) * batch.loss_rows * n_views
    return 3 * torch.randn(rows, num_classes, generator=generator, dtype=F64)


@pytest.mark.parametrize("score", ["logit", "confidence"])
@pytest.mark.parametrize("n_views", [1, 2])
def test_mixup_ranking_loss_matches_a_loop(score, n_views):
    shape = (n_views, 1, 4, 4) if n_views > 1 else (1, 4, 4)
    images, labels = batch_of(n=6, shape=shape, num_classes=3)
    mixer = RankMixup(mode="mrl", num_mixed=2, margin=0.5, weight=0.3, score=score)
    torch.manual_seed(1)
    batch = mixer(images, labels, 3)
    logits = rankmixup_logits(mixer, batch, n_views, num_classes=3)
    perms = batch.state["perms"].tolist()

    def score_of(row: int) -> float:
        values = logits[row] if score == "logit" else logits[row].softmax(dim=0)
        return float(values.max())

    total, count = 0.0, 0
    for k in range(2):
        for i in range(6):
            for v in range(n_views):
                count += 1
                if int(labels[i]) == int(labels[perms[k][i]]):
                    continue
                mixed_row, clean_row = ((1 + k) * 6 + i) * n_views + v, i * n_views + v
                total += max(0.0, score_of(mixed_row) - score_of(clean_row) + 0.5)
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.3 * total / count)


def test_mixup_ranking_loss_on_a_hand_made_case():
    mixer = RankMixup(mode="mrl", margin=2.0, weight=0.1)
    batch = MixedBatch(torch.zeros(2, 1), torch.tensor([0]), 1, {
        "n_views": 1, "same_source": torch.tensor([[False]]), "relevance": torch.tensor([[0.7]])})  # fmt: skip
    logits = torch.tensor([[2.0, 0.0], [3.0, 1.0]])  # clean max logit 2, mixed 3: max(0, 3 - 2 + 2) = 3
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.3)
    batch.state["same_source"] = torch.tensor([[True]])
    assert float(mixer.extra_loss(logits, batch)) == 0.0


@pytest.mark.parametrize("n_views", [1, 2])
def test_mndcg_loss_matches_a_loop(n_views):
    shape = (n_views, 1, 4, 4) if n_views > 1 else (1, 4, 4)
    images, labels = batch_of(n=5, shape=shape)
    mixer = RankMixup(mode="mndcg", weight=0.2)
    torch.manual_seed(3)
    batch = mixer(images, labels, 4)
    logits = rankmixup_logits(mixer, batch, n_views)
    relevance = batch.state["relevance"].tolist()
    losses = []
    for i in range(5):
        for v in range(n_views):
            confidence = [float(logits[(k * 5 + i) * n_views + v].softmax(dim=0).max()) for k in range(4)]
            copies = sorted(range(3), key=lambda k: -relevance[k][i])  # stable: ties keep their order
            ranked = [(1.0, confidence[0])] + [(relevance[k][i], confidence[1 + k]) for k in copies]
            dcg = sum(conf / math.log2(r + 2) for r, (_, conf) in enumerate(ranked))
            idcg = sum(rel / math.log2(r + 2) for r, (rel, _) in enumerate(ranked))
            losses.append(1 - min(dcg / idcg, idcg / dcg))
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.2 * sum(losses) / len(losses))


def test_mndcg_is_zero_when_confidences_equal_the_relevances():
    mixer = RankMixup(mode="mndcg", num_mixed=2, weight=1.0)
    relevance = torch.tensor([[0.9], [0.6]], dtype=F64)
    batch = MixedBatch(torch.zeros(3, 1), torch.tensor([0]), 1, {"n_views": 1, "relevance": relevance})
    # Two classes: the confidence is the larger softmax probability, sigmoid(z0 - z1).
    logits = torch.tensor([[30.0, 0.0], [math.log(0.9 / 0.1), 0.0], [math.log(0.6 / 0.4), 0.0]], dtype=F64)
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Decoupled Mixup
# ---------------------------------------------------------------------------------------------


def test_decoupled_regulariser_on_a_hand_made_case():
    mixer = DecoupledMixup(eta=0.5)
    state = {"classes": torch.tensor([0, 2]), "partner_classes": torch.tensor([1, 2]), "n_views": 1}
    batch = MixedBatch(torch.zeros(2, 1), torch.zeros(2, 3), 2, state)
    # Row 0 mixes classes 0 and 1 with equal logits: each has probability 1/2 among the classes without the other.
    # Row 1 mixes class 2 with itself: no term. Mean over the 2 rows, times eta.
    logits = torch.zeros(2, 3, dtype=F64)
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.5 * (2 * math.log(2)) / 2)


@pytest.mark.parametrize("n_views", [1, 3])
def test_decoupled_regulariser_matches_a_loop(n_views):
    shape = (n_views, 1, 4, 4) if n_views > 1 else (1, 4, 4)
    images, labels = batch_of(n=7, shape=shape, num_classes=5)
    mixer = DecoupledMixup(alpha=1.0, eta=0.1)
    torch.manual_seed(6)
    batch = mixer(images, labels, 5)
    assert batch.target.shape == (7, 5) and batch.loss_rows == 7 and mixer.needs_logits
    logits = 2 * torch.randn(7 * n_views, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    perm = batch.state["perm"].tolist()
    total = 0.0
    for i in range(7):
        a, b = int(labels[i]), int(labels[perm[i]])
        for v in range(n_views):
            z = logits[i * n_views + v].tolist()
            if a == b:
                continue
            p_a = math.exp(z[a]) / sum(math.exp(z[c]) for c in range(5) if c != b)
            p_b = math.exp(z[b]) / sum(math.exp(z[c]) for c in range(5) if c != a)
            total += -math.log(p_a) - math.log(p_b)
    assert float(mixer.extra_loss(logits, batch)) == pytest.approx(0.1 * total / (7 * n_views))


@pytest.mark.parametrize("mixer", [RankMixup(), DecoupledMixup()], ids=["rankmixup", "decoupled_mixup"])
def test_softmax_ranking_mixers_refuse_multi_label_datasets(mixer):
    mixer.check(10, multi_label=False)
    with pytest.raises(ConfigError, match="multi-label"):
        mixer.check(10, multi_label=True)


# ---------------------------------------------------------------------------------------------
# C-Mixup
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def embedding_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.npy"
    np.save(path, np.array([[0.0, 0.0], [0.5, 0.0], [3.0, 1.0], [3.0, 1.5]]))
    return path


def test_c_mixup_partner_probabilities_follow_the_gaussian_kernel_on_label_embeddings(embedding_file):
    mixer = CMixup(bandwidth=0.8, label_embedding=str(embedding_file))
    embedding = np.load(embedding_file)
    labels = torch.tensor([0, 1, 2, 3, 1])
    probabilities = mixer.partner_probabilities(labels)
    for i in range(5):
        weights = [math.exp(-np.sum((embedding[labels[i]] - embedding[labels[j]]) ** 2) / (2 * 0.8**2))
                   for j in range(5)]  # fmt: skip
        for j in range(5):
            assert float(probabilities[i, j]) == pytest.approx(weights[j] / sum(weights))


def test_c_mixup_on_regression_targets_uses_their_distance_and_mixes_them_linearly():
    mixer = CMixup(alpha=2.0, bandwidth=1.5)
    target = torch.tensor([0.0, 0.3, 2.0, 5.0])
    probabilities = mixer.partner_probabilities(target)
    for i in range(4):
        weights = [math.exp(-((float(target[i]) - float(target[j])) ** 2) / (2 * 1.5**2)) for j in range(4)]
        for j in range(4):
            assert float(probabilities[i, j]) == pytest.approx(weights[j] / sum(weights))
    images = torch.randn(4, 1, 3, 3, dtype=F64)
    torch.manual_seed(0)
    batch = mixer(images, target.double(), 1)
    lam, partner = batch.state["lam"], batch.state["partner"]
    torch.testing.assert_close(batch.target, lam * target.double() + (1 - lam) * target.double()[partner])
    torch.testing.assert_close(batch.images, lam * images + (1 - lam) * images[partner])


def test_c_mixup_draws_partners_with_the_kernel_probabilities(embedding_file):
    bandwidth = 1.0
    mixer = CMixup(bandwidth=bandwidth, label_embedding=str(embedding_file))
    embedding = np.load(embedding_file)
    labels = torch.tensor([0, 1, 2]).repeat(
        100
    )  # each class 100 times: partner classes follow the class kernel
    images = torch.zeros(300, 1, 1, 1)
    torch.manual_seed(0)
    counts = torch.zeros(3, 3)
    for _ in range(20):
        partner_classes = labels[mixer(images, labels, 4).state["partner"]]
        counts.index_put_((labels, partner_classes), torch.ones(300), accumulate=True)
    for a in range(3):
        weights = [
            math.exp(-np.sum((embedding[a] - embedding[c]) ** 2) / (2 * bandwidth**2)) for c in range(3)
        ]
        for c in range(3):
            assert float(counts[a, c] / counts[a].sum()) == pytest.approx(weights[c] / sum(weights), abs=0.04)


def test_c_mixup_mixes_images_and_one_hot_targets_with_the_drawn_partner(tmp_path):
    path = tmp_path / "classes.pt"
    torch.save(torch.eye(4), path)
    mixer = CMixup(label_embedding=str(path))
    mixer.check(4, multi_label=False)
    images, labels = batch_of(n=6)
    torch.manual_seed(2)
    batch = mixer(images, labels, 4)
    lam, partner = batch.state["lam"], batch.state["partner"].tolist()
    for i in range(6):
        torch.testing.assert_close(batch.images[i], lam * images[i] + (1 - lam) * images[partner[i]])
        expected = lam * one_hot_row(int(labels[i]), 4) + (1 - lam) * one_hot_row(int(labels[partner[i]]), 4)
        torch.testing.assert_close(batch.target[i], expected)


def test_c_mixup_refuses_hard_labels_without_a_label_embedding(embedding_file):
    with pytest.raises(ConfigError) as error:
        CMixup().check(10, multi_label=False)
    message = str(error.value)
    assert "mixing=c_mixup" in message and "label distance" in message and "hard class labels" in message
    assert "mixing.label_embedding=" in message and "mixing=mixup" in message
    CMixup().check(10, multi_label=True)  # multi-hot label sets have distances of their own
    with pytest.raises(ConfigError, match=r"mixing\.label_embedding=.*4 rows.*10 classes"):
        CMixup(label_embedding=str(embedding_file)).check(10, multi_label=False)
    with pytest.raises(ConfigError, match="mixing=c_mixup"):
        CMixup().partner_probabilities(torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# HybridAugment
# ---------------------------------------------------------------------------------------------


def blur_by_hand(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """3x3 Gaussian blur with reflected borders, written out as a sum over the nine shifts."""
    weights = [math.exp(-(t**2) / (2 * sigma**2)) for t in (-1, 0, 1)]
    weights = [w / sum(weights) for w in weights]
    flat = images.reshape(-1, 1, *images.shape[-2:])
    padded = F.pad(flat, (1, 1, 1, 1), mode="reflect")
    height, width = images.shape[-2:]
    out = torch.zeros_like(flat)
    for dy in range(3):
        for dx in range(3):
            out += weights[dy] * weights[dx] * padded[..., dy : dy + height, dx : dx + width]
    return out.reshape(images.shape)


def test_hybridaugment_joins_own_low_frequencies_with_partners_high_frequencies_and_keeps_the_label():
    images, labels = batch_of(n=5, shape=(3, 6, 7))
    mixer = HybridAugment(probability=1.0, kernel_size=3, sigma=0.5)
    torch.manual_seed(0)
    batch = mixer(images, labels, 4)
    assert not mixer.soft_targets and batch.state["applied"]
    assert batch.loss_rows == 10 and torch.equal(batch.target, torch.cat([labels, labels]))
    torch.testing.assert_close(batch.images[:5], images)
    low = blur_by_hand(images, 0.5)
    perm = batch.state["perm"]
    torch.testing.assert_close(batch.images[5:], low + (images - low)[perm])


def test_hybridaugment_views_share_the_partner_and_unpaired_mode_replaces_the_batch():
    views = torch.randn(4, 2, 1, 5, 5, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    batch = HybridAugment(probability=1.0, paired=False)(views, labels, 4)
    assert batch.loss_rows == 4 and batch.images.shape == views.shape and torch.equal(batch.target, labels)
    low = blur_by_hand(views, 0.5)
    perm = batch.state["perm"]
    for v in range(2):
        torch.testing.assert_close(batch.images[:, v], low[:, v] + (views[:, v] - low[:, v])[perm])


def test_hybridaugment_plus_plus_takes_a_partners_amplitude_spectrum_for_the_low_frequencies():
    images, labels = batch_of(n=4, shape=(2, 6, 6))
    torch.manual_seed(3)
    batch = HybridAugment(probability=1.0, amplitude_phase=True, paired=False)(images, labels, 4)
    perm, amplitude_perm = batch.state["perm"], batch.state["amplitude_perm"]
    assert amplitude_perm is not None
    low = blur_by_hand(images, 0.5).numpy()
    axes = (-3, -2, -1)
    amplitude = np.abs(np.fft.fftn(low[amplitude_perm.numpy()], axes=axes))
    phase = np.angle(np.fft.fftn(low, axes=axes))
    recombined = np.real(np.fft.ifftn(amplitude * np.exp(1j * phase), axes=axes))
    expected = torch.from_numpy(recombined) + (images - torch.from_numpy(low))[perm]
    torch.testing.assert_close(batch.images, expected)


def test_hybridaugment_with_probability_zero_changes_nothing():
    images, labels = batch_of(n=3)
    batch = HybridAugment(probability=0.0)(images, labels, 4)
    assert not batch.state["applied"]
    torch.testing.assert_close(batch.images, torch.cat([images, images]))


# ---------------------------------------------------------------------------------------------
# Configs, validation, reproducibility
# ---------------------------------------------------------------------------------------------


def mixing_choices() -> list[str]:
    return sorted(path.stem for path in MIXING_CONFIGS.glob("*.yaml"))


def instantiate_choice(name: str, tmp_path: Path) -> Mixer:
    config = OmegaConf.load(MIXING_CONFIGS / f"{name}.yaml")
    if name == "c_mixup":
        np.save(tmp_path / "embedding.npy", np.random.default_rng(0).normal(size=(4, 3)))
        config.label_embedding = str(tmp_path / "embedding.npy")
    return hydra.utils.instantiate(config)


def test_the_expected_choices_exist_and_none_composes_to_nothing():
    assert set(mixing_choices()) == {"none", "mixup", "cutmix", "mixup_cutmix", "manifold_mixup", "rankmixup",
                                     "c_mixup", "decoupled_mixup", "hybridaugment"}  # fmt: skip
    assert not OmegaConf.load(MIXING_CONFIGS / "none.yaml")


@pytest.mark.parametrize("name", [name for name in mixing_choices() if name != "none"])
def test_every_config_instantiates_and_the_same_seed_gives_the_same_mix(name, tmp_path):
    config = OmegaConf.load(MIXING_CONFIGS / f"{name}.yaml")
    mixer = instantiate_choice(name, tmp_path)
    assert isinstance(mixer, Mixer) and config._target_ == f"losslab.mixing.{type(mixer).__name__}"
    images, labels = batch_of(n=8, shape=(3, 8, 8))
    backbone = tiny_backbone() if name == "manifold_mixup" else None

    def run(seed: int):
        torch.manual_seed(seed)
        batch = mixer(images, labels, 4)
        if backbone is not None:
            mixer.layers = ["input", "1"]
            with mixer.hidden_mixing(backbone, batch):
                return batch, backbone(batch.images[:, :1, :2, :2])
        return batch, None

    (first, first_hidden), (second, second_hidden) = run(7), run(7)
    torch.testing.assert_close(first.images, second.images)
    torch.testing.assert_close(first.target, second.target)
    assert first.loss_rows == second.loss_rows
    assert first.state.keys() == second.state.keys()
    for key, value in first.state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, second.state[key])
        else:
            assert value == second.state[key], key
    if first_hidden is not None:
        torch.testing.assert_close(first_hidden, second_hidden)
    if type(mixer) is not HybridAugment:  # HybridAugment may leave a batch alone (probability 0.6)
        others = [run(seed)[0] for seed in range(8, 12)]
        assert any(
            other.images.shape != first.images.shape
            or not torch.allclose(other.images, first.images)
            or not torch.allclose(other.target.double(), first.target.double())
            for other in others
        )


@pytest.mark.parametrize(
    ("mixer", "kwargs", "option"),
    [
        (MixUp, {"alpha": 0.0}, "mixing.alpha"),
        (CutMix, {"alpha": -1.0}, "mixing.alpha"),
        (MixUpCutMix, {"mixup_alpha": 0.0}, "mixing.mixup_alpha"),
        (MixUpCutMix, {"cutmix_alpha": -0.5}, "mixing.cutmix_alpha"),
        (MixUpCutMix, {"switch_prob": 1.5}, "mixing.switch_prob"),
        (ManifoldMixup, {"alpha": 0.0}, "mixing.alpha"),
        (ManifoldMixup, {"layers": []}, "mixing.layers"),
        (RankMixup, {"mode": "ndcg"}, "mixing.mode"),
        (RankMixup, {"num_mixed": 0}, "mixing.num_mixed"),
        (RankMixup, {"margin": -1.0}, "mixing.margin"),
        (RankMixup, {"weight": -0.1}, "mixing.weight"),
        (RankMixup, {"score": "probability"}, "mixing.score"),
        (CMixup, {"bandwidth": 0.0}, "mixing.bandwidth"),
        (CMixup, {"label_embedding": "/nonexistent/classes.npy"}, "mixing.label_embedding"),
        (DecoupledMixup, {"eta": -0.1}, "mixing.eta"),
        (HybridAugment, {"probability": 1.2}, "mixing.probability"),
        (HybridAugment, {"kernel_size": 4}, "mixing.kernel_size"),
        (HybridAugment, {"sigma": 0.0}, "mixing.sigma"),
    ],
)
def test_bad_hyperparameters_raise_config_errors_naming_the_option(mixer, kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.") + "="):
        mixer(**kwargs)
