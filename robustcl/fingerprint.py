"""Content hashes: of a model's weights (ties an evaluation report to the exact weights it measured), of an image
tensor (ties pseudo-labels to the exact images they label) and of a dataset split (a run resumes only on the data it
started with)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import datasets


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every state-dict entry (name, dtype, shape, raw bytes), in name order.

    Equal for a model and its ``save_pretrained`` / ``from_pretrained`` round trip; any changed weight, buffer or
    BN statistic changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of a uint8 image tensor's bytes together with its shape."""
    digest = hashlib.sha256(json.dumps(list(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Image rows hashed by dataset_fingerprint: enough to notice added, removed, replaced or re-ordered images at any
# dataset size, while reading only these rows' encoded bytes (no decoding; ImageNet-sized splits included).
_SAMPLED_ROWS = 512


def _encoded_bytes(value: Any) -> bytes:
    """An image cell as stored: its encoded bytes, else the file it points to (imagefolder), else its JSON."""
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        if value.get("bytes") is not None:
            return value["bytes"]
        path = Path(value["path"])
        return path.read_bytes() if path.is_file() else value["path"].encode()
    return json.dumps(value).encode()


def dataset_fingerprint(ds: datasets.Dataset, image_column: str, label_column: str | None) -> dict[str, Any]:
    """What identifies a training split cheaply: row count, features, a SHA-256 of the encoded images of up to
    512 rows spread over the split (first and last included), and a SHA-256 of the whole label column."""
    import numpy as np
    import pyarrow as pa

    rows = len(ds)
    positions = sorted(set(np.linspace(0, rows - 1, min(rows, _SAMPLED_ROWS)).round().astype(int).tolist()))
    images = hashlib.sha256()
    sampled = ds.select(positions).select_columns([image_column]).with_format("arrow")[:]
    for value in sampled.column(image_column).to_pylist():
        images.update(hashlib.sha256(_encoded_bytes(value)).digest())
    labels = None
    if label_column is not None:
        column = ds.select_columns([label_column]).with_format("arrow")[:].column(label_column)
        if pa.types.is_integer(column.type):
            raw = np.asarray(column.to_numpy(zero_copy_only=False)).tobytes()
        else:
            raw = json.dumps(column.to_pylist()).encode()
        labels = hashlib.sha256(raw).hexdigest()
    return {
        "rows": rows,
        "features": json.loads(json.dumps(ds.features.to_dict(), sort_keys=True, default=str)),
        "image_column": image_column,
        "label_column": label_column,
        "sampled_rows": len(positions),
        "images_sha256": images.hexdigest(),
        "labels_sha256": labels,
    }


def data_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How two dataset fingerprints differ, in words (empty when they match)."""
    changes = []
    if old.get("rows") != new.get("rows"):
        changes.append(f"{old.get('rows')} rows then, {new.get('rows')} now")
    if (old.get("image_column"), old.get("label_column")) != (new.get("image_column"), new.get("label_column")):
        changes.append("other image or label columns")
    elif old.get("features") != new.get("features"):
        changes.append("other columns, column types or class names")
    if not changes and old.get("images_sha256") != new.get("images_sha256"):
        changes.append(f"other images among the {new.get('sampled_rows')} rows compared")
    if old.get("labels_sha256") != new.get("labels_sha256") and "other image or label columns" not in changes:
        changes.append("other labels")
    return changes
