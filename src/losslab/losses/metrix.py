"""Metrix: mixup for deep metric learning, the mixed examples' labels interpolated too."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast
from losslab.losses.contrastive import _flatten_views
from losslab.losses.pair import (
    TRIPLET_CHUNK,
    Contrastive,
    MultiSimilarity,
    _label_masks,
    _log_one_plus_sum_exp,
)


class Metrix(Loss):
    """Metrix (Venkataramanan, Psomas, Kijak, Amsaleg, Karantzalos & Avrithis 2022, ICLR, "It Takes Two to Tango:
    Mixup for Deep Metric Learning"), embedding mixup: besides its clean positives and negatives, each anchor a
    meets the mixtures ``u = λ z_p + (1 − λ) z_n`` of its positives p and negatives n, each a positive of weight λ
    and a negative of weight 1 − λ (the paper's loss generalised to interpolated labels):

    ``L = L_base + w · mean_a ℓ̃(a)``,  λ ~ Beta(α, α), one λ per batch, ``w`` = ``mixing_strength``,

    the mean over the anchors that have a positive and a negative. ``base`` multi-similarity (over its mined
    pairs, with its α_MS, β, λ_MS): ``ℓ̃(a) = 1/α_MS log[1 + Σ_u λ e^{−α_MS(S_au − λ_MS)}]
    + 1/β log[1 + Σ_u (1 − λ) e^{β(S_au − λ_MS)}]``, S the cosine similarity. ``base`` contrastive (Hadsell et al.,
    margin m, its distance D): ``ℓ̃(a) = mean_u [λ ½ D_au² + (1 − λ) ½ max(0, m − D_au)²]``, here averaged over
    every (a, p, n) rather than per anchor, as the base loss averages its pairs.

    The mixtures are formed in the space the base loss measures: L2-normalised embeddings, except for the raw
    Euclidean distance (``normalize: false``); the anchor stays clean, as in the paper. ``alpha`` 2 and
    ``mixing_strength`` 0.4 are the authors' code's values (which also picks, per batch at random, anchor-negative
    mixtures for anchors without positives, and puts the mixed multi-similarity sums inside the clean log-sums;
    here the mixed loss is added, as in the paper's error function). Mixing inputs or intermediate features needs
    the network in the loop and is not implemented. Validation and test losses are the base loss's. The mixed
    terms cost O(N³) time over the batch's (a, p, n), in chunks of anchors whose memory stays bounded. Under DDP
    each rank draws its own λ. Counters are the base loss's.
    """

    kind = "embedding"
    needs_positives = True

    def __init__(self, base: Loss | None = None, alpha: float = 2.0, mixing_strength: float = 0.4) -> None:
        super().__init__()
        base = MultiSimilarity() if base is None else base
        if not isinstance(base, (MultiSimilarity, Contrastive)):
            raise ConfigError(
                f"loss.base={type(base).__name__}: Metrix's mixed loss is defined for "
                "losslab.losses.pair.MultiSimilarity and losslab.losses.pair.Contrastive"
            )
        if alpha <= 0:
            raise ConfigError(f"loss.alpha={alpha}: must be > 0")
        if mixing_strength < 0:
            raise ConfigError(f"loss.mixing_strength={mixing_strength}: must be >= 0")
        self.base, self.alpha, self.mixing_strength = base, alpha, mixing_strength

    def draw_lambda(self) -> float:
        """λ ~ Beta(α, α), from the torch generator (a seed reproduces it)."""
        return float(torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha)).sample())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        clean = self.base(embeddings, labels)
        if not self.training or self.mixing_strength == 0:
            return clean
        return clean + self.mixing_strength * self.mixed_loss(embeddings, labels, self.draw_lambda())

    def mixed_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
        """``mean ℓ̃`` for the mixing coefficient ``lam``; zero, keeping the graph, when no anchor has both a
        positive and a negative."""
        features, labels = _flatten_views(embeddings, labels)
        features = upcast(features)
        positives, negatives = _label_masks(labels)
        kept = positives.any(dim=1) & negatives.any(dim=1)
        if not kept.any():
            return features.sum() * 0.0
        base = self.base
        on_sphere = isinstance(base, MultiSimilarity) or base.distance == "cosine" or base.normalize
        with torch.autocast(features.device.type, enabled=False):
            z = F.normalize(features, dim=-1) if on_sphere else features
            gram = z @ z.T
        if isinstance(base, MultiSimilarity):
            positives, negatives = base.mine(gram, positives, negatives)
        norms = gram.diagonal()
        # The mixtures u = lam z_p + (1 - lam) z_n are never built: |u|² for every (p, n), and a·u per chunk.
        mixture_norms = lam**2 * norms[:, None] + (1 - lam) ** 2 * norms[None, :] + 2 * lam * (1 - lam) * gram
        per_anchor = self._multi_similarity_terms if isinstance(base, MultiSimilarity) else self._contrastive_terms
        rows = (gram[kept], norms[kept, None], positives[kept], negatives[kept])
        values = _over_anchor_chunks(lambda *chunk: per_anchor(lam, mixture_norms, on_sphere, *chunk), *rows)
        if isinstance(base, MultiSimilarity):
            return values.mean()
        return 0.5 * values.sum() / (positives[kept].sum(dim=1) * negatives[kept].sum(dim=1)).sum()

    def _multi_similarity_terms(
        self, lam: float, mixture_norms: torch.Tensor, on_sphere: bool, gram_rows: torch.Tensor,
        anchor_norms: torch.Tensor, positive_rows: torch.Tensor, negative_rows: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """ℓ̃(a) of multi-similarity for a chunk of anchors."""
        base = self.base
        shifted = (_mixture_cosine(lam, mixture_norms, gram_rows) - base.lambda_).flatten(1)
        pairs = (positive_rows[:, :, None] & negative_rows[:, None, :]).flatten(1)
        # The weights enter as log-weights; lam = 0 or 1 gives log 0 = -inf, which drops that side's terms.
        log_lam, log_complement = (math.log(w) if w > 0 else -math.inf for w in (lam, 1 - lam))
        positive_term = _log_one_plus_sum_exp(-base.alpha * shifted + log_lam, pairs) / base.alpha
        negative_term = _log_one_plus_sum_exp(base.beta * shifted + log_complement, pairs) / base.beta
        return positive_term + negative_term

    def _contrastive_terms(
        self, lam: float, mixture_norms: torch.Tensor, on_sphere: bool, gram_rows: torch.Tensor,
        anchor_norms: torch.Tensor, positive_rows: torch.Tensor, negative_rows: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Each anchor's sum over (p, n) of ``lam D² + (1 − lam) max(0, m − D)²`` for a chunk of anchors."""
        base = self.base
        if base.distance == "cosine":
            distance = 1.0 - _mixture_cosine(lam, mixture_norms, gram_rows)
        else:
            if on_sphere:  # both ends normalised: D² = 2 − 2 cos
                squared = 2.0 - 2.0 * _mixture_cosine(lam, mixture_norms, gram_rows)
            else:
                dot = lam * gram_rows[:, :, None] + (1 - lam) * gram_rows[:, None, :]
                squared = anchor_norms[:, :, None] + mixture_norms - 2.0 * dot
            # A mixture that coincides with its anchor is at distance 0, with gradient 0 as in cdist.
            tiny = torch.finfo(squared.dtype).tiny
            distance = torch.where(squared > tiny, squared.clamp_min(tiny).sqrt(), 0.0)
        terms = lam * distance.square() + (1 - lam) * F.relu(base.margin - distance).square()
        pairs = positive_rows[:, :, None] & negative_rows[:, None, :]
        return torch.where(pairs, terms, 0.0).flatten(1).sum(dim=1)

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.base.set_epoch(epoch, max_epochs)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return self.base.extra_metrics()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, mixing_strength={self.mixing_strength:g}"


def _mixture_cosine(lam: float, mixture_norms: torch.Tensor, gram_rows: torch.Tensor) -> torch.Tensor:
    """``[r, N, N]``: cos(a, u) for the anchors a of ``gram_rows`` (unit vectors) and every mixture u of (p, n)."""
    dot = lam * gram_rows[:, :, None] + (1 - lam) * gram_rows[:, None, :]
    return dot / mixture_norms.clamp_min(torch.finfo(dot.dtype).tiny).sqrt()


def _over_anchor_chunks(per_anchor: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
    """``per_anchor`` over chunks of the anchors' ``rows`` (``[A, N]`` each), each chunk at most ``TRIPLET_CHUNK``
    (anchor, positive, negative) terms and recomputed in the backward pass instead of kept; concatenated."""
    size = max(1, TRIPLET_CHUNK // rows[0].shape[1] ** 2)
    results = []
    for chunk in zip(*(row.split(size) for row in rows)):
        if torch.is_grad_enabled() and rows[0].requires_grad:
            results.append(checkpoint(per_anchor, *chunk, use_reentrant=False))
        else:
            results.append(per_anchor(*chunk))
    return torch.cat(results)
