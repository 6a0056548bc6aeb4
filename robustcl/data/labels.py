"""Class labels of a split: the label column read as int64 ids, range- and count-checked, and numbered by another
split's class names where asked (a test split by its training split's)."""

from __future__ import annotations

from typing import Any, Protocol

import datasets
import numpy as np
import torch

from robustcl.errors import UserError


class NamedClasses(Protocol):
    """A split whose class ids another split's labels are numbered by (e.g. a loaded training split)."""

    class_names: list[str] | None
    source: str


# Most classes a label column may define. A head has one output per class, so label ids that were never renumbered
# (1e12, or 3 distinct values up to 3,000,000) would build a head of gigabytes; ImageNet-21k, the largest common
# label set, has 21,841 classes.
MAX_CLASSES = 100_000


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
    ids: np.ndarray,
    names: list[str] | None,
    num_classes: int,
    reference: NamedClasses,
    column: str,
    where: str,
    key: str,
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


def read_labels(
    ds: datasets.Dataset, column: str, where: str, key_prefix: str, classes_from: NamedClasses | None = None
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
