"""The JSON robustcl writes (summary, metrics, evaluation reports, checkpoint records): always valid JSON — a
non-finite float becomes ``null`` instead of Python's ``NaN``/``Infinity`` literals, which other JSON readers
reject — and files are replaced atomically. Values may hold pydantic models (written as their JSON form)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .atomic_write import atomic_file


def _finite(value: Any) -> Any:
    if isinstance(value, BaseModel):  # a typed record (the evaluation report): its JSON form
        return _finite(value.model_dump(mode="json"))
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


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented strict JSON in ``path`` (folders created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, durable=True) as tmp:
        tmp.write_bytes((to_json(value, indent=2) + "\n").encode())
