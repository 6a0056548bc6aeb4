"""The formats robustcl writes, each defined once: ``eval.json`` is the typed report model (what evaluation writes is
exactly what the model reads and writes back; reports of earlier versions load), and only the atomic-write module
renames a finished temporary into place."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, call_main, with_sets

SETS = [
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=120",
    "eval.data.max_test=40",
    "eval.attack.steps=1",
    "eval.attack.curve_epsilons=[0,8/255]",
    "eval.slf.epochs=2",
    "eval.slf.select_by=clean",
    "eval.save_classifier=true",
]

# The keys of eval.json, in the order every version has written them (later versions added some).
KEYS = [
    "model",
    "model_kind",
    "bn_branch",
    "protocol",
    "preset",
    "preset_source",
    "dataset",
    "split_sizes",
    "epsilon",
    "SA",
    "SA_attacked_subset",
    "RA",
    "AA",
    "attack",
    "curve",
    "finetune",
    "encoder_sha256",
    "classifier_sha256",
    "seed",
    "num_processes",
    "device",
    "versions",
    "wall_time_s",
    "output",
    "curve_png",
    "classifier_dir",
    "corruptions",
]

# A report as the first version of `robustcl evaluate` wrote it: none of the keys added since (preset,
# encoder_sha256, corruptions, the dataset's test_split_note, the finetune record's selection, ...).
FIRST_VERSION_REPORT = {
    "model": "runs/quickstart/encoder",
    "model_kind": "export_dir",
    "bn_branch": None,
    "protocol": "slf",
    "dataset": {
        "source": "uoft-cs/cifar10",
        "path": "uoft-cs/cifar10",
        "name": None,
        "train_split": "train",
        "test_split": "test",
        "resolution": 32,
        "num_classes": 10,
        "class_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    },
    "split_sizes": {"train": 45000, "val": 5000, "test": 10000, "attacked": 1000},
    "epsilon": 8 / 255,
    "SA": 0.7512,
    "SA_attacked_subset": 0.748,
    "RA": 0.4021,
    "AA": None,
    "attack": {
        "pgd": {"loss": "ce", "epsilon": 8 / 255, "step_size": 2 / 255, "steps": 20, "random_start": True},
        "autoattack": None,
    },
    "curve": [{"epsilon": 0.0, "step_size": 0.0, "accuracy": 0.748}],
    "finetune": {
        "epochs": 25,
        "batch_size": 512,
        "lr": 0.1,
        "train_encoder": False,
        "select_by": "clean",
        "selected_epoch": 21,
        "val_accuracy": 0.7634,
        "history": [{"epoch": 1, "train_loss": 1.52, "val_accuracy": 0.61}],
    },
    "seed": 0,
    "num_processes": 1,
    "device": "cuda:0",
    "versions": {"python": "3.11.9", "torch": "2.5.1"},
    "wall_time_s": 812.5,
    "output": "runs/quickstart/eval/slf/eval.json",
    "curve_png": None,
    "a_key_of_another_version": {"kept": True},
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_export) -> Path:
    """The eval.json ``robustcl evaluate`` wrote (SLF with a validation split, the classifier saved)."""
    out = tmp_path_factory.mktemp("formats") / "slf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)  # call_main changes it
        assert call_main(["evaluate", str(tiny_export), "--output", str(out), *with_sets(*SETS)]) == 0
    return out / "eval.json"


def test_eval_json_round_trips_through_the_report_model_byte_for_byte(evaluated, tmp_path):
    """Read through the model and written back, eval.json is the same bytes: the model is the whole format, and the
    file keeps the keys (and their order) it has always had."""
    from robustcl.eval_report import EvalReport, read_report
    from robustcl.json_files import write_json

    written = evaluated.read_bytes()
    assert list(json.loads(written)) == KEYS
    report = read_report(evaluated)
    assert isinstance(report, EvalReport) and report.finetune.val_accuracy is not None
    write_json(tmp_path / "again.json", report)
    assert (tmp_path / "again.json").read_bytes() == written
    assert report.finetune.epochs == 2 and report.finetune.select_by == "clean"  # the settings, read typed


def test_an_eval_json_of_the_first_version_loads_and_is_read_as_before(tmp_path):
    """Keys added since default to null, unknown keys are kept, and the table, the card and the ensemble read it."""
    from robustcl.eval_report import read_report
    from robustcl.evaluation.ensemble import ensemble
    from robustcl.evaluation.report import format_table
    from robustcl.model_card import eval_results

    path = tmp_path / "eval.json"
    path.write_text(json.dumps(FIRST_VERSION_REPORT))
    report = read_report(path)
    assert report is not None
    assert report.preset is None and report.encoder_sha256 is None and report.corruptions is None
    assert report.dataset.test_split_note is None and report.finetune.selection is None
    assert report.finetune.epochs == 25 and report.finetune.settings["lr"] == 0.1
    assert report.model_dump(mode="json")["a_key_of_another_version"] == {"kept": True}
    table = format_table(report)
    assert "SLF evaluation of runs/quickstart/encoder on uoft-cs/cifar10" in table and "preset" not in table
    assert "selected epoch 21 of 25 (validation clean accuracy 76.34%)" in table
    assert [r.metric_value for r in eval_results([report])] == [75.12, 40.21]
    three = [report.model_copy(update={"protocol": p}) for p in ("slf", "alf", "aff")]
    assert ensemble(three).corruptions_mean is None and ensemble(three).SA == pytest.approx(0.7512)


@pytest.mark.parametrize("content", ["{}", "[1, 2]", "not json", json.dumps({"protocol": "slf", "SA": 0.5})])
def test_what_is_not_an_evaluation_report_reads_as_none(tmp_path, content):
    from robustcl.eval_report import read_report

    (tmp_path / "eval.json").write_text(content)
    assert read_report(tmp_path / "eval.json") is None
    assert read_report(tmp_path / "missing.json") is None


ATOMIC_MODULE = "robustcl/atomic_write.py"


def _renames(tree: ast.AST) -> list[int]:
    """Lines that rename a file or folder: os.replace / os.rename / os.renames, and a path's .replace(target) or
    .rename(target) (one argument: str.replace takes two)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        on_os = isinstance(func.value, ast.Name) and func.value.id == "os"
        if on_os and func.attr in ("replace", "rename", "renames"):
            lines.append(node.lineno)
        elif func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords:
            lines.append(node.lineno)
    return lines


def test_only_the_atomic_write_module_renames_temporaries_into_place():
    """Write-to-temporary-then-rename is written once: every other module goes through robustcl.atomic_write, so
    each write keeps the same guarantees (temporary removed on failure, flushed where asked)."""
    found = []
    for path in sorted((REPO / "robustcl").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel != ATOMIC_MODULE:
            found += [f"{rel}:{line}" for line in _renames(ast.parse(path.read_text()))]
    assert not found, found
    assert _renames(ast.parse((REPO / ATOMIC_MODULE).read_text()))  # the check sees the renames it exists to find
