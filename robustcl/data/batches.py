"""How the global batch splits over processes and accumulation steps, and which images each process sees at each
step: a pure function of (seed, step), so resuming is exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..recipe import TrainingConfig


class EpochBatches:
    """Per-epoch random permutation of the dataset, cut into global batches (the last partial batch is dropped).

    A global batch of ``global_batch`` images is split into ``grad_accum`` micro-batches, each split over the
    ``num_processes`` processes: process ``r`` takes slice ``m * num_processes + r`` for micro-batch ``m``. Every
    image appears once per epoch across all processes; the order is reshuffled each epoch.
    """

    def __init__(
        self,
        num_images: int,
        global_batch: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        grad_accum: int = 1,
    ) -> None:
        parts = num_processes * grad_accum
        if global_batch % parts:
            raise UserError(
                f"batch size {global_batch} is not divisible by processes × accumulation steps = {parts}",
                "training.batch_size",
                f"use a multiple of {parts}",
            )
        if num_images < global_batch:
            raise UserError(
                f"the dataset has {num_images} images, fewer than one batch of {global_batch}",
                "training.batch_size",
                f"use a batch size ≤ {num_images} or more data",
            )
        self.num_images, self.global_batch, self.seed = num_images, global_batch, seed
        self.num_processes, self.process_index, self.grad_accum = num_processes, process_index, grad_accum
        self.micro_batch = global_batch // parts
        self.steps_per_epoch = num_images // global_batch
        # (epoch, permutation), replaced as one object: the streaming loader asks from its prefetch thread too.
        self._cached: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The dataset order of ``epoch`` (CPU, the same on every process and device)."""
        cached = self._cached
        if cached[0] != epoch:
            g = torch.Generator().manual_seed(hash((self.seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
            cached = self._cached = (epoch, torch.randperm(self.num_images, generator=g))
        return cached[1]

    def span(self, step: int, micro: int = 0) -> tuple[int, int, int]:
        """(epoch, start, stop): where this process's micro-batch lies in its epoch's permutation."""
        start = (step % self.steps_per_epoch) * self.global_batch
        start += (micro * self.num_processes + self.process_index) * self.micro_batch
        return self.epoch_of(step), start, start + self.micro_batch

    def indices(self, step: int, micro: int = 0) -> torch.Tensor:
        """Dataset indices for this process's ``micro``-th micro-batch of optimizer step ``step`` (0-based)."""
        epoch, start, stop = self.span(step, micro)
        return self.permutation(epoch)[start:stop]


class BatchRandom:
    """The random numbers of one process's share of a global micro-batch.

    Every draw is made for the whole global micro-batch (``total`` images) from a generator seeded by the batch's
    coordinates alone, so all processes draw the same numbers, and each keeps its own rows
    (``offset`` … ``offset + local``). Image i therefore gets the same crop, jitter and attack start whichever
    process holds it: N processes × B/N images compute what 1 process × B images does. The draws are tiny next
    to a forward pass (a few numbers per image; the attack start is one image-sized tensor per view).

    A draw's first dimension must be a multiple k of ``local``: k stacked views of the local images
    ([view 1; view 2; …]), each view's rows taken from the matching global view.
    """

    def __init__(self, generator: torch.Generator, local: int, offset: int = 0, total: int | None = None) -> None:
        total = local if total is None else total
        if not 0 <= offset <= total - local:
            raise ValueError(f"rows {offset}…{offset + local} are outside a global batch of {total}")
        self.generator, self.local, self.offset, self.total = generator, local, offset, total

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _global_shape(self, size: tuple[int, ...]) -> tuple[int, ...]:
        if not size or size[0] % self.local:
            raise ValueError(f"a batch draw needs a first dimension that is a multiple of {self.local}, got {size}")
        return (size[0] // self.local, self.total, *size[1:])

    def _rows(self, draw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return draw[:, self.offset : self.offset + self.local].reshape(size)

    def rand(self, size: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) numbers of shape ``size`` for this process's rows."""
        draw = torch.rand(self._global_shape(size), generator=self.generator, device=self.device, dtype=dtype)
        return self._rows(draw, size)

    def randint(self, low: int, high: int, size: tuple[int, ...]) -> torch.Tensor:
        """Integers in [low, high) of shape ``size`` for this process's rows."""
        draw = torch.randint(low, high, self._global_shape(size), generator=self.generator, device=self.device)
        return self._rows(draw, size)


# A plain generator (standalone use) or a process's share of a global batch's random numbers (training).
RandomSource = torch.Generator | BatchRandom


def uniform(
    size: tuple[int, ...], source: RandomSource | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform [0, 1) numbers from either kind of source (a BatchRandom keeps this process's rows)."""
    if isinstance(source, BatchRandom):
        return source.rand(size, dtype=dtype)
    return torch.rand(size, generator=source, device=device, dtype=dtype)


def integers(low: int, high: int, size: tuple[int, ...], source: RandomSource, device: torch.device) -> torch.Tensor:
    """Integers in [low, high) from either kind of source."""
    if isinstance(source, BatchRandom):
        return source.randint(low, high, size)
    return torch.randint(low, high, size, generator=source, device=device)


def batch_random(
    seed: int, step: int, micro: int, device: torch.device, local: int, process_index: int = 0, num_processes: int = 1
) -> BatchRandom:
    """The random numbers for augmentation and attack starts of one micro-batch: fixed by (seed, step, micro) and
    the image's row in the global micro-batch, not by which process holds it."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, step, micro, 0x5EED)) & 0x7FFF_FFFF_FFFF_FFFF)
    return BatchRandom(g, local, process_index * local, num_processes * local)


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's global batch is spread: processes × micro-batch × accumulation steps = batch_size."""

    global_batch: int
    processes: int
    micro_batch: int  # images per process per forward pass
    accumulation: int  # micro-batches per optimizer step

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.processes} process(es) × {self.micro_batch} images × "
            f"{self.accumulation} accumulation step(s)"
        )


def plan_batches(t: TrainingConfig, processes: int) -> BatchPlan:
    """Derive the per-process micro-batch and the accumulation steps from the global ``training.batch_size``, so
    the same recipe trains with the same effective batch on 1 process or on 16."""
    if t.batch_size % processes:
        raise UserError(
            f"training.batch_size {t.batch_size} is not divisible by the {processes} processes",
            "training.batch_size",
            f"the batch size is global: use a multiple of {processes}",
        )
    per_process = t.batch_size // processes
    micro = t.micro_batch_size or per_process
    if per_process % micro:
        raise UserError(
            f"training.micro_batch_size {micro} does not divide the per-process batch {per_process} "
            f"(batch_size {t.batch_size} / {processes} processes)",
            "training.micro_batch_size",
            "use a divisor of the per-process batch, or null",
        )
    if micro < 2:
        # BatchNorm in train mode needs two values per channel; the recipe refuses a batch of 1, not 1 per process.
        raise UserError(
            f"training.batch_size {t.batch_size} over {processes} processes gives each 1 image per forward pass",
            "training.batch_size",
            f"use a batch size of at least {2 * processes} (2 images per process)",
        )
    return BatchPlan(t.batch_size, processes, micro, per_process // micro)
