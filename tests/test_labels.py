"""Labels across splits and sizes before allocation: test labels are numbered by the training split's class names (never
by position), a test class the training split lacks is refused, absurd class counts and images that cannot fit in
memory are refused before anything is allocated, and a Pillow decompression-bomb warning is one line naming the row."""

from __future__ import annotations

import json
import os

# Before datasets is imported anywhere: nothing in this file may reach the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import PIL.Image
import pyarrow as pa
import pytest
import torch
from helpers import REPO, TINY, call_main, user_error

from robustcl.data.loading import BUILTIN_DIGITS, check_dataset, load_images
from robustcl.evaluation.run import run_dir_output
from robustcl.evaluation.splits import load_eval_data
from robustcl.recipe import Recipe, override_recipe

QUICK = str(REPO / "recipes" / "quickstart.yaml")
RUN_SETS = [*TINY, "training.max_steps=2", "eval.after_pretrain=false", "logging.progress_bar=false",
            "logging.trackers=[]"]  # fmt: skip
ERROR = "robustcl: error: "
# robustcl.data.loading.MAX_CLASSES (not imported: these tests must run, and fail, on code without it).
MAX_CLASSES = 100_000
COLORS = {"cat": (230, 30, 30), "dog": (30, 230, 30), "zebra": (30, 30, 230), "yak": (230, 230, 30)}


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def _image(cls: str, i: int) -> PIL.Image.Image:
    """Image ``i`` of a class: the class's colour with a little per-image noise, so that every image differs."""
    rng = np.random.default_rng(1000 * list(COLORS).index(cls) + i)
    noise = rng.integers(-20, 21, (8, 8, 3))
    return PIL.Image.fromarray(np.clip(np.array(COLORS[cls]) + noise, 0, 255).astype(np.uint8))


def _split(classes: list[str], label: datasets.ClassLabel | datasets.Value, per_class: int = 1) -> datasets.Dataset:
    names = [c for c in classes for _ in range(per_class)]
    images = [_image(c, i) for c in classes for i in range(per_class)]
    values = [label.str2int(n) for n in names] if isinstance(label, datasets.ClassLabel) else names
    return datasets.Dataset.from_dict(
        {"image": images, "label": values}, features=datasets.Features({"image": datasets.Image(), "label": label})
    )


def _saved(path: Path, train: datasets.Dataset, test: datasets.Dataset) -> str:
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return str(path)


def _eval_recipe(path: str, *sets: str) -> Recipe:
    return override_recipe(Recipe(), [f"eval.data.path={path}", "eval.data.resolution=8", *sets], "test")


STRING = datasets.Value("string")


# ------------------------------------------------------------------------------- labels matched by name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished two-step run on the quickstart recipe: a model to evaluate."""
    run = tmp_path_factory.mktemp("labels") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)
        assert call_main(["pretrain", QUICK, "-o", str(run), *[a for s in RUN_SETS for a in ("--set", s)]]) == 0
    yield run


def _evaluate(run: Path, data: str, *sets: str) -> int:
    args = [f"eval.data.path={data}", "eval.data.label_column=label", "eval.attacks=[]",
            "eval.attack.curve_epsilons=[]", "eval.slf.epochs=30", "eval.data.val_fraction=0.2", *sets]  # fmt: skip
    return call_main(["evaluate", str(run), *[a for s in args for a in ("--set", s)]])


def test_evaluation_maps_string_test_labels_by_training_names(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """train {cat, dog, zebra} / test {cat, zebra}: 'zebra' is class 2 in both (by name), not 1 (its position among
    the test split's own names); the test images are copies of training images of their class, so every test label
    must equal the label of its training twin and the report names the training split's classes."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    train = _split(["cat", "dog", "zebra"], STRING, per_class=10)
    test = _split(["cat", "zebra"], STRING, per_class=10)  # the same images as the training cats and zebras
    data = _saved(tmp_path / "animals", train, test)

    loaded = load_eval_data(_eval_recipe(data, "eval.data.label_column=label", "eval.data.val_fraction=0.1"))
    assert loaded.source["class_names"] == ["cat", "dog", "zebra"] and loaded.num_classes == 3
    assert loaded.test.labels.tolist() == [0] * 10 + [2] * 10
    full_train = load_images(data, "train", resolution=8, label_column="label", progress=False)
    twins = torch.cat([full_train.images[:10], full_train.images[20:]])
    assert torch.equal(loaded.test.images, twins)  # the test images are the training cats and zebras

    assert _evaluate(tiny_run, data) == 0, capfd.readouterr().err[-2000:]
    report = json.loads(run_dir_output(tiny_run, "slf").read_text())
    assert report["dataset"]["class_names"] == ["cat", "dog", "zebra"]
    assert report["dataset"]["num_classes"] == 3
    # Solid colours are trivially separable: with labels matched by name the test split (copies of training images)
    # is classified correctly; matched by position, every zebra would count as wrong (SA ≤ 0.5).
    assert report["SA"] > 0.9, report["SA"]


def test_evaluation_refuses_a_test_class_unknown_to_training(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv)
    data = _saved(tmp_path / "animals", _split(["cat", "dog"], STRING), _split(["cat", "yak"], STRING))
    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    capfd.readouterr()
    assert _evaluate(tiny_run, data, "eval.slf.epochs=1") == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(ERROR), err
    assert "class 'yak' in row 1" in err and "animals:test" in err and "'cat', 'dog'" in err, err
    assert "eval.data.label_column: label" in err, err
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before


def test_class_label_test_split_with_names_in_another_order(tmp_path: Path) -> None:
    train = _split(["cat", "dog", "zebra"], datasets.ClassLabel(names=["cat", "dog", "zebra"]))
    test = _split(["zebra", "cat", "dog"], datasets.ClassLabel(names=["zebra", "dog", "cat"]))
    loaded = load_eval_data(_eval_recipe(_saved(tmp_path / "d", train, test), "eval.data.val_fraction=0.34"))
    assert loaded.test.labels.tolist() == [2, 0, 1]
    assert loaded.source["class_names"] == ["cat", "dog", "zebra"]


def test_string_and_class_label_splits_are_matched_by_name(tmp_path: Path) -> None:
    classes = datasets.ClassLabel(names=["cat", "dog", "zebra"])
    mixed = _saved(tmp_path / "a", _split(["dog", "cat", "zebra"], STRING), _split(["zebra", "cat"], classes))
    loaded = load_eval_data(_eval_recipe(mixed, "eval.data.label_column=label", "eval.data.val_fraction=0.34"))
    assert loaded.test.labels.tolist() == [2, 0] and loaded.source["class_names"] == ["cat", "dog", "zebra"]
    other = _saved(tmp_path / "b", _split(["cat", "dog", "zebra"], classes), _split(["zebra", "dog"], STRING))
    loaded = load_eval_data(_eval_recipe(other, "eval.data.label_column=label", "eval.data.val_fraction=0.34"))
    assert loaded.test.labels.tolist() == [2, 1]


def test_class_label_test_class_unknown_to_training_is_refused(tmp_path: Path) -> None:
    train = _split(["cat", "dog"], datasets.ClassLabel(names=["cat", "dog"]))
    test = _split(["dog", "zebra"], datasets.ClassLabel(names=["cat", "dog", "zebra"]))
    message = user_error(
        load_eval_data, _eval_recipe(_saved(tmp_path / "d", train, test), "eval.data.val_fraction=0.5")
    )
    assert "class 'zebra' in row 1" in message and "d:test" in message and "'cat', 'dog'" in message


def test_unknown_test_class_message_shortens_many_training_classes(tmp_path: Path) -> None:
    names = [f"class{i:03d}" for i in range(200)]
    train = datasets.Dataset.from_dict(
        {"image": [_image("cat", 0)] * 200, "label": names},
        features=datasets.Features({"image": datasets.Image(), "label": STRING}),
    )
    test = _split(["cat"], STRING)
    message = user_error(
        load_eval_data, _eval_recipe(_saved(tmp_path / "d", train, test), "eval.data.label_column=label")
    )
    assert "class 'cat' in row 0" in message and "200 classes" in message and len(message) < 600, message


def test_named_classes_and_bare_integers_cannot_be_matched(tmp_path: Path) -> None:
    integers = datasets.Value("int64")
    named = _split(["cat", "dog"], STRING)
    bare = datasets.Dataset.from_dict(
        {"image": [_image("cat", 0), _image("dog", 0)], "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": integers}),
    )
    for train, test in ((named, bare), (bare, named)):
        path = _saved(tmp_path / f"d{len(list(tmp_path.iterdir()))}", train, test)
        message = user_error(
            load_eval_data, _eval_recipe(path, "eval.data.label_column=label", "eval.data.val_fraction=0.5")
        )
        assert "cannot be matched" in message and "eval.data.label_column" in message, message


def test_bare_integer_labels_still_match_by_value(tmp_path: Path) -> None:
    integers = datasets.Value("int64")
    train = datasets.Dataset.from_dict(
        {"image": [_image("cat", i) for i in range(4)], "label": [0, 1, 2, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": integers}),
    )
    test = datasets.Dataset.from_dict(
        {"image": [_image("cat", 0)] * 2, "label": [2, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": integers}),
    )
    recipe = _eval_recipe(
        _saved(tmp_path / "d", train, test), "eval.data.label_column=label", "eval.data.val_fraction=0.25"
    )
    loaded = load_eval_data(recipe)
    assert loaded.test.labels.tolist() == [2, 0] and loaded.num_classes == 3 and loaded.source["class_names"] is None


# ------------------------------------------------------------------------------------ sizes before allocation


def _integer_labels(path: Path, labels: list[int], dtype: str = "int64") -> str:
    images = datasets.Dataset.from_dict({"image": [_image("cat", 0)] * len(labels)})
    # The label column goes in through Arrow: datasets' own writer reads Python ints as int64 (2**64-1 overflows).
    table = images.data.table.append_column("y", pa.array(labels, type=pa.from_numpy_dtype(np.dtype(dtype))))
    features = datasets.Features({"image": datasets.Image(), "y": datasets.Value(dtype)})
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("labels", [[0, 10**12], [0, 1, 3_000_000]], ids=["1e12", "sparse-3M"])
def test_too_many_integer_classes_are_refused_before_allocation(tmp_path: Path, labels: list[int]) -> None:
    path = _integer_labels(tmp_path / "d", labels)
    for fn, kwargs in ((load_images, {"resolution": 4}), (check_dataset, {})):
        message = user_error(fn, path, "train", label_column="y", **kwargs)
        assert f"label {labels[-1]} in row {len(labels) - 1}" in message, message
        assert f"{MAX_CLASSES:,}" in message and "renumber" in message and "data.label_column" in message, message


def test_evaluating_on_sparse_integer_labels_is_one_line(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv)
    data = _saved(
        tmp_path / "d", *[datasets.load_from_disk(_integer_labels(tmp_path / s, [0, 1, 3_000_000])) for s in "ab"]
    )
    capfd.readouterr()
    assert _evaluate(tiny_run, data, "eval.data.label_column=y") == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(ERROR), err
    assert "label 3000000 in row 2" in err and "3,000,001 classes (3 distinct labels)" in err, err
    assert "eval.data.label_column" in err and "renumber the labels 0..K-1" in err, err


def test_too_many_class_label_classes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from robustcl.data import labels

    # The bound lowered to 5: a real 100,001-name ClassLabel costs datasets seconds to write and read.
    monkeypatch.setattr(labels, "MAX_CLASSES", 5)
    datasets.Dataset.from_dict(
        {"image": [_image("cat", 0)], "label": [0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=6)}),
    ).save_to_disk(str(tmp_path / "d"))
    message = user_error(load_images, str(tmp_path / "d"), "train", resolution=4)
    assert "ClassLabel column 'label' has 6 classes, more than the 5 classes robustcl allows" in message, message


def test_uint64_label_is_reported_with_its_real_value(tmp_path: Path) -> None:
    path = _integer_labels(tmp_path / "d", [0, 2**64 - 1], dtype="uint64")
    message = user_error(load_images, path, "train", resolution=4, label_column="y")
    assert f"label {2**64 - 1} in row 1" in message and "missing" not in message, message
    small = load_images(_integer_labels(tmp_path / "ok", [0, 2, 1], "uint64"), "train", resolution=4, label_column="y",
                        progress=False)  # fmt: skip
    assert small.labels.dtype == torch.int64 and small.labels.tolist() == [0, 2, 1] and small.num_classes == 3


def test_images_that_cannot_fit_in_memory_are_refused_before_allocation() -> None:
    message = user_error(load_images, BUILTIN_DIGITS, "train", resolution=100_000, key_prefix="eval.data")
    assert "eval.data.resolution" in message and "eval.data.max_samples" in message, message
    assert "bytes" in message and "available" in message, message


def test_memory_check_compares_with_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustcl import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 50_000)
    message = user_error(load_images, BUILTIN_DIGITS, "train", resolution=32, max_samples=10, progress=False)
    # 10 images × 32 × 32 × 3 bytes, held twice while reordered to channels-first.
    assert "needs 61,440 bytes" in message and "50,000 bytes (50.0 KB) available" in message, message
    assert "data.resolution" in message and "data.max_samples" in message, message
    monkeypatch.setattr(memory, "available_memory", lambda: 70_000)  # 61,440 is within 90% of it
    assert load_images(BUILTIN_DIGITS, "train", resolution=32, max_samples=10, progress=False).images.shape[0] == 10


def test_evaluate_refuses_images_that_do_not_fit_in_memory(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from robustcl import memory

    monkeypatch.setattr(sys, "argv", sys.argv)
    # 1 MB "available": 300 digits at 64×64 need 7.4 MB (small enough that code without the check just runs).
    monkeypatch.setattr(memory, "available_memory", lambda: 10**6)
    capfd.readouterr()
    args = ["eval.data.resolution=64", "eval.data.max_train=300", "eval.attacks=[]", "eval.attack.curve_epsilons=[]"]
    assert call_main(["evaluate", str(tiny_run), *[a for s in args for a in ("--set", s)]]) == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(ERROR), err
    assert "decoding 300 images of builtin:digits:train at 64×64 needs 7,372,800 bytes" in err, err
    assert "(eval.data.resolution, eval.data.max_train)" in err, err


def test_check_fits_in_memory_refuses_only_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustcl import memory

    available = memory.available_memory()  # this machine's reading: a positive number of bytes on Linux
    assert available is not None and available > 0
    memory.check_fits_in_memory(available // 2, "a tensor", "somewhere", "make it smaller")
    message = user_error(memory.check_fits_in_memory, 2 * available, "a tensor", "somewhere", "make it smaller")
    assert message.startswith("a tensor needs") and "(somewhere) — make it smaller" in message, message
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # no reading (not Linux): nothing is refused
    memory.check_fits_in_memory(10**15, "a huge tensor", "somewhere", "make it smaller")


# ------------------------------------------------------------------------------------ decompression bombs


def test_decompression_bomb_warning_is_one_line_naming_row_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "imgs" / "x"
    folder.mkdir(parents=True)
    _image("cat", 0).save(folder / "a.png")
    PIL.Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "big.png")
    # 256 pixels: over the limit (a warning) but under twice the limit (where Pillow raises by itself).
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the loader fails the test
        message = user_error(load_images, str(tmp_path / "imgs"), "train", resolution=8, progress=False)
    assert "row 1" in message and "big.png" in message and "not a readable image" in message, message
    assert "decompression bomb" in message, message
