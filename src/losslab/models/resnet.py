"""Residual networks with a CIFAR-style stem (3x3 convolution, stride 1, no max-pool).

The stem keeps the full resolution, and every later downsampling is a stride-2 3x3 convolution
(padding 1) followed by global average pooling, so feature maps never shrink below 1x1: all input
sizes from 8x8 up work unchanged.
"""

import torch
from torch import nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal initialisation for convolutions, BatchNorm at identity, as in torchvision."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet (post-activation)
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_channels, out_channels, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_channels, out_channels, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity shortcut when shapes match, else a 1x1 convolution + BN projection ("option B")."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


_RESNET_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet of He et al. (2016), "Deep Residual Learning for Image Recognition", CIFAR variant.

    The ImageNet stem (7x7 stride-2 convolution + max-pool) is replaced by a 3x3 stride-1 convolution,
    as in the common CIFAR implementations; four stages of widths ``width * (1, 2, 4, 8)`` with strides
    (1, 2, 2, 2); global average pooling. BasicBlock for depth 18/34, Bottleneck for 50/101/152.
    ``feature_dim`` is ``8 * width`` (512) for BasicBlock and ``32 * width`` (2048) for Bottleneck.
    With ``zero_init_residual`` the last BN of each residual branch starts at zero, so every block
    starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        depth: int = 18,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        del image_size  # fully convolutional with global pooling: any input size works
        if depth not in _RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_SPECS)}, got depth={depth}")
        block, num_blocks = _RESNET_SPECS[depth]
        self.stem = nn.Sequential(
            _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages = []
        channels = width
        for index, count in enumerate(num_blocks):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(count):
                blocks.append(block(channels, planes, stride if block_index == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.feature_dim = channels

        _init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


# ---------------------------------------------------------------------------------------------
# Pre-activation ResNet and Wide ResNet (BN-ReLU before each convolution)
# ---------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """``BN-ReLU-Conv3x3-BN-ReLU-Conv3x3`` (optionally with dropout between the convolutions).

    When the shortcut needs a projection, it is a 1x1 convolution applied to the pre-activated input,
    as in the reference implementations of both PreActResNet and Wide ResNet.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = _conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + shortcut


def _preact_stages(
    in_channels: int, widths: list[int], num_blocks: list[int], dropout: float = 0.0
) -> nn.Sequential:
    stages = []
    channels = in_channels
    for index, (width, count) in enumerate(zip(widths, num_blocks)):
        stride = 1 if index == 0 else 2
        blocks = []
        for block_index in range(count):
            blocks.append(PreActBlock(channels, width, stride if block_index == 0 else 1, dropout))
            channels = width
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class PreActResNet(nn.Module):
    """Pre-activation ResNet of He et al. (2016), "Identity Mappings in Deep Residual Networks".

    CIFAR stem (a bare 3x3 stride-1 convolution: the first block pre-activates it), four stages of
    pre-activation basic blocks of widths 64/128/256/512 with strides 1/2/2/2, then a final
    BN-ReLU and global average pooling. ``feature_dim`` is 512.
    """

    _NUM_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

    def __init__(self, in_channels: int, image_size: int, depth: int = 18) -> None:
        super().__init__()
        del image_size  # fully convolutional with global pooling: any input size works
        if depth not in self._NUM_BLOCKS:
            raise ValueError(
                f"PreActResNet depth must be one of {sorted(self._NUM_BLOCKS)}, got depth={depth}"
            )
        widths = [64, 128, 256, 512]
        self.stem = _conv3x3(in_channels, widths[0])
        self.stages = _preact_stages(widths[0], widths, self._NUM_BLOCKS[depth])
        self.final = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
        )
        self.feature_dim = widths[-1]
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.stages(self.stem(x)))


class WideResNet(nn.Module):
    """Wide Residual Network WRN-depth-k of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

    A 3x3 convolution to 16 channels, three stages of ``(depth - 4) / 6`` pre-activation blocks of
    widths ``16k, 32k, 64k`` with strides 1/2/2 (dropout between each block's convolutions), then a
    final BN-ReLU and global average pooling. ``feature_dim`` is ``64 * widen_factor`` (640 for
    WRN-28-10).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        del image_size  # fully convolutional with global pooling: any input size works
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 for some n >= 1 (e.g. 16, 22, 28, 40), got depth={depth}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(in_channels, 16)
        self.stages = _preact_stages(16, widths, [blocks_per_stage] * 3, dropout)
        self.final = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
        )
        self.feature_dim = widths[-1]
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.stages(self.stem(x)))
