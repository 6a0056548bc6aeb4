"""Open any image dataset the user points at and decode it once into a uint8 tensor.

Pre-training re-reads every image many times per epoch, so the whole split is decoded up front to
``uint8 [N, 3, R, R]`` (50k CIFAR-sized images are 150 MB) and augmentation then works on tensors.

Accepted ``path`` kinds: a Hub id, a local folder in Hub layout (parquet / arrow / csv / json files),
a ``save_to_disk`` folder (Dataset or DatasetDict), an image folder with class sub-folders, and
:data:`BUILTIN_DIGITS` (scikit-learn's bundled digits, for offline smoke runs).
Everything the user can get wrong surfaces as a one-line :class:`~robustcl.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from robustcl.errors import UserError

BUILTIN_DIGITS = "builtin:digits"
_BUILTINS = (BUILTIN_DIGITS,)

# Below this many rows a bar would flash by and only clutter the log.
_PROGRESS_MIN_ROWS = 5000
# Rows pulled from Arrow per step: large enough to amortise the per-batch overhead, small enough that the
# Python objects of one batch of encoded images stay a few MB.
_BATCH_ROWS = 1024

_DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".tar"}
_IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
}
# imagefolder's side-car files, which are not a sign of a Hub-layout folder.
_METADATA_STEMS = {"metadata"}
# Enough of a directory tree to tell an image folder from a data-file folder without walking a 1M-file tree.
_SCAN_MAX_ENTRIES = 5000
_SCAN_MAX_DEPTH = 3

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


@dataclass
class ImageData:
    """One decoded split, ready to be augmented on the fly."""

    images: torch.Tensor  # uint8 [N, 3, R, R], contiguous, CPU
    labels: torch.Tensor | None  # int64 [N], or None when the dataset has no label column
    num_classes: int | None
    class_names: list[str] | None
    image_column: str
    label_column: str | None
    source: str  # human-readable "path[name]:split"


# --------------------------------------------------------------------------------------------- opening


def _source(path: str, split: str, name: str | None) -> str:
    return f"{path}[{name}]:{split}" if name else f"{path}:{split}"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The user sees a single line, so a multi-line library error is squeezed and shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id (``owner/name`` or a bare ``name``) was meant as a local path."""
    if path.startswith((".", "/", "~")) or path.endswith("/"):
        return True
    if os.sep != "/" and os.sep in path:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in path:
        return True
    return path.count("/") > 1


def _scan_folder(root: Path) -> tuple[bool, bool]:
    """Return (has data files, has image files), looking only at the top of the tree."""
    has_data = has_images = False
    seen = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack and seen < _SCAN_MAX_ENTRIES and not has_data:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                if depth + 1 <= _SCAN_MAX_DEPTH:
                    stack.append((Path(entry.path), depth + 1))
                continue
            stem, suffix = os.path.splitext(entry.name.lower())
            if suffix in _IMAGE_SUFFIXES:
                has_images = True
            elif suffix in _DATA_FILE_SUFFIXES and stem not in _METADATA_STEMS:
                has_data = True
    return has_data, has_images


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Silence datasets' own bars ("Generating train split") when the caller asked for no progress."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            datasets.enable_progress_bars()


def _pick_split(
    splits: datasets.DatasetDict, split: str, source_path: str, key_prefix: str
) -> datasets.Dataset:
    if split in splits:
        return splits[split]
    available = ", ".join(repr(s) for s in splits) or "none"
    raise UserError(
        f"split '{split}' not found in {source_path}; available splits: {available}",
        f"{key_prefix}.split",
        f"set {key_prefix}.split to one of: {', '.join(splits) or '(none)'}",
    )


def _load_dataset_dict(
    path: str,
    split: str,
    name: str | None,
    *,
    hub: bool,
    key_prefix: str,
    display: str | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """load_dataset for Hub ids and Hub-layout / image folders, with every failure turned into a UserError.

    ``path`` goes to load_dataset (a builder name such as "imagefolder" for some kinds); ``display`` is
    what the user wrote, for the messages.
    """
    where = f"{key_prefix}.path"
    display = display or path
    try:
        loaded = datasets.load_dataset(path, name, **kwargs)
    except UserError:
        raise
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # datasets cannot build an empty split
            raise UserError(
                f"a split of {display} has no rows: {_one_line(exc)}",
                f"{key_prefix}.path / {key_prefix}.split",
                "point it to a split that contains images",
            ) from None
        if name is not None and "BuilderConfig" in str(exc):
            raise UserError(
                f"configuration '{name}' not found for dataset '{display}': {_one_line(exc)}",
                f"{key_prefix}.name",
                f"set {key_prefix}.name to one of the available configurations, or remove it",
            ) from None
        raise _load_error(display, exc, hub=hub, where=where) from None
    except Exception as exc:  # noqa: BLE001 - any library failure here is about the user's path/id/network
        raise _load_error(display, exc, hub=hub, where=where) from None
    if isinstance(loaded, datasets.Dataset):  # a loader that ignores splits; treat it as the only one
        return loaded
    if split in loaded or not any(c in split for c in "[+"):
        return _pick_split(loaded, split, display, key_prefix)
    # Split expressions such as "train[:10%]" are understood by load_dataset itself (served from its cache).
    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"cannot select split '{split}' of {display}: {_one_line(exc)}",
            f"{key_prefix}.split",
            f"set {key_prefix}.split to one of: {', '.join(loaded)} (optionally sliced, e.g. train[:10%])",
        ) from None


def _load_error(path: str, exc: BaseException, *, hub: bool, where: str) -> UserError:
    if hub:
        return UserError(
            f"cannot load dataset '{path}' from the Hugging Face Hub: {_one_line(exc)}",
            where,
            f"check the id and your network, or point {where} to a local copy",
        )
    return UserError(
        f"cannot load the dataset in '{path}': {_one_line(exc)}",
        where,
        "point it to a folder of parquet/arrow/csv/json files, a save_to_disk folder, "
        "or a folder of class sub-folders of images",
    )


def _saved_without_rows(root: Path) -> bool:
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _open_saved(root: Path, path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    if name is not None:
        raise UserError(
            f"'{path}' is a save_to_disk folder, which has no named configurations",
            f"{key_prefix}.name",
            f"remove {key_prefix}.name",
        )
    if _saved_without_rows(root):
        # datasets writes such a folder but cannot read it back (it indexes the first of zero shards).
        raise UserError(
            f"dataset split {_source(path, split, name)} has no rows",
            f"{key_prefix}.path / {key_prefix}.split",
            "point it to a split that contains images",
        )
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:  # noqa: BLE001 - a damaged or incompatible folder is the user's to fix
        raise UserError(
            f"cannot read the save_to_disk folder '{path}': {_one_line(exc)}",
            f"{key_prefix}.path",
            "re-create it with Dataset.save_to_disk / DatasetDict.save_to_disk",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, path, key_prefix)
    # A single saved Dataset is one split. If it remembers which one, refuse a different name so that
    # evaluating on "test" never silently reads a saved train split; an anonymous one serves any name.
    stored = loaded.split
    if stored is not None and str(stored) != split:
        raise UserError(
            f"'{path}' holds a single saved split '{stored}', not '{split}'",
            f"{key_prefix}.split",
            f"set {key_prefix}.split: {stored}, "
            f"or point {key_prefix}.path to the folder of the '{split}' split",
        )
    return loaded


def open_split(
    path: str, split: str, name: str | None = None, *, key_prefix: str = "data"
) -> datasets.Dataset:
    """Open (not decode) one split of a dataset.

    ``path`` may be a Hub id ("uoft-cs/cifar10"), a local folder in Hub layout (data files such as
    parquet), a ``save_to_disk`` folder (Dataset or DatasetDict), an image folder (class sub-folders of
    image files) or :data:`BUILTIN_DIGITS`. ``key_prefix`` names the recipe section in error messages
    ("data", "eval.data", ...).
    """
    if path.startswith("builtin:"):
        if path not in _BUILTINS:
            raise UserError(
                f"unknown built-in dataset '{path}'",
                f"{key_prefix}.path",
                f"use one of: {', '.join(_BUILTINS)}, or a Hub id / local folder",
            )
        if name is not None:
            raise UserError(
                f"built-in dataset '{path}' has no named configurations", f"{key_prefix}.name",
                f"remove {key_prefix}.name",
            )
        return _pick_split(_digits_dataset_dict(), split, path, key_prefix)

    local = Path(path).expanduser()
    if not local.exists():
        if _looks_local(path):
            raise UserError(
                "dataset path not found",
                f"{key_prefix}.path: {path}",
                "check the path, or give a Hub dataset id like uoft-cs/cifar10",
            )
        return _load_dataset_dict(path, split, name, hub=True, key_prefix=key_prefix)

    if local.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
        kind = builder.get(local.suffix.lower())
        if kind is None:
            raise UserError(
                f"'{path}' is a file, not a dataset",
                f"{key_prefix}.path",
                "point it to a dataset folder, a parquet/arrow/csv/json file, or a Hub id",
            )
        # A lone data file has no split names; expose it under the requested one.
        return _load_dataset_dict(
            kind, split, name, hub=False, key_prefix=key_prefix, display=path, data_files={split: str(local)}
        )

    if (local / "dataset_dict.json").is_file() or (
        (local / "state.json").is_file() and (local / "dataset_info.json").is_file()
    ):
        return _open_saved(local, path, split, name, key_prefix)

    has_data, has_images = _scan_folder(local)
    if has_images and not has_data:
        if name is not None:
            raise UserError(
                f"'{path}' is an image folder, which has no named configurations",
                f"{key_prefix}.name",
                f"remove {key_prefix}.name",
            )
        return _load_dataset_dict(
            "imagefolder", split, None, hub=False, key_prefix=key_prefix, display=path, data_dir=str(local)
        )
    if not has_data:
        raise UserError(
            f"no data files or images found in '{path}'",
            f"{key_prefix}.path",
            "point it to a folder of parquet/arrow/csv/json files, a save_to_disk folder, "
            "or a folder of class sub-folders of images",
        )
    return _load_dataset_dict(str(local), split, name, hub=False, key_prefix=key_prefix, display=path)


# ------------------------------------------------------------------------------------------- columns


def _describe(feature: Any) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel, {feature.num_classes} classes"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return f"{type(feature).__name__}{tuple(feature.shape)} {feature.dtype}"
    return type(feature).__name__


def _list_depth_and_leaf(feature: Any) -> tuple[int, Any]:
    depth = 0
    while isinstance(feature, (datasets.List, datasets.Sequence, list)):
        feature = feature[0] if isinstance(feature, list) else feature.feature
        depth += 1
    return depth, feature


def _is_int_dtype(dtype: str) -> bool:
    return dtype.startswith(("uint", "int"))


def _is_image_feature(feature: Any) -> bool:
    """An Image feature, or an integer pixel array (H×W, H×W×C or C×H×W) of 8-bit values."""
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return _is_int_dtype(feature.dtype)
    depth, leaf = _list_depth_and_leaf(feature)
    return depth in (2, 3) and isinstance(leaf, datasets.Value) and _is_int_dtype(leaf.dtype)


def _is_label_feature(feature: Any) -> bool:
    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and (
        _is_int_dtype(feature.dtype) or feature.dtype in ("string", "large_string", "bool")
    )


def detect_columns(
    ds: datasets.Dataset,
    image_column: str | None,
    label_column: str | None,
    where: str,
    *,
    key_prefix: str = "data",
) -> tuple[str, str | None]:
    """Pick the image and label columns of ``ds``; ``where`` names the dataset (e.g. "path:split").

    Image column: the given one (an Image feature or an integer pixel array), else the unique Image
    feature. Label column: the given one, else the unique ClassLabel feature, else None.
    """
    features = ds.features
    present = ", ".join(f"'{k}' ({_describe(v)})" for k, v in features.items()) or "none"
    names = ", ".join(features) or "(none)"

    if image_column is not None:
        if image_column not in features:
            raise UserError(
                f"image column '{image_column}' not found in {where}; columns present: {present}",
                f"{key_prefix}.image_column",
                f"set {key_prefix}.image_column to one of: {names}",
            )
        if not _is_image_feature(features[image_column]):
            raise UserError(
                f"column '{image_column}' in {where} holds {_describe(features[image_column])}, not images",
                f"{key_prefix}.image_column",
                f"set {key_prefix}.image_column to a column of type Image or of uint8 pixel arrays",
            )
        image = image_column
    else:
        candidates = [k for k, v in features.items() if isinstance(v, datasets.Image)]
        if not candidates:
            raise UserError(
                f"no image column in {where}; columns present: {present}",
                f"{key_prefix}.image_column",
                f"set {key_prefix}.image_column to the column that holds the images",
            )
        if len(candidates) > 1:
            listed = ", ".join(f"'{c}'" for c in candidates)
            raise UserError(
                f"several image columns in {where}: {listed}",
                f"{key_prefix}.image_column",
                f"set {key_prefix}.image_column to one of: {', '.join(candidates)}",
            )
        image = candidates[0]

    if label_column is not None:
        if label_column not in features:
            raise UserError(
                f"label column '{label_column}' not found in {where}; columns present: {present}",
                f"{key_prefix}.label_column",
                f"set {key_prefix}.label_column to one of: {names}",
            )
        if label_column == image:
            raise UserError(
                f"column '{label_column}' in {where} is the image column, it cannot also be the labels",
                f"{key_prefix}.label_column",
                f"set {key_prefix}.label_column to the column that holds the class ids",
            )
        if not _is_label_feature(features[label_column]):
            raise UserError(
                f"column '{label_column}' in {where} holds {_describe(features[label_column])}, "
                "not class labels",
                f"{key_prefix}.label_column",
                f"set {key_prefix}.label_column to a ClassLabel, integer or string column",
            )
        return image, label_column

    class_labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel) and k != image]
    if len(class_labels) > 1:
        listed = ", ".join(f"'{c}'" for c in class_labels)
        raise UserError(
            f"several ClassLabel columns in {where}: {listed}",
            f"{key_prefix}.label_column",
            f"set {key_prefix}.label_column to one of: {', '.join(class_labels)}",
        )
    return image, (class_labels[0] if class_labels else None)


# -------------------------------------------------------------------------------------------- labels


def _read_labels(
    ds: datasets.Dataset, column: str, where: str, key_prefix: str
) -> tuple[torch.Tensor, int, list[str] | None]:
    feature = ds.features[column]
    array = ds.select_columns([column]).with_format("arrow")[:].column(column)
    key = f"{where}, {key_prefix}.label_column: {column}"
    if array.null_count:
        first = next(i for i, v in enumerate(array.is_null().to_pylist()) if v)
        raise UserError(
            f"{array.null_count} rows of label column '{column}' are empty (first: row {first})",
            key,
            f"fill in the labels, or set {key_prefix}.label_column to a complete column",
        )

    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # Free-text labels get the ids of their sorted names, the same rule imagefolder uses for folders.
        values = array.to_pylist()
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return torch.tensor([index[v] for v in values], dtype=torch.int64), len(names), names

    labels = np.asarray(array.to_numpy(zero_copy_only=False)).astype(np.int64, copy=False)
    if isinstance(feature, datasets.ClassLabel):
        num_classes, names = feature.num_classes, list(feature.names)
    else:
        num_classes = int(labels.max()) + 1 if labels.size else 0
        names = None
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row, value = int(bad[0]), int(labels[bad[0]])
        what = (
            f"label {value} in row {row} of column '{column}' is outside 0..{num_classes - 1}"
            if isinstance(feature, datasets.ClassLabel)
            else f"label {value} in row {row} of column '{column}' is negative"
        )
        if value == -1:
            what += " (-1 marks a missing label)"
        if bad.size > 1:
            what += f"; {bad.size} bad rows in all"
        raise UserError(
            what,
            key,
            f"fix the labels, or set {key_prefix}.label_column to the column that holds the class ids",
        )
    return torch.from_numpy(np.array(labels, dtype=np.int64)), num_classes, names


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
    return UserError(
        f"{what}: {_one_line(exc)}",
        f"{where}, {key}",
        "fix or remove that image, or set the image column to the right column",
    )


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


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UserError(
            f"image resolution must be a positive integer, got {resolution!r}",
            "resolution",
            "set it to the encoder's input size, e.g. 32",
        )


def load_images(
    path: str,
    split: str,
    *,
    resolution: int,
    name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    key_prefix: str = "data",
) -> ImageData:
    """Open a split, detect its columns and decode every image once to uint8 ``[N, 3, R, R]``.

    Non-RGB images are converted to RGB; images of another size are resized (bicubic, shorter side to
    R, centre crop). ``max_samples`` keeps the first rows.
    """
    _check_resolution(resolution)
    source = _source(path, split, name)
    with _datasets_progress(progress):
        ds = open_split(path, split, name, key_prefix=key_prefix)
    image, label = detect_columns(ds, image_column, label_column, source, key_prefix=key_prefix)

    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise UserError(
                f"max_samples must be a positive integer, got {max_samples!r}",
                f"{key_prefix}.max_samples",
                f"set {key_prefix}.max_samples to a number of rows, or remove it to use all",
            )
        if max_samples < len(ds):
            ds = ds.select(range(max_samples))
    if len(ds) == 0:
        raise UserError(
            f"dataset split {source} has no rows",
            f"{key_prefix}.path / {key_prefix}.split",
            "point it to a split that contains images",
        )

    labels = num_classes = class_names = None
    if label is not None:
        # Labels first: a bad label should fail in a second, not after minutes of decoding.
        labels, num_classes, class_names = _read_labels(ds, label, source, key_prefix)

    n = len(ds)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    bar = (
        tqdm(total=n, desc=f"decoding {source}", unit="img", dynamic_ncols=True)
        if progress and n > _PROGRESS_MIN_ROWS
        else None
    )
    try:
        decode = (
            _decode_image_column if isinstance(ds.features[image], datasets.Image) else _decode_array_column
        )
        decode(ds, image, resolution, out, bar, source, key_prefix)
    finally:
        if bar is not None:
            bar.close()

    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageData(
        images=images,
        labels=labels,
        num_classes=num_classes,
        class_names=class_names,
        image_column=image,
        label_column=label,
        source=source,
    )


def check_dataset(
    path: str,
    split: str,
    *,
    name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    key_prefix: str = "data",
) -> tuple[str, str | None]:
    """Validate a dataset reference cheaply: open the split, detect the columns, decode the first image
    and check the labels (an Arrow scan, no image decoding). Returns (image column, label column)."""
    source = _source(path, split, name)
    ds = open_split(path, split, name, key_prefix=key_prefix)
    image, label = detect_columns(ds, image_column, label_column, source, key_prefix=key_prefix)
    if len(ds) == 0:
        raise UserError(
            f"dataset split {source} has no rows",
            f"{key_prefix}.path / {key_prefix}.split",
            "point it to a split that contains images",
        )
    probe = np.empty((1, 8, 8, 3), dtype=np.uint8)
    first = ds.select(range(1))
    if isinstance(ds.features[image], datasets.Image):
        _decode_image_column(first, image, 8, probe, None, source, key_prefix)
    else:
        _decode_array_column(first, image, 8, probe, None, source, key_prefix)
    if label is not None:
        _read_labels(ds, label, source, key_prefix)
    return image, label


# ------------------------------------------------------------------------------------- builtin:digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digits (values 0..16) and their targets, as sklearn.datasets.load_digits returns them."""
    # Reading the CSV bundled with scikit-learn directly skips importing sklearn.datasets (~1.5 s of scipy).
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def _stratified_split(targets: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts (largest-remainder rounding)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    exact = counts * test_size / len(targets)
    take = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - take), kind="stable")[: test_size - int(take.sum())]:
        take[k] += 1
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    train = np.setdiff1d(np.arange(len(targets)), test)
    return rng.permutation(train), rng.permutation(test)


@functools.lru_cache(maxsize=1)
def _digits_dataset_dict() -> datasets.DatasetDict:
    """scikit-learn's 1,797 real 8×8 digits as a normal Image/ClassLabel dataset (no download needed)."""
    images, targets = _digits_arrays()
    # Pixel values are 0..16 counts; stretch them to 8-bit grayscale so the usual pipeline applies.
    pixels = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    # Shuffled, so that max_samples takes a class-balanced prefix; fixed seed, so every run sees one split.
    train_idx, test_idx = _stratified_split(targets, test_size=360, seed=0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def build(indices: np.ndarray, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "image": [PIL.Image.fromarray(pixels[i]) for i in indices],
                "label": [int(targets[i]) for i in indices],
            },
            features=features,
            split=datasets.NamedSplit(split),
        )

    return datasets.DatasetDict({"train": build(train_idx, "train"), "test": build(test_idx, "test")})
