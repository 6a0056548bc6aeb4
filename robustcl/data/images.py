"""Where a split's pixels live while a run uses them: decoded once into memory, or kept encoded and decoded per batch.

Both kinds answer the same two questions: how many images there are, and the uint8 ``[B, 3, R, R]`` pixels of any
rows. :class:`DecodedImages` holds the whole split (CIFAR-10 at 32 px: 150 MB), so a row costs an index;
:class:`EncodedImages` keeps the split's memory-mapped Arrow table (what ``datasets`` already keeps on disk), so
host memory does not grow with the dataset and a row costs a decode — done in DataLoader workers, see
:mod:`robustcl.data.streamed`. Both decode a row to exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..fingerprint import images_fingerprint
from .crops import CropPlan
from .decode import ColumnDecoder


class DecodedImages:
    """The whole split as one uint8 ``[N, 3, R, R]`` host tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def resolution(self) -> int:
        return int(self.tensor.shape[-1])

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The pixels of ``rows`` in that order, and the rows that could not be read (none: all were decoded)."""
        return self.tensor.index_select(0, rows), []

    def identity(self) -> str:
        """What names these exact pixels, in this order (pseudo-label files record it)."""
        return images_fingerprint(self.tensor)


class EncodedImages:
    """The split's image column, decoded row by row when a batch asks for it.

    Picklable and cheap to send to a worker process: ``datasets`` pickles a memory-mapped table by its file
    paths, and a forked worker shares the mapping."""

    def __init__(self, decoder: ColumnDecoder, fingerprint: dict[str, Any], skip_bad: bool = False) -> None:
        self.decoder, self.fingerprint, self.skip_bad = decoder, fingerprint, skip_bad

    def __len__(self) -> int:
        return self.decoder.num_rows

    @property
    def resolution(self) -> int:
        return self.decoder.resolution

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The pixels of ``rows`` in that order, and the unreadable rows replaced (``data.bad_images: skip``)."""
        hwc, bad = self.decoder.decode_rows(rows.tolist(), self.skip_bad)
        return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), bad

    def take_crops(self, rows: torch.Tensor, uniforms: torch.Tensor, plan: CropPlan) -> tuple[torch.Tensor, list[int]]:
        """uint8 ``[views, B, 3, R, R]``: crops of ``rows`` sampled on the original images (``[views, B, draws]``
        uniforms, see :mod:`robustcl.data.crops`), and the unreadable rows replaced."""
        hwc, bad = self.decoder.crop_rows(rows.tolist(), uniforms, plan, self.skip_bad)
        return torch.from_numpy(hwc).permute(0, 1, 4, 2, 3).contiguous(), bad

    def identity(self) -> str:
        # Decoding 1M images to hash their pixels would cost an hour at every start: the dataset fingerprint (rows,
        # features, sampled encoded bytes) and the resolution name the pixels as well as they can be named cheaply.
        text = json.dumps({"dataset": self.fingerprint, "resolution": self.resolution}, sort_keys=True)
        return "encoded:" + hashlib.sha256(text.encode()).hexdigest()


ImageRows = DecodedImages | EncodedImages


def pixels_of(images: ImageRows | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """uint8 ``[len(rows), 3, R, R]`` pixels of ``rows`` of ``images`` (a uint8 tensor, or anything with ``take``),
    in that order."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, rows)
    if not len(rows):
        r = images.resolution
        return torch.empty((0, 3, r, r), dtype=torch.uint8)
    return images.take(rows)[0]


class _Batches(Dataset):
    """Item i: the pixels of the i-th list of rows (a DataLoader with ``batch_size=None`` yields them as they are)."""

    def __init__(self, images: ImageRows | torch.Tensor, batches: list[torch.Tensor]) -> None:
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor | BaseException:
        try:
            return pixels_of(self.images, self.batches[i])
        except Exception as exc:  # noqa: BLE001 — raised as itself in the reading process (see read_batches)
            return exc


def read_batches(
    images: ImageRows | torch.Tensor,
    batches: list[torch.Tensor],
    workers: int = 0,
    progress: bool = False,
    desc: str = "images",
) -> Iterator[torch.Tensor]:
    """The pixels of each list of rows in ``batches`` (of any sizes, empty ones too), in order; with ``workers`` > 0
    they are read by that many processes (worth it where a row costs a decode) while the caller uses the previous
    batch."""
    if workers:
        loader = DataLoader(_Batches(images, batches), batch_size=None, num_workers=workers)
    else:
        loader = (pixels_of(images, rows) for rows in batches)
    for item in tqdm(loader, desc=desc, unit="batch", total=len(batches), dynamic_ncols=True, disable=not progress):
        if isinstance(item, BaseException):
            raise item
        yield item


def read_chunks(
    images: ImageRows, rows: torch.Tensor, chunk: int, workers: int = 0, progress: bool = False, desc: str = "images"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, rows) of ``rows`` in chunks of ``chunk``, in order; encoded images are decoded by ``workers`` processes
    (0: in this one) while the caller uses the previous chunk."""
    chunks = list(rows.split(chunk))
    workers = workers if isinstance(images, EncodedImages) else 0
    yield from zip(read_batches(images, chunks, workers, progress, desc), chunks)
