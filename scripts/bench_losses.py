"""Times forward + backward of every embedding loss in configs/loss, against pytorch-metric-learning.

Each loss is instantiated from its YAML (defaults as shipped) and run on random embeddings ``[N, D]`` whose
labels give ``N / 8`` classes of 8 samples each, in shuffled order (the m-per-class batches pair losses train
on). Two-view losses get the same N rows as ``[N/2, 2, D]``: N/2 images, 4 per class, each row an anchor.
Proxy losses get ``setup_embedding(D, N / 8)``. For each loss that pytorch-metric-learning (PML, optional:
``pip install -e .[bench]``) also has, PML's version, configured with the same hyperparameters and mining and
given the same proxies, is timed in the same process on the same inputs, the repeats of the two interleaved so
that load on a shared machine hits both alike; the table gives the ratio of the medians, ours / PML.

"largest / N²" is the largest tensor any operation produces in one forward + backward (recorded with a
TorchDispatchMode), in units of N² elements, ours / PML's; PML's shows where it builds O(N³) or O(N² D)
tensors (">2 GiB": PML skipped, its largest tensor alone would take more). "growth" is the exponent k of that size ∝ N^k, measured from one step at N = 128 and 256. A loss
of ours must stay within ``MAX_ELEMENTS_PER_N2`` N², or grow at most linearly (a tensor N × a queue of fixed
size); one growing faster than N² is skipped where its largest tensor would pass ``BYTE_BUDGET``, as is a PML
run, and a loss of ours whose step would take longer than ``STEP_SECONDS_BUDGET`` (both extrapolated from the
probes). "loss Δ" is |ours − PML| / |PML| for the loss values: about 1e-7 where the formulas agree. PML computes
something else for contrastive (its hinges are not squared) and triplet semi_hard (it keeps every
semi-hard triplet within the margin, ours the closest one per positive pair). On CUDA the peak allocated
memory of one step is shown too.

    python scripts/bench_losses.py --sizes 1024 4096 --repeats 3 --threads 1
    python scripts/bench_losses.py --device cuda --check   # exit 1 on a slower loss or a bound broken

``--check`` fails when ours is slower than PML (ratio > 1), SupCon is less than 1.5x faster than PML's
SupConLoss, or a loss of ours breaks the memory bound. On a CPU shared with other work, ``--threads 1``:
with more threads than idle cores every parallel operation waits for a descheduled thread, and the times
measure the machine's load rather than the losses.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from losslab.largest_tensor import LargestTensor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "loss"
SAMPLES_PER_CLASS = 8
# The largest tensor of one forward + backward of our losses, in units of N² elements, unless it grows at
# most as N^LINEAR_GROWTH (N × a fixed-size queue).
MAX_ELEMENTS_PER_N2 = 2.0
LINEAR_GROWTH = 1.5
PROBE_SIZES = (128, 256)
SUPCON_SPEEDUP = 1.5
# Runs whose largest tensor (estimated) would exceed this many bytes are skipped.
BYTE_BUDGET = 2**31
# Losses of ours whose step (extrapolated from the probes) would take longer are skipped.
STEP_SECONDS_BUDGET = 5.0
NAME_WIDTH = 46

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Case:
    """One row of the table: a config (plus overrides of its hyperparameters) and, if PML has it, PML's."""

    key: str
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key + "".join(f"[{k}={v}]" for k, v in self.overrides.items())


def cases() -> list[Case]:
    """Every embedding loss config, plus the triplet minings PML also has (hinge, FaceNet's margin)."""
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        if hydra.utils.get_class(OmegaConf.load(path)._target_).kind == "embedding":
            found.append(Case(path.stem))
    found += [
        Case("triplet", {"mining": "semi_hard", "soft_margin": False}),
        Case("triplet", {"mining": "batch_all", "soft_margin": False}),
    ]
    return found


def ours(case: Case, dim: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    config = OmegaConf.load(CONFIGS / f"{case.key}.yaml")
    config = OmegaConf.merge(config, case.overrides)
    loss = hydra.utils.instantiate(config)
    loss.setup_embedding(dim, num_classes)
    return loss.to(device)


def pml(case: Case, loss: torch.nn.Module, dim: int, num_classes: int, n: int) -> tuple[Step, int] | None:
    """PML's version of ``loss`` with the same hyperparameters, mining and proxies, called on the flattened
    ``[N, D]`` rows and their labels, with an estimate of its largest tensor in bytes; None if PML has no such
    loss."""
    from pytorch_metric_learning import distances, losses, miners

    name = type(loss).__name__
    pairs = 4 * n * n  # float32 N × N
    if name == "SupCon":
        return losses.SupConLoss(temperature=loss.temperature), pairs
    if name == "SimCLR":
        # NT-Xent matches every positive pair with every negative pair: [N, N(N − 2)] floats.
        return losses.NTXentLoss(temperature=loss.temperature), 4 * n**3
    if name == "Contrastive" and loss.distance == "euclidean":
        distance = distances.LpDistance(normalize_embeddings=loss.normalize)
        return losses.ContrastiveLoss(pos_margin=0, neg_margin=loss.margin, distance=distance), pairs
    if name == "Circle":
        return losses.CircleLoss(m=loss.margin, gamma=loss.gamma), pairs
    if name == "MultiSimilarity":
        return _with_miner(_multi_similarity(loss), miners.MultiSimilarityMiner(epsilon=loss.epsilon)), pairs
    if name == "ThresholdConsistentMargin" and type(loss.base).__name__ == "MultiSimilarity":
        base = _with_miner(_multi_similarity(loss.base), miners.MultiSimilarityMiner(epsilon=loss.base.epsilon))
        tcm = losses.ThresholdConsistentMarginLoss(
            lambda_plus=loss.lambda_plus, lambda_minus=loss.lambda_minus,
            margin_plus=loss.margin_plus, margin_minus=loss.margin_minus,
        )
        # PML's TCM gathers both embeddings of every pair: [N², D] tensors.
        return (lambda x, y: base(x, y) + tcm(x, y)), pairs * dim
    if name == "Triplet":
        distance = distances.LpDistance(normalize_embeddings=loss.normalize, power=2 if loss.squared else 1)
        margin = 0.0 if loss.soft_margin else loss.margin
        triplet = losses.TripletMarginLoss(margin=margin, smooth_loss=loss.soft_margin, distance=distance)
        if loss.mining == "batch_hard":
            return _with_miner(triplet, miners.BatchHardMiner(distance=distance)), pairs
        if loss.soft_margin:
            return None  # PML's miners keep the triplets inside the margin; the soft margin has none
        kind = "semihard" if loss.mining == "semi_hard" else "all"
        miner = miners.TripletMarginMiner(margin=loss.margin, type_of_triplets=kind, distance=distance)
        return _with_miner(triplet, miner), n**3  # every triplet's byte mask, then its indices
    if name in {"ArcFace", "CosFace", "NormFace", "ProxyAnchor"}:
        return _proxy(loss, dim, num_classes), 4 * n * num_classes
    return None


def _multi_similarity(loss: torch.nn.Module) -> torch.nn.Module:
    from pytorch_metric_learning import losses

    return losses.MultiSimilarityLoss(alpha=loss.alpha, beta=loss.beta, base=loss.lambda_)


def _with_miner(loss: torch.nn.Module, miner: torch.nn.Module) -> Step:
    return lambda x, y: loss(x, y, miner(x, y))


def _proxy(loss: torch.nn.Module, dim: int, num_classes: int) -> Step:
    from pytorch_metric_learning import losses

    name = type(loss).__name__
    if name == "ArcFace":
        theirs = losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(loss.m), scale=loss.s)
    elif name == "CosFace":
        theirs = losses.CosFaceLoss(num_classes, dim, margin=loss.m, scale=loss.s)
    elif name == "NormFace":
        theirs = losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1.0 / loss.s)
    else:
        theirs = losses.ProxyAnchorLoss(num_classes, dim, margin=loss.delta, alpha=loss.alpha)
    with torch.no_grad():
        if name == "ProxyAnchor":
            theirs.proxies.copy_(loss.proxies)
        else:
            theirs.W.copy_(loss.proxies.T)  # PML keeps its class weights as [D, C]
    return theirs.to(loss.proxies.device)



def step(module: Step, rows: torch.Tensor, shape: tuple[int, ...], labels: torch.Tensor) -> float:
    """One forward + backward from a fresh leaf; returns the loss value."""
    x = rows.detach().clone().requires_grad_()
    value = module(x.view(shape), labels)
    value.backward()
    if isinstance(module, torch.nn.Module):
        module.zero_grad(set_to_none=True)
    return value.item()


def timed(run: Callable[[], float], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_mib(run: Callable[[], float], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def inputs(case_loss: torch.nn.Module, n: int, dim: int, device: torch.device, seed: int):
    """``(rows [N, D], our shape, our labels, PML's labels)``; labels: N/8 classes of 8 rows, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=generator).to(device)
    row_labels = (torch.randperm(n, generator=generator) % (n // SAMPLES_PER_CLASS)).to(device)
    if getattr(case_loss, "n_views", 1) == 1:
        return rows, (n, dim), row_labels, row_labels
    images = torch.arange(n // 2, device=device) % (n // SAMPLES_PER_CLASS)
    image_labels = images[torch.randperm(n // 2, generator=generator).to(device)]
    if not case_loss.needs_labels:  # self-supervised: the positives are the other view of the image
        return rows, (n // 2, 2, dim), image_labels, torch.arange(n // 2, device=device).repeat_interleave(2)
    return rows, (n // 2, 2, dim), image_labels, image_labels.repeat_interleave(2)


def growth(case: Case, dim: int, device: torch.device) -> Callable[[int], tuple[float, float, float]]:
    """From one step of ours at each of ``PROBE_SIZES``: N ↦ (k, elements, seconds), our largest tensor's
    exponent (size ∝ N^k) and the extrapolated size of that tensor and time of a step at N."""
    largest, seconds = [], []
    for n in PROBE_SIZES:
        loss = ours(case, dim, n // SAMPLES_PER_CLASS, device)
        rows, shape, labels, _ = inputs(loss, n, dim, device, seed=0)
        with LargestTensor() as record:  # also the warm-up of the timed step
            step(loss, rows, shape, labels)
        largest.append(record.largest)
        seconds.append(timed(partial(step, loss, rows, shape, labels), device))
    base = math.log(PROBE_SIZES[1] / PROBE_SIZES[0])
    k = math.log(largest[1] / largest[0]) / base
    k_time = math.log(seconds[1] / seconds[0]) / base
    scale = PROBE_SIZES[1]
    return lambda n: (k, largest[1] * (n / scale) ** k, seconds[1] * (n / scale) ** max(k_time, 1.0))


def measure(
    case: Case,
    n: int,
    extrapolate: Callable[[int], tuple[float, float, float]],
    args: argparse.Namespace,
    device: torch.device,
    has_pml: bool,
    seed: int,
) -> tuple[str, list[str]]:
    """One table row for ``case`` at batch size ``n``, with the checks it fails; ``extrapolate`` is
    :func:`growth`'s for the case."""
    num_classes = n // SAMPLES_PER_CLASS
    k, elements, seconds = extrapolate(n)
    if 4 * elements > BYTE_BUDGET:
        reason = f"its largest tensor would take {4 * elements / 2**30:.0f} GiB (∝ N^{k:.1f})"
        return f"{case.name:<{NAME_WIDTH}} {n:>5}   skipped: {reason}", [f"{case.name} N={n}: {reason}"]
    if seconds > STEP_SECONDS_BUDGET:
        return f"{case.name:<{NAME_WIDTH}} {n:>5}   skipped: a step would take about {seconds:.0f} s", []
    loss = ours(case, args.dim, num_classes, device)
    rows, shape, labels, flat_labels = inputs(loss, n, args.dim, device, seed)
    runs = {"ours": lambda: step(loss, rows, shape, labels)}
    theirs = pml(case, loss, args.dim, num_classes, n) if has_pml else None
    pml_note = "—"
    if theirs is not None:
        module, largest_bytes = theirs
        if largest_bytes > BYTE_BUDGET:
            pml_note = f">{BYTE_BUDGET // 2**30} GiB"
        else:
            runs["pml"] = lambda: step(module, rows, (n, args.dim), flat_labels)
    largest, values, peaks = {}, {}, {}
    for who, run in runs.items():
        with LargestTensor() as record:
            values[who] = run()
        largest[who] = record.largest / n**2
        if device.type == "cuda":
            peaks[who] = peak_mib(run, device)
        for _ in range(args.warmup):
            run()
    times = {who: [] for who in runs}
    for _ in range(args.repeats):
        for who, run in runs.items():  # interleaved, so that a busy moment slows both
            times[who].append(timed(run, device))
    failures = []
    ours_ms = 1e3 * statistics.median(times["ours"])
    line = f"{case.name:<{NAME_WIDTH}} {n:>5} {ours_ms:>9.1f}"
    sizes = f"{largest['ours']:.2f}"
    if "pml" in runs:
        pml_ms = 1e3 * statistics.median(times["pml"])
        ratio = ours_ms / pml_ms
        sizes += f" / {largest['pml']:.2f}"
        gap = abs(values["ours"] - values["pml"]) / max(abs(values["pml"]), 1e-12)
        line += f" {pml_ms:>9.1f} {ratio:>6.2f} {sizes:>16} {k:>6.1f} {gap:>8.1e}"
        bound = 1.0 / SUPCON_SPEEDUP if case.key == "supcon" else 1.0
        if ratio > bound:
            failures.append(f"{case.name} N={n}: ours / PML = {ratio:.2f} > {bound:.2f}")
    else:
        line += f" {pml_note:>9} {'':>6} {sizes:>16} {k:>6.1f} {'':>8}"
    if device.type == "cuda":
        line += f" {' / '.join(f'{peaks[w]:.0f}' for w in runs):>17}"
    if largest["ours"] > MAX_ELEMENTS_PER_N2 and k > LINEAR_GROWTH:
        failures.append(f"{case.name} N={n}: a tensor of {largest['ours']:.2f} N² elements, growing as N^{k:.1f}")
    return line, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="batch sizes N")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per loss; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, from OMP_NUM_THREADS)")
    parser.add_argument("--losses", nargs="+", help="config keys to run (default: every embedding loss)")
    parser.add_argument("--no-pml", action="store_true", help="time our losses only")
    parser.add_argument("--check", action="store_true", help="exit 1 if ours is slower or a bound is broken")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    has_pml = not args.no_pml
    if has_pml:
        try:
            import pytorch_metric_learning

            pml_version = pytorch_metric_learning.__version__
        except ImportError:
            has_pml = False
            print("pytorch-metric-learning is not installed (pip install -e .[bench]): timing our losses only.")
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads"
        + (f", pytorch-metric-learning {pml_version}" if has_pml else "")
        + f"; D = {args.dim}, N/{SAMPLES_PER_CLASS} classes, median of {args.repeats} after {args.warmup} warm-up"
    )
    selected = [c for c in cases() if not args.losses or c.key in args.losses]
    header = f"{'loss':<{NAME_WIDTH}} {'N':>5} {'ours ms':>9} {'PML ms':>9} {'ratio':>6} {'largest/N²':>16}"
    header += f" {'growth':>6} {'loss Δ':>8}"
    if device.type == "cuda":
        header += f" {'peak MiB':>17}"
    print(header)
    print("-" * len(header))
    failures, probes = [], {}
    for n in args.sizes:
        for seed, case in enumerate(selected):
            if case.name not in probes:
                probes[case.name] = growth(case, args.dim, device)
            line, broken = measure(case, n, probes[case.name], args, device, has_pml, seed)
            print(line, flush=True)
            failures += broken
    if failures:
        print("\n" + "\n".join(failures))
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
