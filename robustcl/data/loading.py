"""Decode a dataset split once into a uint8 tensor: column detection, label reading and :class:`ImageData`.

Pre-training re-reads every image many times per epoch, so the whole split is decoded up front to
``uint8 [N, 3, R, R]`` (50k CIFAR-sized images are 150 MB) and augmentation then works on tensors.

Opening the split (Hub id, local folder, save_to_disk folder, image folder, single data file or
:data:`BUILTIN_DIGITS`) is :mod:`robustcl.data.sources`; turning its image column into pixels is
:mod:`robustcl.data.decode`.  Everything the user can get wrong surfaces as a one-line
:class:`~robustcl.errors.UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from robustcl.data.builtin import BUILTIN_DIGITS
from robustcl.data.decode import _decode_array_column, _decode_image_column
from robustcl.data.sources import _datasets_progress, _source, open_split
from robustcl.errors import UserError

if TYPE_CHECKING:
    from robustcl.recipe import DataConfig

__all__ = [
    "BUILTIN_DIGITS",
    "ImageData",
    "check_dataset",
    "detect_columns",
    "load_images",
    "load_pretraining_images",
    "open_split",
]

# Below this many rows a bar would flash by and only clutter the log.
_PROGRESS_MIN_ROWS = 5000


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

    def require_present(kind: str, column: str) -> None:
        if column not in features:
            raise UserError(
                f"{kind} column '{column}' not found in {where}; columns present: {present}",
                f"{key_prefix}.{kind}_column",
                f"set {key_prefix}.{kind}_column to one of: {names}",
            )

    if image_column is not None:
        require_present("image", image_column)
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
        require_present("label", label_column)
        if label_column == image:
            raise UserError(
                f"column '{label_column}' in {where} is the image column, it cannot also be the labels",
                f"{key_prefix}.label_column",
                f"set {key_prefix}.label_column to the column that holds the class ids",
            )
        if not _is_label_feature(features[label_column]):
            raise UserError(
                f"column '{label_column}' in {where} holds {_describe(features[label_column])}, not class labels",
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


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UserError(
            f"image resolution must be a positive integer, got {resolution!r}",
            "resolution",
            "set it to the encoder's input size, e.g. 32",
        )


def _require_rows(ds: datasets.Dataset, source: str, key_prefix: str) -> None:
    if len(ds) == 0:
        raise UserError(
            f"dataset split {source} has no rows",
            f"{key_prefix}.path / {key_prefix}.split",
            "point it to a split that contains images",
        )


def _decoder_for(ds: datasets.Dataset, image: str):
    """Image features decode through PIL; pixel-array columns are copied (and range-checked) as they are."""
    return _decode_image_column if isinstance(ds.features[image], datasets.Image) else _decode_array_column


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
    _require_rows(ds, source, key_prefix)

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
        _decoder_for(ds, image)(ds, image, resolution, out, bar, source, key_prefix)
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
    _require_rows(ds, source, key_prefix)
    probe = np.empty((1, 8, 8, 3), dtype=np.uint8)
    first = ds.select(range(1))
    _decoder_for(ds, image)(first, image, 8, probe, None, source, key_prefix)
    if label is not None:
        _read_labels(ds, label, source, key_prefix)
    return image, label


def load_pretraining_images(data: DataConfig, progress: bool = True) -> ImageData:
    """A recipe's pretraining split (its ``data`` section), decoded as ``robustcl pretrain`` trains on it; AdvCL's
    pseudo-labels are computed on exactly these images."""
    return load_images(
        data.path,
        data.split,
        resolution=data.resolution,
        name=data.name,
        image_column=data.image_column,
        label_column=data.label_column,
        max_samples=data.max_samples,
        progress=progress,
    )
