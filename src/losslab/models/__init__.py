"""Feature-extracting backbones: ``Cls(in_channels, image_size, **hyperparameters)`` -> [B, feature_dim]."""

from losslab.models.external import TimmBackbone, TorchvisionBackbone
from losslab.models.mlp import MLP
from losslab.models.resnet import PreActResNet, ResNet, WideResNet
from losslab.models.small_cnn import SmallCNN

__all__ = ["MLP", "PreActResNet", "ResNet", "SmallCNN", "TimmBackbone", "TorchvisionBackbone", "WideResNet"]
