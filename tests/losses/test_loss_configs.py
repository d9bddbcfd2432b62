"""Each configs/loss/<key>.yaml builds its class with the paper's defaults."""

from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"

PAPER_DEFAULTS = {
    "kd": ("KnowledgeDistillation", {"alpha": 0.9, "temperature": 4.0}),
    "dkd": ("DecoupledKD", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}),
    "dhkd": ("DualHeadKD", {"alpha": 1.0, "temperature": 2.0, "auxiliary_head": "linear"}),
    "nd_kd": ("NormDirectionKD", {"kd_weight": 1.0, "temperature": 4.0, "nd_weight": 2.0, "warmup_epochs": 20}),
    "ce": ("CrossEntropy", {}),
    "label_smoothing": ("LabelSmoothing", {"epsilon": 0.1}),
    "focal": ("Focal", {"gamma": 2.0, "sigmoid_alpha": 0.25}),
    "focal_adaptive": ("FocalAdaptive", {"gamma_low": 5.0, "gamma_high": 3.0, "p_threshold": 0.2}),
    "bce": ("BinaryCrossEntropy", {}),
    "mae": ("MeanAbsoluteError", {}),
    "l2svm": ("SquaredHinge", {"margin": 1.0}),
    "poly1": ("Poly1", {"epsilon": 1.0}),
    "poly1_focal": ("Poly1Focal", {"epsilon": 1.0, "gamma": 2.0}),
    "comp_sum": ("CompSum", {"tau": 1.5}),
    "zloss_spherical": ("ZLossSpherical", {"a": 1.0, "b": 1.0}),
    "squentropy": ("Squentropy", {}),
    "stablemax": ("StableMax", {}),
    "encouraging": ("Encouraging", {"log_end": 0.75}),
    "gce": ("GCE", {"q": 0.7}),
    "sce": ("SCE", {"alpha": 0.1, "beta": 1.0}),
    "nce_rce": ("NCEandRCE", {"alpha": 1.0, "beta": 1.0}),
    "nce_mae": ("NCEandMAE", {"alpha": 1.0, "beta": 1.0}),
    "nfl_rce": ("NFLandRCE", {"alpha": 1.0, "beta": 1.0, "gamma": 0.5}),
    "nfl_mae": ("NFLandMAE", {"alpha": 1.0, "beta": 1.0, "gamma": 0.5}),
    "ldr_kl": ("LDRKL", {"lambda_": 1.0, "margin": 0.1}),
    "dual_focal": ("DualFocal", {"gamma": 5.0}),
    "logit_adjust": ("LogitAdjust", {"tau": 1.0}),
    "balanced_softmax": ("BalancedSoftmax", {}),
    "ldam": ("LDAM", {"max_margin": 0.5, "s": 30.0, "drw": True, "drw_start_fraction": 0.8, "beta": 0.9999}),
    "vs_loss": ("VectorScaling", {"gamma": 0.2, "tau": 1.5}),
    "anyloss": ("AnyLoss", {"metric": "f1", "L": 73.0, "beta": 1.0}),
    "dice": ("DiceSemimetricLoss", {"classes": "present", "threshold": 0.01}),
    "jaccard": ("JaccardMetricLoss", {"classes": "present", "threshold": 0.01}),
    "harmonic": ("Harmonic", {"n": None}),
    "palm_zloss": ("PaLMZLoss", {"coefficient": 1e-4}),
    "asl": ("AsymmetricLoss", {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05, "reduction": "mean",
                                "detach_focusing_weights": False}),
    "supcon": ("SupCon", {"temperature": 0.1}),
    "simclr": ("SimCLR", {"temperature": 0.5}),
    "dcl": ("DCL", {"temperature": 0.1}),
    "dclw": ("DCLW", {"temperature": 0.1, "sigma": 0.5}),
    "align_uniform": ("AlignUniform", {"alpha": 2.0, "t": 2.0, "lam_align": 1.0, "lam_uniform": 1.0}),
    "siglip": ("SigLIP", {"temperature_init": 10.0, "bias_init": -10.0}),
    "supcon_relu": ("SupConReLU", {"temperature": 0.1}),
    "contrastive": ("Contrastive", {"margin": 1.0, "distance": "euclidean", "normalize": True}),
    "triplet": ("Triplet", {"margin": 0.2, "mining": "batch_hard", "soft_margin": True, "normalize": False,
                            "squared": False}),
    "circle": ("Circle", {"margin": 0.4, "gamma": 80.0}),
    "multi_similarity": ("MultiSimilarity", {"alpha": 2.0, "beta": 50.0, "lambda_": 1.0, "epsilon": 0.1}),
    "tcm": ("ThresholdConsistentMargin", {"lambda_plus": 1.0, "lambda_minus": 1.0, "margin_plus": 0.9,
                                          "margin_minus": 0.5}),
    "ge2e": ("GE2E", {"w_init": 10.0, "b_init": -5.0, "variant": "softmax"}),
    "arcface": ("ArcFace", {"s": 64.0, "m": 0.5, "margin_form": "paper", "lr_multiplier": 1.0}),
    "cosface": ("CosFace", {"s": 64.0, "m": 0.35, "lr_multiplier": 1.0}),
    "normface": ("NormFace", {"s": 10.0, "learn_s": True, "lr_multiplier": 1.0}),
    "proxy_anchor": ("ProxyAnchor", {"alpha": 32.0, "delta": 0.1, "lr_multiplier": 100.0}),
    "xbm": ("CrossBatchMemory", {"memory_size": 55000, "start_iteration": 1000, "weight": 1.0}),
    "mochi": ("MoCHi", {"temperature": 0.2, "queue_size": 4096, "hard_negatives": 256, "mixed_negatives": 512,
                        "query_mixed_negatives": 256}),
    "metrix": ("Metrix", {"alpha": 2.0, "mixing_strength": 0.4}),
}


def test_every_loss_config_is_listed_here():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(PAPER_DEFAULTS)


@pytest.mark.parametrize("key", sorted(PAPER_DEFAULTS))
def test_loss_config_builds_its_class_with_paper_defaults(key):
    class_name, defaults = PAPER_DEFAULTS[key]
    loss = hydra.utils.instantiate(OmegaConf.load(CONFIGS / f"{key}.yaml"))
    assert type(loss).__name__ == class_name
    for name, value in defaults.items():
        assert getattr(loss, name) == pytest.approx(value), f"{key}: {name}"
