"""One writer per folder: a run directory (``pretrain``), an export folder (``export``) and an evaluation's output
folder (``evaluate``) are each written by one robustcl process at a time; a second one is refused at once, naming
the holder.

The lock is the kernel's ``flock`` on a small file beside the folder, ``.NAME.lock`` (the holder writes its pid, host
and command into it for the refusal message). The kernel drops the lock when the holder exits, however it exits
(SIGKILL included), so a lock left by a killed process never blocks a resume: the file may remain, unlocked. On
NFS, Linux implements ``flock`` with POSIX locks that the server tracks across clients, so two nodes sharing a
run directory exclude each other too; a node that dies holds its locks until the server's lease expires (NFSv4:
about 90 s). On a filesystem without lock support robustcl warns once and runs unlocked.

The holder deletes the file when it is done, while still holding the lock; a process that locked the file it had
opened before that deletion sees that its file is no longer at the path and tries again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FolderBusy

# Errors of a filesystem that has no (working) lock support: NFS without lockd, some FUSE filesystems.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Paths this process holds: flock on NFS follows POSIX rules, where a second open + close of the same file by the
# same process would release the first lock; a second claim here is refused before the file is touched.
_held: set[Path] = set()
_held_fds: set[int] = set()


def _drop_inherited_locks() -> None:
    # A forked child (a DataLoader worker of the training process) shares the lock's open file; while it kept its
    # copy, a SIGKILLed holder's lock would outlive it until the child noticed and exited. The parent keeps its own.
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` beside it (inside it, a lock would become part of the folder)."""
    folder = Path(os.path.realpath(folder))
    return folder.with_name(f".{folder.name}.lock")


def _holder_record(command: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()})


def _describe_holder(text: str) -> str:
    try:
        record = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["since"])))
        return f"robustcl {record['command']} (pid {int(record['pid'])} on host {record['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another robustcl process"  # it has locked the file but not yet written its record


def _refusal(folder: Path, holder: str, fix: str) -> FolderBusy:
    return FolderBusy(f"{folder} is in use by {holder}", str(lock_path(folder)), fix)


def _try_lock(path: Path) -> tuple[int | None, str | None]:
    """(fd, None) when locked; (None, holder text) when another process holds it; (None, None) when the
    filesystem cannot lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            return None, holder
        except OSError as err:
            os.close(fd)
            if err.errno in _UNSUPPORTED:
                return None, None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)  # the previous holder deleted the file between our open and our lock: take the new one


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns them, deepest first."""
    missing = [p for p in path.parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def folder_lock(folder: Path, command: str, fix: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise :class:`FolderBusy` naming the holder. ``command`` is what
    the refusal of a second process says holds it (e.g. "pretrain"); ``fix`` is the refusal's advice. Folders made
    to hold the lock file are removed again when they are still empty at the end."""
    folder = Path(os.path.realpath(folder))
    path = lock_path(folder)
    if folder in _held:
        raise _refusal(folder, f"robustcl {command} in this process (pid {os.getpid()})", fix)
    made = _make_parents(path)
    fd, holder = _try_lock(path)
    try:
        if fd is None and holder is not None:
            raise _refusal(folder, _describe_holder(holder), fix)
        if fd is None:
            print(
                f"robustcl: warning: the filesystem of {path.parent} does not support file locks; nothing stops "
                "another process from writing the same folder",
                file=sys.stderr,
            )
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_record(command).encode(), 0)
            _held_fds.add(fd)
        _held.add(folder)
        try:
            yield
        finally:
            _held.discard(folder)
            if fd in _held_fds:  # not in a forked child, which dropped its copy and must not touch the file
                _held_fds.discard(fd)
                path.unlink(missing_ok=True)  # still locked: a process waiting on this file sees it gone, retries
                os.close(fd)
    finally:
        for parent in made:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: it holds what the block wrote
