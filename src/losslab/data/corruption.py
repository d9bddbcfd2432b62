"""The settings the robust-loss and long-tail papers train in, applied to the training split only:
label noise (symmetric, asymmetric, pair-flip) and exponential class imbalance (CIFAR-LT).
Both are seeded and record what they did, so a run states its realised noise rate and class counts."""

from __future__ import annotations

from typing import Any

import torch

from losslab.errors import ConfigError

NOISE_KINDS = ("symmetric", "asymmetric", "pairflip")

# Asymmetric ("class-dependent") noise maps, source class -> target class.
ASYMMETRIC_MAPS: dict[str, dict[int, int]] = {
    # Patrini et al. 2017 / Ma et al. 2020: truck->automobile, bird->airplane, deer->horse, cat<->dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # Patrini et al. 2017 / Ma et al. 2020: 2->7, 3->8, 5<->6, 7->1.
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    # LossLab's stated map for Fashion-MNIST (visually confusable classes): T-shirt<->Shirt, Pullover<->Coat,
    # Sandal->Sneaker, Sneaker->Ankle boot.
    "fashion_mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9},
}

# CIFAR-100's fine label -> super-class (coarse label), as stored in its `coarse_labels`.
CIFAR100_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip


def cifar100_superclass_map() -> dict[int, int]:
    """Each fine class -> the next fine class of its super-class (circularly), as the papers describe.
    (The APL code instead treats blocks of 5 consecutive labels as super-classes, which CIFAR-100's
    alphabetical label order does not support.)"""
    mapping = {}
    for coarse in range(20):
        members = [fine for fine, c in enumerate(CIFAR100_COARSE) if c == coarse]
        for i, fine in enumerate(members):
            mapping[fine] = members[(i + 1) % len(members)]
    return mapping


def asymmetric_map(dataset: str) -> dict[int, int]:
    if dataset == "cifar100":
        return cifar100_superclass_map()
    if dataset not in ASYMMETRIC_MAPS:
        raise ConfigError(
            f"dataset.label_noise.kind=asymmetric has no class map for dataset {dataset}; maps exist for "
            f"{', '.join(sorted([*ASYMMETRIC_MAPS, 'cifar100']))} (use symmetric or pairflip)"
        )
    return ASYMMETRIC_MAPS[dataset]


def add_label_noise(
    labels: torch.Tensor, num_classes: int, kind: str, rate: float, seed: int, dataset: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Corrupt exactly ``round(rate * n)`` eligible labels per class (seeded); return the noisy labels and a
    record with the realised noise rate. Symmetric noise moves a label to a uniformly drawn *other* class;
    pair-flip to the next class (Han et al. 2018); asymmetric along :func:`asymmetric_map`."""
    if kind not in NOISE_KINDS:
        raise ConfigError(f"dataset.label_noise.kind={kind!r}: allowed values are {', '.join(NOISE_KINDS)}")
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"dataset.label_noise.rate={rate}: must be in [0, 1)")
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    mapping = asymmetric_map(dataset) if kind == "asymmetric" else None
    for cls in range(num_classes):
        if mapping is not None and cls not in mapping:
            continue
        members = torch.nonzero(labels == cls).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[: round(rate * len(members))]]
        if kind == "symmetric":
            # An offset in 1..C-1 never lands on the true class.
            offsets = torch.randint(1, num_classes, (len(chosen),), generator=generator)
            noisy[chosen] = (cls + offsets) % num_classes
        elif kind == "pairflip":
            noisy[chosen] = (cls + 1) % num_classes
        else:
            noisy[chosen] = mapping[cls]
    flipped = noisy != labels
    record = {"kind": kind, "rate": rate, "seed": seed, "realised_rate": float(flipped.float().mean()),
              "n_noisy": int(flipped.sum())}  # fmt: skip
    return noisy, record


def long_tail_counts(counts: torch.Tensor, imbalance_factor: float) -> torch.Tensor:
    """CIFAR-LT (Cao et al. 2019): class c keeps n_max * imbalance_factor^(-c / (C - 1)) samples."""
    if imbalance_factor < 1:
        raise ConfigError(f"dataset.imbalance_factor={imbalance_factor}: must be >= 1 (n_max / n_min)")
    num_classes = len(counts)
    exponent = torch.arange(num_classes, dtype=torch.float64) / max(1, num_classes - 1)
    wanted = (counts.max().double() * imbalance_factor ** (-exponent)).floor().long().clamp_min(1)
    return torch.minimum(wanted, counts)


def subsample_long_tail(labels: torch.Tensor, imbalance_factor: float, seed: int) -> torch.Tensor:
    """Indices of a seeded long-tailed subset of ``labels``, sorted."""
    counts = torch.bincount(labels)
    keep_counts = long_tail_counts(counts, imbalance_factor)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls, n in enumerate(keep_counts.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(keep).sort().values
