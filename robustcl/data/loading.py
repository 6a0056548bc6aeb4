"""Decode a dataset split once into a uint8 tensor: column detection, label reading and :class:`ImageData`.

Pre-training re-reads every image many times per epoch, so the whole split is decoded up front to
``uint8 [N, 3, R, R]`` (50k CIFAR-sized images are 150 MB) and augmentation then works on tensors.

Opening the split (Hub id, local folder, save_to_disk folder, image folder, single data file or
:data:`BUILTIN_DIGITS`) is :mod:`robustcl.data.sources`; turning its image column into pixels is
:mod:`robustcl.data.decode`.  Everything the user can get wrong surfaces as a one-line
:class:`~robustcl.errors.UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from robustcl.data.builtin import BUILTIN_DIGITS
from robustcl.data.decode import ColumnDecoder
from robustcl.data.images import DecodedImages, EncodedImages, ImageRows
from robustcl.data.labels import MAX_CLASSES, read_labels
from robustcl.data.sources import _datasets_progress, _source, open_split
from robustcl.errors import UserError
from robustcl.fingerprint import dataset_fingerprint
from robustcl.memory import USABLE_SHARE, available_memory, check_fits_in_memory

if TYPE_CHECKING:
    from robustcl.recipe import DataConfig

__all__ = [
    "BUILTIN_DIGITS",
    "MAX_CLASSES",
    "SUBSET_SEED",
    "ImageData",
    "check_dataset",
    "detect_columns",
    "load_images",
    "choose_loading",
    "open_images",
    "open_pretraining_split",
    "pretraining_images",
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
    if image_column is not None:
        image = _given_image_column(features, image_column, where, key_prefix)
    else:
        image = _found_image_column(features, where, key_prefix)
    if label_column is not None:
        return image, _given_label_column(features, label_column, image, where, key_prefix)
    return image, _found_label_column(features, image, where, key_prefix)


def _columns_present(features: datasets.Features) -> str:
    return ", ".join(f"'{k}' ({_describe(v)})" for k, v in features.items()) or "none"


def _require_present(features: datasets.Features, kind: str, column: str, where: str, key_prefix: str) -> None:
    if column not in features:
        raise UserError(
            f"{kind} column '{column}' not found in {where}; columns present: {_columns_present(features)}",
            f"{key_prefix}.{kind}_column",
            f"set {key_prefix}.{kind}_column to one of: {', '.join(features) or '(none)'}",
        )


def _given_image_column(features: datasets.Features, column: str, where: str, key_prefix: str) -> str:
    """The image column the recipe names: present, and of images or 8-bit pixel arrays."""
    _require_present(features, "image", column, where, key_prefix)
    if not _is_image_feature(features[column]):
        raise UserError(
            f"column '{column}' in {where} holds {_describe(features[column])}, not images",
            f"{key_prefix}.image_column",
            f"set {key_prefix}.image_column to a column of type Image or of uint8 pixel arrays",
        )
    return column


def _found_image_column(features: datasets.Features, where: str, key_prefix: str) -> str:
    """The one Image feature of the split: none or several need the recipe to name it."""
    candidates = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if not candidates:
        raise UserError(
            f"no image column in {where}; columns present: {_columns_present(features)}",
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
    return candidates[0]


def _given_label_column(features: datasets.Features, column: str, image: str, where: str, key_prefix: str) -> str:
    """The label column the recipe names: present, not the image column, and of class labels."""
    _require_present(features, "label", column, where, key_prefix)
    if column == image:
        raise UserError(
            f"column '{column}' in {where} is the image column, it cannot also be the labels",
            f"{key_prefix}.label_column",
            f"set {key_prefix}.label_column to the column that holds the class ids",
        )
    if not _is_label_feature(features[column]):
        raise UserError(
            f"column '{column}' in {where} holds {_describe(features[column])}, not class labels",
            f"{key_prefix}.label_column",
            f"set {key_prefix}.label_column to a ClassLabel, integer or string column",
        )
    return column


def _found_label_column(features: datasets.Features, image: str, where: str, key_prefix: str) -> str | None:
    """The one ClassLabel feature besides the image column, None when there is none; several need the recipe to
    name one."""
    class_labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel) and k != image]
    if len(class_labels) > 1:
        listed = ", ".join(f"'{c}'" for c in class_labels)
        raise UserError(
            f"several ClassLabel columns in {where}: {listed}",
            f"{key_prefix}.label_column",
            f"set {key_prefix}.label_column to one of: {', '.join(class_labels)}",
        )
    return class_labels[0] if class_labels else None


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


# Rows max_samples draws from: fixed, so a recipe's subset is a property of its data section (the same rows for
# every run, every resume and the pseudo-labels computed for it), not of the training seed.
SUBSET_SEED = 0


def _subset(
    ds: datasets.Dataset, max_samples: int | None, max_samples_key: str
) -> tuple[datasets.Dataset, np.ndarray | None]:
    """A seeded random subset of ``max_samples`` rows, kept in dataset order: an image folder is sorted by class,
    so its first rows would hold only the first classes."""
    if max_samples is None:
        return ds, None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise UserError(
            f"max_samples must be a positive integer, got {max_samples!r}",
            max_samples_key,
            f"set {max_samples_key} to a number of rows, or remove it to use all",
        )
    if max_samples >= len(ds):
        return ds, None
    rows = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(ds), size=max_samples, replace=False))
    return ds.select(rows), rows


def _check_decoded_size(n: int, resolution: int, source: str, resolution_key: str, max_samples_key: str) -> None:
    # The decoded [N, R, R, 3] array and its channels-first copy are both held while it is reordered.
    check_fits_in_memory(
        2 * n * resolution * resolution * 3,
        f"decoding {n:,} images of {source} at {resolution}×{resolution}",
        f"{resolution_key}, {max_samples_key}",
        f"lower {resolution_key}, or set {max_samples_key} to decode fewer images",
    )


@dataclass
class OpenedSplit:
    """A split opened, its columns detected and its rows chosen, nothing decoded yet."""

    ds: datasets.Dataset
    image_column: str
    label_column: str | None
    source: str
    resolution: int
    key_prefix: str
    max_samples_key: str
    fingerprint: dict[str, Any]  # what identifies the split cheaply (fingerprint.dataset_fingerprint)
    center_crop: float = 1.0  # share of the shorter side kept by the centre crop (ImageNet evaluation: 0.875)
    source_rows: np.ndarray | None = None  # the split's row numbers of a max_samples subset's rows
    replaced_rows: list[int] = field(default_factory=list)  # unreadable rows decode() replaced (bad_images: skip)

    def decoded_bytes(self) -> int:
        return len(self.ds) * self.resolution * self.resolution * 3

    def decoder(self) -> ColumnDecoder:
        column, where = self.image_column, self.source
        return ColumnDecoder(
            self.ds, column, self.resolution, where, self.key_prefix, self.center_crop, self.source_rows
        )

    def decode(self, progress: bool = True, skip_bad: bool = False) -> torch.Tensor:
        """Every image, decoded once to uint8 ``[N, 3, R, R]``; ``skip_bad`` replaces an unreadable image by the
        next readable row (counted in ``replaced_rows``)."""
        n, r = len(self.ds), self.resolution
        _check_decoded_size(n, r, self.source, f"{self.key_prefix}.resolution", self.max_samples_key)
        out = np.empty((n, r, r, 3), dtype=np.uint8)
        show = progress and n > _PROGRESS_MIN_ROWS
        bar = tqdm(total=n, desc=f"decoding {self.source}", unit="img", dynamic_ncols=True) if show else None
        try:
            self.replaced_rows = self.decoder().decode_into(out, bar, skip_bad)
        finally:
            if bar is not None:
                bar.close()
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def encoded(self, skip_bad: bool = False) -> EncodedImages:
        """The images left encoded, decoded per batch where they are used."""
        return EncodedImages(self.decoder(), self.fingerprint, skip_bad)


def open_images(
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
    center_crop: float = 1.0,
) -> OpenedSplit:
    """Open a split, detect its columns and choose its rows (see :func:`load_images`), without decoding.
    ``center_crop`` < 1 resizes the shorter side to R / center_crop before the centre R × R is cut."""
    _check_resolution(resolution)
    max_samples_key = max_samples_key or f"{key_prefix}.max_samples"
    source = _source(path, split, name)
    with _datasets_progress(progress):
        ds = open_split(path, split, name, key_prefix=key_prefix)
    image, label = detect_columns(ds, image_column, label_column, source, key_prefix=key_prefix)
    ds, source_rows = _subset(ds, max_samples, max_samples_key)
    _require_rows(ds, source, key_prefix)
    fingerprint = dataset_fingerprint(ds, image, label)
    return OpenedSplit(
        ds, image, label, source, resolution, key_prefix, max_samples_key, fingerprint, center_crop, source_rows
    )


def load_images(path: str, split: str, *, classes_from: ImageData | None = None, **options: Any) -> ImageData:
    """Open a split, detect its columns and decode every image once to uint8 ``[N, 3, R, R]``; ``options`` are
    :func:`open_images`'s (``resolution`` is required).

    Non-RGB images are converted to RGB; images of another size are resized (bicubic, shorter side to
    R, centre crop). ``max_samples`` keeps a seeded random subset of that many rows, in dataset order
    (``max_samples_key`` names its recipe key, by default ``<key_prefix>.max_samples``). ``classes_from``, a
    labelled split loaded before (e.g. the training split of a test split), numbers the labels as it does: class
    names (string or ClassLabel) by its names, refusing a class it lacks; bare integers by value. Class names on
    one side and bare integers on the other are refused.
    """
    opened = open_images(path, split, **options)
    key_prefix, progress = opened.key_prefix, options.get("progress", True)
    labels = num_classes = class_names = None
    if opened.label_column is not None:
        # Labels first: a bad label should fail in a second, not after minutes of decoding.
        labels, num_classes, class_names = read_labels(
            opened.ds, opened.label_column, opened.source, key_prefix, classes_from
        )
    return ImageData(
        images=opened.decode(progress),
        labels=labels,
        num_classes=num_classes,
        class_names=class_names,
        image_column=opened.image_column,
        label_column=opened.label_column,
        source=opened.source,
        fingerprint=opened.fingerprint,
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
    ColumnDecoder(ds, image, 8, source, key_prefix).decode_rows([0])
    if label is not None:
        read_labels(ds, label, source, key_prefix)
    return image, label


def open_pretraining_split(data: DataConfig, progress: bool = True) -> OpenedSplit:
    """A recipe's pretraining split (its ``data`` section) opened and its rows chosen, nothing decoded: what
    ``robustcl pretrain`` trains on, and AdvCL's pseudo-labels are computed on."""
    return open_images(
        data.path, data.split, resolution=data.resolution, name=data.name, image_column=data.image_column,
        label_column=data.label_column, max_samples=data.max_samples, progress=progress,
    )  # fmt: skip


def choose_loading(data: DataConfig, decoded_bytes: int, processes_on_node: int | None, originals: bool = False) -> str:
    """``data.loading`` resolved: ``auto`` decodes up front when the decoded pixels fit ``data.decoded_max_gb`` and,
    held twice while they are reordered by every process of this node, the available memory; else it streams.
    ``processes_on_node`` None skips the memory reading (the decoding then refuses, in one line, what does not fit);
    ``originals`` (crops taken from the original images) always streams."""
    if data.loading != "auto":
        return data.loading
    if originals:
        return "streamed"
    if decoded_bytes > data.decoded_max_gb * 1e9:
        return "streamed"
    if processes_on_node is None:
        return "decoded"
    available = available_memory()
    if available is not None and 2 * decoded_bytes * processes_on_node > USABLE_SHARE * available:
        return "streamed"
    return "decoded"


def pretraining_images(
    opened: OpenedSplit, data: DataConfig, processes_on_node: int = 1, progress: bool = True, originals: bool = False
) -> ImageRows:
    """The split's pixels as the recipe loads them: decoded once, or left encoded for the streamed path (always
    with ``originals``: crops taken from the original images)."""
    skip_bad = data.bad_images == "skip"
    if choose_loading(data, opened.decoded_bytes(), processes_on_node, originals) == "streamed":
        return opened.encoded(skip_bad)
    return DecodedImages(opened.decode(progress, skip_bad))
