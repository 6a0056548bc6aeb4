"""The pixels an evaluation reads: a uint8 tensor (tests, small splits), a split decoded once
(:class:`~robustcl.data.images.DecodedImages`) or left encoded and decoded per batch
(:class:`~robustcl.data.images.EncodedImages`), or some rows of one of them (the finetuning and validation parts of
a training split). Each process reads only the rows it works on, so an encoded split is decoded once in all,
shared between the processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data import images as data_images
from ..data.images import EncodedImages, ImageRows


class RowView:
    """Rows ``rows`` of ``images``, numbered 0 … len − 1. Picklable, for decoding workers."""

    def __init__(self, images: ImageRows | RowView | HeldRows, rows: torch.Tensor) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def resolution(self) -> int:
        return self.images.resolution

    @property
    def streamed(self) -> bool:
        return is_streamed(self.images)

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        return self.images.take(self.rows[rows])


class HeldRows:
    """Some rows of a split, decoded: ``tensor[i]`` holds row ``rows[i]`` (``rows`` sorted). What a process keeps of
    a split it reads only part of."""

    def __init__(self, tensor: torch.Tensor, rows: torch.Tensor) -> None:
        self.tensor, self.rows = tensor, rows

    @property
    def resolution(self) -> int:
        return int(self.tensor.shape[-1])

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        at = torch.searchsorted(self.rows, rows).clamp_max(max(len(self.rows) - 1, 0))
        if not torch.equal(self.rows[at], rows):
            raise RuntimeError("evaluation read a row this process did not decode")
        return self.tensor.index_select(0, at), []


Pixels = torch.Tensor | ImageRows | RowView | HeldRows


def is_streamed(images: Pixels) -> bool:
    """Whether reading a row costs a decode (then worth doing in worker processes)."""
    return isinstance(images, EncodedImages) or (isinstance(images, RowView) and images.streamed)


def resolution(images: Pixels) -> int:
    return int(images.shape[-1]) if isinstance(images, torch.Tensor) else images.resolution


def read_batches(images: Pixels, batches: list[torch.Tensor], workers: int = 0) -> Iterator[torch.Tensor]:
    """The pixels of each list of rows in ``batches``, in order; encoded images are decoded by ``workers`` processes
    while the caller uses the previous batch. Batches may have different sizes (or none: an empty batch)."""
    return data_images.read_batches(images, batches, workers if is_streamed(images) else 0)
