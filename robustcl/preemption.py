"""SIGTERM / SIGINT during training: stop at a step boundary with a checkpoint instead of losing the work since the
last one. Clusters send SIGTERM before they preempt a job; Ctrl-C sends SIGINT."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

# Distinct from a failure (1), bad input (2) and a kill by signal (128 + n): "stopped on request, resume later"
# (sysexits' EX_TEMPFAIL), so a requeue script can tell a preempted run from a broken one.
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a checkpoint; the same command resumes it."""

    exit_code = EXIT_STOPPED


class StopOnSignal:
    """While active, the first SIGTERM/SIGINT only sets :attr:`received` (the loop finishes its step, checkpoints and
    stops); a second one exits at once. Checkpoints are written atomically, so the newest complete one survives."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\nrobustcl: second {name}: stopping now; the last complete checkpoint is kept", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.received = name
        print(
            f"\nrobustcl: {name} received: finishing this step, writing a checkpoint, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
