"""Collectives that carry gradients, for training on several processes: the all-gather behind cross-process
negatives, and BatchNorm with statistics over the global batch.

Both reduce to plain single-process code when no process group of size > 1 is running, so the same method code
runs under ``robustcl pretrain``, ``accelerate launch`` (DDP or DeepSpeed) and in unit tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, size: int, align: int = 1) -> range:
    """The rows of process ``rank`` of ``size`` among ``n``: contiguous blocks in row order that start at multiples
    of ``align`` (sizes differ by at most ``align`` rows)."""
    units = -(-n // align)
    return range(min(n, units * rank // size * align), min(n, units * (rank + 1) // size * align))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (rank order), keeping the autograd graph.

    The backward sends each process the gradient of *all* processes' losses with respect to its rows (summed over
    ranks). With DDP's or DeepSpeed's gradient averaging on top, N processes each computing the mean loss of
    their own anchors against the gathered keys produce the gradient of the mean over all anchors: what one
    process with the whole batch computes. An attack's input gradient is averaged by nothing, so its loss is each
    process's share of the global one instead (``losses.multi_positive_nt_xent``, ``across_processes="share"``).
    ``accelerator.gather`` carries no gradient, hence this.
    """
    _, size = world()
    if size == 1:
        return x
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD))


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (all processes together).

    ``torch.nn.SyncBatchNorm`` runs only on accelerators; this one works on any device and backend (gloo
    included). Each process computes its batch's mean and biased variance, the (count, mean, variance) triples
    are gathered with gradient and combined exactly (Chan et al.'s parallel variance), so normalisation, the
    running statistics (unbiased variance over the global count) and the gradients equal those of one
    process holding the whole batch. Eval mode and single-process runs are plain BatchNorm. Parameters and
    buffers are BatchNorm's, so state dicts load either way.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and self.track_running_stats) or world()[1] == 1:
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        var, mean = torch.var_mean(input, dim=dims, unbiased=False)
        count = torch.full_like(mean, input.numel() / input.shape[1])
        stats = gather_with_grad(torch.stack([count, mean, var])[None])  # [world, 3, C]
        counts, means, variances = stats.unbind(1)
        total = counts.sum(0)
        mean_all = (counts * means).sum(0) / total
        var_all = (counts * (variances + (means - mean_all) ** 2)).sum(0) / total

        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean_all.detach().to(self.running_mean.dtype), momentum)
            unbiased = var_all.detach() * total / (total - 1).clamp_min(1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)

        shape = [1, -1] + [1] * (input.dim() - 2)
        out = (input - mean_all.view(shape)) * torch.rsqrt(var_all.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` inside ``module`` by a :class:`SyncBatchNorm` sharing its parameters
    and buffers (so an optimizer built afterwards, a checkpoint or an export see the same tensors)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=None, dtype=None,
        )  # fmt: skip
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def check_replicas_identical(module: nn.Module, buffers: bool = True) -> None:
    """Raise when ``module``'s parameters (and buffers) differ between processes.

    Data-parallel training keeps one model on every process; a replica that drifted (a launcher that started
    independent processes, an update applied on one rank) would silently train something else. One all-gather
    of per-tensor checksums (float64 sums of values and squares) detects it.
    """
    _, size = world()
    if size == 1:
        return
    tensors = list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
    tensors = [(name, t) for name, t in tensors if t.is_floating_point()]
    sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for _, t in tensors])
    gathered = [torch.empty_like(sums) for _ in range(size)]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered[1:], start=1):
        differs = (other != gathered[0]).any(1).nonzero()
        if len(differs):
            name = tensors[int(differs[0])][0]
            raise RuntimeError(f"model replicas differ between process 0 and process {rank} (first: {name})")
