"""What a method may use before its first step (``Method.setup(context)``): the schedule's length, the run directory,
the device, and passes over the pretraining images that the trainer shards across its processes.

A method never sees processes. The trainer hands it a :class:`ProcessesSetupContext`, whose passes give each process
a block of the images and combine the blocks, whose loads happen once per machine and whose file writes happen once
per run; single-process code (tests, scripts) uses a plain :class:`SetupContext`, where each is the plain call. In
both, a failure on any process raises on every process, so none is left waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from .collectives import shard_range
from .data.images import ImageRows
from .features import CHUNK, encode_rows
from .kmeans import OneProcess, ProcessGroup

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")


@dataclass(frozen=True)
class RowBlock:
    """Per-image rows of a dataset pass, sharded: this process's contiguous block of the dataset's rows (every row
    in one process), and the collectives that combine the blocks of all processes (k-means takes them)."""

    rows: torch.Tensor
    collectives: OneProcess

    def gather(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row`` (one entry for each row of this block) of every block, in dataset order, on every process."""
        return self.collectives.gather_rows(per_row)


def encode_block(
    encoder: nn.Module,
    images: ImageRows,
    device: torch.device,
    collectives: OneProcess,
    *,
    batch_size: int = CHUNK,
    progress: bool = True,
) -> RowBlock:
    """float32 features (pixels in [0, 1] → ``encoder``) of this process's block of ``images``. Setting
    ``ROBUSTCL_ENCODED_ROWS_LOG`` to a file appends one line per process naming the rows it encoded (tests check the
    sharding with it)."""
    # Blocks of whole feature batches: every image is encoded in the very batch one process would encode it in, so
    # the features do not depend on the process count (batch-shape-dependent kernels, TF32 convolutions).
    rows = shard_range(len(images), collectives.rank, collectives.size, align=batch_size)
    encoder = encoder.to(device)
    features = encode_rows(encoder, images, device, progress, batch_size, rows=torch.arange(rows.start, rows.stop))
    log = os.environ.get("ROBUSTCL_ENCODED_ROWS_LOG")
    if log:  # a test hook: which rows this process pushed through the encoder
        with open(log, "a") as f:
            f.write(f"process {collectives.rank} of {collectives.size} encoded rows {rows.start}..{rows.stop}\n")
    return RowBlock(features.float(), collectives)


@dataclass
class SetupContext:
    """The context of a single-process setup (tests, scripts): every pass covers all images, loads and writes are
    plain calls."""

    run_dir: Path | None  # where a method keeps what it computes before training (None: nowhere)
    # The pretraining split in dataset order, to describe (count, identity); passes over it go through features().
    images: ImageRows
    steps_per_epoch: int
    total_steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True  # whether this process shows progress bars

    @property
    def total_epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def features(self, encoder: nn.Module, batch_size: int = CHUNK) -> RowBlock:
        """``encoder``'s features of the pretraining images (pixels in [0, 1]), each process encoding its block."""
        collectives = self._collectives()
        return collectives.agree(
            lambda: encode_block(
                encoder, self.images, self.device, collectives, batch_size=batch_size, progress=self.progress
            ),
            "encoding the images",
        )

    def load_once(self, load: Callable[[], T], doing: str) -> T:
        """``load()`` (e.g. an encoder from the Hub), downloaded once per machine when processes share it."""
        return load()

    def write_once(self, write: Callable[[], object], doing: str) -> None:
        """``write()`` once for the run (files into the run directory); returns when it is done."""
        write()

    def _collectives(self) -> OneProcess:
        return OneProcess()


@dataclass
class ProcessesSetupContext(SetupContext):
    """The trainer's context: every process of the run calls the method's setup with it, and each pass, load and
    write is collective (every process must make the same calls in the same order)."""

    accelerator: Accelerator = field(kw_only=True)

    def _collectives(self) -> OneProcess:
        return ProcessGroup() if self._many() else OneProcess()

    def _many(self) -> bool:
        return self.accelerator.num_processes > 1

    def load_once(self, load: Callable[[], T], doing: str) -> T:
        if not self._many():
            return load()
        from .distributed import node_main_first

        # Each machine's main process first: a Hub download happens once per machine, not raced for by every process.
        return self._collectives().agree(lambda: node_main_first(self.accelerator, load), doing)

    def write_once(self, write: Callable[[], object], doing: str) -> None:
        if not self._many():
            write()
            return
        main = self.accelerator.is_main_process
        self._collectives().agree(lambda: write() if main else None, doing)
