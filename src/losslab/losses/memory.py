"""Embedding losses with a memory of past embeddings: the cross-batch memory XBM for pair losses, and MoCo's queue
of negatives with MoCHi's hard negative mixing.

The memory lives in registered buffers, so checkpoints carry it (and a resumed run continues with it); it is sized
from the embedding dimension in :meth:`setup_embedding`, or at the first call. Only training calls (the module in
training mode) write to it: validation and test losses leave it as it is. Under DDP a loss sees the batch gathered
from every rank (:mod:`losslab.distributed`) and every rank stores that same global batch, so the ranks' memories
stay identical.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from losslab.errors import ConfigError
from losslab.losses.base import Loss, upcast
from losslab.losses.contrastive import _flatten_views
from losslab.losses.pair import MultiSimilarity

# MoCo draws its initial queue at random; one fixed draw gives every rank (and every run) the same queue.
QUEUE_SEED = 0


class _MemoryLoss(Loss):
    """Buffers whose size depends on the embedding dimension: a checkpoint's are taken at their stored size, so a
    loss not yet set up (or set up for another dimension) still loads one."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, buffer in self._buffers.items():
            stored = state_dict.get(prefix + name)
            if buffer is not None and stored is not None and stored.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _ring_slots(pointer: int, count: int, size: int, device: torch.device) -> torch.Tensor:
    """The slots of a ring buffer of ``size`` entries that the next ``count`` entries overwrite, oldest first."""
    return (pointer + torch.arange(count, device=device)) % size


class CrossBatchMemory(_MemoryLoss):
    """Cross-batch memory XBM (Wang, Zhang, Huang & Scott 2020, CVPR, "Cross-Batch Memory for Embedding
    Learning"): a pair loss whose anchors, the batch B, are also compared with the embeddings of the last
    ``memory_size`` training samples, kept detached with their labels in a FIFO queue M:

    ``L = L_base(B; B) + weight · L_base(B; M)``,  M holding the batch itself once it is enqueued,

    ``L_base(A; C)`` the base loss of anchors A against candidates C, each anchor never paired with its own entry.
    This is the training step of the official code (research-xbm: batch loss plus ``XBM.WEIGHT`` times the loss
    against the memory, the batch enqueued first); the batch term keeps the gradient through both ends of the
    batch's own pairs, the memory term reaches only the anchors (the paper's "slow drift": stored embeddings
    stand in for the current network's). The memory is used after ``start_iteration`` training calls (the
    official warm-up, ``XBM.START_ITERATION``); before, and in validation and test, ``L = L_base(B; B)``.

    ``base``: a labelled pair loss that takes reference embeddings (:class:`~losslab.losses.pair.MultiSimilarity`,
    the default, :class:`~losslab.losses.pair.Contrastive`, :class:`~losslab.losses.pair.Triplet`,
    :class:`~losslab.losses.pair.Circle`). Views are flattened, each one an entry. The official config holds
    55,000 entries (Stanford Online Products, about its training set) from iteration 1,000 with weight 1. A
    memory larger than the training set holds several embeddings of one image: an anchor's older copies of itself
    are then among its positives, as in the official code. A memory smaller than the batch holds only the batch's
    last entries; its term then compares the batch with itself. Counters are the batch term's.
    """

    kind = "embedding"
    needs_positives = True

    def __init__(
        self, base: Loss | None = None, memory_size: int = 55000, start_iteration: int = 1000, weight: float = 1.0
    ) -> None:
        super().__init__()
        base = MultiSimilarity() if base is None else base
        if not (
            isinstance(base, Loss) and base.kind == "embedding" and base.needs_labels
            and "reference_embeddings" in inspect.signature(base.forward).parameters
        ):  # fmt: skip
            raise ConfigError(
                f"loss.base={type(base).__name__}: XBM needs a labelled pair loss that takes reference embeddings: "
                "losslab.losses.pair.MultiSimilarity, Contrastive, Triplet or Circle"
            )
        if memory_size < 1:
            raise ConfigError(f"loss.memory_size={memory_size}: must be >= 1")
        if start_iteration < 0:
            raise ConfigError(f"loss.start_iteration={start_iteration}: must be >= 0")
        if weight < 0:
            raise ConfigError(f"loss.weight={weight}: must be >= 0")
        self.base = base
        self.n_views, self.needs_positives = base.n_views, base.needs_positives
        self.memory_size, self.start_iteration, self.weight = memory_size, start_iteration, weight
        self.register_buffer("memory_embeddings", torch.zeros(0, 0))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.counters = base.extra_metrics()

    def setup_embedding(self, embedding_dim: int, num_classes: int) -> None:
        self.base.setup_embedding(embedding_dim, num_classes)
        self._allocate(embedding_dim, self.memory_embeddings)

    def _allocate(self, embedding_dim: int, like: torch.Tensor) -> None:
        if self.memory_embeddings.shape != (self.memory_size, embedding_dim):
            self.memory_embeddings = like.new_zeros(self.memory_size, embedding_dim)

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored embeddings and labels, oldest first."""
        filled = int(self.filled)
        if filled == 0:
            return self.memory_embeddings[:0], self.memory_labels[:0]
        order = _ring_slots(int(self.pointer) - filled, filled, self.memory_size, self.memory_labels.device)
        return self.memory_embeddings[order], self.memory_labels[order]

    def _enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the (detached) batch over the oldest entries; returns the entries from before that remain."""
        self._allocate(features.shape[1], features)
        stored, stored_labels = self.memory()
        count = min(len(features), self.memory_size)
        overwritten = max(0, len(stored) + count - self.memory_size)
        stored, stored_labels = stored[overwritten:], stored_labels[overwritten:]
        slots = _ring_slots(int(self.pointer), count, self.memory_size, features.device)
        self.memory_embeddings[slots] = features[-count:].to(self.memory_embeddings.dtype)
        self.memory_labels[slots] = labels[-count:]
        self.pointer.fill_((int(self.pointer) + count) % self.memory_size)
        self.filled.fill_(min(int(self.filled) + count, self.memory_size))
        return stored.to(features.dtype), stored_labels

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features, labels = _flatten_views(embeddings, labels)
        features = upcast(features)
        loss = self.base(features, labels)
        self.counters = self.base.extra_metrics()
        if not self.training:
            return loss
        self.iteration += 1
        if int(self.iteration) <= self.start_iteration:
            return loss
        batch = features.detach()
        stored, stored_labels = self._enqueue(batch, labels)
        # The candidates begin with the anchors' own entries, which the base loss never pairs with their anchor.
        memory_loss = self.base(features, labels, torch.cat([batch, stored]), torch.cat([labels, stored_labels]))
        return loss + self.weight * memory_loss

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.base.set_epoch(epoch, max_epochs)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return self.counters

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, start_iteration={self.start_iteration}, weight={self.weight:g}"


class MixingDraws(NamedTuple):
    """MoCHi's random choices for B queries, indices into each query's hardest negatives: ``first``, ``second``
    and ``alpha`` ``[B, s]`` for the mixtures of two hard negatives, ``partner`` and ``beta`` ``[B, s']`` for the
    mixtures of the query with one."""

    first: torch.Tensor
    second: torch.Tensor
    alpha: torch.Tensor
    partner: torch.Tensor
    beta: torch.Tensor


class MoCHi(_MemoryLoss):
    """Hard negative mixing MoCHi (Kalantidis, Sariyildiz, Pion, Weinzaepfel & Larlus 2020, NeurIPS, "Hard Negative
    Mixing for Contrastive Learning") on MoCo's InfoNCE with a queue of negatives (He et al. 2020, CVPR):

    ``L = −log exp(q·k/τ) / (exp(q·k/τ) + Σ_{n∈Q} exp(q·n/τ) + Σ_{h∈H(q)} exp(q·h/τ))``,

    averaged over the queries, q and k the L2-normalised embeddings of an image's first and second view, Q the
    queue of the last ``queue_size`` keys k (detached) and H(q) MoCHi's synthetic negatives, built from the
    ``hard_negatives`` N negatives of Q closest to q (the largest q·n): ``mixed_negatives`` s points
    ``h = normalize(α n_i + (1 − α) n_j)`` with n_i, n_j drawn among those N and α ~ U(0, 1), and
    ``query_mixed_negatives`` s' points ``h' = normalize(β q + (1 − β) n_j)`` with β ~ U(0, 0.5), so the negative
    outweighs the query. The synthetic negatives are constants for the gradient, as in the paper.

    LossLab has no momentum encoder: the key is the same network's embedding of the second view and receives the
    gradient of its positive logit. As in MoCo's code the queue starts as random unit vectors (one fixed draw, the
    same on every rank); each training call enqueues the batch's keys after computing the loss. Validation and
    test use the queue without synthetic negatives. ``temperature`` 0.2 is MoCo v2's, on which the paper builds;
    the paper's queue holds 16,384 keys on ImageNet-100 and 65,536 on ImageNet-1K, with (N, s, s') such as
    (256, 512, 256) or (1024, 512, 256); the default 4,096 suits small datasets (a queue longer than the training
    set holds older keys of the query's own image, as negatives). A batch of one view has no key: a zero loss
    that keeps its graph, every image counted in ``anchors_without_positives``. Under DDP each rank draws its own
    mixtures of the same global batch.
    """

    kind = "embedding"
    n_views = 2
    needs_labels = False

    def __init__(
        self,
        temperature: float = 0.2,
        queue_size: int = 4096,
        hard_negatives: int = 256,
        mixed_negatives: int = 512,
        query_mixed_negatives: int = 256,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        if queue_size < 1:
            raise ConfigError(f"loss.queue_size={queue_size}: must be >= 1")
        if not 0 <= hard_negatives <= queue_size:
            raise ConfigError(
                f"loss.hard_negatives={hard_negatives}: must be between 0 and loss.queue_size={queue_size}"
            )
        for name, value in (("mixed_negatives", mixed_negatives), ("query_mixed_negatives", query_mixed_negatives)):
            if value < 0:
                raise ConfigError(f"loss.{name}={value}: must be >= 0")
            if value and not hard_negatives:
                raise ConfigError(f"loss.hard_negatives=0: loss.{name}={value} mixes hard negatives, so needs >= 1")
        self.temperature, self.queue_size, self.hard_negatives = temperature, queue_size, hard_negatives
        self.mixed_negatives, self.query_mixed_negatives = mixed_negatives, query_mixed_negatives
        self.register_buffer("queue", torch.zeros(0, 0))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.anchors_without_positives = torch.zeros(())

    def setup_embedding(self, embedding_dim: int, num_classes: int) -> None:
        self._allocate(embedding_dim, self.queue)

    def _allocate(self, embedding_dim: int, like: torch.Tensor) -> None:
        if self.queue.shape != (self.queue_size, embedding_dim):
            generator = torch.Generator().manual_seed(QUEUE_SEED)
            queue = F.normalize(torch.randn(self.queue_size, embedding_dim, generator=generator), dim=1)
            self.queue = queue.to(like)

    def draw_mixing(self, n_queries: int, device: torch.device) -> MixingDraws:
        """The random choices of one training call (the torch generator's, so a seed reproduces them)."""
        mixed, query_mixed = (n_queries, self.mixed_negatives), (n_queries, self.query_mixed_negatives)
        return MixingDraws(
            first=torch.randint(self.hard_negatives, mixed, device=device),
            second=torch.randint(self.hard_negatives, mixed, device=device),
            alpha=torch.rand(mixed, device=device),
            partner=torch.randint(self.hard_negatives, query_mixed, device=device),
            beta=0.5 * torch.rand(query_mixed, device=device),
        )

    def synthetic_negatives(
        self, query: torch.Tensor, queue: torch.Tensor, similarity: torch.Tensor, draws: MixingDraws
    ) -> torch.Tensor:
        """``[B, s + s', D]``: each query's mixtures of its hardest negatives (those with the largest
        ``similarity [B, K]`` to it in ``queue [K, D]``), then its mixtures of itself with them."""
        hardest = queue[similarity.topk(self.hard_negatives, dim=1).indices]  # [B, N, D], hardest first

        def pick(index: torch.Tensor) -> torch.Tensor:
            return torch.take_along_dim(hardest, index[..., None], dim=1)

        alpha, beta = draws.alpha[..., None].to(query.dtype), draws.beta[..., None].to(query.dtype)
        mixed = alpha * pick(draws.first) + (1 - alpha) * pick(draws.second)
        query_mixed = beta * query[:, None] + (1 - beta) * pick(draws.partner)
        return F.normalize(torch.cat([mixed, query_mixed], dim=1), dim=-1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings.dim() == 2 or embeddings.shape[1] < 2:
            self.anchors_without_positives = torch.tensor(len(embeddings), device=embeddings.device)
            return upcast(embeddings).sum() * 0.0
        self.anchors_without_positives = torch.zeros((), dtype=torch.long, device=embeddings.device)
        with torch.autocast(embeddings.device.type, enabled=False):
            z = F.normalize(upcast(embeddings), dim=-1)
            query, key = z[:, 0], z[:, 1]
            self._allocate(z.shape[-1], z)
            queue = self.queue.to(z.dtype).clone()  # the buffer is overwritten below, before the backward pass
            negative_logits = query @ queue.T
            logits = [(query * key).sum(dim=1, keepdim=True), negative_logits]
            if self.training and self.mixed_negatives + self.query_mixed_negatives > 0:
                draws = self.draw_mixing(len(query), z.device)
                synthetic = self.synthetic_negatives(query.detach(), queue, negative_logits.detach(), draws)
                logits.append(torch.einsum("bd,bsd->bs", query, synthetic))
            logits = torch.cat(logits, dim=1) / self.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=z.device))
        if self.training:
            self._enqueue(key.detach())
        return loss

    def _enqueue(self, keys: torch.Tensor) -> None:
        count = min(len(keys), self.queue_size)
        slots = _ring_slots(int(self.pointer), count, self.queue_size, keys.device)
        self.queue[slots] = keys[-count:].to(self.queue.dtype)
        self.pointer.fill_((int(self.pointer) + count) % self.queue_size)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return {"anchors_without_positives": self.anchors_without_positives}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature:g}, queue_size={self.queue_size}, hard_negatives={self.hard_negatives}, "
            f"mixed_negatives={self.mixed_negatives}, query_mixed_negatives={self.query_mixed_negatives}"
        )
