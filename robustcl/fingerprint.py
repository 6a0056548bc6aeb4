"""Content hashes: of a model's weights (ties an evaluation report to the exact weights it measured) and of an image
tensor (ties pseudo-labels to the exact images they label)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


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
