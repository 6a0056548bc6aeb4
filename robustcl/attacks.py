"""The one PGD implementation: training attacks any loss, evaluation attacks cross-entropy with it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .data.batches import BatchRandom, uniform


@contextmanager
def module_mode(module: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Switch ``module`` (and every sub-module) to train/eval mode, restoring each one's own flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad`` off for ``module``'s parameters while attacking, then back on for those that had it.

    Eager autograd already skips the weight gradients when only the input's is asked for; a compiled module does
    not (its backward graph is fixed at trace time and computes every gradient its inputs require). Frozen, the
    attack's passes get their own input-only graphs: a backward pass about half as expensive."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)


def pgd_attack(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    random: torch.Generator | BatchRandom | None = None,
    start: torch.Tensor | None = None,
    clamp_start: bool = True,
) -> torch.Tensor:
    """L∞ projected gradient ascent on ``loss_fn`` around ``x`` (pixels in [0, 1]).

    ``loss_fn(x_adv)`` returns the scalar to *maximise*; the caller decides the model's mode and BN branch inside
    it. The start is ``start`` when given (a perturbation, projected into the ball: evaluation passes per-sample
    seeded noise so results do not depend on batching, TRADES passes its small Gaussian), else uniform noise in
    the ε-ball drawn from ``random`` (``random_start``), else zero. With ``clamp_start`` the start is clamped into
    [0, 1] before the first gradient (Madry et al.); without it the first gradient is taken at the unclamped
    ``x + δ₀`` and only each step's result is clamped, as the contrastive methods' authors do (ACL's
    ``PGD_contrastive`` in VITA-Group/Adversarial-Contrastive-Learning ``utils.py``; AdvCL's and DynACL's attacks).

    Gradients are taken with respect to the perturbation only (``torch.autograd.grad``), so parameter ``.grad``
    fields are never touched and no gradient all-reduce fires inside the attack. No host syncs.
    Returns the adversarial images, detached, inside the ε-ball and clamped to [0, 1].
    """
    x = x.detach()
    if start is not None:
        delta = start.detach().to(x).clamp(-epsilon, epsilon)
    elif random_start:
        noise = uniform(tuple(x.shape), random, x.device, x.dtype)  # training: same start on any process
        delta = (noise * 2 - 1) * epsilon
    else:
        delta = torch.zeros_like(x)
    if clamp_start:
        delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + step_size * grad.sign()
            delta = delta.clamp_(-epsilon, epsilon)
            delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).clamp(0, 1).detach()
