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
from robustcl.fingerprint import dataset_fingerprint
from robustcl.memory import check_fits_in_memory

if TYPE_CHECKING:
    from robustcl.recipe import DataConfig

__all__ = [
    "BUILTIN_DIGITS",
    "MAX_CLASSES",
    "ImageData",
    "check_dataset",
    "detect_columns",
    "load_images",
    "load_pretraining_images",
    "open_split",
]

# Below this many rows a bar would flash by and only clutter the log.
_PROGRESS_MIN_ROWS = 5000

# Most classes a label column may define. A head has one output per class, so label ids that were never renumbered
# (1e12, or 3 distinct values up to 3,000,000) would build a head of gigabytes; ImageNet-21k, the largest common
# label set, has 21,841 classes.
MAX_CLASSES = 100_000


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
    fingerprint: dict[str, Any]  # what identifies the split cheaply (fingerprint.dataset_fingerprint)


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


def _shown_names(names: list[str], limit: int = 10) -> str:
    """Class names as a one-line message lists them: quoted (control characters escaped), the first ``limit``."""
    shown = ", ".join(repr(n) if len(n) <= 40 else repr(n[:39]) + "…" for n in names[:limit])
    return shown + (f", … ({len(names):,} in all)" if len(names) > limit else "")


def _check_class_count(num_classes: int, what: str, key: str, fix: str) -> None:
    if num_classes > MAX_CLASSES:
        raise UserError(f"{what}, more than the {MAX_CLASSES:,} classes robustcl allows", key, fix)


def _string_labels(array: Any) -> tuple[np.ndarray, int, list[str]]:
    # Free-text labels get the ids of their sorted names, the same rule imagefolder uses for folders.
    values = array.to_pylist()
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), len(names), names


def _integer_labels(
    array: Any, feature: Any, column: str, key: str, key_prefix: str
) -> tuple[np.ndarray, int, list[str] | None]:
    """ClassLabel ids or plain integers, range-checked in their own signedness (a uint64 2**64-1 read as int64 would
    show as -1) and before anything is sized by them."""
    values = np.asarray(array.to_numpy(zero_copy_only=False))
    values = values.astype(np.uint64 if values.dtype.kind == "u" else np.int64, copy=False)
    class_label = isinstance(feature, datasets.ClassLabel)
    bad = (values < 0) | (values >= feature.num_classes) if class_label else values < 0
    bad = np.flatnonzero(bad)
    if bad.size:
        row, value = int(bad[0]), int(values[bad[0]])
        what = f"label {value} in row {row} of column '{column}' is " + (
            f"outside 0..{feature.num_classes - 1}" if class_label else "negative"
        )
        if value == -1:
            what += " (-1 marks a missing label)"
        if bad.size > 1:
            what += f"; {bad.size} bad rows in all"
        raise UserError(
            what, key, f"fix the labels, or set {key_prefix}.label_column to the column that holds the class ids"
        )
    if class_label:
        _check_class_count(
            feature.num_classes,
            f"ClassLabel column '{column}' has {feature.num_classes:,} classes",
            key,
            "use a label column with fewer classes",
        )
        return values.astype(np.int64), feature.num_classes, list(feature.names)
    row = int(values.argmax())
    top = int(values[row])
    _check_class_count(
        top + 1,
        f"label {top} in row {row} of column '{column}' would make {top + 1:,} classes "
        f"({np.unique(values).size:,} distinct labels)",
        key,
        f"renumber the labels 0..K-1, or make {key_prefix}.label_column a ClassLabel or string column",
    )
    return values.astype(np.int64), top + 1, None


def _renumber(
    ids: np.ndarray, names: list[str] | None, num_classes: int, reference: ImageData, column: str, where: str, key: str
) -> tuple[np.ndarray, int, list[str] | None]:
    """Labels numbered by ``reference``'s class names (its ids are the ones a head trained on it predicts); bare
    integers in both splits are matched by value."""
    if (names is None) != (reference.class_names is None):
        named, bare = (where, reference.source) if names is not None else (reference.source, where)
        raise UserError(
            f"{named} has class names but {bare} only bare integer labels: their classes cannot be matched",
            key,
            "give both splits the same kind of label column: ClassLabel or string names in both, or integers in both",
        )
    if names is None:
        return ids, num_classes, None
    index = {name: i for i, name in enumerate(reference.class_names)}
    mapped = np.array([index.get(name, -1) for name in names], dtype=np.int64)[ids]
    unknown = np.flatnonzero(mapped < 0)
    if unknown.size:
        row = int(unknown[0])
        what = (
            f"class {_shown_names([names[ids[row]]])} in row {row} of column '{column}' is not among the "
            f"{len(index):,} classes of {reference.source} ({_shown_names(reference.class_names)})"
        )
        raise UserError(
            what + (f"; {unknown.size:,} such rows in all" if unknown.size > 1 else ""),
            key,
            f"use a split whose classes all occur in {reference.source}, or remove those rows",
        )
    return mapped, len(reference.class_names), list(reference.class_names)


def _read_labels(
    ds: datasets.Dataset, column: str, where: str, key_prefix: str, classes_from: ImageData | None = None
) -> tuple[torch.Tensor, int, list[str] | None]:
    """The label column as int64 ids, the number of classes and the class names (None for bare integers); with
    ``classes_from``, numbered as that split numbers its classes (see :func:`load_images`)."""
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
        ids, num_classes, names = _string_labels(array)
        _check_class_count(
            num_classes,
            f"column '{column}' has {num_classes:,} distinct labels",
            key,
            "use a column with fewer classes",
        )
    else:
        ids, num_classes, names = _integer_labels(array, feature, column, key, key_prefix)
    if classes_from is not None:
        ids, num_classes, names = _renumber(ids, names, num_classes, classes_from, column, where, key)
    return torch.from_numpy(ids), num_classes, names


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


def _first_rows(ds: datasets.Dataset, max_samples: int | None, max_samples_key: str) -> datasets.Dataset:
    if max_samples is None:
        return ds
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise UserError(
            f"max_samples must be a positive integer, got {max_samples!r}",
            max_samples_key,
            f"set {max_samples_key} to a number of rows, or remove it to use all",
        )
    return ds.select(range(max_samples)) if max_samples < len(ds) else ds


def _check_decoded_size(n: int, resolution: int, source: str, resolution_key: str, max_samples_key: str) -> None:
    # The decoded [N, R, R, 3] array and its channels-first copy are both held while it is reordered.
    check_fits_in_memory(
        2 * n * resolution * resolution * 3,
        f"decoding {n:,} images of {source} at {resolution}×{resolution}",
        f"{resolution_key}, {max_samples_key}",
        f"lower {resolution_key}, or set {max_samples_key} to decode fewer images",
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
    max_samples_key: str | None = None,
    classes_from: ImageData | None = None,
) -> ImageData:
    """Open a split, detect its columns and decode every image once to uint8 ``[N, 3, R, R]``.

    Non-RGB images are converted to RGB; images of another size are resized (bicubic, shorter side to
    R, centre crop). ``max_samples`` keeps the first rows (``max_samples_key`` names its recipe key, by default
    ``<key_prefix>.max_samples``). ``classes_from``, a labelled split loaded before (e.g. the training split of a
    test split), numbers the labels as it does: class names (string or ClassLabel) by its names, refusing a class
    it lacks; bare integers by value. Class names on one side and bare integers on the other are refused.
    """
    _check_resolution(resolution)
    max_samples_key = max_samples_key or f"{key_prefix}.max_samples"
    source = _source(path, split, name)
    with _datasets_progress(progress):
        ds = open_split(path, split, name, key_prefix=key_prefix)
    image, label = detect_columns(ds, image_column, label_column, source, key_prefix=key_prefix)
    ds = _first_rows(ds, max_samples, max_samples_key)
    _require_rows(ds, source, key_prefix)
    n = len(ds)
    _check_decoded_size(n, resolution, source, f"{key_prefix}.resolution", max_samples_key)

    labels = num_classes = class_names = None
    if label is not None:
        # Labels first: a bad label should fail in a second, not after minutes of decoding.
        labels, num_classes, class_names = _read_labels(ds, label, source, key_prefix, classes_from)

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
        fingerprint=dataset_fingerprint(ds, image, label),
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
