"""The streamed data path: images stay encoded and each micro-batch is decoded by DataLoader worker processes.

Host memory no longer grows with the dataset (the split stays in its memory-mapped Arrow files), and start-up costs
no decoding. Exactness is kept by asking for batches by their coordinates: item (step, micro) is this process's
rows of that micro-batch (:meth:`EpochBatches.indices`, a function of (seed, step)), decoded exactly as the
decode-once path decodes them, so augmentation and attack starts — drawn on the device from
:func:`~robustcl.data.batches.batch_random` — see the same pixels either way. Each process decodes only its own
rows: across processes every image of a global batch is decoded once.

Workers run ahead in training order ((step, 0), (step, 1), …, (step + 1, 0)), ``prefetch`` micro-batches each; a
request out of that order (the first one, a resume) restarts them from there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import CroppedViews
from .batches import EpochBatches
from .crops import CropPlan, crop_uniforms
from .images import EncodedImages

# Micro-batches each worker keeps decoded ahead of the step.
PREFETCH = 2


def default_workers(processes_on_node: int) -> int:
    """This process's share of the CPU cores, less the one it trains on; at least one worker."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_on_node) - 1)


class _MicroBatches(Dataset):
    """Item (step, micro): this process's decoded images (or, with a crop plan, their views cropped on the original
    images), their dataset rows and the rows replaced as unreadable."""

    def __init__(self, images: EncodedImages, batches: EpochBatches, crops: CropPlan | None) -> None:
        self.images, self.batches, self.crops = images, batches, crops

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[int]] | BaseException:
        rows = self.batches.indices(*key)
        try:
            pixels, bad = self._pixels(rows, *key)
        except Exception as exc:  # noqa: BLE001 — raised as itself by the training process (DataLoader would rewrap it)
            return exc
        return pixels, rows, bad

    def _pixels(self, rows: torch.Tensor, step: int, micro: int) -> tuple[torch.Tensor, list[int]]:
        if self.crops is None:
            return self.images.take(rows)
        b = self.batches
        total, offset = b.num_processes * b.micro_batch, b.process_index * b.micro_batch
        draws = [crop_uniforms(self.crops.seed, step, micro, v, total) for v in range(self.crops.views)]
        uniforms = torch.stack([d[offset : offset + len(rows)] for d in draws])
        return self.images.take_crops(rows, uniforms, self.crops)


class _TrainingOrder(Sampler):
    """(step, micro) keys from a starting point on, in the order the training loop asks for them."""

    def __init__(self, start: tuple[int, int], grad_accum: int, total_steps: int) -> None:
        self.start, self.grad_accum, self.total_steps = start, grad_accum, total_steps

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step, micro = self.start
        while step < self.total_steps:
            yield step, micro
            step, micro = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)

    def __len__(self) -> int:
        step, micro = self.start
        return max(0, (self.total_steps - step) * self.grad_accum - micro)


class DecodingFeed:
    """Micro-batches decoded by ``workers`` processes ahead of the step (0: in this process, when asked)."""

    placement = "streamed"

    def __init__(
        self,
        images: EncodedImages,
        batches: EpochBatches,
        device: torch.device,
        workers: int,
        total_steps: int,
        crops: CropPlan | None = None,
    ) -> None:
        self.dataset = _MicroBatches(images, batches, crops)
        self.batches, self.device, self.workers, self.total_steps = batches, device, workers, total_steps
        self.pin = device.type == "cuda"
        self._running: Iterator | None = None
        self._expected: tuple[int, int] | None = None
        self.replaced_rows: list[int] = []  # unreadable rows met so far (data.bad_images: skip), in order

    def _start(self, step: int, micro: int) -> None:
        self.close()
        order = _TrainingOrder((step, micro), self.batches.grad_accum, max(self.total_steps, step + 1))
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # each item is a whole micro-batch already
            sampler=order,
            num_workers=self.workers,
            prefetch_factor=PREFETCH if self.workers else None,
            pin_memory=self.pin,
        )
        self._running = iter(loader)
        self._expected = (step, micro)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor | CroppedViews, torch.Tensor]:
        """uint8 images [B, C, H, W] (with a crop plan: their views, cropped) and their dataset indices [B] of
        micro-batch ``micro`` of optimizer step ``step``, on the device."""
        if self._expected != (step, micro):
            self._start(step, micro)
        item = next(self._running)
        self._expected = (step, micro + 1) if micro + 1 < self.batches.grad_accum else (step + 1, 0)
        if isinstance(item, BaseException):
            self.close()
            raise item
        pixels, rows, replaced = item
        if replaced:
            self.replaced_rows.extend(replaced)
            print(
                f"robustcl: warning: unreadable image(s) in row(s) {', '.join(map(str, replaced))} of step {step + 1}: "
                f"replaced by the next readable row (data.bad_images: skip; {len(self.replaced_rows)} so far)",
                file=sys.stderr,
            )
        pixels = pixels.to(self.device, non_blocking=True)
        if self.dataset.crops is not None:
            pixels = CroppedViews(pixels)
        return pixels, rows.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the workers (they exit when their iterator is dropped)."""
        running, self._running, self._expected = self._running, None, None
        if running is not None and hasattr(running, "_shutdown_workers"):
            running._shutdown_workers()
