"""Features of a split's images from any pixels-in-[0, 1] encoder (evaluation heads, k-means clustering)."""

from __future__ import annotations

import torch
from torch import nn

from .attacks import module_mode
from .data.images import ImageRows, read_chunks

CHUNK = 512  # images per forward when encoding a dataset


def pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float pixels in [0, 1] on ``device``."""
    return images.to(device).float() / 255


@torch.no_grad()
def encode_rows(
    encoder: nn.Module,
    images: ImageRows,
    device: torch.device,
    progress: bool = False,
    chunk: int = CHUNK,
    workers: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of the images of ``images`` at ``rows`` (default: all, in dataset order), decoded or streamed by
    ``workers`` processes."""
    rows = torch.arange(len(images)) if rows is None else rows
    if len(rows) == 0 and len(images):  # an empty shard (fewer images than processes) still has the feature width
        return encode_rows(encoder, images, device, False, chunk, 0, torch.arange(1))[:0]
    parts = read_chunks(images, rows, chunk, workers, progress, desc="features")
    with module_mode(encoder, False):
        return torch.cat([encoder(pixels(part, device)) for part, _ in parts])
