"""The downstream splits of an evaluation: opened and labelled without decoding a pixel (what the checks before
pretraining read, :mod:`.preflight`), then decoded or left encoded for finetuning and measurement (:mod:`.run`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..data.labels import read_labels
from ..data.loading import ImageData, OpenedSplit, choose_loading, open_images
from ..errors import UserError
from ..recipe import DataConfig, Recipe
from .finetune import LabelledImages, split_validation
from .rows import HeldRows
from .sharding import owned_rows


@dataclass
class EvalData:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    num_classes: int
    source: dict[str, Any]


# Measured instead of a test split without labels (ImageNet-1k's on the Hub: every label -1).
FALLBACK_TEST_SPLIT = "validation"


@dataclass
class _Split:
    opened: OpenedSplit
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] | None


def _has_labels(opened: OpenedSplit) -> bool:
    """Whether the split has a label column with a value in some row (null, or -1 in every row, means none)."""
    if opened.label_column is None:
        return False
    column = opened.ds.select_columns([opened.label_column]).with_format("arrow")[:].column(opened.label_column)
    if column.null_count == len(column):
        return False
    if pa.types.is_integer(column.type):
        return bool(pc.max(pc.greater_equal(column, 0)).as_py())
    return True


def _labelled(opened: OpenedSplit, classes_from: ImageData | None = None) -> _Split:
    """The split's labels read (numbered as ``classes_from`` numbers its classes), no pixel decoded."""
    if opened.label_column is None:
        raise UserError(
            f"evaluation needs class labels, but {opened.source} has no label column",
            "eval.data.label_column",
            "name the label column with --set eval.data.label_column=NAME",
        )
    labels, num_classes, names = read_labels(opened.ds, opened.label_column, opened.source, "eval.data", classes_from)
    return _Split(opened, labels, num_classes, names)


def _as_reference(split: _Split) -> ImageData:
    """What label numbering (``classes_from``) needs of a split: its class names and where it comes from."""
    o = split.opened
    return ImageData(
        torch.empty(0, dtype=torch.uint8), split.labels, split.num_classes, split.class_names, o.image_column,
        o.label_column, o.source, o.fingerprint,
    )  # fmt: skip


def _open_test(
    open_split: Callable[[str, str], OpenedSplit], test_split: str, train_split: str, dataset: str
) -> tuple[OpenedSplit, str | None]:
    """The split to measure on: ``test_split``, or the validation split when the test split has no labels; with
    the note the report carries when it was replaced."""
    test = open_split(test_split, "eval.data.max_test")
    if _has_labels(test):
        return test, None
    what = f"the '{test_split}' split of {dataset} has no labels"
    fix = "set eval.data.test_split to a labelled split (--set eval.data.test_split=NAME)"
    if FALLBACK_TEST_SPLIT in (test_split, train_split):
        raise UserError(f"{what} to measure on", "eval.data.test_split", fix)
    try:
        fallback = open_split(FALLBACK_TEST_SPLIT, "eval.data.max_test")
    except UserError as err:
        what = f"{what}, and its '{FALLBACK_TEST_SPLIT}' split cannot stand in: {err.what}"
        raise UserError(what, "eval.data.test_split", fix) from None
    if not _has_labels(fallback):
        raise UserError(f"{what}, nor has its '{FALLBACK_TEST_SPLIT}' split", "eval.data.test_split", fix)
    return fallback, f"measured on the '{FALLBACK_TEST_SPLIT}' split: the '{test_split}' split has no labels"


def _loading(data: DataConfig, decoded_bytes: int) -> str:
    """``data.loading`` for an evaluation split: ``auto`` decodes up to ``data.decoded_max_gb`` (the decoding then
    refuses, in one line, what does not fit in memory), and streams beyond."""
    return choose_loading(data, decoded_bytes, processes_on_node=None)


def _train_pixels(train: _Split, data: DataConfig, fraction: float, seed: int, shard: bool, progress: bool):
    """The training split's finetuning and validation parts: decoded (all rows, or with ``shard`` only the rows this
    process owns, see :func:`owned_rows`) when ``data.loading`` allows, else left encoded."""
    encoded = LabelledImages(train.opened.encoded(), train.labels)
    fit, val = split_validation(encoded, fraction, seed)
    if _loading(data, train.opened.decoded_bytes()) == "streamed":
        return fit, val
    if not shard:
        return split_validation(LabelledImages(train.opened.decode(progress), train.labels), fraction, seed)
    held = torch.cat([fit.images.rows[owned_rows(len(fit))], val.images.rows[owned_rows(len(val))]]).sort().values
    part = replace(train.opened, ds=train.opened.ds.select(held.tolist())).decode(progress)
    return split_validation(LabelledImages(HeldRows(part, held), train.labels), fraction, seed)


@dataclass
class OpenedEval:
    """The downstream splits opened and their labels read and checked, no pixel decoded."""

    train: _Split
    test: _Split  # the split measured on: eval.data.test_split, or the validation split standing in for it
    source: dict[str, Any]  # what the report records of the dataset


def _split_key(err: UserError, key: str) -> UserError:
    """``open_images`` names a split ``eval.data.split``; an evaluation reads two: ``train_split``, ``test_split``."""
    generic = "eval.data.split"
    if err.where != generic:
        return err
    return type(err)(err.what, key, (err.fix or "").replace(generic, key))


def open_eval_splits(recipe: Recipe, progress: bool = True) -> OpenedEval:
    """The downstream train and test splits (``eval.data``, or the pretraining dataset when its path is unset)
    opened, their labels read and refused in one line when they cannot be evaluated on: what
    :func:`load_eval_data` decodes, and what pretraining checks before its first step (:mod:`.preflight`)."""
    e, d = recipe.eval.data, recipe.data
    inherited = e.path is None
    path = d.path if inherited else e.path
    common = dict(
        resolution=e.resolution or d.resolution,
        name=d.name if inherited else e.name,
        image_column=d.image_column if inherited else e.image_column,
        label_column=d.label_column if inherited else e.label_column,
        progress=progress,
        key_prefix="eval.data",
        center_crop=e.center_crop,
    )

    def open_split(split: str, max_key: str) -> OpenedSplit:
        train = max_key == "eval.data.max_train"
        limit = e.max_train if train else e.max_test
        try:
            return open_images(path, split, max_samples=limit, max_samples_key=max_key, **common)
        except UserError as err:
            raise _split_key(err, "eval.data.train_split" if train else "eval.data.test_split") from None

    train = _labelled(open_split(e.train_split, "eval.data.max_train"))
    num_classes = train.num_classes
    if num_classes < 2:
        raise UserError(
            f"evaluation needs at least 2 classes, {train.opened.source} has {num_classes}",
            "eval.data.label_column",
            "point eval.data at a labelled classification dataset",
        )
    dataset = f"{path}" + (f"[{common['name']}]" if common["name"] else "")
    opened_test, note = _open_test(open_split, e.test_split, e.train_split, dataset)
    # Numbered by the training split's class names: the head predicts the training split's ids.
    test = _labelled(opened_test, classes_from=_as_reference(train))
    # Bare integer labels are matched by value: a test id beyond the training split's classes has no output.
    if int(test.labels.max()) >= num_classes:
        raise UserError(
            f"{test.opened.source} has labels the training split does not ({int(test.labels.max())} ≥ {num_classes})",
            "eval.data.test_split",
            "use train and test splits of the same dataset",
        )
    source = {
        "source": dataset,
        "path": path,
        "name": common["name"],
        "train_split": e.train_split,
        "test_split": FALLBACK_TEST_SPLIT if note else e.test_split,
        "requested_test_split": e.test_split,
        "test_split_note": note,
        "resolution": common["resolution"],
        "center_crop": e.center_crop,
        "num_classes": num_classes,
        "class_names": train.class_names,
    }
    return OpenedEval(train, test, source)


def load_eval_data(
    recipe: Recipe, progress: bool = True, shard_train: bool = False, validation: bool = True
) -> EvalData:
    """The downstream train/validation/test splits opened (:func:`open_eval_splits`) and given their pixels
    (:func:`eval_pixels`)."""
    return eval_pixels(open_eval_splits(recipe, progress), recipe, progress, shard_train, validation)


def eval_pixels(
    opened: OpenedEval, recipe: Recipe, progress: bool = True, shard_train: bool = False, validation: bool = True
) -> EvalData:
    """The opened splits with their pixels: decoded once (uint8 tensors) when ``data.loading`` allows it for the
    split's size (:func:`_loading`), else left encoded and decoded by the process that reads a row, when it does.
    With ``shard_train`` (SLF, which reads each training image once) a process decodes only the rows it owns.
    Without ``validation`` (the last epoch is kept) no validation split is carved out: every training image trains.
    """
    e, d = recipe.eval.data, recipe.data
    fraction = e.val_fraction if validation else 0.0  # none: every training image trains, the last epoch is kept
    fit, val = _train_pixels(opened.train, d, fraction, recipe.eval.seed, shard_train, progress)
    test = opened.test.opened
    streamed = _loading(d, test.decoded_bytes()) == "streamed"
    test_pixels = test.encoded() if streamed else test.decode(progress)
    test_data = LabelledImages(test_pixels, opened.test.labels)
    return EvalData(fit, val, test_data, opened.source["num_classes"], opened.source)
