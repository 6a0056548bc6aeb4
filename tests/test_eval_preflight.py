"""The evaluation a pretraining run ends with (``eval.after_pretrain``) is checked before the first training step:
settings that would stop it (a missing or unlabelled test split, fewer than two classes, test labels the training
split lacks, a corrupted set that cannot be measured) end ``robustcl pretrain`` in one line before any image is
decoded, any step is taken or anything is written, instead of after the whole training."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import PIL.Image
import pytest
from helpers import REPO, TINY, call_main, user_error, with_sets

from robustcl.recipe import Recipe, recipe_from_dict

QUICK = str(REPO / "recipes" / "quickstart.yaml")
TWO = datasets.ClassLabel(names=["a", "b"])


def _labelled(labels: list[int], feature=TWO) -> datasets.Dataset:
    images = [PIL.Image.new("RGB", (8, 8), (30 * i % 255, 40, 50)) for i in range(len(labels))]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels}, features=datasets.Features({"image": datasets.Image(), "label": feature})
    )


def _unlabelled(n: int) -> datasets.Dataset:
    images = [PIL.Image.new("RGB", (8, 8), (30 * i % 255, 40, 50)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    datasets.DatasetDict({"train": _labelled([0, 1] * 40)}).save_to_disk(str(root / "train_only"))
    datasets.DatasetDict({"train": _labelled([0, 1] * 4), "test": _unlabelled(4)}).save_to_disk(
        str(root / "unlabelled_test")
    )
    one = datasets.ClassLabel(names=["a"])
    datasets.DatasetDict({"train": _labelled([0] * 4, one), "test": _labelled([0] * 4, one)}).save_to_disk(
        str(root / "one_class")
    )
    ints = datasets.Value("int64")
    datasets.DatasetDict({"train": _labelled([0, 1, 0, 1], ints), "test": _labelled([0, 1, 2, 1], ints)}).save_to_disk(
        str(root / "unseen_test_label")
    )
    return root


def _recipe(eval_path: Path | str, label_column: str | None = None, **more) -> Recipe:
    data = {"path": str(eval_path), "label_column": label_column}
    return recipe_from_dict({"data": {"path": "builtin:digits", "resolution": 8}, "eval": {"data": data, **more}})


def test_good_settings_pass(data):
    from robustcl.evaluation.preflight import check_eval_settings

    check_eval_settings(recipe_from_dict({"data": {"path": "builtin:digits", "resolution": 8}}))


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("train_only", ("split 'test' not found", "eval.data.test_split", "'train'")),
        (
            "unlabelled_test",
            ("'test' split", "has no labels", "'validation' split cannot stand in", "eval.data.test_split"),
        ),
        ("one_class", ("at least 2 classes", "eval.data.label_column")),
        ("unseen_test_label", ("labels the training split does not", "eval.data.test_split")),
    ],
)
def test_each_problem_is_one_line_naming_the_key(data, dataset, expected):
    from robustcl.evaluation.preflight import check_eval_settings

    # Plain integer labels are read from a column the recipe names (only a ClassLabel column is auto-detected).
    label_column = "label" if dataset == "unseen_test_label" else None
    message = user_error(check_eval_settings, _recipe(data / dataset, label_column))
    for part in expected:
        assert part in message, message


def test_corrupted_set_problems_are_checked_too(data):
    from robustcl.evaluation.preflight import check_eval_settings

    recipe = _recipe("builtin:digits", corruptions={"path": "builtin:digits", "split": "test"})
    message = user_error(check_eval_settings, recipe)  # digits has no corruption column
    assert "column 'corruption_name' not found" in message and "eval.corruptions.corruption_column" in message


def test_pretrain_without_a_test_split_stops_before_the_first_step(data, tmp_path, capsys, monkeypatch):
    """Measured, not inferred from the output: no image decoded, no training step taken, no run directory left."""
    import robustcl.train as train
    from robustcl.data.loading import OpenedSplit

    steps, decoded = [], []
    step, decode = train.train_step, OpenedSplit.decode
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    monkeypatch.setattr(
        OpenedSplit, "decode", lambda self, *a, **k: decoded.append(self.source) or decode(self, *a, **k)
    )
    monkeypatch.setattr(sys, "argv", sys.argv)
    run = tmp_path / "run"
    sets = [*TINY, f"data.path={data / 'train_only'}", "training.max_steps=2", "eval.after_pretrain=true"]
    sets += ["logging.progress_bar=false", "logging.trackers=[]"]
    capsys.readouterr()
    code = call_main(["pretrain", QUICK, "-o", str(run), *with_sets(*sets)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("robustcl: error: "), err
    assert "eval.after_pretrain" in err[0] and "split 'test' not found" in err[0] and "eval.data.test_split" in err[0]
    assert steps == [] and decoded == []
    assert not run.exists()
