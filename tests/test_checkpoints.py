"""Checkpoint integrity: every file is recorded with its size and SHA-256; a damaged newest checkpoint is reported
and skipped for the previous good one; a failed write (disk full) loses nothing; retention keeps the newest; a file
holding pickled code (even with a matching checksum) is refused without running it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import REPO

from robustcl.errors import StorageError, UserError
from robustcl.recipe import load_recipe
from robustcl.run_dir import checkpoint_problem, complete_checkpoints, latest_checkpoint
from robustcl.run_layout import COMPLETE_MARKER
from robustcl.train import pretrain

SMALL = [
    "model.widths=[8,8,8,8]",
    "data.resolution=12",
    "training.batch_size=16",
    "attack.steps=1",
    "training.checkpoint_every=2",
    "training.keep_checkpoints=3",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]


def _pretrain(run_dir: Path, steps: int, *sets: str):
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*SMALL, f"training.max_steps={steps}", *sets])
    return pretrain(recipe, run_dir)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _pretrain(run, 4)
    older, newest = complete_checkpoints(run)
    files = json.loads((newest / COMPLETE_MARKER).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "train_state.json"} <= set(files)
    assert checkpoint_problem(newest) is None and latest_checkpoint(run) == newest

    weights = newest / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    assert "model.safetensors does not match" in checkpoint_problem(newest)
    capsys.readouterr()
    assert latest_checkpoint(run) == older
    assert f"skipping damaged checkpoint {newest}" in capsys.readouterr().err

    weights.write_bytes(original)
    assert checkpoint_problem(newest) is None
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    assert "optimizer.bin has 100 bytes" in checkpoint_problem(newest)

    summary = _pretrain(run, 6)  # resumes from the good one and trains on
    out = capsys.readouterr()
    assert f"resumed from {older} (step 2)" in out.out and "skipping damaged checkpoint" in out.err
    assert summary.steps == 6 and latest_checkpoint(run).name == "step-00000006"


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _pretrain(run, 2)
    (previous,) = complete_checkpoints(run)
    before = _digests(previous)
    real_save = Accelerator.save_state

    def full_disk(self, output_dir, **kwargs):
        real_save(self, output_dir, **kwargs)  # half the state is on the disk when the space runs out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(StorageError) as caught:
        _pretrain(run, 4)
    message = str(caught.value)
    assert "checkpoint of step 4: the disk is full; the last checkpoint, step-00000002, is intact" in message
    assert "run the same command again" in message and caught.value.exit_code == 1
    assert complete_checkpoints(run) == [previous] and _digests(previous) == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_retention_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _pretrain(run, 4, "training.keep_checkpoints=1")
    (only,) = complete_checkpoints(run)
    assert only.name == "step-00000004" and checkpoint_problem(only) is None
    # What a kill leaves: a write's temporary folder, an old checkpoint half deleted (its marker goes first).
    for leftover in (".tmp-step-00000005", "step-00000003"):
        (run / "checkpoints" / leftover).mkdir()
        (run / "checkpoints" / leftover / "model.safetensors").write_bytes(b"partial")
    _pretrain(run, 6, "training.keep_checkpoints=1")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000006"]


class _Payload:
    """Unpickling this runs ``os.mkdir(path)``: what a tampered checkpoint could do to whoever loads it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    run, ran = tmp_path / "run", tmp_path / "payload-ran"
    _pretrain(run, 2)
    (checkpoint,) = complete_checkpoints(run)
    torch.save({"state": {}, "param_groups": [], "hook": _Payload(ran)}, checkpoint / "optimizer.bin")
    # Re-sign the marker, as an attacker with write access could: only weights_only loading stands in the way.
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    data = (checkpoint / "optimizer.bin").read_bytes()
    marker["files"]["optimizer.bin"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert checkpoint_problem(checkpoint) is None
    with pytest.raises(UserError) as refused:
        _pretrain(run, 4)
    assert "checkpoint refused: a file holds objects other than tensors" in str(refused.value)
    assert str(checkpoint) in str(refused.value) and refused.value.exit_code == 2
    assert not ran.exists()
