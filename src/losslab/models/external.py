"""Backbones from torchvision and timm, with their classification heads removed.

Some architectures only accept a fixed or minimum input size. Vision Transformers and MaxViT are
built for ``image_size`` automatically, but pretrained weights fix it (224 for most), and other
models may simply be too deep for tiny inputs; in those cases set the dataset's resize, e.g.
``dataset.image_size=224``. Construction fails with a ValueError saying so.
"""

import difflib
from typing import Any

import torch
import torchvision
from torch import nn

# Heads that torchvision classifiers keep in these attributes (fc: ResNet, GoogLeNet, Inception,
# RegNet, ShuffleNet; classifier: VGG, AlexNet, DenseNet, MobileNet, EfficientNet, ConvNeXt,
# MNASNet, SqueezeNet, MaxViT; heads: ViT; head: Swin).
_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")


def _unknown_name(library: str, name: str, available: list[str], matches: list[str]) -> ValueError:
    """A ValueError for an unknown model name, suggesting names that contain it or are spelt alike."""
    suggestions = matches or difflib.get_close_matches(name, available, n=5, cutoff=0.5)
    if suggestions:
        hint = f"did you mean one of: {', '.join(suggestions[:8])}?"
    else:
        hint = f"available models include: {', '.join(available[:8])}, ..."
    return ValueError(f"Unknown {library} model {name!r}; {hint}")


def _size_error(library: str, name: str, in_channels: int, image_size: int, error: Exception) -> ValueError:
    return ValueError(
        f"{library} model {name!r} cannot process {in_channels}x{image_size}x{image_size} inputs "
        f"({type(error).__name__}: {error}). Some architectures need a fixed or minimum input size: "
        "resize the images, e.g. dataset.image_size=224."
    )


def _measure_feature_dim(model: nn.Module, in_channels: int, image_size: int, library: str, name: str) -> int:
    """Run a one-image dummy forward in eval mode (restoring the mode after) and return its width."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as error:  # the libraries raise assorted types for unsupported input sizes
        raise _size_error(library, name, in_channels, image_size, error) from error
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{library} model {name!r} returns {shape} without its head, expected [batch, features]"
        )
    return int(out.shape[1])


def _remove_torchvision_head(model: nn.Module, name: str) -> None:
    """Replace the final classification layer with Identity, keeping any pooling/norm layers before it."""
    for attribute in _HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return
        if isinstance(head, nn.Sequential):
            # E.g. ConvNeXt: (LayerNorm2d, Flatten, Linear); SqueezeNet: (Dropout, Conv2d, ReLU, pool).
            for key, layer in reversed(list(head.named_children())):
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    setattr(head, key, nn.Identity())
                    return
    raise ValueError(f"Don't know how to remove the classification head of torchvision model {name!r}")


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model (``torchvision.models.get_model``) without its final layer.

    Architectures and their papers: see https://pytorch.org/vision/stable/models.html (e.g. ResNet:
    He et al. 2016; ViT: Dosovitskiy et al. 2021). The final classification layer (``fc``,
    ``classifier``, ``heads`` or ``head``) is replaced with Identity, so the output is the penultimate
    features; ``feature_dim`` is measured with a dummy forward. Torchvision models expect RGB, so
    grayscale inputs are repeated to 3 channels. ``weights`` (e.g. ``"DEFAULT"``) downloads pretrained
    weights; ``kwargs`` go to the model builder. ViT and MaxViT are built for ``image_size`` unless
    ``kwargs`` sets their size; pretrained ones need their native size (``dataset.image_size=224``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        name: str = "resnet18",
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            matches = [model for model in available if name.lower() in model]
            raise _unknown_name("torchvision classification", name, available, matches)
        if in_channels not in (1, 3):
            raise ValueError(f"TorchvisionBackbone supports in_channels 1 or 3, got {in_channels}")
        kwargs = dict(kwargs)
        if name.startswith("vit_"):
            kwargs.setdefault("image_size", image_size)
        elif name.startswith("maxvit_"):
            kwargs.setdefault("input_size", (image_size, image_size))
        elif name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", False)  # otherwise training-mode forward returns a tuple
        self.in_channels = in_channels
        try:
            self.model = torchvision.models.get_model(name, weights=weights, **kwargs)
        except AssertionError as error:  # e.g. ViT: "Input shape indivisible by patch size!"
            raise _size_error("torchvision", name, in_channels, image_size, error) from error
        _remove_torchvision_head(self.model, name)
        self.feature_dim = _measure_feature_dim(self, in_channels, image_size, "torchvision", name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model(x)


class TimmBackbone(nn.Module):
    """A timm model (``timm.create_model(..., num_classes=0)``) returning pooled features.

    timm: Wightman, "PyTorch Image Models" (https://github.com/huggingface/pytorch-image-models);
    each architecture cites its own paper there. timm adapts the stem to ``in_channels`` itself
    (summing pretrained RGB filters for grayscale). Models that take ``img_size`` (ViT, Swin, ...) are
    built for ``image_size`` unless ``kwargs`` sets it. ``feature_dim`` is measured with a dummy
    forward (it equals ``model.num_features`` except for models with a pre-logits layer).
    ``pretrained=True`` downloads weights.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        name: str = "resnet18",
        pretrained: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        try:
            import timm  # optional dependency, and slow to import
        except ImportError as error:
            raise ImportError("The timm backbone needs timm: pip install 'losslab[timm]'") from error

        if not timm.is_model(name):
            raise _unknown_name("timm", name, timm.list_models(), timm.list_models(f"*{name}*"))
        kwargs = dict(kwargs)
        common = dict(pretrained=pretrained, num_classes=0, in_chans=in_channels)
        if "img_size" in kwargs:
            self.model = timm.create_model(name, **common, **kwargs)
        else:
            try:
                self.model = timm.create_model(name, **common, img_size=image_size, **kwargs)
            except TypeError as error:  # the architecture has a free input size
                if "img_size" not in str(error):
                    raise
                self.model = timm.create_model(name, **common, **kwargs)
        self.feature_dim = _measure_feature_dim(self, in_channels, image_size, "timm", name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
