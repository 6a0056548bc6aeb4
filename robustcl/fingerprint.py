"""A content hash of a model's weights: it ties an evaluation report to the exact weights it measured."""

from __future__ import annotations

import hashlib

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
