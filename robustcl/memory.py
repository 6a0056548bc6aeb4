"""Refuse an allocation that cannot fit in memory before it is made: a one-line error instead of a MemoryError
traceback, or instead of the OOM killer after minutes of work. No heavy imports, so any module can use it."""

from __future__ import annotations

import os
from pathlib import Path

from robustcl.errors import UserError

__all__ = ["available_memory", "check_fits_in_memory"]

# Share of the available memory one allocation may take: the process also needs room for the model, the decoder's
# batches and the rest of the machine, and the reading is a snapshot that other processes change.
USABLE_SHARE = 0.9

# cgroup limits (containers, Slurm jobs) that can be far below what the machine reports: (limit, usage) files.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def _meminfo_available() -> int | None:
    """Linux's MemAvailable: free memory plus the page cache it can reclaim (MemFree alone would count a machine
    whose dataset files are cached as full)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or v1's near-2**63 value: no limit
            return max(int(limit) - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate (the smaller of the machine's and its cgroup's), or None when the
    platform does not say."""
    readings = [r for r in (_meminfo_available(), _cgroup_available()) if r is not None]
    return min(readings) if readings else None


def _human(nbytes: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError  # unreachable: the loop returns at "TB"


def check_fits_in_memory(nbytes: int, what: str, where: str, fix: str) -> None:
    """Raise ``UserError("<what> needs N bytes, M bytes available", where, fix)`` when ``nbytes`` exceeds the
    usable share of the available memory; ``what`` names the allocation (e.g. "decoding 50,000 images at 32×32").
    Nothing is refused when the platform gives no reading."""
    available = available_memory()
    if available is None or nbytes <= USABLE_SHARE * available:
        return
    raise UserError(
        f"{what} needs {nbytes:,} bytes ({_human(nbytes)}) of memory, {available:,} bytes ({_human(available)}) "
        "available",
        where,
        fix,
    )
