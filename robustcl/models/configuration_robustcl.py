"""Configuration of the RobustCL ResNet encoder.

This file is exported as transformers remote code, so it may import only torch,
transformers, the standard library and sibling files (relative imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

STEMS = ("cifar", "imagenet")


class RobustCLResNetConfig(PreTrainedConfig):
    """ResNet encoder whose BatchNorms may be multi-branch (e.g. clean/adversarial dual BN).

    Inputs are pixels in [0, 1]; the model normalises them with ``image_mean``/``image_std``.
    Defaults describe the CIFAR ResNet-18 used by ACL/AdvCL/DeACL.
    """

    model_type = "robustcl-resnet"

    # A custom __init__ (rather than dataclass fields) keeps the class loadable on transformers 4.x and 5.x.
    def __init__(
        self,
        block_layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "cifar",
        stem_padding: int | None = None,
        num_channels: int = 3,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        bn_branches: Sequence[str] = (),
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
        **kwargs: Any,
    ) -> None:
        # Lists (not tuples) so that a JSON round trip gives back an equal config.
        self.block_layers = [int(n) for n in block_layers]
        self.widths = [int(w) for w in widths]
        self.stem = stem
        self.stem_padding = None if stem_padding is None else int(stem_padding)
        self.num_channels = int(num_channels)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.bn_branches = list(bn_branches)
        self.batch_norm_eps = float(batch_norm_eps)
        self.batch_norm_momentum = float(batch_norm_momentum)
        self._check()
        super().__init__(**kwargs)

    def _check(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {self.stem!r}")
        if not self.block_layers:
            raise ValueError("block_layers must name at least one stage")
        if len(self.widths) != len(self.block_layers):
            raise ValueError(
                f"widths ({len(self.widths)} entries) and block_layers ({len(self.block_layers)} entries) "
                "must have the same length"
            )
        if any(n < 1 for n in self.block_layers):
            raise ValueError(f"every entry of block_layers must be >= 1, got {self.block_layers}")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"every entry of widths must be >= 1, got {self.widths}")
        if self.stem_padding is not None and self.stem_padding < 0:
            raise ValueError(f"stem_padding must be >= 0 or None, got {self.stem_padding}")
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {self.num_channels}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"image_mean and image_std need num_channels={self.num_channels} entries, got "
                f"{len(self.image_mean)} and {len(self.image_std)}"
            )
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std entries must be > 0, got {self.image_std}")
        for name in self.bn_branches:
            # Branch names become state-dict path components (nn.ModuleDict keys).
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"bn_branches entries must be non-empty strings without '.', got {name!r}")
        if len(set(self.bn_branches)) != len(self.bn_branches):
            raise ValueError(f"bn_branches must be unique, got {self.bn_branches}")
        if self.batch_norm_eps <= 0:
            raise ValueError(f"batch_norm_eps must be > 0, got {self.batch_norm_eps}")
        if not 0.0 <= self.batch_norm_momentum <= 1.0:
            raise ValueError(f"batch_norm_momentum must be in [0, 1], got {self.batch_norm_momentum}")

    @property
    def hidden_size(self) -> int:
        """Dimension of the pooled feature (width of the last stage)."""
        return self.widths[-1]

    @property
    def resolved_stem_padding(self) -> int:
        """Stem conv padding, with the stem's default filled in."""
        if self.stem_padding is not None:
            return self.stem_padding
        return 1 if self.stem == "cifar" else 3


__all__ = ["RobustCLResNetConfig"]
