"""Decode an image column of a dataset into a preallocated uint8 ``[N, R, R, 3]`` array.

Two column kinds: ``datasets.Image`` (encoded files, decoded with PIL straight from the Arrow bytes) and
integer pixel arrays (H×W, H×W×C or C×H×W).  Every image is converted to RGB and, when its size differs,
resized bicubically (shorter side to R) and centre-cropped.  An unreadable or malformed row surfaces as a
one-line :class:`~robustcl.errors.UserError` naming the row.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any

import datasets
import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from robustcl.data.sources import _one_line
from robustcl.errors import UserError

# Rows pulled from Arrow per step: large enough to amortise the per-batch overhead, small enough that the
# Python objects of one batch of encoded images stay a few MB.
_BATCH_ROWS = 1024

# Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; the decode loop turns the warning into
# an error so that it is reported like any other unreadable image, on one line naming the row.
_BOMBS = (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, *_BOMBS)


# ------------------------------------------------------------------------------------------ decoding


def _sniff_formats(data: bytes) -> tuple[str, ...] | None:
    """Tell PIL the format up front: skipping its plugin probing is ~20% of a 32×32 decode."""
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG",)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("PNG",)
    return None


def _open_pil(value: Any, feature: datasets.Image) -> PIL.Image.Image:
    if isinstance(value, dict):
        data, file = value.get("bytes"), value.get("path")
        if data is not None:
            return PIL.Image.open(io.BytesIO(data), formats=_sniff_formats(data))
        if file and os.path.isfile(file):
            return PIL.Image.open(file)
    # Remote or repo-relative paths: datasets knows how to resolve them.
    return feature.decode_example(value)


def _to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("P", "PA"):
        # Through RGBA so that palette transparency is honoured (PIL warns otherwise).
        return im.convert("RGBA").convert("RGB")
    if mode == "F" or mode.startswith("I"):
        # High-bit-depth grayscale: PIL's own conversion clips to 255, which turns 16-bit scans white.
        pixels = np.asarray(im, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if pixels.size and pixels.max() > 255 else 1.0
        gray = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, LA, RGBA (alpha dropped), CMYK, YCbCr, ...
    except ValueError:
        return im.convert("RGBA").convert("RGB")


def _draft_for(im: PIL.Image.Image, resolution: int) -> None:
    """Let the JPEG decoder downscale by 2/4/8 in the DCT domain when the target is much smaller."""
    if im.format != "JPEG":
        return
    w, h = im.size
    short = min(w, h)
    if short >= 2 * resolution:
        target = (math.ceil(w * resolution / short), math.ceil(h * resolution / short))
        im.draft(im.mode if im.mode in ("RGB", "L") else None, target)


def _fit(im: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Bicubic resize of the shorter side to R, then a centre crop, done as one resample of a box."""
    w, h = im.size
    if (w, h) == (resolution, resolution):
        return im
    if w == h:
        return im.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    sx, sy = new_w / w, new_h / h
    box = (left / sx, top / sy, (left + resolution) / sx, (top + resolution) / sy)
    return im.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC, box=box)


def _pil_to_hwc(im: PIL.Image.Image, resolution: int) -> np.ndarray:
    if im.mode == "RGB" and im.size == (resolution, resolution):
        return np.asarray(im)  # the common case: no conversion, no resampling, pixels kept exactly
    _draft_for(im, resolution)
    return np.asarray(_fit(_to_rgb(im), resolution))


def _image_error(row: int, column: str, value: Any, exc: BaseException, where: str, key: str) -> UserError:
    file = value.get("path") if isinstance(value, dict) else None
    what = f"row {row} of column '{column}' is not a readable image"
    if file:
        what += f" (file {file})"
    fix = (
        f"downscale or remove that image (Pillow refuses images over {PIL.Image.MAX_IMAGE_PIXELS:,} pixels)"
        if isinstance(exc, _BOMBS)
        else "fix or remove that image, or set the image column to the right column"
    )
    return UserError(f"{what}: {_one_line(exc)}", f"{where}, {key}", fix)


def _decode_image_column(
    ds: datasets.Dataset,
    column: str,
    resolution: int,
    out: np.ndarray,
    bar: tqdm | None,
    where: str,
    key_prefix: str,
) -> None:
    feature = ds.features[column]
    key = f"{key_prefix}.image_column: {column}"
    # Raw Arrow access: no per-row Python dicts from the formatter and no eager PIL decode by datasets.
    table_iter = ds.select_columns([column]).with_format("arrow").iter(batch_size=_BATCH_ROWS)
    row = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        for table in table_iter:
            for value in table.column(column).to_pylist():
                empty = isinstance(value, dict) and value.get("bytes") is None and not value.get("path")
                if value is None or empty:
                    raise UserError(
                        f"row {row} of column '{column}' has no image",
                        f"{where}, {key}",
                        "fill in or remove the empty rows",
                    )
                try:
                    out[row] = _pil_to_hwc(_open_pil(value, feature), resolution)
                except _DECODE_ERRORS as exc:
                    raise _image_error(row, column, value, exc, where, key) from None
                row += 1
            if bar is not None:
                bar.update(table.num_rows)


def _array_to_hwc(pixels: np.ndarray, row: int, column: str, where: str, key: str) -> np.ndarray:
    """One pixel array (H×W, H×W×C or C×H×W, C in 1/3/4) as uint8 H×W×C."""
    if pixels.dtype.kind not in "ui":
        raise UserError(
            f"row {row} of column '{column}' holds {pixels.dtype} pixels, not 8-bit integers",
            f"{where}, {key}",
            "store images as uint8 arrays (0..255) or as datasets.Image",
        )
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise UserError(
            f"row {row} of column '{column}' has pixel values outside 0..255 "
            f"({int(pixels.min())}..{int(pixels.max())})",
            f"{where}, {key}",
            "store images as uint8 arrays (0..255) or as datasets.Image",
        )
    pixels = pixels.astype(np.uint8, copy=False)
    if pixels.ndim == 2:
        return pixels[:, :, None]
    if pixels.ndim == 3:
        if pixels.shape[2] in (1, 3, 4):
            return pixels
        if pixels.shape[0] in (1, 3, 4):
            return pixels.transpose(1, 2, 0)
    raise UserError(
        f"row {row} of column '{column}' has shape {tuple(pixels.shape)}, not an image",
        f"{where}, {key}",
        "use H×W, H×W×C or C×H×W arrays with C = 1, 3 or 4",
    )


def _decode_array_column(
    ds: datasets.Dataset,
    column: str,
    resolution: int,
    out: np.ndarray,
    bar: tqdm | None,
    where: str,
    key_prefix: str,
) -> None:
    key = f"{key_prefix}.image_column: {column}"
    row = 0
    # The numpy formatter widens integers to int64; the range check above makes narrowing back safe.
    for batch in ds.select_columns([column]).with_format("numpy").iter(batch_size=_BATCH_ROWS):
        # A regular column arrives as one [B, ...] array, a ragged one as an object array of arrays.
        items = list(batch[column])
        for pixels in items:
            hwc = _array_to_hwc(np.asarray(pixels), row, column, where, key)
            if hwc.shape == (resolution, resolution, 3):
                out[row] = hwc
            else:
                im = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)  # L, RGB or RGBA
                out[row] = np.asarray(_fit(_to_rgb(im), resolution))
            row += 1
        if bar is not None:
            bar.update(len(items))
