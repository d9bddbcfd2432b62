"""Proxy-based embedding losses: the loss owns one learned vector (proxy) per class, trained with the network.

The training module calls :meth:`ProxyLoss.setup_embedding` once the projection head exists, which creates the
``[C, D]`` proxies; from then on they are parameters of the module, and ``lr_multiplier`` sets their learning
rate relative to the optimizer's. Similarities are cosines between L2-normalised embeddings and proxies,
computed in float32 at least (never autocast to half precision: with s = 64 a bf16 cosine error of 4e-3
moves a logit by 0.25).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast

MARGIN_FORMS = ("paper", "official", "easy_margin")


def _flatten_views(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V, D]`` (or ``[N, D]``) → ``[N*V, D]``, each view an anchor with its image's label."""
    if embeddings.dim() == 2:
        return embeddings, labels
    views = embeddings.shape[1]
    return embeddings.flatten(0, 1), labels.repeat_interleave(views)


class ProxyLoss(Loss):
    """An embedding loss with one learned proxy per class (``proxies``, ``[C, D]``).

    Proxies are drawn from kaiming normal with ``mode="fan_out"`` (std sqrt(2 / C)), as in the Proxy Anchor
    code; since only their directions enter the losses, the scale only sets how fast they turn.
    ``lr_multiplier``: the proxies (and any other parameter of the loss) learn at this multiple of the
    optimizer's learning rate.
    """

    kind = "embedding"
    n_views = 1
    needs_labels = True

    def __init__(self, lr_multiplier: float = 1.0) -> None:
        super().__init__()
        if not lr_multiplier > 0:
            raise ConfigError(f"loss.lr_multiplier={lr_multiplier}: must be > 0")
        self.lr_multiplier = lr_multiplier
        self.register_parameter("proxies", None)

    def setup_embedding(self, embedding_dim: int, num_classes: int) -> None:
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def unit_vectors(
        self, embeddings: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, ...]:
        """``(s x [N, D], w [C, D], labels [N])``: the (flattened) embeddings and the proxies, L2-normalised, the
        embeddings then multiplied by ``scale`` in the same pass."""
        if self.proxies is None:
            raise RuntimeError(
                f"{type(self).__name__} has no proxies yet: call setup_embedding(dim, num_classes)"
            )
        embeddings, labels = _flatten_views(embeddings, labels)
        dtype = torch.promote_types(upcast(embeddings).dtype, upcast(self.proxies).dtype)
        with torch.autocast(embeddings.device.type, enabled=False):
            embeddings = embeddings.to(dtype)
            norms = torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
            x = embeddings * (scale / norms)
            w = F.normalize(self.proxies.to(dtype), dim=-1)
        return x, w, labels

    def cosines(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos θ_{ic}`` between every (flattened) embedding and every proxy, ``[N, C]``, with the labels."""
        x, w, labels = self.unit_vectors(embeddings, labels)
        with torch.autocast(x.device.type, enabled=False):
            return x @ w.T, labels

    def extra_repr(self) -> str:
        shape = "no proxies" if self.proxies is None else f"proxies={tuple(self.proxies.shape)}"
        return f"{shape}, lr_multiplier={self.lr_multiplier:g}"


class _MarginSoftmax(ProxyLoss):
    """Cross-entropy on ``s cos θ_j`` for the other classes and ``s ψ(cos θ_y)`` for the true one."""

    # A mean of per-sample terms against the proxies: under DDP each rank's share is enough.
    gathers_across_ranks = False

    def __init__(self, s: float, lr_multiplier: float) -> None:
        super().__init__(lr_multiplier)
        if not s > 0:
            raise ConfigError(f"loss.s={s}: the scale must be > 0")
        self.s = s

    def scale(self) -> torch.Tensor | float:
        return self.s

    def target_cosine(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cos_y

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        x, w, labels = self.unit_vectors(embeddings, labels, scale)
        with torch.autocast(x.device.type, enabled=False):
            logits = x @ w.T  # s scaled the N×D embeddings rather than the N×C logits
            index = labels[:, None]
            target = self.target_cosine(logits.gather(1, index) / scale) * scale
            return F.cross_entropy(logits.scatter(1, index, target), labels)


class ArcFace(_MarginSoftmax):
    """ArcFace (Deng, Guo, Xue & Zafeiriou 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR): ``-log e^{s cos(θ_y + m)} / (e^{s cos(θ_y + m)} + sum_{j≠y} e^{s cos θ_j})``.

    ``cos(θ + m) = cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(1 - cos² θ)`` and cos θ clamped to [-1, 1]:
    rounding can push a normalised dot product past 1, and at the clamp's bounds no gradient passes, so the
    infinite ``d sin θ / d cos θ`` where an embedding meets its proxy (θ = 0) never reaches the network.
    ``margin_form`` is what happens where ``θ_y + m > π``, where ``cos(θ_y + m)`` turns back up and a larger
    angle would lower the loss:

    - ``paper``: ``cos(θ_y + m)`` everywhere (the paper's formula);
    - ``official``: ``cos θ_y - m sin m`` there, as the official InsightFace code (threshold ``cos(π - m)``,
      ``mm = sin(π - m) m``), which keeps the target logit decreasing in θ_y;
    - ``easy_margin``: the official code's other option, no margin where ``θ_y > π/2`` (``cos θ_y < 0``).
    """

    def __init__(
        self, s: float = 64.0, m: float = 0.5, margin_form: str = "paper", lr_multiplier: float = 1.0
    ) -> None:
        super().__init__(s, lr_multiplier)
        if not 0 <= m < math.pi:
            raise ConfigError(f"loss.m={m}: the angular margin must be in [0, pi)")
        if margin_form not in MARGIN_FORMS:
            raise ConfigError(
                f"loss.margin_form={margin_form!r}: allowed values are {', '.join(MARGIN_FORMS)}"
            )
        self.m = m
        self.margin_form = margin_form

    def target_cosine(self, cos_y: torch.Tensor) -> torch.Tensor:
        cos_y = cos_y.clamp(-1.0, 1.0)
        sin_y = (1.0 - cos_y.square()).sqrt()
        shifted = cos_y * math.cos(self.m) - sin_y * math.sin(self.m)
        if self.margin_form == "official":
            return torch.where(cos_y > math.cos(math.pi - self.m), shifted, cos_y - math.sin(self.m) * self.m)
        if self.margin_form == "easy_margin":
            return torch.where(cos_y > 0, shifted, cos_y)
        return shifted


class CosFace(_MarginSoftmax):
    """CosFace, the large margin cosine loss (Wang et al. 2018, "CosFace: Large Margin Cosine Loss for Deep
    Face Recognition", CVPR):
    ``-log e^{s (cos θ_y - m)} / (e^{s (cos θ_y - m)} + sum_{j≠y} e^{s cos θ_j})``."""

    def __init__(self, s: float = 64.0, m: float = 0.35, lr_multiplier: float = 1.0) -> None:
        super().__init__(s, lr_multiplier)
        if not m >= 0:
            raise ConfigError(f"loss.m={m}: the cosine margin must be >= 0")
        self.m = m

    def target_cosine(self, cos_y: torch.Tensor) -> torch.Tensor:
        return cos_y - self.m


class NormFace(_MarginSoftmax):
    """NormFace, the normalised softmax (Wang, Xiang, Cheng & Yuille 2017, "NormFace: L2 Hypersphere
    Embedding for Face Verification", ACM MM): ``-log e^{s cos θ_y} / sum_j e^{s cos θ_j}``.

    Without the scale, cosines in [-1, 1] bound the softmax away from confident predictions; the paper learns
    s as a scale layer after the cosine layer. ``learn_s``: s is then a parameter starting at ``s``, kept
    >= 0.01 (the official prototxt's filler value 10 and ``min_value``); otherwise ``s`` is fixed.
    The official prototxt also trains the class weights at ``lr_mult: 100`` without weight decay (a
    fine-tuning recipe); ``lr_multiplier=100`` gives its learning rate, with the optimizer's weight decay.
    """

    min_scale = 0.01

    def __init__(self, s: float = 10.0, learn_s: bool = True, lr_multiplier: float = 1.0) -> None:
        super().__init__(s, lr_multiplier)
        if not isinstance(learn_s, bool):
            raise ConfigError(f"loss.learn_s={learn_s!r}: allowed values are true, false")
        self.learn_s = learn_s
        if learn_s:
            self.learned_s = nn.Parameter(torch.tensor(float(s)))

    def scale(self) -> torch.Tensor | float:
        return self.learned_s.clamp_min(self.min_scale) if self.learn_s else self.s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No margin: the logits are s cos θ throughout, with no target logit to replace.
        x, w, labels = self.unit_vectors(embeddings, labels, self.scale())
        with torch.autocast(x.device.type, enabled=False):
            return F.cross_entropy(x @ w.T, labels)


class ProxyAnchor(ProxyLoss):
    """Proxy Anchor loss (Kim, Kim, Cho & Kwak 2020, "Proxy Anchor Loss for Deep Metric Learning", CVPR):

    ``1/|P+| sum_{p∈P+} log(1 + sum_{x∈X_p+} e^{-α(s(x,p) - δ)})``
    ``+ 1/|P| sum_{p∈P} log(1 + sum_{x∈X_p-} e^{α(s(x,p) + δ)})``

    s the cosine similarity, P all proxies, P+ those of the classes in the batch, X_p+ / X_p- the embeddings
    of p's class / of the others. ``log(1 + sum e^a)`` is a log-sum-exp with a zero term, finite at any α·s.
    The paper trains the proxies 100x faster than the network (``lr_multiplier: 100``).
    """

    def __init__(self, alpha: float = 32.0, delta: float = 0.1, lr_multiplier: float = 100.0) -> None:
        super().__init__(lr_multiplier)
        if not alpha > 0:
            raise ConfigError(f"loss.alpha={alpha}: the scaling factor must be > 0")
        if not delta >= 0:
            raise ConfigError(f"loss.delta={delta}: the margin must be >= 0")
        self.alpha = alpha
        self.delta = delta

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, labels = self.cosines(embeddings, labels)
        positive = F.one_hot(labels, cos.shape[1]).bool()
        with_positives = positive.any(dim=0)
        positive_term = _log_one_plus_sum_exp(
            (-self.alpha * (cos - self.delta)).masked_fill(~positive, -math.inf)
        )
        negative_term = _log_one_plus_sum_exp(
            (self.alpha * (cos + self.delta)).masked_fill(positive, -math.inf)
        )
        return positive_term[with_positives].sum() / with_positives.sum() + negative_term.mean()


def _log_one_plus_sum_exp(exponents: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_i e^{a_ic})`` per column c; a column of ``-inf`` (no member) gives 0, without NaN
    gradients."""
    zeros = exponents.new_zeros(1, exponents.shape[1])
    return torch.logsumexp(torch.cat([zeros, exponents]), dim=0)
