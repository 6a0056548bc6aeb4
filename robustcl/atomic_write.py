"""Writes that readers never see half done: a file or a folder is written under a temporary name beside its place,
then renamed into place once complete (a rename within one folder is atomic). A failure removes the temporary; a
process killed mid-write leaves only a hidden ``.tmp-NAME`` sibling, which the next write of that name replaces.

This is the one module that renames temporaries into place (tests/test_formats.py checks it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # hidden, and what a stale-temporary sweep (run_dir's checkpoints) looks for


def temp_sibling(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') written data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """The temporary path to write ``path``'s content to; once the block ends it replaces ``path``. ``durable``: the
    content is flushed to the disk before the rename, so that a power loss cannot leave the new name with a part."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block (or the flush) failed


@contextmanager
def atomic_folder(path: Path, *, durable: bool = False, owner: bool = True) -> Iterator[Path]:
    """An empty temporary folder to fill; once the block ends it replaces the folder ``path`` (an earlier one there
    is deleted first). ``durable``: the folder's entries are flushed before the rename, and its parent's after.

    ``owner`` False is for a process that writes into a folder that another process (the owner) creates, before
    the block, and installs, after it: it only removes the temporary when its own part fails.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed write
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owner:
        if durable:
            fsync_path(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)


@contextmanager
def staging_folder(beside: Path) -> Iterator[Path]:
    """A new temporary folder next to ``beside`` (one filesystem: its files move into place atomically with
    :func:`move_file`), deleted with whatever is left in it when the block ends."""
    beside = Path(beside)
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{beside.name}.", dir=beside.parent) as tmp:
        yield Path(tmp)


def move_file(source: Path, path: Path) -> None:
    """Replace ``path`` by the finished file ``source`` (from a :func:`staging_folder`) in one step."""
    os.replace(source, path)
