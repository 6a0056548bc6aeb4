"""Projection heads for contrastive pre-training (torch only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .resnet import make_batch_norm, resolve_bn_branch, set_bn_branch


class ProjectionHead(nn.Module):
    """MLP projection head as in ACL: ``fc1(bias) → BN → ReLU → … → fcN(no bias) [→ BN]``.

    Only ``fc1`` has a bias; the others feed a BatchNorm, which makes a bias redundant. Without the last BN
    (SimCLR, AdvCL) ``last_bias`` gives the last linear layer its bias back. ``hidden_bn=False`` drops the hidden
    BNs, so the hidden linear layers keep their biases: ``fc1 → ReLU → … → fcN``, solo-learn's SimCLR projector.
    Layers are named ``fc{i}``/``bn{i}`` to match ACL checkpoints. With ``bn_branches`` every
    BN is a MultiBatchNorm1d and ``forward`` picks the branch per call.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 3,
        bn_branches: Sequence[str] = (),
        last_bn: bool = True,
        last_bias: bool = False,
        hidden_bn: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if len(set(bn_branches)) != len(bn_branches):
            raise ValueError(f"bn_branches must be unique, got {list(bn_branches)}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.last_bn = last_bn
        self.bn_branches = list(bn_branches)
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            is_last = i == num_layers - 1
            bias = i == 0 or (last_bias if is_last else not hidden_bn)
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1], bias=bias))
            if (hidden_bn and not is_last) or (is_last and last_bn):
                setattr(self, f"bn{i + 1}", make_batch_norm(dims[i + 1], self.bn_branches, dim=1))
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor, bn_branch: str | None = None) -> torch.Tensor:
        branch = resolve_bn_branch(self.bn_branches, bn_branch)
        if branch is None:
            return self._mlp(x)
        with set_bn_branch(self, branch):
            return self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            bn = getattr(self, f"bn{i}", None)
            if bn is not None:
                x = bn(x)
            if i < self.num_layers:
                x = self.relu(x)
        return x


__all__ = ["ProjectionHead"]
