"""Decode rows of an image column of a dataset into uint8 ``[R, R, 3]`` arrays.

Two column kinds: ``datasets.Image`` (encoded files, decoded with PIL straight from the Arrow bytes) and
integer pixel arrays (H×W, H×W×C or C×H×W).  Every image is converted to RGB and, when its size differs,
resized bicubically (shorter side to R) and centre-cropped.  An unreadable or malformed row surfaces as a
one-line :class:`~robustcl.errors.UserError` naming the row.  :class:`ColumnDecoder` serves both the decode-once
path (a run of rows into a preallocated array) and the streamed path (any rows, in a DataLoader worker).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from robustcl.data.crops import CropPlan, crop_boxes, crop_views
from robustcl.data.sources import _one_line
from robustcl.errors import UserError

# Rows pulled from Arrow per step: large enough to amortise the per-batch overhead, small enough that the
# Python objects of one batch of encoded images stay a few MB.
_BATCH_ROWS = 1024

# Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; the decode loop turns the warning into
# an error so that it is reported like any other unreadable image, on one line naming the row.
# How far past an unreadable row data.bad_images: skip looks for a readable substitute.
_SUBSTITUTE_TRIES = 16

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


def _draft_for(im: PIL.Image.Image, short_side: int) -> None:
    """Let the JPEG decoder downscale by 2/4/8 in the DCT domain when the target is much smaller."""
    if im.format != "JPEG":
        return
    w, h = im.size
    short = min(w, h)
    if short >= 2 * short_side:
        target = (math.ceil(w * short_side / short), math.ceil(h * short_side / short))
        im.draft(im.mode if im.mode in ("RGB", "L") else None, target)


def _short_side(resolution: int, center_crop: float) -> int:
    """The shorter side an image is resized to before its centre R × R is cut (ImageNet evaluation: 224 / 0.875 =
    256)."""
    return max(resolution, round(resolution / center_crop))


def _fit(im: PIL.Image.Image, resolution: int, center_crop: float = 1.0) -> PIL.Image.Image:
    """Bicubic resize of the shorter side to R / center_crop, then the centre R × R, done as one resample of a box."""
    w, h = im.size
    short_side = _short_side(resolution, center_crop)
    if (w, h) == (resolution, resolution) and short_side == resolution:
        return im
    if w == h and short_side == resolution:
        return im.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
    scale = short_side / min(w, h)
    new_w, new_h = max(short_side, round(w * scale)), max(short_side, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    sx, sy = new_w / w, new_h / h
    box = (left / sx, top / sy, (left + resolution) / sx, (top + resolution) / sy)
    return im.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC, box=box)


def _pil_to_hwc(im: PIL.Image.Image, resolution: int, center_crop: float = 1.0) -> np.ndarray:
    if im.mode == "RGB" and im.size == (resolution, resolution) and center_crop == 1.0:
        return np.asarray(im)  # the common case: no conversion, no resampling, pixels kept exactly
    _draft_for(im, _short_side(resolution, center_crop))
    return np.asarray(_fit(_to_rgb(im), resolution, center_crop))


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


@contextlib.contextmanager
def _bombs_as_errors() -> Iterator[None]:
    # Set once per batch, not per image: entering catch_warnings costs as much as decoding a 32×32 PNG.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        yield


class ColumnDecoder:
    """The image column of one split, decoded row by row to uint8 ``[R, R, 3]``; every failure names its row.

    Image features decode through PIL from the raw Arrow values (no per-row Python dicts from the formatter, no
    eager PIL decode by ``datasets``); pixel-array columns are range-checked and copied."""

    def __init__(
        self,
        ds: datasets.Dataset,
        column: str,
        resolution: int,
        where: str,
        key_prefix: str,
        center_crop: float = 1.0,
        source_rows: np.ndarray | None = None,
    ) -> None:
        self.column, self.resolution, self.where, self.center_crop = column, resolution, where, center_crop
        # The split's own row numbers of a subset's rows (data.max_samples): what errors and warnings name.
        self.source_rows = source_rows
        self.key = f"{key_prefix}.image_column: {column}"
        self.feature = ds.features[column]
        self.is_image = isinstance(self.feature, datasets.Image)
        # The numpy formatter widens integers to int64; the range check of _array_to_hwc makes narrowing back safe.
        self._view = ds.select_columns([column]).with_format("arrow" if self.is_image else "numpy")
        self.num_rows = len(ds)

    def named(self, row: int) -> int:
        """The split's row number of row ``row`` of the (possibly subset) dataset."""
        return int(row if self.source_rows is None else self.source_rows[row])

    def values(self, rows: slice | list[int]) -> list[Any]:
        """The raw values of ``rows`` (a slice, or dataset row numbers in any order)."""
        batch = self._view[rows]
        if self.is_image:
            return batch.column(self.column).to_pylist()
        # A regular column arrives as one [B, ...] array, a ragged one as an object array of arrays.
        return list(batch[self.column])

    def decode(self, value: Any, row: int) -> np.ndarray:
        """One value as uint8 ``[R, R, 3]``, or a UserError naming ``row``."""
        if self.is_image:
            return self._decode_image(value, row)
        hwc = _array_to_hwc(np.asarray(value), row, self.column, self.where, self.key)
        if hwc.shape == (self.resolution, self.resolution, 3) and self.center_crop == 1.0:
            return hwc
        im = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)  # L, RGB or RGBA
        return np.asarray(_fit(_to_rgb(im), self.resolution, self.center_crop))

    def _check_present(self, value: Any, row: int) -> None:
        empty = isinstance(value, dict) and value.get("bytes") is None and not value.get("path")
        if value is None or empty:
            raise UserError(
                f"row {row} of column '{self.column}' has no image",
                f"{self.where}, {self.key}",
                "fill in or remove the empty rows",
            )

    def _decode_image(self, value: Any, row: int) -> np.ndarray:
        self._check_present(value, row)
        try:
            return _pil_to_hwc(_open_pil(value, self.feature), self.resolution, self.center_crop)
        except _DECODE_ERRORS as exc:
            raise _image_error(row, self.column, value, exc, self.where, self.key) from None

    def decode_into(self, out: np.ndarray, bar: tqdm | None = None, skip_bad: bool = False) -> list[int]:
        """Every row, in order, into ``out`` (uint8 ``[N, R, R, 3]``); returns the unreadable rows replaced (see
        :meth:`decode_rows`)."""
        bad: list[int] = []
        with _bombs_as_errors():
            for start in range(0, self.num_rows, _BATCH_ROWS):
                values = self.values(slice(start, min(start + _BATCH_ROWS, self.num_rows)))
                self._decode_values(values, range(start, start + len(values)), out[start:], skip_bad, bad)
                if bar is not None:
                    bar.update(len(values))
        return bad

    def _decode_values(
        self, values: list[Any], rows: Sequence[int], out: np.ndarray, skip_bad: bool, bad: list[int]
    ) -> None:
        for i, (row, value) in enumerate(zip(rows, values)):
            try:
                out[i] = self.decode(value, self.named(row))
            except UserError:
                if not skip_bad:
                    raise
                bad.append(self.named(row))
                out[i] = self._substitute(int(row))

    def decode_rows(self, rows: Sequence[int], skip_bad: bool = False) -> tuple[np.ndarray, list[int]]:
        """``rows`` (dataset row numbers, any order) as uint8 ``[B, R, R, 3]``, and the rows that could not be read.

        An unreadable row raises its UserError, or with ``skip_bad`` is replaced by the next readable row of the
        dataset: a function of the data alone, so every process and every resume sees the same substitute."""
        out = np.empty((len(rows), self.resolution, self.resolution, 3), dtype=np.uint8)
        bad: list[int] = []
        with _bombs_as_errors():
            self._decode_values(self.values(list(rows)), rows, out, skip_bad, bad)
        return out, bad

    def crop_rows(
        self, rows: Sequence[int], uniforms: torch.Tensor, plan: CropPlan, skip_bad: bool = False
    ) -> tuple[np.ndarray, list[int]]:
        """uint8 ``[views, B, R, R, 3]``: the crops of ``rows`` sampled on the original images (see
        :mod:`robustcl.data.crops`) from their ``[views, B, CROP_DRAWS]`` uniforms, and the unreadable rows
        replaced (see :meth:`decode_rows`; a substitute is cropped with the same uniforms)."""
        out = np.empty((plan.views, len(rows), plan.resolution, plan.resolution, 3), dtype=np.uint8)
        bad: list[int] = []
        with _bombs_as_errors():
            values = self.values(list(rows))
            # Headers first (no decoding): the boxes of the whole batch in one vectorised call.
            opened = [self._attempt(functools.partial(self._pil, v, self.named(r)), r, v) for r, v in zip(rows, values)]
            sizes = [(im.size[1], im.size[0]) if isinstance(im, PIL.Image.Image) else (1, 1) for im in opened]
            boxes = crop_boxes(uniforms, sizes, plan)
            for i, (row, value, im) in enumerate(zip(rows, values, opened)):
                if isinstance(im, PIL.Image.Image):
                    im = self._attempt(functools.partial(crop_views, im, boxes[i], plan, _to_rgb), row, value)
                if isinstance(im, np.ndarray):
                    out[:, i] = im
                    continue
                if not skip_bad:
                    raise im
                bad.append(self.named(row))
                substitute = functools.partial(self._crop, uniforms=uniforms[:, i], plan=plan)
                out[:, i] = self._substitute(int(row), substitute)
        return out, bad

    def _attempt(self, work: Callable[[], Any], row: int, value: Any) -> Any:
        """``work()``, or the UserError naming ``row`` that it failed with (returned, not raised)."""
        try:
            return work()
        except UserError as error:
            return error
        except _DECODE_ERRORS as exc:
            return _image_error(self.named(row), self.column, value, exc, self.where, self.key)

    def _crop(self, value: Any, row: int, uniforms: torch.Tensor, plan: CropPlan) -> np.ndarray:
        """One image's crops (a substitute's): its boxes computed alone."""
        try:
            im = self._pil(value, row)
            boxes = crop_boxes(uniforms[:, None], [(im.size[1], im.size[0])], plan)[0]
            return crop_views(im, boxes, plan, _to_rgb)
        except _DECODE_ERRORS as exc:
            raise _image_error(row, self.column, value, exc, self.where, self.key) from None

    def _pil(self, value: Any, row: int) -> PIL.Image.Image:
        """The row as a PIL image, not yet decoded where it is a file (its size is known from the header)."""
        if self.is_image:
            self._check_present(value, row)
            return _open_pil(value, self.feature)
        hwc = _array_to_hwc(np.asarray(value), row, self.column, self.where, self.key)
        return PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)

    def _substitute(self, row: int, decode: Callable[[Any, int], np.ndarray] | None = None) -> np.ndarray:
        decode = decode or self.decode
        error = None
        for step in range(1, _SUBSTITUTE_TRIES + 1):
            other = (row + step) % self.num_rows
            try:
                return decode(self.values([other])[0], self.named(other))
            except UserError as exc:
                error = error or exc
        raise UserError(
            f"row {row} and the {_SUBSTITUTE_TRIES} rows after it are unreadable ({error.what})",
            error.where,
            "the data is damaged beyond skipping single images: repair or re-create the dataset",
        )
