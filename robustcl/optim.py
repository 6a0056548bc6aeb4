"""Optimisers (LARS, SGD) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from .recipe import OptimizerConfig, ScheduleConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017) as ACL trains with it.

    Per tensor: local_lr = η‖w‖ / (‖g‖ + wd‖w‖) (1 when either norm is ~0); the momentum buffer accumulates
    lr · local_lr · (g + wd·w) and is subtracted from w. Applied to every parameter, BN and biases included,
    as in the reference implementation.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            # Every parameter's trust ratio in a handful of kernels over the stacked norms (no per-tensor loop).
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            updates = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            local = eta * w_norms / (g_norms + wd * w_norms)
            ok = (w_norms >= 1e-15) & (g_norms >= 1e-15)
            scales = torch.where(ok, local, torch.ones_like(local)) * group["lr"]
            torch._foreach_mul_(updates, list(scales.unbind()))
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            held = [i for i, buf in enumerate(bufs) if buf is not None]
            if held:
                torch._foreach_mul_([bufs[i] for i in held], group["momentum"])
                torch._foreach_add_([bufs[i] for i in held], [updates[i] for i in held])
            for i, buf in enumerate(bufs):
                if buf is None:  # a parameter's first update starts its buffer
                    self.state[params[i]]["momentum_buffer"] = bufs[i] = updates[i]
            torch._foreach_sub_(params, bufs)
        return loss


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer at peak learning rate ``lr`` (``cfg.peak_lr`` of the run's global batch)."""
    if cfg.name == "lars":
        return LARS(
            params,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
        )
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, peak_lr: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    floor = cfg.min_lr / peak_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    total_steps: int,
    steps_per_epoch: int,
    peak_lr: float,
) -> LambdaLR:
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg, peak_lr))
