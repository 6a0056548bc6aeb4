"""RandomResizedCrop on the original image, taken in the data workers (``augment.crop_on: original``).

ImageNet pipelines sample the crop on the full width × height of each image and resize only the crop to the training
resolution; cropping a square decoded at that resolution first would lose most of a small crop's pixels. The crop
box of view v of an image comes from uniforms drawn for the whole global micro-batch by a generator seeded with
(seed, step, micro, v) — the same numbers whichever process holds the image, on every resume — and from the image's
own size, by torchvision's ``get_params`` (:func:`~robustcl.data.augment.crop_boxes_from_uniforms`). A JPEG is
decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still gives every view's crop at least the training
resolution, once for all views of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .augment import _CROP_ATTEMPTS, crop_boxes_from_uniforms

# Uniforms per image and view: area fractions and log-ratios of every attempt, then top and left.
CROP_DRAWS = 2 * _CROP_ATTEMPTS + 2


@dataclass(frozen=True)
class CropPlan:
    """What the workers crop: ``views`` crops per image with the recipe's scale and ratio ranges."""

    views: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    resolution: int
    seed: int
    interpolation: str = "bicubic"  # augment.interpolation


def crop_uniforms(seed: int, step: int, micro: int, view: int, total: int) -> torch.Tensor:
    """float32 ``[total, CROP_DRAWS]``: the crop draws of view ``view`` for every image of the global micro-batch."""
    g = torch.Generator().manual_seed(hash((seed, step, micro, view, 0xC409)) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand((total, CROP_DRAWS), generator=g)


def crop_boxes(
    uniforms: torch.Tensor, sizes: list[tuple[int, int]], plan: CropPlan
) -> list[list[tuple[int, int, int, int]]]:
    """(top, left, h, w) of each view of each image: ``boxes[i][v]`` from ``uniforms[v, i]`` (``[views, B,
    CROP_DRAWS]``) and image i's (height, width). One vectorised call for the batch: torch's per-call overhead
    would otherwise cost more than cropping."""
    views, n = uniforms.shape[:2]
    flat = uniforms.transpose(0, 1).reshape(n * views, CROP_DRAWS)  # image-major: rows i*views … i*views+views-1
    a = _CROP_ATTEMPTS
    area, log_ratio, top, left = flat[:, :a], flat[:, a : 2 * a], flat[:, 2 * a], flat[:, 2 * a + 1]
    size_rows = torch.tensor(sizes, dtype=torch.long).repeat_interleave(views, dim=0)
    boxes = crop_boxes_from_uniforms(area, log_ratio, top, left, size_rows, plan.scale, plan.ratio).tolist()
    return [[tuple(box) for box in boxes[i * views : (i + 1) * views]] for i in range(n)]


_FILTERS = {"bicubic": PIL.Image.Resampling.BICUBIC, "bilinear": PIL.Image.Resampling.BILINEAR}


def crop_views(im: PIL.Image.Image, boxes: list[tuple[int, int, int, int]], plan: CropPlan, rgb) -> np.ndarray:
    """uint8 ``[views, R, R, 3]``: each box of ``im`` (still undecoded) resized to R × R (``plan.interpolation``).

    Without a DCT reduction this is torchvision's ``img.crop(box).resize(size, interpolation)`` exactly; with one, the
    box is scaled into the reduced image (PIL's ``resize(box=...)``)."""
    resolution = plan.resolution
    width, height = im.size
    if im.format == "JPEG":
        # The reduced image must keep every crop at least R pixels on each side.
        need_w = max(math.ceil(width * resolution / w) for _, _, _, w in boxes)
        need_h = max(math.ceil(height * resolution / h) for _, _, h, _ in boxes)
        if need_w < width and need_h < height:
            im.draft(im.mode if im.mode in ("RGB", "L") else None, (need_w, need_h))
    im = rgb(im)
    sx, sy = im.size[0] / width, im.size[1] / height
    out = np.empty((len(boxes), resolution, resolution, 3), dtype=np.uint8)
    size, resample = (resolution, resolution), _FILTERS[plan.interpolation]
    for v, (top, left, h, w) in enumerate(boxes):
        if (sx, sy) == (1.0, 1.0):
            view = im.crop((left, top, left + w, top + h)).resize(size, resample)
        else:
            view = im.resize(size, resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        out[v] = np.asarray(view)
    return out
