"""Errors the CLI reports on one line, without a traceback: mistakes a user can fix (bad recipe, missing file,
wrong column; exit code 2) and failures the same input may not meet again (a remote service, a full disk, a
diverged run; exit code 1)."""

from __future__ import annotations

import errno
from typing import Any


def one_line(text: str) -> str:
    """``text`` with control characters (newlines, tabs, line separators) escaped: errors print on one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, on one line, shortened."""
    try:
        text = one_line(repr(value))
    except ValueError:  # an int beyond the 4300 digits Python converts to text
        return "an integer too long to print"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class UserError(Exception):
    """A problem in the user's input. The CLI prints it on one line and exits with code 2.

    Format: ``<what> (<where>) — <how to fix>``; ``where`` names the file, key path or column.
    """

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, where, fix
        text = what
        if where:
            text += f" ({where})"
        if fix:
            text += f" — {fix}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        # A DataLoader worker hands its error to the training process by pickling it: keep the three parts.
        return (type(self), (self.what, self.where, self.fix))


class RemoteError(UserError):
    """A remote service (the Hub) failed; the input was fine and the same command may succeed later. Exit code 1."""

    exit_code = 1


class StorageError(UserError):
    """The disk refused a write (full, read-only, quota); nothing written earlier was lost. Exit code 1."""

    exit_code = 1


class NonFiniteLoss(UserError):
    """Training produced a NaN/inf loss or gradient (usually a learning rate too high); the checkpoints written
    before it are intact. Exit code 1."""

    exit_code = 1


class FolderBusy(UserError):
    """Another process is writing the folder. The input was fine and the same command works once it is done:
    exit code 1."""

    exit_code = 1


# How a failed write surfaces besides OSError: torch.save's RuntimeError, safetensors' own error (Rust io errors).
_WRITE_FAILURES = ("No space left", "StorageFull", "os error 28", "Disk quota", "file write failed")


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is the disk refusing a write (full, read-only, quota), whichever library raised it."""
    return isinstance(err, OSError) or any(text in str(err) for text in _WRITE_FAILURES)


def describe_write_failure(err: BaseException) -> str:
    """A failed write in a few words, e.g. "the disk is full"."""
    if getattr(err, "errno", None) == errno.ENOSPC or any(t in str(err) for t in ("No space left", "StorageFull")):
        return "the disk is full"
    return getattr(err, "strerror", None) or str(err).splitlines()[0]
