"""A diverging run never trains on NaN/inf: with `training.nonfinite: stop` it ends at the first such step (exit code
1, one line naming the step and the last good checkpoint) and saves nothing after it; resumed with `skip`, the
steps' updates are dropped (weights, optimizer state and BatchNorm statistics stay as before them) and the run stops
once more than `training.max_skipped_steps` were skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, call_main, with_sets
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# SGD at lr 1e30: the first update makes the weights so large that the next forward overflows to inf/NaN.
DIVERGING = [
    *TINY,
    "optimizer.name=sgd",
    "optimizer.lr=1e30",
    "schedule.name=constant",
    "training.max_steps=8",
    "training.checkpoint_every=1",
    "training.keep_checkpoints=8",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]


def _pretrain(run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *sets: str) -> tuple:
    monkeypatch.setattr(sys, "argv", sys.argv)  # call_main changes it
    argv = ["pretrain", str(REPO / "recipes" / "quickstart.yaml"), "-o", str(run), *with_sets(*DIVERGING, *sets)]
    return call_main(argv), capsys.readouterr().err


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    momentum = {f"momentum.{k}": v["momentum_buffer"] for k, v in optimizer["state"].items()}
    return {**load_file(checkpoint / "model.safetensors"), **momentum}


def test_a_nonfinite_step_stops_the_run_and_skip_drops_its_update(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    code, err = _pretrain(run, monkeypatch, capsys)
    good = run / "checkpoints" / "step-00000001"
    assert code == 1, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("robustcl: error:")]
    assert "NaN/inf at step 2 (no update was made" in line and f"the last good checkpoint is {good}" in line
    assert "--set training.nonfinite=skip" in line and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]  # nothing saved after it
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1]

    # The same command with `skip` resumes from step 1 and skips steps 2, 3 and 4: the third skip is one too many.
    code, err = _pretrain(run, monkeypatch, capsys, "training.nonfinite=skip", "training.max_skipped_steps=2")
    assert code == 1, err[-3000:]
    assert "NaN/inf loss or gradient at step 2: skipped" in err
    assert "3 steps had a NaN/inf loss or gradient, more than" in err
    assert "training.max_skipped_steps 2 (the last: step 4)" in err
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"], "loss" in r) for r in records] == [
        (1, 0, True),
        (2, 1, False),
        (3, 2, False),
    ]
    # The checkpoints of the skipped steps hold exactly the state before them: no update, BN statistics restored.
    before = _state(good)
    assert all(torch.isfinite(t).all() for t in before.values())
    for step in (2, 3):
        after = _state(run / "checkpoints" / f"step-{step:08d}")
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), f"step {step} changed the state"
    assert not (run / "checkpoints" / "step-00000004").exists()
