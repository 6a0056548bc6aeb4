"""The JSON robustcl writes (summary, metrics, evaluation reports, checkpoint records): always valid JSON — a
non-finite float becomes ``null`` instead of Python's ``NaN``/``Infinity`` literals, which other JSON readers
reject — and files are replaced atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON text (NaN and ±inf written as null)."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary sibling, flushed to the disk, then renamed: readers see the old file or
    the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented strict JSON in ``path`` (folders created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (to_json(value, indent=2) + "\n").encode())
