"""SIGTERM / SIGINT during `robustcl pretrain`: the first signal finishes the step, writes a checkpoint and exits
with code 75 and a resume hint; a second signal exits at once without damaging the last complete checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, REPO, TINY, cli_env, robustcl, with_sets

from robustcl.preemption import EXIT_STOPPED
from robustcl.run_dir import checkpoint_problem, complete_checkpoints, latest_checkpoint

pytestmark = pytest.mark.slow


def _start(run: Path, *sets: str) -> subprocess.Popen:
    sets = with_sets(*TINY, "eval.after_pretrain=false", *sets)
    args = ["pretrain", "recipes/quickstart.yaml", "-o", str(run), *sets]
    return subprocess.Popen(
        [str(BIN / "robustcl"), *args], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes(tmp_path: Path) -> None:
    run, sig = tmp_path / "run", signal.SIGTERM
    proc = _start(run, "training.max_steps=5000", "training.checkpoint_every=0")
    _wait_for_steps(run, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert f"{sig.name} received" in err and "run the same command again to resume" in err
    checkpoint = latest_checkpoint(run, warn=False)
    step = int(checkpoint.name.removeprefix("step-"))
    last_logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert step >= 3 and step == last_logged  # the step in flight was finished and saved, nothing after it
    assert f"after step {step} of 5000" in err and not (run / "encoder").exists()
    res = robustcl(
        "pretrain", "recipes/quickstart.yaml", "-o", str(run),
        *with_sets(*TINY, "eval.after_pretrain=false", f"training.max_steps={step + 2}", "training.checkpoint_every=0"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"(step {step})" in res.stdout and latest_checkpoint(run).name == f"step-{step + 2:08d}"


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
