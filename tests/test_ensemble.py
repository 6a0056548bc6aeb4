"""The leaderboard's "ensemble" figure (RobustSSL_Benchmark): the mean of each metric over one SLF, one ALF and one AFF
evaluation of the same encoder. ``robustcl evaluate --protocol all`` runs the three and writes ``ensemble.json``
beside their folders; the model card adds an ensemble row when an export ships the three."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from helpers import call_main, user_error, with_sets

SETS = [
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=120",
    "eval.data.max_test=40",
    "eval.attack.steps=1",
    "eval.attack.curve_epsilons=[]",
    "eval.slf.epochs=1",
    "eval.alf.epochs=1",
    "eval.alf.attack_steps=1",
    "eval.aff.epochs=1",
    "eval.aff.batch_size=64",
    "eval.aff.attack_steps=1",
]


def _report(protocol: str, sa: float, ra: float, aa: float | None, mean_c: float | None, sha: str = "ab" * 32):
    from robustcl.eval_report import EvalReport

    pgd = {"loss": "ce", "epsilon": 8 / 255, "step_size": 2 / 255, "steps": 20, "random_start": True}
    corruptions = {
        "source": "c",
        "columns": {},
        "images": 1,
        "accuracy": {},
        "images_per_cell": {},
        "severity_mean": {},
        "corruption_mean": {},
        "mean": mean_c,
        "reference": "r",
    }
    return EvalReport.model_validate(
        {
            "model": "m",
            "model_kind": "export_dir",
            "bn_branch": None,
            "protocol": protocol,
            "encoder_sha256": sha,
            "dataset": {
                "source": "builtin:digits",
                "path": "builtin:digits",
                "name": None,
                "train_split": "train",
                "test_split": "test",
                "resolution": 8,
                "num_classes": 10,
                "class_names": None,
            },
            "split_sizes": {"train": 100, "val": 0, "test": 40, "attacked": 40},
            "epsilon": 8 / 255,
            "SA": sa,
            "SA_attacked_subset": sa,
            "RA": ra,
            "AA": aa,
            "attack": {"pgd": pgd, "autoattack": None},
            "curve": [],
            "finetune": {"epochs": 1, "select_by": "final", "selected_epoch": 1, "val_accuracy": None, "history": []},
            "seed": 0,
            "num_processes": 1,
            "device": "cpu",
            "versions": {},
            "wall_time_s": 1.0,
            "output": f"/x/eval/{protocol}/eval.json",
            "curve_png": None,
            "corruptions": None if mean_c is None else corruptions,
        }
    )


def test_ensemble_is_the_mean_of_each_metric_over_the_three_protocols():
    from robustcl.evaluation.ensemble import ensemble

    reports = [
        _report("slf", 0.8, 0.3, 0.2, 0.7),
        _report("alf", 0.7, 0.4, 0.35, 0.6),
        _report("aff", 0.9, 0.5, 0.45, 0.8),
    ]
    figures = ensemble(reports)
    assert figures.SA == pytest.approx((0.8 + 0.7 + 0.9) / 3)
    assert figures.RA == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    assert figures.AA == pytest.approx((0.2 + 0.35 + 0.45) / 3)
    assert figures.corruptions_mean == pytest.approx((0.7 + 0.6 + 0.8) / 3)
    assert figures.encoder_sha256 == "ab" * 32 and figures.protocols == ["slf", "alf", "aff"]
    # Any order in, the same figures out; a metric one protocol lacks has no mean.
    assert ensemble(list(reversed(reports))).SA == pytest.approx(figures.SA)
    reports[1].AA = None
    assert ensemble(reports).AA is None


def test_ensemble_refuses_reports_of_different_encoders_or_settings():
    from robustcl.evaluation.ensemble import ensemble

    reports = [
        _report("slf", 0.8, 0.3, 0.2, None),
        _report("alf", 0.7, 0.4, 0.3, None),
        _report("aff", 0.9, 0.5, 0.4, None),
    ]
    other = copy.deepcopy(reports)
    other[2].encoder_sha256 = "cd" * 32
    message = user_error(ensemble, other)
    assert "different encoders" in message and "aff" in message
    other = copy.deepcopy(reports)
    other[1].preset = "cifar10-fast"
    assert "preset" in user_error(ensemble, other)
    assert "one each of slf, alf, aff" in user_error(ensemble, reports[:2])
    assert "one each of slf, alf, aff" in user_error(ensemble, [reports[0], reports[0], reports[2]])


@pytest.fixture(scope="module")
def all_protocols(tmp_path_factory, tiny_export) -> Path:
    """The folder ``robustcl evaluate EXPORT --protocol all --output DIR`` wrote."""
    out = tmp_path_factory.mktemp("all") / "evals"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)  # call_main changes it
        code = call_main(["evaluate", str(tiny_export), "--protocol", "all", "--output", str(out), *with_sets(*SETS)])
    assert code == 0
    return out


def test_protocol_all_writes_three_reports_and_their_ensemble(all_protocols):
    out = all_protocols
    reports = {p: json.loads((out / p / "eval.json").read_text()) for p in ("slf", "alf", "aff")}
    assert {r["protocol"] for r in reports.values()} == {"slf", "alf", "aff"}
    assert len({r["encoder_sha256"] for r in reports.values()}) == 1
    figures = json.loads((out / "ensemble.json").read_text())
    for metric in ("SA", "RA"):
        assert figures[metric] == pytest.approx(sum(r[metric] for r in reports.values()) / 3)
    assert figures["AA"] is None  # not measured, so no mean
    assert figures["encoder_sha256"] == reports["slf"]["encoder_sha256"]


def test_protocol_all_needs_a_folder_as_output(tmp_path, tiny_export, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    capsys.readouterr()
    code = call_main(["evaluate", str(tiny_export), "--protocol", "all", "--output", str(tmp_path / "one.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--protocol all" in err and "folder" in err
    assert not (tmp_path / "one.json").exists()


def test_model_card_shows_the_ensemble_row_when_the_three_reports_ship(all_protocols, tiny_export):
    from robustcl.eval_report import read_report
    from robustcl.model_card import CardFacts, render_model_card
    from robustcl.models import RobustCLResNetModel

    out = all_protocols
    reports = [read_report(out / p / "eval.json") for p in ("slf", "alf", "aff")]
    model = RobustCLResNetModel.from_pretrained(tiny_export)
    figures = json.loads((out / "ensemble.json").read_text())

    def card(evaluations):
        return render_model_card(CardFacts("me/tiny", "mit", model, 8, evaluations=evaluations)).text

    rows = [line for line in card(reports).splitlines() if line.startswith("| Ensemble")]
    assert len(rows) == 1 and f"{100 * figures['SA']:.2f}%" in rows[0] and f"{100 * figures['RA']:.2f}%" in rows[0]
    assert "| Ensemble" not in card(reports[:2])
