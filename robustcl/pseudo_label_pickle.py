"""The AdvCL authors' pseudo-label pickle, read without running anything from it.

LijieFan/AdvCL ships ``data/imagenet_clPretrain_pseudo_labels.pkl`` (k-means of ImageNet-pretrained contrastive
features) and pretraining_advCL.py reads it with ``pickle.load``: a dict whose ``pseudo_train_{K}`` entries are int32
numpy arrays, one label per CIFAR-10 training image in torchvision's order (``pseudo_test_{K}``: the test images).

A pickle can call any importable function while it loads, so this reader rebuilds numpy arrays and plain containers
(dict, list, tuple, str, numbers: pickle opcodes that import nothing) and nothing else: ``find_class`` hands out only
numpy's array reconstruction functions, under the names numpy 1.x and 2.x write, and refuses every other global
before it is imported. The rows carry no image fingerprint, so only their count can be checked against the dataset.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, one_line

PICKLE_SUFFIXES = (".pkl", ".pickle")
TRAIN_PREFIX = "pseudo_train_"  # pretraining_advCL.py's key + K: the K-cluster labels of the training images


class _Refused(Exception):
    """A global the file names that is not a numpy array part."""


def _array_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy's ndarray and dtype pickles name (protocols 2–5), under both module spellings."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric  # numpy ≥ 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 2–4
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    allowed[("_codecs", "encode")] = _latin1_bytes  # protocol 2 spells an array's raw bytes this way
    return allowed


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """What protocol 2 asks of ``_codecs.encode``: bytes written as a latin-1 str. Only that: another codec is a
    lookup (an import) chosen by the file."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        # latin1: a Python 2 pickle's byte strings (an array's data) come back as the bytes they were.
        super().__init__(file, encoding="latin1")
        self._allowed = _array_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f).load()
    except _Refused as refused:
        raise UserError(
            f"the pseudo-label pickle names {one_line(str(refused))[:120]}, which is not part of a numpy array: "
            "refused without loading it",
            str(path),
            "use the authors' file as published, or write the labels with robustcl cluster",
        ) from None
    except OSError as err:
        raise UserError(
            f"cannot open the pseudo-label pickle ({err.strerror or type(err).__name__})", str(path), "check the path"
        ) from None
    except Exception:  # any other damage: a cut or corrupt pickle raises many kinds
        raise UserError(
            "cannot read the pseudo-label pickle (damaged or not a pickle)",
            str(path),
            "download the authors' file again, or write the labels with robustcl cluster",
        ) from None


def _train_labels(data: Any, k: int, rows: int, path: Path) -> torch.Tensor:
    import numpy as np

    key = f"{TRAIN_PREFIX}{k}"
    labels = data[key]
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise UserError(
            f"{key} in the pseudo-label pickle is not a 1-D integer array", str(path), "use the authors' file layout"
        )
    if len(labels) != rows:
        raise UserError(
            f"pseudo-labels were computed on other images ({key}: {len(labels)} labels, {rows} images)",
            str(path),
            "train on the images the labels were computed on, all rows in their order (the authors' file: "
            "CIFAR-10's 50,000 training images)",
        )
    return torch.from_numpy(labels.astype(np.int64))


def read_label_pickle(path: Path, clusters: Sequence[int], rows: int) -> torch.Tensor:
    """Labels [len(clusters), rows] (int64) from an AdvCL-layout pickle, or a one-line UserError saying what does
    not fit: a global other than numpy's array parts, not a dict, a K the recipe asks for that it lacks, or another
    row count. Values are left to the caller's range check."""
    path = Path(path)
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise UserError(
            f"the pseudo-label pickle holds a {type(data).__name__}, not a dict of pseudo_train_K arrays",
            str(path),
            "use the authors' file layout",
        )
    have = sorted(int(key[len(TRAIN_PREFIX) :]) for key in data if _is_train_key(key))
    missing = [k for k in clusters if f"{TRAIN_PREFIX}{k}" not in data]
    if missing:
        raise UserError(
            f"the pseudo-label pickle has no labels for K = {missing} (it has {have})",
            str(path),
            "set method.advcl.clusters to Ks the file has",
        )
    return torch.stack([_train_labels(data, int(k), rows, path) for k in clusters])


def _is_train_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(TRAIN_PREFIX) and key[len(TRAIN_PREFIX) :].isdigit()
