"""Optimisers (LARS, SGD) and the learning-rate schedule (set per step or per epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from .recipe import OptimizerConfig, ScheduleConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017): ACL's LARS by default, solo-learn's with its options.

    Per tensor: trust = η‖w‖ / (‖g‖ + wd‖w‖ + eps) (1 when either norm is ~0); the momentum buffer accumulates
    lr · trust · (g + wd·w) and is subtracted from w. By default every parameter, BN and biases included, is adapted
    and decayed, as ACL's optimizer/lars.py does. solo-learn's solo/utils/lars.py adds:

    - ``exclude_bias_and_norm``: 1-D tensors (biases, norm weights) step by lr·g, with neither trust ratio nor weight
      decay (solo-learn adds the decay inside its LARS branch only, and hands the base SGD none);
    - ``clip_lr``: trust becomes min(trust / lr, 1), so a tensor steps by lr · min(trust / lr, 1) = min(trust, lr);
    - ``lr_outside_momentum``: the buffer sums trust · (g + wd·w) and w −= lr · buffer (torch SGD's placement).
      The same as ACL's while lr is constant; it differs when lr jumps, e.g. at the epoch boundaries of a per-epoch
      warm-up;
    - ``trust_eps`` (1e-8 there) in the trust ratio's denominator.

    1-D means ``ndim == 1`` exactly, as solo-learn tests it. Where a norm is ~0 ACL still decays (trust 1), solo-learn
    neither adapts nor decays; ACL's rule is kept: it differs only for a tensor whose gradient is exactly zero.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        trust_eps: float = 0.0,
        exclude_bias_and_norm: bool = False,
        clip_lr: bool = False,
        lr_outside_momentum: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            trust_eps=trust_eps,
            exclude_bias_and_norm=exclude_bias_and_norm,
            clip_lr=clip_lr,
            lr_outside_momentum=lr_outside_momentum,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A checkpoint from before trust_eps / exclude_bias_and_norm / clip_lr / lr_outside_momentum has none in its
        # groups: the values this optimizer was built with (the recipe's) fill them in.
        for group in self.param_groups:
            for key in ("trust_eps", "exclude_bias_and_norm", "clip_lr", "lr_outside_momentum"):
                group.setdefault(key, self.defaults[key])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._momentum_step(group, params, self._updates(group, params))
        return loss

    @staticmethod
    def _updates(group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's step before momentum: s · trust · (g + wd·w), or s · g for a tensor left out of the
        adaptation, where s = lr (ACL) or 1 (lr_outside_momentum: lr multiplies the buffer instead)."""
        updates = list(torch._foreach_mul([p.grad for p in params], 1.0))  # a copy in one fused kernel
        exclude = group["exclude_bias_and_norm"]
        adapted = [i for i, p in enumerate(params) if not (exclude and p.ndim == 1)]
        plain = [i for i, p in enumerate(params) if exclude and p.ndim == 1]
        if plain and not group["lr_outside_momentum"]:
            torch._foreach_mul_([updates[i] for i in plain], group["lr"])
        if adapted:
            LARS._adapt(group, [params[i] for i in adapted], [updates[i] for i in adapted])
        return updates

    @staticmethod
    def _adapt(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Turns each gradient in ``grads`` (in place) into s · trust · (g + wd·w) (s as in :meth:`_updates`)."""
        wd, eta, lr = group["weight_decay"], group["trust_coefficient"], group["lr"]
        # Every parameter's trust ratio in a handful of kernels over the stacked norms (no per-tensor loop).
        w_norms = torch.stack(torch._foreach_norm(params))
        g_norms = torch.stack(torch._foreach_norm(grads))
        trust = eta * w_norms / (g_norms + wd * w_norms + group["trust_eps"])
        unit = 1.0 if group["lr_outside_momentum"] else lr
        if not group["clip_lr"]:
            scaled = trust * unit
        elif group["lr_outside_momentum"]:
            scaled = (trust / lr).clamp(max=1.0) if lr else torch.ones_like(trust)  # min(trust / lr, 1); 1 at lr 0
        else:
            scaled = trust.clamp(max=lr)  # lr · min(trust / lr, 1), which also holds at lr = 0
        ok = (w_norms >= 1e-15) & (g_norms >= 1e-15)
        scales = torch.where(ok, scaled, torch.full_like(scaled, unit))
        if wd:
            torch._foreach_add_(grads, params, alpha=wd)
        torch._foreach_mul_(grads, list(scales.unbind()))

    def _momentum_step(self, group: dict, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        held = [i for i, buf in enumerate(bufs) if buf is not None]
        if held:
            torch._foreach_mul_([bufs[i] for i in held], group["momentum"])
            torch._foreach_add_([bufs[i] for i in held], [updates[i] for i in held])
        for i, buf in enumerate(bufs):
            if buf is None:  # a parameter's first update starts its buffer
                self.state[params[i]]["momentum_buffer"] = bufs[i] = updates[i]
        if group["lr_outside_momentum"]:
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        else:
            torch._foreach_sub_(params, bufs)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer at peak learning rate ``lr`` (``cfg.peak_lr`` of the run's global batch)."""
    if cfg.name == "lars":
        return LARS(
            params,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
            trust_eps=cfg.trust_eps,
            exclude_bias_and_norm=cfg.exclude_bias_and_norm,
            clip_lr=cfg.clip_lr,
            lr_outside_momentum=cfg.lr_outside_momentum,
        )
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def lr_factor(step: int, total_steps: float, warmup_steps: int, cfg: ScheduleConfig, peak_lr: float) -> float:
    """Multiplier of the peak lr at tick ``step`` (0-based) of ``total_steps``: linear warm-up over the first
    ``warmup_steps``, then cosine to min_lr. A tick is an optimizer step, or an epoch with ``schedule.unit`` epoch."""
    if warmup_steps > 0 and step < warmup_steps:
        if cfg.warmup_start_lr is None:
            return (step + 1) / warmup_steps
        start = cfg.warmup_start_lr / peak_lr
        # pl_bolts' warm-up: from the start lr at tick 0 to the peak at the warm-up's last tick.
        return start + step * (1 - start) / (warmup_steps - 1) if warmup_steps > 1 else start
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
    """The lr of optimizer step ``step`` is ``peak_lr × lr_factor``: a function of the step alone, so a resumed
    run (its scheduler's step count restored) continues the very same sequence."""
    if cfg.unit == "epoch":
        # The epoch index as the tick: the lr DynACL's and DeACL's per-epoch schedulers hold through epoch e.
        # A run cut by training.max_steps ends inside an epoch: its length in (fractional) epochs.
        total_epochs = total_steps / steps_per_epoch
        warmup_epochs = int(cfg.warmup_epochs)
        return LambdaLR(
            optimizer, lambda step: lr_factor(step // steps_per_epoch, total_epochs, warmup_epochs, cfg, peak_lr)
        )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg, peak_lr))
