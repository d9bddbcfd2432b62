"""Teachers for knowledge distillation (``configs/teacher/``): a frozen classifier whose logits and penultimate
features on each batch the distillation losses (:mod:`losslab.losses.distillation`) learn from.

- ``teacher=run``: the backbone and classifier of an earlier LossLab run (:func:`from_run`), rebuilt from its
  ``config.yaml`` and loaded from its Lightning checkpoint, as ``paradigm.from_run`` loads a backbone;
- ``teacher=torchvision`` / ``teacher=timm``: a classifier from the library (:func:`from_model`); ImageNet weights
  (downloaded) with ``pretrained=true``, random ones otherwise.

Both are instantiated with the dataset's ``num_classes``, ``in_channels`` and ``image_size``. A teacher never
trains: no gradients, and eval mode for good (BatchNorm keeps its running statistics, dropout is off). It sees the
student's batch as the data module normalised it, so a teacher from another dataset needs the same normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.base import Loss
from losslab.losses.distillation import TeacherOutputs
from losslab.sweep import load_resolved

CHECKPOINTS = ("best", "last")
LIBRARIES = ("torchvision", "timm")


class Teacher(nn.Module):
    """A frozen classifier: ``backbone`` (images -> ``[N, feature_dim]``) then ``head`` (-> ``[N, num_classes]``).
    ``forward(images)`` returns both as :class:`TeacherOutputs`, without gradients."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, feature_dim: int, num_classes: int, source: str
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.source = source  # where the weights come from, for logs and results.json
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # whatever Lightning switches, the teacher stays in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutputs:
        features = self.backbone(images)
        return TeacherOutputs(logits=self.head(features), features=features)

    @torch.no_grad()
    def class_means(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
    ) -> torch.Tensor:
        """The mean teacher feature of each class, ``[C, feature_dim]`` float32, over ``(images, labels)`` batches
        (labels ``[N]``, or ``[N, C]`` probabilities taken at their argmax): what ND (``loss=nd_kd``) aligns the
        student with; computed once over the training split, preferably without augmentation."""
        device = next(self.parameters()).device
        sums = torch.zeros(num_classes, self.feature_dim, dtype=torch.float64, device=device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        for images, labels in batches:
            labels = (labels.argmax(dim=-1) if labels.is_floating_point() else labels).to(device)
            features = self(images.to(device)).features.to(torch.float64)
            sums.index_add_(0, labels, features)
            counts += torch.bincount(labels, minlength=num_classes).to(torch.float64)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ConfigError(
                f"the teacher's class means need samples of every class; classes {missing} have none"
            )
        return (sums / counts[:, None]).float()


def from_run(
    run_dir: str, num_classes: int, in_channels: int, image_size: int, checkpoint: str = "best",
    root_dir: str | None = None, dataset: str | None = None,
) -> Teacher:  # fmt: skip
    """The classifier an earlier LossLab run trained: its ``backbone`` rebuilt from ``<run_dir>/config.yaml`` for
    this dataset's images, its ``backbone.*`` and ``head.*`` weights from ``checkpoints/<checkpoint>.ckpt``. A head
    that is not one linear layer (the loss owned it: harmonic, dhkd) is rebuilt by the run's loss. A relative
    ``run_dir`` is taken from ``root_dir`` (the YAML passes ``paths.root_dir``: where LossLab was launched).
    The run must have classified this run's classes: as many, and, when ``dataset`` (this run's ``dataset.name``)
    is given, of the same dataset."""
    path = Path(str(run_dir)).expanduser()
    if not path.is_absolute() and root_dir is not None:
        path = Path(root_dir) / path
    if not path.is_dir():
        raise ConfigError(f"teacher.run_dir={run_dir}: no run directory at {path}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"teacher.checkpoint={checkpoint!r}: allowed values are {', '.join(CHECKPOINTS)}")
    checkpoint_file = path / "checkpoints" / f"{checkpoint}.ckpt"
    smoke = (load_resolved(path / "config.yaml") or {}).get("trainer", {}).get("fast_dev_run")
    if not checkpoint_file.is_file() and smoke:
        # A smoke test's teacher (debug=fdr saves no checkpoint): its architecture with initial weights, so that
        # a debug=fdr distillation chain runs end to end, as a two-stage paradigm chain does.
        saved = load_resolved(path / "config.yaml")
        backbone = hydra.utils.instantiate(
            OmegaConf.create(saved["backbone"]), in_channels=in_channels, image_size=image_size
        )
        head = nn.Linear(backbone.feature_dim, num_classes)
        return Teacher(backbone, head, backbone.feature_dim, num_classes,
                       source=f"run {path} (fast_dev_run: no checkpoint, initial weights)")  # fmt: skip
    if not checkpoint_file.is_file():
        hint = (
            " (it kept only last.ckpt: use teacher.checkpoint=last)"
            if checkpoint == "best" and (path / "checkpoints" / "last.ckpt").is_file() else ""
        )  # fmt: skip
        raise ConfigError(f"teacher.checkpoint={checkpoint}: {checkpoint_file} does not exist{hint}")
    saved = load_resolved(path / "config.yaml")
    if not saved or not saved.get("backbone"):
        raise ConfigError(
            f"teacher.run_dir={run_dir}: no readable config.yaml with a backbone there; is it a LossLab run directory?"
        )
    # The run's own checkpoint, which Lightning itself loads the same way to resume it.
    saved_checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    state = saved_checkpoint.get("state_dict") or {}
    weights = {part: _prefixed(state, f"{part}.") for part in ("backbone", "head")}
    if not weights["backbone"] or not weights["head"]:
        raise ConfigError(
            f"teacher.run_dir={run_dir}: {checkpoint_file} holds no backbone.* and head.* weights"
        )
    trained_on = (saved.get("dataset") or {}).get("name")
    if dataset is not None and trained_on is not None and trained_on != dataset:
        raise ConfigError(
            f"teacher.run_dir={run_dir} was trained on dataset {trained_on}, but this run's is {dataset}: the "
            "teacher must classify the same classes"
        )
    trained_classes = (saved_checkpoint.get("hyper_parameters") or {}).get("num_classes")
    if trained_classes is None and "weight" in weights["head"]:
        trained_classes = weights["head"]["weight"].shape[0]
    if trained_classes is not None and trained_classes != num_classes:
        raise ConfigError(
            f"teacher.run_dir={run_dir} classifies {trained_classes} classes, but this run's dataset has "
            f"{num_classes}: the teacher must be trained on the same classes"
        )
    try:
        backbone = hydra.utils.instantiate(
            OmegaConf.create(saved["backbone"]), in_channels=in_channels, image_size=image_size
        )
    except Exception as error:
        raise ConfigError(
            f"teacher.run_dir={run_dir}: its backbone cannot be rebuilt here: {error}"
        ) from error
    head = _run_head(saved, weights["head"], backbone.feature_dim, num_classes, run_dir)
    for part, module in (("backbone", backbone), ("head", head)):
        _load(module, weights[part], part, run_dir, in_channels, image_size)
    return Teacher(
        backbone, head, backbone.feature_dim, num_classes, source=f"run {path} ({checkpoint}.ckpt)"
    )


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _run_head(
    saved: dict[str, Any], weights: dict[str, torch.Tensor], feature_dim: int, num_classes: int, run_dir: str
) -> nn.Module:
    if set(weights) == {"weight", "bias"} and weights["weight"].dim() == 2:
        return nn.Linear(feature_dim, num_classes)
    try:  # a head the run's loss owned
        loss: Loss = hydra.utils.instantiate(OmegaConf.create(saved.get("loss") or {}))
        return loss.build_head(feature_dim, num_classes)
    except Exception as error:
        raise ConfigError(
            f"teacher.run_dir={run_dir}: its classifier ({', '.join(sorted(weights))}) is not a linear layer and its "
            f"loss cannot rebuild it: {error}"
        ) from error


def _load(
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    part: str,
    run_dir: str,
    in_channels: int,
    image_size: int,
) -> None:
    expected = module.state_dict()
    misfits = [
        f"{part}.{key}: {tuple(weights[key].shape) if key in weights else 'missing'} there, {tuple(value.shape)} here"
        for key, value in expected.items() if key not in weights or weights[key].shape != value.shape
    ]  # fmt: skip
    unexpected = sorted(set(weights) - set(expected))
    if misfits or unexpected:
        raise ConfigError(
            f"teacher.run_dir={run_dir}: its {part} does not fit this dataset's {in_channels}x{image_size}x{image_size}"
            f" images: {'; '.join(misfits) or 'unexpected ' + ', '.join(unexpected)}"
        )
    module.load_state_dict(weights)


def from_model(
    name: str, num_classes: int, in_channels: int, image_size: int, library: str = "torchvision",
    pretrained: bool = False, **kwargs: Any,
) -> Teacher:  # fmt: skip
    """A torchvision (``torchvision.models.get_model``) or timm (``timm.create_model``) classifier by name.

    Features are the input of its final linear layer: torchvision's final ``Linear`` (in ``fc``, ``classifier``,
    ``heads`` or ``head``) becomes the teacher's head and is replaced by Identity in the backbone; timm's are
    ``forward_head(forward_features(x), pre_logits=True)``, with ``get_classifier()`` as the head.
    ``pretrained=true`` downloads ImageNet weights, whose classes must be the dataset's (a new head would be random);
    otherwise the model is built for ``num_classes`` with random weights. ``kwargs`` go to the model builder."""
    if library not in LIBRARIES:
        raise ConfigError(f"teacher.library={library!r}: allowed values are {', '.join(LIBRARIES)}")
    build = _torchvision if library == "torchvision" else _timm
    backbone, head, feature_dim = build(name, num_classes, in_channels, image_size, pretrained, dict(kwargs))
    classes = head.out_features if isinstance(head, nn.Linear) else num_classes
    if classes != num_classes:
        raise ConfigError(
            f"teacher.pretrained=true: {library} {name!r} was pretrained on {classes} classes, but this run's dataset "
            f"has {num_classes}; a pretrained teacher must predict the dataset's classes"
        )
    return Teacher(
        backbone, head, feature_dim, num_classes, source=f"{library} {name} (pretrained={pretrained})"
    )


class _Grayscale(nn.Module):
    """Repeats 1-channel images to the 3 channels torchvision models take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)


def _torchvision(
    name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, nn.Module, int]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"teacher.name={name!r}: not a torchvision classification model")
    if in_channels not in (1, 3):
        raise ConfigError(f"teacher.library=torchvision takes 1- or 3-channel images, not {in_channels}")
    if name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)
    elif name.startswith("maxvit_"):
        kwargs.setdefault("input_size", (image_size, image_size))
    elif name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
    if not pretrained:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    head = _pop_final_linear(model, name)
    return _Grayscale(model), head, head.in_features


def _pop_final_linear(model: nn.Module, name: str) -> nn.Linear:
    """Takes the model's last layer, a Linear, out of it (replaced by Identity) and returns it."""
    for attribute in ("fc", "classifier", "heads", "head"):
        layer = getattr(model, attribute, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return layer
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            final = layer[-1]
            layer[-1] = nn.Identity()
            return final
    raise ConfigError(
        f"teacher.name={name!r}: its classifier does not end in a linear layer; choose another model"
    )


class _TimmPreLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def _timm(
    name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, nn.Module, int]:
    try:
        import timm
    except ImportError as error:
        raise ConfigError("teacher.library=timm needs timm: pip install 'losslab[timm]'") from error
    if not timm.is_model(name):
        raise ConfigError(f"teacher.name={name!r}: not a timm model")
    common = dict(
        pretrained=pretrained, in_chans=in_channels, **({} if pretrained else {"num_classes": num_classes})
    )
    try:
        model = timm.create_model(name, **common, **{"img_size": image_size, **kwargs})
    except TypeError as error:  # the architecture has a free input size
        if "img_size" not in str(error):
            raise
        model = timm.create_model(name, **common, **kwargs)
    backbone = _TimmPreLogits(model).eval()
    with torch.no_grad():
        feature_dim = backbone(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
    return backbone, model.get_classifier(), feature_dim
