"""Pure loss functions on feature tensors (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: row i of ``z1`` and row i of ``z2`` are a positive pair, every other row a negative.

    Cosine similarity divided by ``temperature``; each of the 2N anchors is scored against the 2N − 1 others
    (its own similarity removed); the loss is the mean over the 2N anchors.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"view features differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)
