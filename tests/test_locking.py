"""One writer per folder: a second `robustcl pretrain` on a run directory in use, a second `export` into one folder and
a second `evaluate` writing into one run are refused at once with one line naming the holder; a lock left by a killed
process never blocks the resume. The holders are real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY, start_robustcl, with_sets

from robustcl.errors import FolderBusy
from robustcl.locking import folder_lock, lock_path

SETS = [*TINY, "eval.after_pretrain=false", "logging.progress_bar=false", "logging.trackers=[]"]


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what}: the process ended: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holder(folder: Path) -> subprocess.Popen:
    """A real process that holds ``folder``'s lock (as robustcl export / evaluate do) until it is killed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from robustcl.locking import folder_lock
        with folder_lock({str(folder)!r}, "export", "wait"):
            print("locked", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _refusal(cli, argv: list[str]) -> str:
    started = time.monotonic()
    code, _, err = cli(*argv)
    assert code == 1, err
    assert time.monotonic() - started < 30, "refused late"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_second_pretrain_is_refused_at_once_and_a_killed_holder_does_not_block_the_resume(
    tmp_path: Path, cli
) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "recipes/quickstart.yaml", "-o", str(run)]
    sets = with_sets(*SETS, "training.max_steps=5000", "training.checkpoint_every=1")
    first = start_robustcl(*args, *sets)
    try:
        _wait_for(lambda: any(run.glob("checkpoints/step-*/COMPLETE")), first, "the first checkpoint")
        line = _refusal(cli, [*args, *sets])
        assert f"{run} is in use by robustcl pretrain (pid {first.pid} on host {socket.gethostname()}" in line
        assert "choose another --output-dir" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_path(run).exists(), "the killed process leaves its lock file behind"
    # The same command (only shorter, to end soon) resumes: the dead process's lock is gone with it.
    code, out, err = cli(*args, *with_sets(*SETS, "training.max_steps=2", "training.checkpoint_every=1"))
    assert code == 0, err[-3000:]
    assert "resumed from" in out + err
    assert not lock_path(run).exists(), "the lock file is removed when the run ends"


def test_folder_lock_refuses_a_second_holder_and_frees_itself_when_the_holder_dies(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    holder = _holder(folder)
    try:
        with pytest.raises(FolderBusy) as refused:
            with folder_lock(folder, "export", "wait"):
                pass
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(refused.value)
        record = json.loads(lock_path(folder).read_text())
        assert record["pid"] == holder.pid and record["command"] == "export"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(folder, "export", "wait"):  # the kernel released the dead holder's lock
        assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    assert not lock_path(folder).exists() and not folder.exists()


def test_a_forked_child_of_a_killed_holder_does_not_keep_its_lock(tmp_path: Path) -> None:
    # DataLoader workers are forked from the training process: a SIGKILLed trainer's workers live on for seconds.
    folder = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, time
        from robustcl.locking import folder_lock
        with folder_lock({str(folder)!r}, "pretrain", "wait"):
            child = os.fork()
            if child == 0:
                time.sleep(600)
                os._exit(0)
            print(child, flush=True)
            time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with folder_lock(folder, "pretrain", "wait"):  # the child still lives, without the lock
            os.kill(child, 0)
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "out", "export", "wait"):
        with pytest.raises(FolderBusy, match="in this process"):
            with folder_lock(tmp_path / "out", "evaluate", "wait"):
                pass


def test_a_lock_file_deleted_by_its_releasing_holder_is_not_taken_as_held(tmp_path: Path) -> None:
    """A process that opened the lock file just before the holder deleted it must not believe it holds the lock:
    it would share the folder with the next process, which locks a new file at the same path."""
    folder = tmp_path / "out"
    path = lock_path(folder)
    path.write_text("")
    stale = os.open(path, os.O_RDWR)  # opened before the holder's deletion
    path.unlink()
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a racing process would then get
    try:
        with folder_lock(folder, "export", "wait"):  # the lock at the path is free: a new file, a new lock
            assert path.exists()
    finally:
        os.close(stale)


def test_a_second_export_into_one_folder_is_refused(tmp_path: Path, run: Path, cli) -> None:
    out = tmp_path / "export"
    holder = _holder(out)
    try:
        line = _refusal(cli, ["export", str(run), str(out)])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"{out} is in use by robustcl export (pid {holder.pid}" in line and "export into another folder" in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_second_evaluation_writing_into_one_run_is_refused(run: Path, cli) -> None:
    folder = run / "eval" / "slf"
    before = (folder / "eval.json").read_bytes()
    holder = _holder(folder)
    try:
        line = _refusal(cli, ["evaluate", str(run), *with_sets(*TINY)])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"{folder} is in use by robustcl export (pid {holder.pid}" in line and "another --output" in line
    assert (folder / "eval.json").read_bytes() == before
