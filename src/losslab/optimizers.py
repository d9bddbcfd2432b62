"""Optimizers beyond torch.optim (Lion, LARS, SAM/ASAM, SWATS, MoMo, DOT) and an EMA of the weights (a
Lightning callback).

Each optimizer is configured by Hydra with ``_partial_: true`` and called by the training module as
``factory(params=...)``; hyperparameter names follow the papers. Class attributes tell the training module
what an optimizer needs beyond ``step()``: ``two_pass`` (SAM, ASAM: a second forward/backward at perturbed
weights), ``needs_loss`` (MoMo: ``step(closure)`` with a closure that returns the loss) and
``separates_distillation`` (DOT: the distillation term's gradient first, through ``step_kd()``, then the task
term's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim import Optimizer
from torch.optim.swa_utils import get_ema_multi_avg_fn

from losslab.errors import ConfigError

Closure = Callable[[], Any]


def _require(option: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"optimizer.{option}={value!r}: must be {allowed}")


def _check_betas(betas: Iterable[float]) -> tuple[float, ...]:
    betas = tuple(betas)
    _require(
        "betas", list(betas), len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "two values in [0, 1)"
    )
    return betas


def _with_grad(group: dict) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in at least float32: in half precision, sums of squares and products overflow."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_wide(tensor))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sum(_wide(a) * _wide(b))


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    ``c = β1 m + (1 - β1) g``;  ``w ← w - lr (sign(c) + λ w)``;  ``m ← β2 m + (1 - β2) g``.

    Every coordinate moves by ±lr, so the paper advises an lr 3-10× smaller than AdamW's and a weight decay λ
    3-10× larger (keeping lr·λ, the decay's strength, about the same).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: Iterable[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        _require("lr", lr, lr > 0, "> 0")
        _require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        super().__init__(params, {"lr": lr, "betas": _check_betas(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for p in _with_grad(group):
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                momentum = state["exp_avg"]
                p.mul_(1.0 - lr * weight_decay)
                p.add_(torch.sign(momentum * beta1 + p.grad * (1.0 - beta1)), alpha=-lr)
                momentum.lerp_(p.grad, 1.0 - beta2)
        return loss


class LARS(Optimizer):
    """LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Algorithm 1), as
    used by SimCLR and BYOL: SGD with momentum where each tensor's step is scaled by its trust ratio

    ``λ = η ||w|| / (||g|| + β ||w||)``  (1 where ``||w||`` or ``||g||`` is 0);
    ``v ← m v + lr λ (g + β w)``;  ``w ← w - v``   (β: ``weight_decay``, m: ``momentum``).

    With ``exclude_bias_and_norm`` (SimCLR, BYOL) tensors with ``ndim <= 1`` (biases, normalisation scales and
    shifts) get neither the trust ratio nor weight decay: plain SGD with momentum.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        _require("lr", lr, lr > 0, "> 0")
        _require("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1)")
        _require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _require("eta", eta, eta > 0, "> 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta}
        super().__init__(params, {**defaults, "exclude_bias_and_norm": exclude_bias_and_norm})

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay, eta = group["weight_decay"], group["eta"]
            for p in _with_grad(group):
                grad = p.grad
                if not (group["exclude_bias_and_norm"] and p.ndim <= 1):
                    weight_norm = _norm(p)
                    grad_norm = _norm(grad)
                    trust = torch.where(
                        (weight_norm > 0) & (grad_norm > 0),
                        eta * weight_norm / (grad_norm + weight_decay * weight_norm),
                        torch.ones_like(weight_norm),
                    )
                    grad = (grad + weight_decay * p) * trust.to(p.dtype)
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                velocity = state["momentum_buffer"]
                velocity.mul_(group["momentum"]).add_(grad, alpha=group["lr"])
                p.sub_(velocity)
        return loss


class SAM(Optimizer):
    """Sharpness-Aware Minimization (Foret, Kleiner, Mobahi & Neyshabur 2021) and, with ``adaptive``, ASAM
    (Kwon, Kim, Park & Choi 2021, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks").

    Minimise ``max_{||ε|| <= ρ} L(w + ε)``: ascend to ``w + e`` with the first-order maximiser

    ``e = ρ g / ||g||``  (SAM);   ``e = ρ T_w² g / ||T_w g||``, ``T_w = |w| + η`` elementwise  (ASAM),

    take the gradient there, restore ``w`` and let the base optimizer step with that gradient. ``||·||`` is
    the norm over all parameters, in float32 or wider; a zero or non-finite gradient norm gives no
    perturbation. (ASAM's official code leaves biases unscaled, choosing them by name; an optimizer sees no
    names, so ``T_w`` applies to every tensor.)

    ``base_optimizer`` is a factory (a Hydra partial such as ``torch.optim.SGD`` with its lr and momentum);
    ``rho``, ``adaptive`` and ``eta`` join its param groups, which are this optimizer's ``param_groups`` (the
    same objects), so lr schedulers act on the base optimizer. ``state_dict()`` is the base optimizer's.

    Two ways to drive it:

    * ``step(closure)``, the closure zeroing the gradients, computing the loss, calling ``backward()`` and
      returning the loss: both passes (the closure runs twice). Lightning's automatic optimisation works this
      way, but runs ``training_step`` twice.
    * Manual: backward at ``w``, ``first_step()`` (perturbs; zeroes the gradients), backward at ``w + e``,
      then ``second_step()`` or ``step()`` (restore ``w``, base step). While a perturbation is pending,
      ``step(closure)`` runs the closure once (Lightning's manual ``optimizer.step()`` passes a no-op closure)
      and then ``second_step()``; ``step()`` without a closure, as a GradScaler calls it, is
      ``second_step()``. Under Lightning, finish with the ``LightningOptimizer``'s ``step()`` rather than
      ``second_step()``: only that counts as a step for ``global_step`` (checkpoints, ``max_steps``, weight
      averaging) and runs the AMP scaler.

    Mixed precision: ``e`` is unchanged when the gradients are multiplied by a constant, so with an fp16
    GradScaler the gradients need **no** unscaling before ``first_step()`` (an overflowed first pass perturbs
    nothing). Do not call ``scaler.unscale_`` before ``first_step()``: the scaler unscales once per step, in
    the final ``step()``. If the scaler skips that step (overflow), the weights are still perturbed:
    ``restore()`` afterwards is a no-op otherwise, and the next ``first_step()`` restores first. Gradient
    clipping (if any) belongs before the final step only.
    """

    two_pass = True
    _own_options = ("rho", "adaptive", "eta")

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
    ) -> None:
        _require(
            "base_optimizer",
            base_optimizer,
            callable(base_optimizer),
            "an optimizer factory (_partial_: true)",
        )
        _require("rho", rho, rho >= 0, ">= 0")
        _require("eta", eta, eta >= 0, ">= 0")
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta})
        # The base optimizer adopts these group dicts in place: one set of groups, shared.
        self.base_optimizer = base_optimizer(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move to ``w + e`` using the gradients at ``w`` (already computed), remembering ``w``."""
        self.restore()
        params = [(group, p) for group in self.param_groups for p in _with_grad(group)]
        if not params:
            return
        device = params[0][1].device
        norms = [_norm(self._scaled(group, p, p.grad)).to(device) for group, p in params]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        inverse_norm = torch.where(torch.isfinite(norm) & (norm > 0), 1.0 / norm, torch.zeros_like(norm))
        for group, p in params:
            direction = self._scaled(group, p, self._scaled(group, p, p.grad))
            perturbation = torch.nan_to_num(_wide(direction) * (group["rho"] * inverse_norm), 0.0, 0.0, 0.0)
            self.state[p]["weights_before_perturbation"] = p.detach().clone()
            p.add_(perturbation.to(p.dtype))
        if zero_grad:
            self.zero_grad()

    @staticmethod
    def _scaled(group: dict, p: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``T_w tensor``: ASAM's elementwise ``(|w| + η) tensor``; the identity for SAM."""
        return tensor * (p.abs() + group["eta"]) if group["adaptive"] else tensor

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by ``first_step()``, exactly (a no-op when nothing is perturbed)."""
        for group in self.param_groups:
            for p in group["params"]:
                saved = self.state.get(p, {}).pop("weights_before_perturbation", None)
                if saved is not None:
                    p.copy_(saved)

    @property
    def perturbed(self) -> bool:
        return any("weights_before_perturbation" in state for state in self.state.values())

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore ``w`` and step the base optimizer with the gradients computed at ``w + e``."""
        self.restore()
        self.base_optimizer.step()

    def step(self, closure: Closure | None = None) -> Any:
        if closure is None or self.perturbed:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.second_step()
            return loss
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__, before the base optimizer exists
            super().add_param_group(param_group)
            return
        for option in self._own_options:
            param_group.setdefault(option, self.defaults[option])
        base.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # loading replaces the group dicts


class ASAM(SAM):
    """SAM with the adaptive (scale-invariant) perturbation of Kwon et al. 2021; see :class:`SAM`.

    Defaults from the paper's official code (SamsungLabs/ASAM): ρ = 0.5 (CIFAR-10; 1.0 for CIFAR-100),
    η = 0.01.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.5,
        eta: float = 0.01,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta)


class SWATS(Optimizer):
    """SWATS (Keskar & Socher 2017, "Improving Generalization Performance by Switching from Adam to SGD",
    Algorithm 1).

    Adam phase, with its step ``p_k = -lr √(1-β2^k) / (1-β1^k) · m_k / (√v_k + eps)``: estimate the SGD
    learning rate whose step projects onto ``p_k``, ``γ_k = p_kᵀp_k / (-p_kᵀg_k)``, average it,
    ``λ_k = β2 λ_{k-1} + (1-β2) γ_k``, and switch when ``k > 1`` and
    ``|λ_k / (1-β2^k) - γ_k| < switch_epsilon`` (and the estimate is positive).
    SGD phase, at ``Λ = λ_k / (1-β2^k)``: ``u ← β1 u + g``;  ``w ← w - (1-β1) Λ u``.

    The algorithm is written for one parameter vector; here each param group switches on its own, so the
    default single group is the paper's whole-model switch. After the switch ``Λ`` follows the group's lr
    schedule (it is scaled by ``lr / lr_at_switch``). ``weight_decay`` is an L2 term added to the gradient in
    both phases. Each group records ``switched_at`` (the step, or None) and ``sgd_lr`` (``Λ``);
    :attr:`switched_at` reports the first switch for logging.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Iterable[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_epsilon: float = 1e-9,
    ) -> None:
        _require("lr", lr, lr > 0, "> 0")
        _require("eps", eps, eps > 0, "> 0")
        _require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _require("switch_epsilon", switch_epsilon, switch_epsilon > 0, "> 0")
        defaults = {"lr": lr, "betas": _check_betas(betas), "eps": eps, "weight_decay": weight_decay}
        # Phase bookkeeping lives in the groups (as defaults), so that state_dict() carries it with them.
        phase = {
            "step": 0,
            "lr_estimate_average": 0.0,
            "switched_at": None,
            "sgd_lr": None,
            "lr_at_switch": None,
        }
        super().__init__(params, dict(defaults, switch_epsilon=switch_epsilon, **phase))

    @property
    def switched_at(self) -> int | None:
        """The step at which the first param group switched to SGD (None while all are in the Adam phase)."""
        steps = [group["switched_at"] for group in self.param_groups if group["switched_at"] is not None]
        return min(steps) if steps else None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = _with_grad(group)
            if not params:
                continue
            group["step"] += 1
            grads = [p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad for p in params]
            if group["switched_at"] is None:
                self._adam_step(group, params, grads)
            else:
                self._sgd_step(group, params, grads)
        return loss

    def _adam_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        (beta1, beta2), k = group["betas"], group["step"]
        step_size = group["lr"] * (1 - beta2**k) ** 0.5 / (1 - beta1**k)
        step_dot_step = step_dot_grad = 0.0
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            adam_step = exp_avg / (exp_avg_sq.sqrt() + group["eps"]) * -step_size
            p.add_(adam_step)
            step_dot_step += _dot(adam_step, adam_step)
            step_dot_grad += _dot(adam_step, grad)
        step_dot_step, step_dot_grad = float(step_dot_step), float(step_dot_grad)
        if step_dot_grad == 0.0:
            return
        estimate = step_dot_step / -step_dot_grad
        group["lr_estimate_average"] = beta2 * group["lr_estimate_average"] + (1 - beta2) * estimate
        corrected = group["lr_estimate_average"] / (1 - beta2**k)
        if k > 1 and corrected > 0 and abs(corrected - estimate) < group["switch_epsilon"]:
            group.update(switched_at=k, sgd_lr=corrected, lr_at_switch=group["lr"])

    def _sgd_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        beta1 = group["betas"][0]
        lr = group["sgd_lr"] * group["lr"] / group["lr_at_switch"]
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            velocity = state["momentum_buffer"]
            velocity.mul_(beta1).add_(grad)
            p.add_(velocity, alpha=-(1 - beta1) * lr)


class MoMo(Optimizer):
    """MoMo (Schaipp, Ohana, Eickenberg, Defazio & Gower 2024, "MoMo: Momentum Models for Adaptive Learning
    Rates", ICLR; Algorithm 1 with decoupled weight decay λ, the SGD-momentum variant).

    Momentum averages (β: ``momentum``, named as torch names it so that lr schedulers that cycle momentum,
    such as OneCycleLR, find it) of the loss, the gradient and ``<g, w>``, each started at its first value:
    ``f̄ ← β f̄ + (1-β) f``;  ``d ← β d + (1-β) g``;  ``γ̄ ← β γ̄ + (1-β) <g, w>``; then

    ``τ = min(lr, ((1 + lr λ)(f̄ - lb - γ̄) + <d, w>)_+ / ||d||²)``;  ``w ← (w - τ d) / (1 + lr λ)``,

    a Polyak-type step on the model ``f̄ + <d, · - w>`` truncated at the loss lower bound ``lb``. ``lr`` caps
    the step (the paper uses lr = 1 with no schedule). The sums run over all groups; lr, λ and β are per group
    (the loss average uses the first group's β). The loss is needed: ``step(closure)`` with a closure
    returning it (Lightning's automatic optimisation passes one, except under an fp16 GradScaler).
    """

    needs_loss = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        momentum: float = 0.9,
        lb: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        _require("lr", lr, lr > 0, "> 0")
        _require("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1)")
        _require("lb", lb, isinstance(lb, (int, float)) and math.isfinite(lb), "a finite number")
        _require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.lb = float(lb)  # a bound on the whole loss, not a group's

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        if closure is None:
            raise RuntimeError(
                "MoMo needs the loss: call step(closure) with a closure that returns it (an fp16 GradScaler "
                "calls step() without one; use precision 32-true or bf16-mixed)"
            )
        with torch.enable_grad():
            loss = closure()
        groups = [(group, _with_grad(group)) for group in self.param_groups]
        if loss is None or not any(params for _, params in groups):  # e.g. a training_step that returned None
            return loss
        # The loss average is global; it is kept with the first parameter so that state_dict() carries it.
        first = self.state[self.param_groups[0]["params"][0]]
        beta = self.param_groups[0]["momentum"]
        f = _wide(torch.as_tensor(loss).detach()).reshape(())
        # Each average starts at its first value (the paper's default, without bias correction).
        if "loss_average" in first:
            first["loss_average"] = beta * first["loss_average"] + (1 - beta) * f
        else:
            first["loss_average"] = f.clone()
        dot_average = grad_dot_weight_average = norm_squared = torch.zeros((), device=f.device)
        for group, p in [(group, p) for group, params in groups for p in params]:
            beta, state = group["momentum"], self.state[p]
            grad_dot_weight = _dot(p.grad, p)
            if "grad_average" not in state:
                state["grad_average"] = p.grad.clone()
                state["grad_dot_weight"] = grad_dot_weight
            else:
                state["grad_average"].lerp_(p.grad, 1 - beta)
                state["grad_dot_weight"] = beta * state["grad_dot_weight"] + (1 - beta) * grad_dot_weight
            d = state["grad_average"]
            dot_average = dot_average + _dot(d, p).to(f.device)
            grad_dot_weight_average = grad_dot_weight_average + state["grad_dot_weight"].to(f.device)
            norm_squared = norm_squared + _dot(d, d).to(f.device)
        for group, group_params in groups:
            decay = 1.0 + group["lr"] * group["weight_decay"]
            numerator = decay * (first["loss_average"] - self.lb - grad_dot_weight_average) + dot_average
            polyak = torch.where(
                norm_squared > 0,
                numerator.clamp(min=0) / norm_squared,
                torch.full_like(norm_squared, group["lr"]),
            )
            step_size = polyak.clamp(max=group["lr"])
            for p in group_params:
                p.sub_(self.state[p]["grad_average"] * step_size.to(p.dtype))
                if group["weight_decay"]:
                    p.div_(decay)
        return loss


class EMAWeightAveraging(WeightAveraging):
    """An exponential moving average of the weights (and buffers), on Lightning's ``WeightAveraging``:
    ``w_ema ← decay · w_ema + (1 - decay) · w`` every ``update_every_n_steps`` optimizer steps, starting from
    the weights after the first update step.

    Validation during training, the checkpoints' ``state_dict`` and the weights after ``fit`` are the averaged
    ones (Lightning keeps the raw weights in the checkpoint for resuming). After ``fit`` the average is
    dropped, so a later ``validate``/``test`` with a checkpoint evaluates that checkpoint's averaged weights
    as they are (Lightning's callback would otherwise load the raw weights there, and ``test`` would use
    them).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, use_buffers: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay!r}: must be in [0, 1]")
        if update_every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.update_every_n_steps={update_every_n_steps!r}: must be >= 1")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # resuming fit: restore both the raw and the averaged weights
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class DOT(Optimizer):
    """DOT, the Distillation-Oriented Trainer (Zhao, Song, Qiu, Cui & Liang 2023, "DOT: A Distillation-Oriented
    Trainer", ICCV; the official ``mdistiller/engine/dot.py``): SGD with heavy-ball momentum (no dampening, not
    Nesterov) and one momentum buffer per loss, the distillation gradient's kept longer than the task gradient's:

    ``b_task ← (μ - Δ) b_task + g_task + λ w``;  ``b_kd ← (μ + Δ) b_kd + g_kd``;  ``w ← w - lr (b_task + b_kd)``.

    Each buffer starts at its first gradient (as torch's SGD). A tensor with one of the two gradients only keeps
    that buffer at ``μ`` and takes the weight decay λ with it; the official code adds λ to a distillation-only
    gradient from its second step on, and so does this one. With ``Δ = 0`` the two buffers sum to SGD momentum on
    ``g_task + g_kd``. ``momentum`` is named as torch names it, so schedulers that cycle momentum move ``μ``.

    Per step: backward the distillation term, ``step_kd()`` (keeps a copy of ``.grad`` as ``g_kd``), zero the
    gradients, backward the task term, ``step()`` (takes ``.grad`` as ``g_task`` and updates the weights).
    """

    separates_distillation = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.05,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 5e-4,
    ) -> None:
        _require("lr", lr, lr > 0, "> 0")
        _require("momentum", momentum, 0.0 < momentum < 1.0, "in (0, 1)")
        _require(
            "delta", delta, 0.0 <= delta < min(momentum, 1.0 - momentum),
            f"in [0, min(momentum, 1 - momentum)) = [0, {min(momentum, 1.0 - momentum):g}), so that both momenta "
            "lie in (0, 1)",
        )  # fmt: skip
        _require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        defaults = {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step_kd(self) -> None:
        """Keep the current gradients as the distillation gradients of the next :meth:`step` (replacing any
        kept before); tensors without a gradient have none."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    self.state.get(p, {}).pop("distillation_grad", None)
                else:
                    self.state[p]["distillation_grad"] = p.grad.detach().clone()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, delta, weight_decay = group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                task_grad = p.grad
                distillation_grad = self.state.get(p, {}).pop("distillation_grad", None)
                if task_grad is None and distillation_grad is None:
                    continue
                state, both = self.state[p], task_grad is not None and distillation_grad is not None
                buffers = []
                if task_grad is not None:
                    if weight_decay:
                        task_grad = task_grad + weight_decay * p
                    task_momentum = momentum - delta if both else momentum
                    buffers.append(self._accumulate(state, "momentum_buffer", task_grad, task_momentum))
                if distillation_grad is not None:
                    name = "distillation_momentum_buffer"
                    # Weight decay from the second step on, as the official code adds it.
                    if weight_decay and not both and name in state:
                        distillation_grad = distillation_grad + weight_decay * p
                    distillation_momentum = momentum + delta if both else momentum
                    buffers.append(self._accumulate(state, name, distillation_grad, distillation_momentum))
                for buffer in buffers:  # both buffers were computed from the weights before this update
                    p.add_(buffer, alpha=-group["lr"])
        return loss

    @staticmethod
    def _accumulate(state: dict, name: str, grad: torch.Tensor, momentum: float) -> torch.Tensor:
        """``b ← momentum b + grad``, the buffer starting at its first gradient."""
        if name not in state:
            state[name] = grad.detach().clone()
        else:
            state[name].mul_(momentum).add_(grad)
        return state[name]
