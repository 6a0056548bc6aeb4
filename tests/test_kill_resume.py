"""Exact resume under kills: a real `robustcl pretrain` is killed (SIGKILL or SIGTERM) at random moments, one of
them while a checkpoint is being written, and restarted each time with the same command; its final weights,
optimizer state, schedule and logged losses equal those of an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, robustcl, start_robustcl, with_sets
from safetensors.torch import load_file

from robustcl.preemption import EXIT_STOPPED
from robustcl.run_dir import latest_checkpoint
from robustcl.run_layout import CHECKPOINTS, TRAIN_STATE

pytestmark = pytest.mark.slow

STEPS = 40
# 256 images in batches of 32: 8 steps an epoch, so the kills fall in several epochs and mid-epoch. Checkpoints
# every 3 steps: a resume usually repeats a few steps (data order, augmentation and attack starts must match).
# Each restart is killed within a few steps (of this machine's step time), so the runs never reach the end.
SETS = [
    *TINY,
    "data.max_samples=256",
    "eval.after_pretrain=false",
    f"training.max_steps={STEPS}",
    "training.checkpoint_every=3",
    "training.keep_checkpoints=2",
]
# The streamed data path (images decoded per batch by a worker process) resumes as exactly as the decoded one.
ARGS = ["pretrain", "recipes/quickstart.yaml", *with_sets(*SETS, "data.loading=streamed", "data.workers=1")]


def _start(run: Path) -> subprocess.Popen:
    return start_robustcl(*ARGS, "-o", str(run))


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _wait(condition, proc: subprocess.Popen, what: str, poll: float = 0.01, timeout: float = 120) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return True


def _checkpoint_step(run: Path) -> int:
    checkpoint = latest_checkpoint(run, warn=False)
    return int(checkpoint.name.removeprefix("step-")) if checkpoint else 0


def _kill_during_checkpoint_write(run: Path) -> str:
    """SIGKILL the moment a checkpoint's temporary folder exists; retried when the write was already over."""

    def writing() -> bool:
        return any((run / CHECKPOINTS).glob(".tmp-*"))

    for _ in range(5):  # a retry starts clean: the missed write was complete, so no temporary folder is left
        proc = _start(run)
        found = _wait(writing, proc, "a checkpoint write", poll=0.0005)
        proc.kill()
        proc.wait()
        assert found, f"the run ended before writing a checkpoint: {proc.stderr.read()[-2000:]}"
        if writing():  # the folder was still temporary when the process died
            return f"SIGKILL during the write of {[p.name for p in (run / CHECKPOINTS).glob('.tmp-*')]}"
    raise AssertionError("no kill landed inside a checkpoint write in 5 tries")


def _kill_at_random(run: Path, sig: signal.Signals, rng: random.Random, step_s: float) -> str:
    """Start, wait until this process has trained a step, then send ``sig`` after a random delay of up to four
    steps (``step_s`` seconds each)."""
    resumed_from = _checkpoint_step(run)
    stale = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    proc = _start(run)

    def trained() -> bool:
        # A restart first drops the log lines of steps it will repeat; wait for a new one.
        text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
        return text != stale and max(_logged_steps(run), default=0) > resumed_from

    assert _wait(trained, proc, "a training step"), proc.stderr.read()[-2000:]
    delay = rng.uniform(0, 4 * step_s)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    event = f"{sig.name} {delay:.2f}s after step {resumed_from + 1}"
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else EXIT_STOPPED), f"{event}: {err[-2000:]}"
    if resumed_from:
        assert f"resumed from {run / CHECKPOINTS}/step-{resumed_from:08d}" in out, out[-2000:]
    if sig == signal.SIGTERM:
        # The step in flight was finished and saved, and nothing after it.
        saved = _checkpoint_step(run)
        assert saved == max(_logged_steps(run)) and f"after step {saved} of {STEPS}" in err, err[-2000:]
        assert "SIGTERM received: finishing this step" in err and "run the same command again to resume" in err
    return f"{event}: resumable from step {_checkpoint_step(run)}"


def _final_state(run: Path) -> dict[str, object]:
    checkpoint = run / CHECKPOINTS / f"step-{STEPS:08d}"
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    train_state = json.loads((checkpoint / TRAIN_STATE).read_text())
    return {
        "model": load_file(checkpoint / "model.safetensors"),
        "optimizer": optimizer["state"],
        "param_groups": optimizer["param_groups"],
        # Images seen add up over the sessions (repeated steps counted once); only the wall time may differ.
        "train_state": {**train_state, "compute": {**train_state["compute"], "wall_time_s": None}},
        "encoder": load_file(run / "encoder" / "model.safetensors"),
    }


def _assert_equal(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_killed_and_restarted_runs_end_bit_for_bit_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("ROBUSTCL_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    res = robustcl(*ARGS, "-o", str(reference))
    assert res.returncode == 0, res.stderr[-3000:]
    # This machine's step time: five runs of at most ~5 new steps each never reach the end of the 40.
    speeds = sorted(json.loads(line)["images_per_s"] for line in (reference / "metrics.jsonl").read_text().splitlines())
    step_s = 32 / speeds[len(speeds) // 2]

    kills = [_kill_during_checkpoint_write(interrupted)]
    for sig in rng.sample([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGTERM], 4):
        kills.append(_kill_at_random(interrupted, sig, rng, step_s))
    history = f"seed {seed} (rerun with ROBUSTCL_KILL_SEED={seed}): " + "; ".join(kills)
    print(history)
    res = robustcl(*ARGS, "-o", str(interrupted))
    assert res.returncode == 0, f"{history}\n{res.stderr[-3000:]}"

    _assert_equal(_final_state(interrupted), _final_state(reference), history)
    # Every step logged once, in order, with the uninterrupted run's loss: repeated steps replaced their lines.
    logged = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1)), history
    assert [r["loss"] for r in logged] == [r["loss"] for r in expected], history
    assert not list((interrupted / CHECKPOINTS).glob(".tmp-*")), "a killed write's temporary folder was left"
