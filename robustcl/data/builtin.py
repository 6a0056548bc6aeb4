"""Built-in datasets that need no download, for offline smoke runs and tests.

:data:`BUILTIN_DIGITS` is scikit-learn's bundled 1,797 real 8×8 digits, served as an ordinary
Image / ClassLabel ``DatasetDict`` with a fixed, stratified train / test split.
:func:`robustcl.data.sources.open_split` dispatches ``builtin:`` paths here.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

BUILTIN_DIGITS = "builtin:digits"
_BUILTINS = (BUILTIN_DIGITS,)


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
