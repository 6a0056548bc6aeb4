"""Common-corruption accuracy (CIFAR-10-C style, ``eval.corruptions``): the figures per corruption × severity are the
finetuned classifier's plain accuracy on those rows, their means are the benchmark's, and a corrupted set that
cannot be measured is refused in one line before any finetuning.

The corrupted sets are made here: a few builtin:digits test images under two simple corruptions (seeded noise and
darkening) at severities 1..5, laid out as CIFAR-10-C is on the Hub (one split, a row per image × corruption ×
severity, with ``corruption_name`` and ``corruption_level`` columns)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers import with_sets
from torch import nn

from robustcl.data.builtin import _digits_dataset_dict
from robustcl.data.loading import load_images
from robustcl.recipe import Recipe, recipe_from_dict

CORRUPTIONS = ("gaussian_noise", "brightness")
DIGIT_NAMES = [str(d) for d in range(10)]
IMAGES = 24  # clean test images, each under every corruption and severity


def _corrupt(pixels: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """A simple stand-in for CIFAR-10-C's corruptions: stronger with the severity."""
    x = pixels.astype(np.float64)
    if corruption == "gaussian_noise":
        x = x + np.random.default_rng(seed).normal(0, 25 * severity, x.shape)
    else:
        x = x * (1 - 0.17 * severity)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _corrupted_rows(
    severities: tuple[int, ...] = (1, 2, 3, 4, 5), labelled: bool = True, images: int = IMAGES
) -> datasets.Dataset:
    clean = _digits_dataset_dict()["test"].select(range(images))
    rows: dict[str, list] = {"image": [], "label": [], "corruption_name": [], "corruption_level": []}
    for corruption in CORRUPTIONS:
        for severity in severities:
            for i, row in enumerate(clean):
                pixels = np.asarray(row["image"].convert("L"))
                rows["image"].append(PIL.Image.fromarray(_corrupt(pixels, corruption, severity, seed=i)))
                rows["label"].append(row["label"])
                rows["corruption_name"].append(corruption)
                rows["corruption_level"].append(severity)
    features = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=DIGIT_NAMES),
        "corruption_name": datasets.Value("string"),
        "corruption_level": datasets.Value("int64"),
    }
    if not labelled:
        del rows["label"], features["label"]
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def _save(ds: datasets.Dataset, folder: Path) -> Path:
    datasets.DatasetDict({"test": ds}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> Path:
    return _save(_corrupted_rows(), tmp_path_factory.mktemp("corrupted") / "digits-c")


@pytest.fixture(scope="module")
def digits_classifier() -> nn.Module:
    """A linear classifier trained the ordinary way on 8×8 digits: far better than chance, not perfect."""
    torch.manual_seed(0)
    train = load_images("builtin:digits", "train", resolution=8, max_samples=600, progress=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        for index in torch.randperm(len(train.labels)).split(64):
            loss = F.cross_entropy(model(train.images[index].float() / 255), train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _recipe(path: Path, **corruptions) -> Recipe:
    tree = {
        "data": {"path": "builtin:digits", "resolution": 8},
        "eval": {"corruptions": {"path": str(path), **corruptions}},
    }
    return recipe_from_dict(tree)


def _flat(figures: dict[str, dict[str, float]]) -> dict[tuple[str, str], float]:
    return {(c, s): v for c, cells in figures.items() for s, v in cells.items()}


DIGITS_TRAIN = {"source": "builtin:digits:train", "class_names": DIGIT_NAMES, "num_classes": 10}


def _direct_accuracy(model: nn.Module, path: Path) -> dict[str, dict[str, float]]:
    """Accuracy per (corruption, severity), computed here without robustcl's measurement: decode, predict, count."""
    data = load_images(str(path), "test", resolution=8, progress=False)
    table = datasets.load_from_disk(str(path))["test"]
    names, levels = table["corruption_name"], table["corruption_level"]
    with torch.no_grad():
        correct = (model(data.images.float() / 255).argmax(1) == data.labels).tolist()
    out: dict[str, dict[str, float]] = {}
    for corruption in sorted(set(names)):
        for severity in sorted(set(levels)):
            cell = [ok for ok, c, s in zip(correct, names, levels) if c == corruption and s == severity]
            out.setdefault(corruption, {})[str(severity)] = sum(cell) / len(cell)
    return out


def test_figures_are_the_accuracy_on_each_corruption_and_severity(corrupted, digits_classifier):
    from robustcl.evaluation.corruptions import measure_corruptions, open_corruptions

    recipe = _recipe(corrupted)
    opened = open_corruptions(recipe, DIGITS_TRAIN)
    report = measure_corruptions(digits_classifier, opened, recipe, Accelerator(cpu=True), progress=False)
    expected = _direct_accuracy(digits_classifier, corrupted)
    assert _flat(report.accuracy) == pytest.approx(_flat(expected), abs=1e-12)
    assert set(report.accuracy) == set(CORRUPTIONS)
    assert report.images == len(CORRUPTIONS) * 5 * IMAGES
    assert all(n == IMAGES for cells in report.images_per_cell.values() for n in cells.values())
    # The benchmark's figures: per severity the mean over corruptions, and the mean of those five.
    for s in "12345":
        assert report.severity_mean[s] == pytest.approx(np.mean([expected[c][s] for c in CORRUPTIONS]))
    assert report.mean == pytest.approx(np.mean(list(report.severity_mean.values())))
    for c in CORRUPTIONS:
        assert report.corruption_mean[c] == pytest.approx(np.mean(list(expected[c].values())))
    # The corruptions bite: the strongest noise costs accuracy against the mildest.
    assert report.accuracy["gaussian_noise"]["5"] < report.accuracy["gaussian_noise"]["1"]


def test_a_chosen_list_of_corruptions_keeps_only_those(corrupted, digits_classifier):
    from robustcl.evaluation.corruptions import measure_corruptions, open_corruptions

    recipe = _recipe(corrupted, corruptions=["brightness"])
    opened = open_corruptions(recipe, DIGITS_TRAIN)
    report = measure_corruptions(digits_classifier, opened, recipe, Accelerator(cpu=True), progress=False)
    assert list(report.accuracy) == ["brightness"] and report.images == 5 * IMAGES
    expected = _direct_accuracy(digits_classifier, corrupted)["brightness"]
    assert report.accuracy["brightness"] == pytest.approx(expected, abs=1e-12)


def test_no_corrupted_set_means_no_measurement(digits_classifier):
    from robustcl.evaluation.corruptions import measure_corruptions, open_corruptions

    recipe = recipe_from_dict({"data": {"path": "builtin:digits", "resolution": 8}})
    assert recipe.eval.corruptions.path is None
    assert open_corruptions(recipe, DIGITS_TRAIN) is None
    assert measure_corruptions(digits_classifier, None, recipe, Accelerator(cpu=True)) is None


# ------------------------------------------------------------------------------- end to end, through the CLI

EVAL_SETS = [
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=200",
    "eval.data.max_test=50",
    "eval.slf.epochs=2",
    "eval.attacks=[]",
    "eval.attack.curve_epsilons=[]",
]


def test_evaluate_reports_corruptions_in_eval_json_and_the_table(tmp_path, tiny_export, corrupted, cli):
    from robustcl.models import RobustCLResNetForImageClassification

    out = tmp_path / "report"
    code, stdout, err = cli(
        "evaluate", str(tiny_export), "--output", str(out), *with_sets(*EVAL_SETS, f"eval.corruptions.path={corrupted}")
    )
    assert code == 0, err[-3000:]
    report = json.loads((out / "eval.json").read_text())
    figures = report["corruptions"]
    assert set(figures["accuracy"]) == set(CORRUPTIONS) and figures["images"] == 2 * 5 * IMAGES
    # The classifier saved beside the report is the one measured: its accuracy, computed directly, is the report's.
    classifier = RobustCLResNetForImageClassification.from_pretrained(out / "classifier").eval()
    expected = _direct_accuracy(lambda x: classifier(pixel_values=x).logits, corrupted)
    assert _flat(figures["accuracy"]) == pytest.approx(_flat(expected), abs=1e-12)
    assert "corruptions" in stdout and f"{100 * figures['mean']:.2f}%" in stdout
    for corruption in CORRUPTIONS:
        assert corruption in stdout


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: "), err[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "make, sets, expected",
    [
        pytest.param(
            lambda: _corrupted_rows(),
            ["eval.corruptions.severity_column=level"],
            ("column 'level' not found", "eval.corruptions.severity_column", "corruption_level"),
            id="missing-severity-column",
        ),
        pytest.param(
            lambda: _corrupted_rows(),
            ["eval.corruptions.corruption_column=kind"],
            ("column 'kind' not found", "eval.corruptions.corruption_column"),
            id="missing-corruption-column",
        ),
        pytest.param(
            lambda: _corrupted_rows(severities=(1, 2, 6), images=2),
            [],
            ("severity 6", "outside 1..5", "eval.corruptions.severity_column"),
            id="severity-out-of-range",
        ),
        pytest.param(
            lambda: _corrupted_rows(labelled=False, images=2),
            [],
            ("no label column", "eval.corruptions.label_column"),
            id="unlabelled",
        ),
        pytest.param(
            lambda: _corrupted_rows(images=2),
            ["eval.corruptions.corruptions=[fog]"],
            ("'fog'", "eval.corruptions.corruptions", "brightness"),
            id="unknown-corruption",
        ),
    ],
)
def test_bad_corrupted_set_is_one_line_before_any_finetuning(
    tmp_path, tiny_export, cli, monkeypatch, make, sets, expected
):
    import robustcl.evaluation.run as run

    finetuned = []
    monkeypatch.setattr(run, "finetune", lambda *a, **k: finetuned.append(1) or pytest.fail("finetuned"))
    path = _save(make(), tmp_path / "bad-c")
    out = tmp_path / "report"
    code, _, err = cli(
        "evaluate",
        str(tiny_export),
        "--output",
        str(out),
        *with_sets(*EVAL_SETS, f"eval.corruptions.path={path}", *sets),
    )
    line = _one_line_error(err)
    assert code == 2 and not finetuned
    for part in expected:
        assert part in line, line
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_give_the_same_corruption_figures_as_one(tmp_path, tiny_export, corrupted):
    """Each process decodes and classifies only the rows of its own batches; the figures are those of one process."""
    import subprocess

    from helpers import BIN, REPO, cli_env

    def launch(processes: int) -> dict:
        out = tmp_path / f"p{processes}"
        args = ["--multi_gpu"] if processes > 1 else []
        cmd = [
            str(BIN / "accelerate"), "launch", *args, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "robustcl", "evaluate", str(tiny_export),
            "--output", str(out), *with_sets(*EVAL_SETS, f"eval.corruptions.path={corrupted}"),
        ]  # fmt: skip
        env = {"ACCELERATE_USE_CPU": "true"} if processes > 1 else {}
        res = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((out / "eval.json").read_text())

    one, two = launch(1), launch(2)
    assert two["num_processes"] == 2
    assert two["SA"] == one["SA"] and two["corruptions"] == one["corruptions"]
