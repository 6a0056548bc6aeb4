"""How an evaluation shares its work between processes, so that N processes compute what one does.

Rows are shared two ways:

- **owned rows**: process r holds one contiguous block of a split (:func:`owned_rows`). SLF's features are computed
  and kept only by the process that owns the row; validation rows are judged by their owner.
- **batch shares**: every finetuning batch is drawn from the same seeded permutation on every process and cut by
  position into nearly equal parts (:func:`batch_share`); process r runs part r (augmentation, attacks, forward and
  backward). SLF's batches instead go to the rows' owners: a head step costs next to nothing, and the features stay
  where they were computed.

Either way each process's loss is the *sum* of its rows' losses divided by the global batch size, and the gradients
are summed over the processes (:func:`sum_gradients`, one all-reduce): the gradient of the global batch's mean loss,
whatever the number of processes. Counts (correct predictions, loss sums) are summed the same way. What differs from
one process is the float reduction order only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import shard_range, world
from ..data.batches import BatchRandom


def owned_rows(n: int) -> torch.Tensor:
    """This process's contiguous block of rows 0 … n − 1 (the blocks differ in size by at most one)."""
    block = shard_range(n, *world())
    return torch.arange(block.start, block.stop)


def batch_share(index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's part of a global batch ``index`` (split by position) and where it starts in the batch."""
    block = shard_range(len(index), *world())
    return index[block.start : block.stop], block.start


def batch_random(seed: int, epoch: int, batch: int, device: torch.device, share: int, offset: int, total: int):
    """The random numbers (augmentation, attack starts) of one finetuning batch: fixed by (seed, epoch, batch) and
    the row's place in the global batch, not by which process holds it (see :class:`BatchRandom`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, epoch, batch, 0xE7A1)) & 0x7FFF_FFFF_FFFF_FFFF)
    return BatchRandom(generator, share, offset, total)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (itself when there is one process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params: list[nn.Parameter]) -> None:
    """Give every parameter a gradient (zeros where this process's rows gave none, so all processes send the same
    tensors and the optimizer treats every parameter alike on any number of processes), then sum them over the
    processes in one all-reduce."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world()[1] == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    sum_over_processes(flat)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p))
