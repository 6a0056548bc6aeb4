"""Common-corruption accuracy (CIFAR-10-C style): the finetuned classifier's clean accuracy on a corrupted copy of the
test images, per corruption × severity 1..5, with the means the RobustSSL benchmark reports.

The figures follow GodXuxilie/RobustSSL_Benchmark, Finetuning_Methods/Vanilla_Finetuning/utils.py (``eval_test_OOD``):
the accuracy of each (corruption, severity); per severity, the mean over the corruptions; and, as the headline, the
mean of those five per-severity means. The benchmark reads CIFAR-10-C's ``.npy`` files through robustbench (15
corruptions of 10,000 images each). Here the corrupted set is any dataset laid out as CIFAR-10-C is on the Hub
(randall-lab/cifar10-c): one split with a row per image × corruption × severity and columns naming each row's
corruption and severity (``eval.corruptions``), opened like every other split.

Labels are numbered by the training split's classes, as the test split's are, with one allowance: bare integer labels
(CIFAR-10-C's ``labels.npy``, in CIFAR-10's test order) are matched by value to a training split with class names.

The rows are measured by :func:`~robustcl.evaluation.measure.measure` (clean accuracy, no attack): under several
processes each process decodes and classifies the rows of its own batches, and the per-row results are gathered in
row order. They stay encoded until then: each row is read once, so decoding the set up front would only cost memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..data.labels import read_labels
from ..data.loading import OpenedSplit, open_images
from ..errors import UserError, one_line, shown
from ..eval_report import CorruptionFigures
from ..recipe import Recipe
from .measure import measure

KEY = "eval.corruptions"
SEVERITIES = (1, 2, 3, 4, 5)  # CIFAR-10-C's levels
REFERENCE = "GodXuxilie/RobustSSL_Benchmark Finetuning_Methods/Vanilla_Finetuning/utils.py (eval_test_OOD)"


@dataclass
class _Classes:
    """The training split's classes, as :func:`read_labels` numbers another split's labels by them."""

    class_names: list[str] | None
    source: str


@dataclass
class CorruptedSet:
    """The corrupted split opened and checked, nothing decoded."""

    opened: OpenedSplit
    labels: torch.Tensor  # int64 [N], the training split's class ids
    names: list[str]  # the corruptions, in the order they first appear
    codes: np.ndarray  # int64 [N]: each row's corruption, an index into ``names``
    severities: np.ndarray  # int64 [N], 1..5
    num_classes: int  # the training split's: the classifier's outputs


def _arrow(ds: datasets.Dataset, column: str) -> Any:
    return ds.select_columns([column]).with_format("arrow")[:].column(column)


def _kind(feature: Any) -> str:
    return feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__


def _split_row(opened: OpenedSplit, row: int) -> int:
    """A row's number in the split (a ``max_samples`` subset keeps only some rows)."""
    return int(opened.source_rows[row]) if opened.source_rows is not None else row


def _require_column(opened: OpenedSplit, column: str, field: str) -> None:
    features = opened.ds.features
    if column not in features:
        names = ", ".join(features)
        raise UserError(
            f"column {shown(column)} not found in {opened.source}; columns present: {names}",
            f"{KEY}.{field}",
            f"set {KEY}.{field} to one of: {names}",
        )


def _no_nulls(opened: OpenedSplit, column: str, array: Any, field: str) -> None:
    if array.null_count:
        first = next(i for i, v in enumerate(array.is_null().to_pylist()) if v)
        raise UserError(
            f"{array.null_count} rows of column '{column}' in {opened.source} are empty (first: row "
            f"{_split_row(opened, first)})",
            f"{KEY}.{field}",
            f"fill them in, or set {KEY}.{field} to a complete column",
        )


def _corruption_codes(opened: OpenedSplit, column: str) -> tuple[list[str], np.ndarray]:
    """Each row's corruption as an index into the corruption names (in the order they first appear)."""
    field, feature = "corruption_column", opened.ds.features[column]
    array = _arrow(opened.ds, column)
    _no_nulls(opened, column, array, field)
    values = array.to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.names[v] for v in values]
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "string", "large_string")):
        values = [str(v) for v in values]
    else:
        raise UserError(
            f"column '{column}' in {opened.source} holds {_kind(feature)}, not corruption names",
            f"{KEY}.{field}",
            f"set {KEY}.{field} to the column that names each row's corruption",
        )
    index = {name: i for i, name in enumerate(dict.fromkeys(values))}
    return list(index), np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))


def _keep(opened: OpenedSplit, names: list[str], codes: np.ndarray, wanted: list[str] | None):
    """Only the rows of the ``wanted`` corruptions (all when None), in that order."""
    if wanted is None:
        return opened, names, codes
    missing = [w for w in wanted if w not in names]
    if missing:
        raise UserError(
            f"corruption {shown(missing[0])} is not in {opened.source} (it holds: {one_line(', '.join(names))})",
            f"{KEY}.corruptions",
            f"name corruptions the data holds, or remove {KEY}.corruptions to measure every one",
        )
    chosen = list(dict.fromkeys(wanted))
    rows = np.flatnonzero(np.isin(codes, [names.index(w) for w in chosen]))
    source_rows = opened.source_rows[rows] if opened.source_rows is not None else rows
    kept = replace(opened, ds=opened.ds.select(rows), source_rows=source_rows)
    recode = np.array([chosen.index(n) if n in chosen else -1 for n in names], dtype=np.int64)
    return kept, chosen, recode[codes[rows]]


def _severities(opened: OpenedSplit, column: str) -> np.ndarray:
    field, feature = "severity_column", opened.ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise UserError(
            f"column '{column}' in {opened.source} holds {_kind(feature)}, not severities 1..5",
            f"{KEY}.{field}",
            f"set {KEY}.{field} to the integer column of each row's severity",
        )
    array = _arrow(opened.ds, column)
    _no_nulls(opened, column, array, field)
    values = np.asarray(array.to_numpy(zero_copy_only=False))
    bad = np.flatnonzero((values < SEVERITIES[0]) | (values > SEVERITIES[-1]))
    if bad.size:
        row = int(bad[0])
        raise UserError(
            f"severity {int(values[row])} in row {_split_row(opened, row)} of column '{column}' in {opened.source} "
            f"is outside 1..5" + (f"; {bad.size:,} such rows in all" if bad.size > 1 else ""),
            f"{KEY}.{field}",
            f"keep CIFAR-10-C's severities 1..5, or set {KEY}.{field} to the column that holds them",
        )
    return values.astype(np.int64)


def _labels(opened: OpenedSplit, classes: _Classes, num_classes: int, own_columns: tuple[str, str]) -> torch.Tensor:
    column = opened.label_column
    if column is None:
        raise UserError(
            f"the corrupted set {opened.source} has no label column",
            f"{KEY}.label_column",
            f"name it with --set {KEY}.label_column=NAME (randall-lab/cifar10-c: label)",
        )
    if column in own_columns:  # auto-detected: the only ClassLabel column was the corruption's
        raise UserError(
            f"the label column of {opened.source} was taken to be '{column}', which names the corruptions",
            f"{KEY}.label_column",
            f"name the class-label column with --set {KEY}.label_column=NAME",
        )
    labels, _, names = read_labels(opened.ds, column, opened.source, KEY)
    if names is not None or classes.class_names is None:
        labels, _, _ = read_labels(opened.ds, column, opened.source, KEY, classes_from=classes)
    if int(labels.max()) >= num_classes:
        raise UserError(
            f"{opened.source} has labels the training split does not ({int(labels.max())} ≥ {num_classes})",
            f"{KEY}.label_column",
            "use a corrupted copy of the evaluation's own test set",
        )
    return labels


def open_corruptions(recipe: Recipe, classes: dict[str, Any], progress: bool = False) -> CorruptedSet | None:
    """``eval.corruptions`` opened and checked (columns, corruption names, severities 1..5, labels numbered by the
    training split's ``classes``: its ``source``, ``class_names`` and ``num_classes``); None when it is not set."""
    c, e, d = recipe.eval.corruptions, recipe.eval.data, recipe.data
    if c.path is None:
        return None
    opened = open_images(
        c.path, c.split, resolution=e.resolution or d.resolution, name=c.name, image_column=c.image_column,
        label_column=c.label_column, max_samples=c.max_samples, progress=progress, key_prefix=KEY,
        center_crop=e.center_crop,
    )  # fmt: skip
    _require_column(opened, c.corruption_column, "corruption_column")
    _require_column(opened, c.severity_column, "severity_column")
    names, codes = _corruption_codes(opened, c.corruption_column)
    opened, names, codes = _keep(opened, names, codes, c.corruptions)
    severities = _severities(opened, c.severity_column)
    reference = _Classes(classes["class_names"], classes["source"])
    labels = _labels(opened, reference, classes["num_classes"], (c.corruption_column, c.severity_column))
    return CorruptedSet(opened, labels, names, codes, severities, classes["num_classes"])


def corruption_report(corrupted: CorruptedSet, correct: torch.Tensor) -> CorruptionFigures:
    """The figures of the per-row results ``correct`` (1 right, 0 wrong, in row order): accuracy and images per
    corruption × severity, the mean per severity (over the corruptions) and per corruption (over its severities), and
    ``mean``, the benchmark's headline: the mean of the per-severity means."""
    levels = len(SEVERITIES)
    cell_of = corrupted.codes * levels + (corrupted.severities - SEVERITIES[0])
    size = len(corrupted.names) * levels
    right = np.bincount(cell_of, weights=correct.numpy().astype(np.float64), minlength=size)
    count = np.bincount(cell_of, minlength=size)
    accuracy: dict[str, dict[str, float]] = {}
    images: dict[str, dict[str, int]] = {}
    for code, name in enumerate(corrupted.names):
        for s in SEVERITIES:
            cell = code * levels + s - SEVERITIES[0]
            if count[cell]:
                accuracy.setdefault(name, {})[str(s)] = float(right[cell] / count[cell])
                images.setdefault(name, {})[str(s)] = int(count[cell])
    by_severity = {}
    for s in map(str, SEVERITIES):
        found = [cells[s] for cells in accuracy.values() if s in cells]
        if found:
            by_severity[s] = float(np.mean(found))
    o = corrupted.opened
    return CorruptionFigures(
        source=o.source,
        columns={"image": o.image_column, "label": o.label_column},
        images=len(corrupted.labels),
        accuracy=accuracy,
        images_per_cell=images,
        severity_mean=by_severity,
        corruption_mean={name: float(np.mean(list(cells.values()))) for name, cells in accuracy.items()},
        mean=float(np.mean(list(by_severity.values()))),
        reference=REFERENCE,
    )


def measure_corruptions(
    classifier: nn.Module,
    corrupted: CorruptedSet | None,
    recipe: Recipe,
    accelerator: Accelerator,
    progress: bool = True,
) -> CorruptionFigures | None:
    """The classifier's accuracy on the corrupted set ``open_corruptions`` opened (see :func:`corruption_report`),
    None when there is none."""
    if corrupted is None:
        return None
    clean_only = recipe.eval.attack.model_copy(update={"curve_epsilons": []})
    measured = measure(
        classifier,
        corrupted.opened.encoded(),
        corrupted.labels,
        clean_only,
        [],
        accelerator,
        num_classes=corrupted.num_classes,
        seed=recipe.eval.seed,
        progress=progress,
    )
    return corruption_report(corrupted, measured.clean)


def corruption_lines(figures: CorruptionFigures | None) -> list[str]:
    """The report's corruption figures as lines of ``format_table``: a row per corruption, a column per severity."""
    if not figures:
        return []

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    accuracy = figures.accuracy
    width = max(len("corruption"), *(len(one_line(name)) for name in accuracy))

    def row(name: str, values: list[float | None], mean: float | None) -> str:
        return "    " + " ".join([f"{name:<{width}}", *(f"{pct(v):>7}" for v in values), f"{pct(mean):>7}"])

    header = "    " + " ".join([f"{'corruption':<{width}}", *(f"{s:>7}" for s in SEVERITIES), f"{'mean':>7}"])
    lines = [
        f"  common corruptions: {one_line(figures.source)}, {figures.images} images; mean {pct(figures.mean)}"
        f" (over severities, of the mean over {len(accuracy)} corruptions)",
        header,
    ]
    for name, cells in accuracy.items():
        values = [cells.get(str(s)) for s in SEVERITIES]
        lines.append(row(one_line(name), values, figures.corruption_mean[name]))
    by_severity = [figures.severity_mean.get(str(s)) for s in SEVERITIES]
    lines.append(row("mean", by_severity, figures.mean))
    return lines
