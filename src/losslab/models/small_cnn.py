"""A small VGG-style convolutional network for low-resolution images (MNIST, Fashion-MNIST, CIFAR)."""

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """VGG-style CNN (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale
    Image Recognition") with batch normalisation (Ioffe & Szegedy 2015).

    One block per entry of ``channels``: ``convs_per_block`` × ``Conv3x3-BN-ReLU``, then ``MaxPool2``
    (the default, one conv per block, is the classic 2-conv CNN of the Fashion-MNIST benchmarks); then flatten and
    ``Linear(..., hidden_dim)-BN1d-ReLU-Dropout``. ``feature_dim == hidden_dim``. A block's max-pool is
    skipped when its input map is already 1x1, so inputs as small as 8x8 (or smaller) work. The
    flattened size grows with ``image_size`` squared, so this network is meant for small images.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int] = (16, 32),
        hidden_dim: int = 256,
        dropout: float = 0.25,
        convs_per_block: int = 1,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("SmallCNN needs at least one entry in channels")
        if convs_per_block < 1:
            raise ValueError(f"SmallCNN convs_per_block must be >= 1, got {convs_per_block}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SmallCNN dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        size = image_size
        previous = in_channels
        for width in channels:
            layers += _conv_bn_relu(previous, width)
            for _ in range(convs_per_block - 1):
                layers += _conv_bn_relu(width, width)
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(1),
            # No Linear bias: the following BatchNorm's shift makes it redundant.
            nn.Linear(previous * size * size, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.feature_dim = int(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
