"""Optimizers for pretraining: AdamW (torch's fused kernel where the device has one) and LAMB.

LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
2019, Algorithm 2) is Adam with a per-tensor ("layer-wise") trust ratio that lets BERT train
with batches of 32k-64k sequences. For each parameter tensor w with gradient g at step t:

    m = β1·m + (1-β1)·g            v = β2·v + (1-β2)·g²
    m̂ = m / (1-β1^t)               v̂ = v / (1-β2^t)            (bias correction)
    r = m̂ / (√v̂ + ε) + λ·w                                     (decoupled weight decay)
    ratio = ‖w‖ / ‖r‖,  or 1 when either norm is 0               (a fresh zero-initialised
                                                                  bias, or no update at all)
    w = w - lr · ratio · r

Everything stays on the device: the trust ratio is a tensor, never a Python float, so a step
never waits for the host (no .item()).

The trust ratio needs each tensor whole. DeepSpeed ZeRO (stages 1-3) hands the optimizer flat
partitions of many tensors, so under ZeRO the ratio would be taken per partition instead of
per layer: use LAMB with ZeRO stage 0 (DeepSpeed then keeps one fp32 master per tensor).

Also here: the LR policy of a run (learning_rate_factor). This module does not import DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mlm_dist.config import ConfigError, RunConfig
from mlm_dist.model import parameter_groups
from mlm_dist.precision import Precision

OPTIMIZERS = ("adamw", "lamb")


class Lamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True):
        if lr <= 0.0:
            raise ValueError(f"Lamb: lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"Lamb: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # SkipsNonFiniteSteps sets it
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
            grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # Step counts are 0-d tensors on the parameter's device, so that a skipped
                # step can leave them alone without the host knowing; in the parameter's
                # precision, fp32 at least, as the bias corrections made from them are (an
                # int, as checkpoints written before held, or a CPU tensor, as
                # load_state_dict gives back, is moved there once).
                step, dtype = state["step"], torch.promote_types(p.dtype, torch.float32)
                if not torch.is_tensor(step) or step.device != p.device:
                    state["step"] = torch.as_tensor(step, dtype=dtype).to(p.device)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            self._update(params, grads, exp_avgs, exp_avg_sqs, steps, group=group,
                         found_inf=found_inf)
        return loss

    @staticmethod
    def _update(params, grads, exp_avgs, exp_avg_sqs, steps, *, group, found_inf):
        """One LAMB step of one group; `found_inf` (a 0-d 0/1 tensor, or None) makes it leave
        parameters, moments and step counts as they were, on the device."""
        beta1, beta2 = group["betas"]
        keep: float | torch.Tensor = 1.0
        if found_inf is not None:
            keep = 1.0 - found_inf
            # A skipped step's gradients may hold inf/NaN, which survive multiplying by 0:
            # select zeros instead, then every update below is scaled by `keep`.
            grads = [torch.where(found_inf.bool(), 0.0, g) for g in grads]
        torch._foreach_add_(steps, 1.0)
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))
        # Moments (in place): m = β1 m + (1-β1) g ; v = β2 v + (1-β2) g²; a skipped step
        # multiplies by 1 and adds its zeroed gradient.
        torch._foreach_mul_(exp_avgs, 1.0 - (1.0 - beta1) * keep)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, 1.0 - (1.0 - beta2) * keep)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # r = (m / c1) / (sqrt(v) / sqrt(c2) + eps)  ==  m̂ / (√v̂ + ε), with c = 1 - β^t per
        # tensor. A first step that was skipped leaves t = 0 and c = 0 over m = v = 0: the
        # clamp keeps that update 0 rather than NaN, and `keep` then scales it away.
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        updates = list(exp_avgs)
        if group["bias_correction"]:
            correction1 = _bias_corrections(beta1, steps)
            correction2_sqrt = torch._foreach_sqrt(_bias_corrections(beta2, steps))
            torch._foreach_div_(denominators, correction2_sqrt)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(updates, denominators)
        del denominators
        if group["bias_correction"]:
            torch._foreach_div_(updates, correction1)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        # Trust ratio per tensor, in fp32 at least whatever the parameter dtype.
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        weight_norms = torch.stack([n.to(acc) for n in torch._foreach_norm(params)])
        update_norms = torch.stack([n.to(acc) for n in torch._foreach_norm(updates)])
        usable = (weight_norms > 0) & (update_norms > 0)
        ratios = torch.where(usable, weight_norms / update_norms.clamp(min=1e-38),
                             torch.ones_like(weight_norms))
        scales = (ratios * (-group["lr"] * keep)).unbind()
        torch._foreach_mul_(updates, [s.to(u.dtype) for s, u in zip(scales, updates)])
        torch._foreach_add_(params, updates)


def _bias_corrections(beta: float, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """1 - β^t for each tensor's step count t, floored above 0 (see Lamb._update)."""
    corrections = torch._foreach_pow(beta, steps)
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1.0)
    return torch._foreach_clamp_min(corrections, 1e-12)


class SkipsNonFiniteSteps:
    """Mixin: step() leaves parameters, moments and step counts alone when any gradient is inf
    or NaN, decided on the device: `found_inf` (a 0-d float tensor, 1 when skipped) is the
    argument torch's fused AdamW kernel takes for exactly this (AMP's GradScaler passes it
    too) and Lamb._update honours; nothing waits for the device.

    DeepSpeed checks gradients itself under bf16 and fp16 and, via the gradient norm, in its
    ZeRO 1-3 optimizers; at ZeRO stage 0 with fp32 weights it calls our step() directly and
    checks nothing, so this is the guard there. The gradients were all-reduced before step():
    every rank sees the same ones and takes the same decision. DeepSpeed reads `overflow` as
    a Python bool after the step; it stays False, since deciding in Python would wait for the
    device every step. So DeepSpeed counts a step skipped here as taken and moves the LR
    schedule on (its own check holds the schedule back instead); the divergence guard reads
    `found_inf` through engine.step_skipped."""

    overflow = False
    found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            # The max-abs norm is NaN/inf exactly when some element is; a 2-norm could
            # overflow to inf on large but finite gradients.
            norm = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
            self.found_inf = torch.isfinite(norm).logical_not().float()
        return super().step(closure)


class GuardedAdamW(SkipsNonFiniteSteps, torch.optim.AdamW):
    """AdamW skipping non-finite steps: torch's fused kernel only (its others refuse
    found_inf); build_optimizer asks for it wherever a guard is wanted."""


class GuardedLamb(SkipsNonFiniteSteps, Lamb):
    pass


def fused_adamw_available(device: torch.device | str) -> bool:
    """torch.optim.AdamW(fused=True) has kernels for CUDA (and XPU/MPS) and, since torch 2.4,
    for CPU tensors."""
    kind = torch.device(device).type
    if kind == "cpu":
        version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        return version >= (2, 4)
    return kind in ("cuda", "xpu", "mps")


def build_optimizer(param_groups: list[dict], *, name: str, lr: float,
                    betas: tuple[float, float], eps: float, weight_decay: float,
                    device: torch.device | str = "cpu", fused: bool = True,
                    skip_non_finite: bool = False) -> torch.optim.Optimizer:
    """AdamW or LAMB over `param_groups` (model.parameter_groups: decayed / not decayed; each
    group's own weight_decay wins over `weight_decay`).

    AdamW uses torch's fused kernel (one pass over p, g, m, v per tensor) when `fused` and the
    device has it: the same update as the per-tensor loop, faster on CPU and GPU alike.
    `skip_non_finite` adds SkipsNonFiniteSteps, for where nothing else guards the step."""
    if name == "adamw":
        fused = fused and fused_adamw_available(device)
        if skip_non_finite and not fused:
            raise ConfigError(f"optim.name=adamw: the non-finite guard at train.zero_stage=0 "
                              f"needs torch's fused AdamW, which {device} lacks; use "
                              "train.zero_stage=1 (DeepSpeed's own check)")
        kwargs = {"fused": True} if fused else {}
        adamw = GuardedAdamW if skip_non_finite else torch.optim.AdamW
        return adamw(param_groups, lr=lr, betas=betas, eps=eps,
                                 weight_decay=weight_decay, **kwargs)
    if name == "lamb":
        lamb = GuardedLamb if skip_non_finite else Lamb
        return lamb(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"optim.name: unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def learning_rate_factor(cfg: RunConfig, step: int) -> float:
    """The LR policy, one schedule over the whole run whatever the phases: linear warmup for
    optim.warmup_steps, then linear decay to 0 at the last step. A phase with warmup_steps
    scales that down to 0 at its start and ramps it back over its first steps (re-warmup)."""
    o, total = cfg.optim, cfg.schedule.total_steps
    if step < o.warmup_steps:
        factor = (step + 1) / o.warmup_steps
    else:
        factor = max(0.0, (total - step) / max(1, total - o.warmup_steps))
    index = cfg.schedule.phase_at(step)
    into_phase = step - cfg.schedule.start_of(index)
    rewarm = cfg.schedule.phases[index].warmup_steps
    if index > 0 and into_phase < rewarm:
        factor *= (into_phase + 1) / rewarm
    return factor


def optimizer_and_schedule(model: torch.nn.Module, cfg: RunConfig, device: torch.device,
                           precision: Precision):
    """The run's optimizer (BERT's weight-decay groups) and its LR policy as a torch scheduler;
    `precision` (precision_for's) says whether the weights are fp32."""
    o = cfg.optim
    optimizer = build_optimizer(parameter_groups(model, o.weight_decay), name=o.name, lr=o.lr,
                                betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay, device=device,
                                # DeepSpeed checks for non-finite gradients everywhere but at
                                # ZeRO 0 with fp32 weights (fp32, or bf16 under autocast)
                                skip_non_finite=(cfg.train.zero_stage == 0
                                                 and precision.fp32_weights))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(cfg, step))
    return optimizer, scheduler
