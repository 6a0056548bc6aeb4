"""Which images each process sees at each step: a pure function of (seed, step), so resuming is exact."""

from __future__ import annotations

import torch

from ..errors import UserError


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
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int, micro: int = 0) -> torch.Tensor:
        """Dataset indices for this process's ``micro``-th micro-batch of optimizer step ``step`` (0-based)."""
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(hash((self.seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
            self._epoch, self._perm = epoch, torch.randperm(self.num_images, generator=g)
        start = (step % self.steps_per_epoch) * self.global_batch
        start += (micro * self.num_processes + self.process_index) * self.micro_batch
        return self._perm[start : start + self.micro_batch]


def step_generator(seed: int, step: int, micro: int, process_index: int, device: torch.device) -> torch.Generator:
    """The generator for augmentation and attack starts of one micro-batch: fixed by its coordinates alone."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, step, micro, process_index, 0x5EED)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g
