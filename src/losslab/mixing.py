"""Batch mixing for training batches: ``mixing=<name>`` (``configs/mixing/<name>.yaml``; ``mixing=none`` selects
nothing).

A :class:`Mixer` turns a training batch ``(images, target)`` into a :class:`MixedBatch`: the images the network sees
(possibly more rows than came in), the target the training loss sees for the first ``loss_rows`` outputs (``[N, C]``
probabilities, or the hard labels unchanged when the mixer keeps the loss on clean samples), and its draws in
``state``. The training module then opens :meth:`Mixer.hidden_mixing` around the backbone's forward pass (manifold
mixup mixes a hidden layer there) and adds :meth:`Mixer.extra_loss` to the loss (RankMixup's ranking terms, Decoupled
Mixup's regulariser). Validation and test batches are never mixed.

Every mixer accepts hard ``[B]`` labels and ``[B, C]`` probability or multi-hot targets (mixed linearly), and images
``[B, C, H, W]`` or ``[B, V, C, H, W]`` (V views of each sample): every view of a sample gets the same partner,
coefficient and box. Random draws come from torch's global generators (``torch.manual_seed`` reproduces a mix):
permutations on the images' device, per-batch scalars (coefficients, boxes, coin flips) on the CPU.

torchvision.transforms.v2.MixUp/CutMix are not used: they pair each sample with its neighbour in the batch
(``roll(1)``), take only hard labels, and return neither the coefficient nor the pairing, which manifold mixup,
RankMixup and Decoupled Mixup need after the forward pass and the tests check.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from losslab.errors import ConfigError
from losslab.losses.base import upcast


@dataclass
class MixedBatch:
    """A training batch after mixing.

    ``images``: what the network sees, ``[B', C, H, W]`` or ``[B', V, C, H, W]``.
    ``target``: what the loss sees for outputs ``[:loss_rows]``: ``[loss_rows, num_classes]`` probabilities, or the
    hard target unchanged (``Mixer.soft_targets`` False).
    ``loss_rows``: how many leading rows of the network's outputs the training loss and metrics use.
    ``state``: the mixer's draws (permutation, coefficient(s), box, ...), read by ``hidden_mixing``/``extra_loss``.
    """

    images: torch.Tensor
    target: torch.Tensor
    loss_rows: int
    state: dict[str, Any] = field(default_factory=dict)


class Mixer(nn.Module):
    """Base class of the batch mixers.

    ``soft_targets``: whether :attr:`MixedBatch.target` is ``[N, C]`` probabilities (the loss must accept them).
    ``needs_logits``: whether :meth:`extra_loss` needs class logits (refused with embedding losses).
    """

    soft_targets: ClassVar[bool] = True
    needs_logits: ClassVar[bool] = False

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        raise NotImplementedError

    def hidden_mixing(self, backbone: nn.Module, batch: MixedBatch) -> contextlib.AbstractContextManager:
        """A context open around the backbone's forward pass of ``batch``; nothing by default."""
        return contextlib.nullcontext()

    def extra_loss(self, logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor | None:
        """The mixer's own term, already weighted, on the logits of all ``B'`` rows (times views); None by default."""
        return None

    def check(self, num_classes: int, multi_label: bool) -> None:
        """Raises ConfigError for datasets on which the mixer has no meaning; nothing by default."""

    def check_backbone(self, backbone: nn.Module) -> None:
        """Raises ConfigError, at start-up, for a backbone the mixer cannot work with; nothing by default."""


# ---------------------------------------------------------------------------------------------
# Shared draws and mixing
# ---------------------------------------------------------------------------------------------


def _require(condition: bool, option: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"mixing.{option}={value}: must be {allowed}")


def _beta(alpha: float) -> float:
    """lam ~ Beta(alpha, alpha), drawn on the CPU."""
    concentration = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(concentration, concentration).sample())


def _coin(probability: float) -> bool:
    return bool(torch.rand(()) < probability)


def _n_views(images: torch.Tensor) -> int:
    return images.shape[1] if images.dim() == 5 else 1


def _target_dtype(images: torch.Tensor) -> torch.dtype:
    return torch.promote_types(images.dtype, torch.float32)


def as_probabilities(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Hard ``[B]`` labels as one-hot rows; ``[B, C]`` probabilities / multi-hot and float ``[B]`` regression
    targets as they are (in ``dtype``)."""
    if target.is_floating_point():
        return target.to(dtype)
    return F.one_hot(target, num_classes).to(dtype)


def mix_targets(target: torch.Tensor, partner: torch.Tensor, lam: float, num_classes: int,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``lam * y + (1 - lam) * y[partner]``, hard labels first made one-hot."""
    soft = as_probabilities(target, num_classes, dtype)
    return lam * soft + (1 - lam) * soft[partner]


def _interpolate(images: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * images + (1 - lam) * images[partner]


def _mixup(images: torch.Tensor, target: torch.Tensor, num_classes: int, alpha: float) -> MixedBatch:
    lam = _beta(alpha)
    perm = torch.randperm(len(images), device=images.device)
    mixed_target = mix_targets(target, perm, lam, num_classes, _target_dtype(images))
    return MixedBatch(_interpolate(images, perm, lam), mixed_target, len(images), {"lam": lam, "perm": perm})


def _cutmix(images: torch.Tensor, target: torch.Tensor, num_classes: int, alpha: float) -> MixedBatch:
    height, width = images.shape[-2:]
    cut_ratio = math.sqrt(1.0 - _beta(alpha))
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = (int(torch.randint(size, ())) for size in (height, width))
    y1, y2 = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    x1, x2 = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)  # the box may be clipped at the border
    perm = torch.randperm(len(images), device=images.device)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = images[perm][..., y1:y2, x1:x2]
    mixed_target = mix_targets(target, perm, lam, num_classes, _target_dtype(images))
    return MixedBatch(mixed, mixed_target, len(images), {"lam": lam, "perm": perm, "box": (y1, y2, x1, x2)})


# ---------------------------------------------------------------------------------------------
# Input mixing: mixup, CutMix, timm's switch between them
# ---------------------------------------------------------------------------------------------


class MixUp(Mixer):
    """mixup (Zhang, Cisse, Dauphin & Lopez-Paz 2018, ICLR, "mixup: Beyond Empirical Risk Minimization"):
    ``x~ = lam x_i + (1 - lam) x_perm(i)``, ``y~ = lam y_i + (1 - lam) y_perm(i)``, one ``lam ~ Beta(alpha, alpha)``
    and one random permutation per batch. ``alpha`` 1.0: the paper's CIFAR setting."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        self.alpha = alpha

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        return _mixup(images, target, num_classes, self.alpha)


class CutMix(Mixer):
    """CutMix (Yun, Han, Oh, Chun, Choe & Yoo 2019, ICCV, "CutMix: Regularization Strategy to Train Strong Classifiers
    with Localizable Features"): a box of the partner ``x_perm(i)`` is pasted into ``x_i``, the same box for the whole
    batch. ``lam ~ Beta(alpha, alpha)``; the box has sides ``H sqrt(1 - lam)``, ``W sqrt(1 - lam)`` around a uniform
    centre, clipped at the border, and ``lam`` is then corrected to ``1 - box area / (H W)``, the clean pixels'
    share, which weights the targets: ``y~ = lam y_i + (1 - lam) y_perm(i)``. ``alpha`` 1.0 as in the paper."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        self.alpha = alpha

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        return _cutmix(images, target, num_classes, self.alpha)


class MixUpCutMix(Mixer):
    """timm's mixup/CutMix switch (Wightman, ``timm.data.Mixup``, as in DeiT, Touvron et al. 2021): per batch, CutMix
    with ``Beta(cutmix_alpha, cutmix_alpha)`` with probability ``switch_prob``, else mixup with
    ``Beta(mixup_alpha, mixup_alpha)``. timm's defaults for its ImageNet recipes: 0.8, 1.0, 0.5. ``state["mode"]``
    says which was drawn. (timm's label smoothing is left to ``loss=label_smoothing``.)"""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5) -> None:
        super().__init__()
        _require(mixup_alpha > 0, "mixup_alpha", mixup_alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        _require(cutmix_alpha > 0, "cutmix_alpha", cutmix_alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        _require(0 <= switch_prob <= 1, "switch_prob", switch_prob, "in [0, 1] (the probability of CutMix)")
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = mixup_alpha, cutmix_alpha, switch_prob

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        if _coin(self.switch_prob):
            batch = _cutmix(images, target, num_classes, self.cutmix_alpha)
            batch.state["mode"] = "cutmix"
        else:
            batch = _mixup(images, target, num_classes, self.mixup_alpha)
            batch.state["mode"] = "mixup"
        return batch


# ---------------------------------------------------------------------------------------------
# Manifold mixup: a hidden layer's output
# ---------------------------------------------------------------------------------------------


INPUT = "input"


def default_mixing_layers(backbone: nn.Module) -> list[str]:
    """Where manifold mixup mixes when ``layers`` is not set: ``input`` (k = 0) and, for losslab's residual networks,
    the outputs of the first two residual stages (Verma et al.'s k in {0, 1, 2} for PreAct ResNets); for ``small_cnn``
    and ``mlp``, the output of every hidden layer (its ReLU) except the last, which is the features themselves."""
    from losslab.models import MLP, PreActResNet, ResNet, SmallCNN, WideResNet

    if isinstance(backbone, (ResNet, PreActResNet, WideResNet)):
        return [INPUT, "stages.0", "stages.1"]
    if isinstance(backbone, (SmallCNN, MLP)):
        activations = [name for name, module in backbone.named_modules() if isinstance(module, nn.ReLU)]
        return [INPUT, *activations[:-1]]
    top_level = ", ".join(name for name, _ in backbone.named_children())
    raise ConfigError(
        f"mixing=manifold_mixup has no default layers for {type(backbone).__name__}; set "
        f"mixing.layers=[input,<module>,...] with names from backbone.named_modules() (top level: {top_level})"
    )


class ManifoldMixup(Mixer):
    """Manifold mixup (Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz & Bengio 2019, ICML, "Manifold Mixup:
    Better Representations by Interpolating Hidden States"): per batch one layer k is drawn uniformly from ``layers``
    and its output is mixed, ``h~ = lam h_i + (1 - lam) h_perm(i)``, with ``y~ = lam y_i + (1 - lam) y_perm(i)`` and
    ``lam ~ Beta(alpha, alpha)``; ``alpha`` 2.0 as in the paper. ``layers``: module names of the backbone
    (``backbone.named_modules()``), ``input`` for the images (k = 0); None: :func:`default_mixing_layers`.

    :meth:`forward` leaves the images clean and draws ``lam``, the permutation and the layer;
    :meth:`hidden_mixing` mixes that layer's output through a forward hook, removed when the context closes (the
    same layer in every pass over the same batch)."""

    def __init__(self, alpha: float = 2.0, layers: Sequence[str] | None = None) -> None:
        super().__init__()
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        if layers is not None:
            layers = [str(name) for name in layers]
            _require(
                len(layers) > 0, "layers", layers, "a non-empty list of module names, or null for the default"
            )
        self.alpha, self.layers = alpha, layers

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        lam = _beta(self.alpha)
        perm = torch.randperm(len(images), device=images.device)
        mixed_target = mix_targets(target, perm, lam, num_classes, _target_dtype(images))
        # The layer is drawn here, as a uniform number, since the candidates depend on the backbone.
        state = {"lam": lam, "perm": perm, "layer_draw": float(torch.rand(())), "n_views": _n_views(images)}
        return MixedBatch(images, mixed_target, len(images), state)

    def resolve_layers(self, backbone: nn.Module) -> list[str]:
        """The candidate layers for ``backbone``; ConfigError for names it does not have."""
        if self.layers is None:
            return default_mixing_layers(backbone)
        modules = dict(backbone.named_modules())
        unknown = [name for name in self.layers if name != INPUT and (name not in modules or name == "")]
        if unknown:
            top_level = ", ".join(name for name, _ in backbone.named_children())
            raise ConfigError(
                f"mixing.layers={self.layers}: {type(backbone).__name__} has no module {unknown}; use {INPUT!r} or "
                f"names from backbone.named_modules() (top level: {top_level})"
            )
        return list(self.layers)

    def check_backbone(self, backbone: nn.Module) -> None:
        self.resolve_layers(backbone)

    def hidden_mixing(self, backbone: nn.Module, batch: MixedBatch) -> contextlib.AbstractContextManager:
        layers = self.resolve_layers(backbone)
        layer = layers[min(int(batch.state["layer_draw"] * len(layers)), len(layers) - 1)]
        batch.state["layer"] = layer
        return _mixing_hook(backbone, layer, batch.state["perm"], batch.state["lam"], batch.state["n_views"])


def _expand_to_views(perm: torch.Tensor, rows: int) -> torch.Tensor:
    """The permutation of ``rows = B * V`` flattened rows (sample-major, as the training module flattens views)."""
    n_views = rows // len(perm)
    if n_views * len(perm) != rows:
        raise RuntimeError(
            f"manifold mixup drew a permutation of {len(perm)} samples but the layer sees {rows} rows"
        )
    return (perm[:, None] * n_views + torch.arange(n_views, device=perm.device)).flatten()


@contextlib.contextmanager
def _mixing_hook(
    backbone: nn.Module, layer: str, perm: torch.Tensor, lam: float, n_views: int
) -> Iterator[None]:
    def mix(hidden: torch.Tensor) -> torch.Tensor:
        return _interpolate(hidden, _expand_to_views(perm, len(hidden)), lam)

    if layer == INPUT:
        handle = backbone.register_forward_pre_hook(lambda module, args: (mix(args[0]), *args[1:]))
    else:
        handle = backbone.get_submodule(layer).register_forward_hook(lambda module, args, output: mix(output))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Mixers with a term of their own on the logits
# ---------------------------------------------------------------------------------------------


def _refuse_multi_label(key: str, multi_label: bool) -> None:
    if multi_label:
        raise ConfigError(
            f"mixing={key} compares softmax outputs of single-label classes and has no meaning on a multi-label "
            "dataset; use mixing=mixup or mixing=cutmix (multi-hot targets are mixed linearly)"
        )


def _hard_classes(target: torch.Tensor) -> torch.Tensor:
    return target.argmax(dim=-1) if target.is_floating_point() else target


class RankMixup(Mixer):
    """RankMixup (Noh, Park, Lee & Ham 2023, ICCV, "RankMixup: Ranking-Based Mixup Training for Network
    Calibration"). The network sees the clean batch followed by ``num_mixed`` mixup copies (each with its own
    permutation and ``lam_k ~ Beta(alpha, alpha)``); the training loss sees the clean rows with the hard labels, and
    the mixed rows feed one ranking term, weighted by ``weight``:

    ``mode=mrl`` (mixup ranking loss): a mixed sample should score below its clean source by ``margin``,
    ``mean_{k,i} max(0, s(x~_ki) - s(x_i) + margin)``, over pairs of different classes; ``s`` is the largest logit
    (``score=logit``, the authors' code) or the confidence, the largest softmax probability (``score=confidence``, the
    paper's wording).
    ``mode=mndcg`` (M-NDCG): the clean sample (relevance 1) and its mixed copies (relevance ``max_c y~_c``, i.e.
    ``max(lam, 1 - lam)`` for two classes) are listed by decreasing relevance; with confidences ``p`` as gains,
    ``DCG = sum_r p_r / log2(r + 1)``, ``IDCG = sum_r rel_r / log2(r + 1)``, and the term is
    ``1 - min(DCG / IDCG, IDCG / DCG)``, averaged over samples.

    Defaults are the authors' CIFAR configuration (github.com/cvlab-yonsei/RankMixup): ``alpha`` 2.0, ``weight`` 0.1,
    ``margin`` 2.0 on logits, one mixed copy for MRL and three for M-NDCG (``num_mixed: null``).
    """

    soft_targets: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = True
    MODES: ClassVar[tuple[str, ...]] = ("mrl", "mndcg")
    SCORES: ClassVar[tuple[str, ...]] = ("logit", "confidence")

    def __init__(self, mode: str = "mrl", alpha: float = 2.0, weight: float = 0.1, margin: float = 2.0,
                 num_mixed: int | None = None, score: str = "logit") -> None:  # fmt: skip
        super().__init__()
        _require(mode in self.MODES, "mode", mode, f"one of {', '.join(self.MODES)}")
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        _require(weight >= 0, "weight", weight, ">= 0")
        _require(margin >= 0, "margin", margin, ">= 0")
        _require(score in self.SCORES, "score", score, f"one of {', '.join(self.SCORES)}")
        if num_mixed is None:
            num_mixed = 1 if mode == "mrl" else 3
        _require(int(num_mixed) == num_mixed and num_mixed >= 1, "num_mixed", num_mixed, "an integer >= 1")
        self.mode, self.alpha, self.weight, self.margin = mode, alpha, weight, margin
        self.num_mixed, self.score = int(num_mixed), score

    def check(self, num_classes: int, multi_label: bool) -> None:
        _refuse_multi_label("rankmixup", multi_label)

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        batch_size, dtype = len(images), _target_dtype(images)
        lams = torch.tensor([_beta(self.alpha) for _ in range(self.num_mixed)], dtype=images.dtype)
        perms = torch.stack([torch.randperm(batch_size, device=images.device) for _ in range(self.num_mixed)])
        lam_images = lams.to(images.device).view(-1, *[1] * images.dim())
        mixed = lam_images * images + (1 - lam_images) * images[perms]  # [num_mixed, B, ...]
        soft = as_probabilities(target, num_classes, dtype)
        lam_targets = lams.to(device=soft.device, dtype=dtype).view(-1, 1, 1)
        mixed_targets = lam_targets * soft + (1 - lam_targets) * soft[perms]
        state = {
            "lams": lams, "perms": perms, "n_views": _n_views(images),
            "relevance": mixed_targets.amax(dim=-1),  # [num_mixed, B]
            "same_source": (soft == soft[perms]).all(dim=-1),  # pairs of one class carry no ranking
        }  # fmt: skip
        return MixedBatch(torch.cat([images, mixed.flatten(0, 1)]), target, batch_size, state)

    def extra_loss(self, logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        n_views = batch.state["n_views"]
        grouped = upcast(logits).view(1 + self.num_mixed, batch.loss_rows, n_views, -1)
        if self.mode == "mrl":
            return self.weight * mixup_ranking_loss(
                grouped, batch.state["same_source"], self.margin, self.score
            )
        return self.weight * mixup_ndcg_loss(grouped, batch.state["relevance"])


def mixup_ranking_loss(
    logits: torch.Tensor, same_source: torch.Tensor, margin: float, score: str
) -> torch.Tensor:
    """RankMixup's MRL on ``logits [1 + K, B, V, C]`` (clean rows first): ``mean max(0, s_mixed - s_clean + margin)``
    over K copies, B samples and V views, zero for copies whose two sources share a class."""
    scores = logits.amax(dim=-1) if score == "logit" else logits.softmax(dim=-1).amax(dim=-1)
    hinge = F.relu(scores[1:] - scores[:1] + margin)  # [K, B, V]
    return (hinge * ~same_source[..., None]).mean()


def mixup_ndcg_loss(logits: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """RankMixup's M-NDCG term on ``logits [1 + K, B, V, C]`` (clean rows first) and the mixed copies'
    ``relevance [K, B]``: ``1 - min(DCG / IDCG, IDCG / DCG)`` averaged over samples and views."""
    confidence = logits.softmax(dim=-1).amax(dim=-1)  # [1 + K, B, V]
    order = relevance.argsort(dim=0, descending=True, stable=True)
    ranked_relevance = torch.cat([torch.ones_like(relevance[:1]), relevance.gather(0, order)]).to(
        confidence.dtype
    )
    ranked_confidence = torch.cat(
        [confidence[:1], confidence[1:].gather(0, order[..., None].expand_as(confidence[1:]))]
    )
    positions = torch.arange(1, len(confidence) + 1, device=confidence.device, dtype=confidence.dtype)
    discount = torch.log2(positions + 1).view(-1, 1, 1)
    dcg = (ranked_confidence / discount).sum(dim=0)
    idcg = (ranked_relevance[..., None] / discount).sum(dim=0)
    ndcg = torch.minimum(dcg / idcg, idcg / dcg)
    return (1 - ndcg).mean()


class DecoupledMixup(Mixer):
    """Decoupled Mixup (Liu, Li, Wang, Tan, Wu & Li 2023, NeurIPS, "Harnessing Hard Mixed Samples with Decoupled
    Regularizer"): mixup (``lam ~ Beta(alpha, alpha)``, soft mixed target for the loss) plus ``eta`` times the
    decoupled regulariser: for a sample mixing classes a and b, each class's log-probability under a softmax that
    leaves out the other one, ``-log(e^{z_a} / sum_{c != b} e^{z_c}) - log(e^{z_b} / sum_{c != a} e^{z_c})``, unweighted
    by lam (two-hot), zero when a = b, averaged over the batch. ``eta`` 0.1 and ``alpha`` 1.0: the authors' CIFAR
    settings (OpenMixup, github.com/Westlake-AI/openmixup)."""

    needs_logits: ClassVar[bool] = True

    def __init__(self, alpha: float = 1.0, eta: float = 0.1) -> None:
        super().__init__()
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        _require(eta >= 0, "eta", eta, ">= 0")
        self.alpha, self.eta = alpha, eta

    def check(self, num_classes: int, multi_label: bool) -> None:
        _refuse_multi_label("decoupled_mixup", multi_label)

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        batch = _mixup(images, target, num_classes, self.alpha)
        classes = _hard_classes(target)
        batch.state.update(
            classes=classes, partner_classes=classes[batch.state["perm"]], n_views=_n_views(images)
        )
        return batch

    def extra_loss(self, logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        n_views = batch.state["n_views"]
        classes = batch.state["classes"].repeat_interleave(n_views)
        partners = batch.state["partner_classes"].repeat_interleave(n_views)
        return self.eta * decoupled_regularizer(upcast(logits), classes, partners)


def decoupled_regularizer(
    logits: torch.Tensor, classes: torch.Tensor, partners: torch.Tensor
) -> torch.Tensor:
    """``mean_i [a_i != b_i] (-log softmax_{c != b_i}(z_i)_{a_i} - log softmax_{c != a_i}(z_i)_{b_i})``."""

    def left_out_log_probability(kept: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
        masked = logits.scatter(1, left_out[:, None], float("-inf"))
        return logits.gather(1, kept[:, None]).squeeze(1) - masked.logsumexp(dim=1)

    terms = -(left_out_log_probability(classes, partners) + left_out_log_probability(partners, classes))
    return (terms * (classes != partners)).mean()


# ---------------------------------------------------------------------------------------------
# C-Mixup: partners drawn by label similarity
# ---------------------------------------------------------------------------------------------


def _load_label_embedding(path: str) -> torch.Tensor:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"mixing.label_embedding={path}: no such file (a .npy or .pt [num_classes, d] array)"
        )
    if file.suffix == ".npy":
        array = torch.from_numpy(np.load(file))
    elif file.suffix in (".pt", ".pth"):
        array = torch.as_tensor(torch.load(file, map_location="cpu", weights_only=True))
    else:
        raise ConfigError(f"mixing.label_embedding={path}: must be a .npy, .pt or .pth file")
    if array.dim() != 2:
        raise ConfigError(
            f"mixing.label_embedding={path}: holds shape {tuple(array.shape)}, not [num_classes, d]"
        )
    return array.double()


class CMixup(Mixer):
    """C-Mixup (Yao, Wang, Zhang, Zou & Finn 2022, NeurIPS, "C-Mixup: Improving Generalization in Regression"):
    mixup whose partner j of sample i is drawn from the batch with probability
    ``P(j | i) ∝ exp(-d(y_i, y_j)^2 / (2 bandwidth^2))`` (j = i included, as in the authors' code), then
    ``x~ = lam x_i + (1 - lam) x_j``, ``y~ = lam y_i + (1 - lam) y_j`` with ``lam ~ Beta(alpha, alpha)``.
    ``d`` is the Euclidean distance between label vectors: float ``[B]`` regression targets, ``[B, C]``
    probabilities or multi-hot sets, or, with ``label_embedding`` (a .npy/.pt ``[num_classes, d]`` array), the
    embeddings of the classes (``y @ E`` for probability targets). Hard class labels need the embedding: without it
    every two classes are equally far apart. ``alpha`` 2.0: the paper's setting on most datasets; ``bandwidth`` is
    tuned per dataset there (0.05 to 10), 1.0 here."""

    def __init__(
        self, alpha: float = 2.0, bandwidth: float = 1.0, label_embedding: str | None = None
    ) -> None:
        super().__init__()
        _require(alpha > 0, "alpha", alpha, "> 0 (the Beta(alpha, alpha) concentration)")
        _require(bandwidth > 0, "bandwidth", bandwidth, "> 0 (the Gaussian kernel's width)")
        self.alpha, self.bandwidth, self.label_embedding_path = alpha, bandwidth, label_embedding
        embedding = _load_label_embedding(label_embedding) if label_embedding is not None else None
        self.register_buffer("label_embedding", embedding, persistent=False)

    def check(self, num_classes: int, multi_label: bool) -> None:
        if self.label_embedding is None and not multi_label:
            raise ConfigError(self._needs_embedding())
        if self.label_embedding is not None and len(self.label_embedding) != num_classes:
            raise ConfigError(
                f"mixing.label_embedding={self.label_embedding_path}: has {len(self.label_embedding)} rows but the "
                f"dataset has {num_classes} classes"
            )

    @staticmethod
    def _needs_embedding() -> str:
        return (
            "mixing=c_mixup samples mixing partners by label distance, which hard class labels do not give (every two "
            "classes are equally far apart); set mixing.label_embedding=<file with a [num_classes, d] array> "
            "(.npy or .pt) or use mixing=mixup"
        )

    def label_vectors(self, target: torch.Tensor) -> torch.Tensor:
        """The vectors whose distances define the kernel, ``[B, d]`` in float64."""
        if self.label_embedding is not None:
            embedding = self.label_embedding.to(device=target.device, dtype=torch.float64)
            return embedding[target] if not target.is_floating_point() else target.double() @ embedding
        if not target.is_floating_point():
            raise ConfigError(self._needs_embedding())
        return target.double().view(len(target), -1)

    def partner_probabilities(self, target: torch.Tensor) -> torch.Tensor:
        """``[B, B]``: row i is ``P(j | i) ∝ exp(-||e_i - e_j||^2 / (2 bandwidth^2))``."""
        vectors = self.label_vectors(target)
        squared_distance = (vectors[:, None, :] - vectors[None, :, :]).pow(2).sum(dim=-1)
        return (-squared_distance / (2 * self.bandwidth**2)).softmax(dim=1)

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        probabilities = self.partner_probabilities(target)
        partner = torch.multinomial(probabilities, 1).squeeze(1).to(images.device)
        lam = _beta(self.alpha)
        mixed_target = mix_targets(target, partner.to(target.device), lam, num_classes, _target_dtype(images))
        state = {"lam": lam, "partner": partner, "probabilities": probabilities}
        return MixedBatch(_interpolate(images, partner, lam), mixed_target, len(images), state)


# ---------------------------------------------------------------------------------------------
# HybridAugment: frequency bands swapped between images
# ---------------------------------------------------------------------------------------------


class HybridAugment(Mixer):
    """HybridAugment and HybridAugment++ (Yucel, Cinbis & Duygulu 2023, ICCV, "HybridAugment++: Unified Frequency
    Spectra Perturbations for Model Robustness"), paired (batch) version. With probability ``probability`` per batch,
    each image keeps its low frequencies and takes a partner's high frequencies,
    ``x~_i = LF(x_i) + (x_perm(i) - LF(x_perm(i)))``, ``LF`` a Gaussian blur (``kernel_size`` 3, ``sigma`` 0.5, the
    authors' CIFAR values); the label stays that of the image that supplies the low frequencies (the paper: labels
    live mostly in the low frequencies), so targets stay hard. ``amplitude_phase`` (HybridAugment++): with the same
    probability, ``LF(x_i)`` is first replaced by the image with the phase of ``LF(x_i)`` and the amplitude spectrum of
    ``LF(x_perm2(i))`` (a second permutation), the 3-D FFT over channels and pixels as in the authors' code.
    ``paired`` (the authors' training): the network sees the clean batch followed by the hybrid one and the loss
    covers both with the same labels (``loss_rows = 2B``); otherwise the hybrids replace the batch.
    ``probability`` 0.6 as in the authors' code. The images are the normalised ones (the authors mix before
    normalising; the blur split commutes with it, the amplitude swap only approximately)."""

    soft_targets: ClassVar[bool] = False

    def __init__(self, probability: float = 0.6, kernel_size: int = 3, sigma: float = 0.5,
                 amplitude_phase: bool = False, paired: bool = True) -> None:  # fmt: skip
        super().__init__()
        _require(0 <= probability <= 1, "probability", probability, "in [0, 1]")
        _require(int(kernel_size) == kernel_size and kernel_size >= 1 and kernel_size % 2 == 1, "kernel_size",
                 kernel_size, "an odd integer >= 1")  # fmt: skip
        _require(sigma > 0, "sigma", sigma, "> 0 (the Gaussian blur's standard deviation, in pixels)")
        self.probability, self.kernel_size, self.sigma = probability, int(kernel_size), float(sigma)
        self.amplitude_phase, self.paired = bool(amplitude_phase), bool(paired)

    def low_frequencies(self, images: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(images, [self.kernel_size] * 2, [self.sigma] * 2)

    def forward(self, images: torch.Tensor, target: torch.Tensor, num_classes: int) -> MixedBatch:
        state: dict[str, Any] = {"applied": _coin(self.probability), "amplitude_perm": None}
        hybrid = images
        if state["applied"]:
            state["perm"] = torch.randperm(len(images), device=images.device)
            low = self.low_frequencies(images)
            high = images - low
            if self.amplitude_phase and _coin(self.probability):
                state["amplitude_perm"] = torch.randperm(len(images), device=images.device)
                low = recombine_amplitude_phase(low[state["amplitude_perm"]], low)
            hybrid = low + high[state["perm"]]
        if self.paired:
            return MixedBatch(
                torch.cat([images, hybrid]), torch.cat([target, target]), 2 * len(images), state
            )
        return MixedBatch(hybrid, target, len(images), state)


def recombine_amplitude_phase(amplitude_from: torch.Tensor, phase_from: torch.Tensor) -> torch.Tensor:
    """The image with the Fourier amplitude of ``amplitude_from`` and the phase of ``phase_from`` (3-D FFT over the
    last three dims, channels and pixels)."""
    dims = (-3, -2, -1)
    amplitude = torch.fft.fftn(amplitude_from, dim=dims).abs()
    phase = torch.fft.fftn(phase_from, dim=dims).angle()
    return torch.fft.ifftn(torch.polar(amplitude, phase), dim=dims).real.to(phase_from.dtype)
