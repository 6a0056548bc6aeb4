"""A second SIGINT during `robustcl pretrain` exits at once without damaging the last complete checkpoint. (The
first signal's checkpoint, exit code 75 and exact resume: tests/test_kill_resume.py.)"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TINY, start_robustcl, with_sets

from robustcl.run_dir import checkpoint_problem, complete_checkpoints

pytestmark = pytest.mark.slow


def _start(run: Path, *sets: str) -> subprocess.Popen:
    sets = with_sets(*TINY, "eval.after_pretrain=false", *sets)
    return start_robustcl("pretrain", "recipes/quickstart.yaml", "-o", str(run), *sets)


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Slower steps (about a second) so the second signal lands while the first is still being honoured.
    slow = ["data.resolution=16", "model.widths=[16,32,64,128]", "training.batch_size=256"]
    slow.append("training.checkpoint_every=1")
    proc = _start(run, "training.max_steps=5000", *slow)
    _wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT received" in err and "second SIGINT: stopping now" in err
    checkpoints = complete_checkpoints(run)
    assert checkpoints and all(checkpoint_problem(c) is None for c in checkpoints)
