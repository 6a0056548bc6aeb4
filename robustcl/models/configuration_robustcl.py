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

from .resnet import STEM_KERNEL, STEM_PADDING

STEMS = ("cifar", "imagenet")
# basic: two 3×3 convs (ResNet-18/34); bottleneck: 1×1 → 3×3 (stride here, torchvision v1.5) → 1×1 with 4× output
# channels (ResNet-50/101); wide_preact: BN-ReLU before each of two 3×3 convs (WideResNets as TRADES/AWP use them).
BLOCKS = ("basic", "bottleneck", "wide_preact")
# Output channels of a block per channel of its stage width.
BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4, "wide_preact": 1}
# A WideResNet's stem has 16 channels whatever its widen factor (Zagoruyko & Komodakis; TRADES, AWP).
WIDE_STEM_WIDTH = 16

# Sizes are checked here, from the numbers alone, because building the model allocates every tensor first: a
# config.json or recipe with block_layers [200000, ...] or widths of 1e5 would otherwise hang for minutes growing
# past the machine's memory before anything could refuse it. Each limit is far above any published ResNet.
# ResNet-1202 (the deepest CIFAR ResNet) has 200 basic blocks per stage.
MAX_BLOCKS_PER_STAGE = 512
# Wide ResNets used for robustness (WRN-70-16, WRN-94-16) stop at 1024 channels.
MAX_WIDTH = 8192
# Every stage halves the feature map: past ~8 stages even a 224-pixel image is down to 1×1.
MAX_STAGES = 16
# The largest robust ResNets (WRN-70-16: 267M, WRN-94-16: 367M parameters) with room to spare; 4 GB in float32.
MAX_PARAMETERS = 1_000_000_000
# Every BatchNorm holds one set of parameters per branch; methods use at most three (AdvCL).
MAX_BN_BRANCHES = 16


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
        block: str = "basic",
        stem_width: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Lists (not tuples) so that a JSON round trip gives back an equal config.
        self.block_layers = _int_list("block_layers", block_layers)
        self.widths = _int_list("widths", widths)
        self.stem = stem
        self.stem_padding = None if stem_padding is None else int(stem_padding)
        self.num_channels = int(num_channels)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.bn_branches = list(bn_branches)
        self.batch_norm_eps = float(batch_norm_eps)
        self.batch_norm_momentum = float(batch_norm_momentum)
        # Absent from config.json files written before these keys existed: the basic block and widths[0] they used.
        self.block = block
        if stem_width is not None and not _is_integer(stem_width):
            raise ValueError(f"stem_width must be an integer or None, got {_brief(stem_width)}")
        self.stem_width = None if stem_width is None else int(stem_width)
        self._check()
        super().__init__(**kwargs)

    def _check(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {self.stem!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {list(BLOCKS)}, got {_brief(self.block)}")
        if self.stem_width is not None and not 1 <= self.stem_width <= MAX_WIDTH:
            raise ValueError(f"stem_width must be between 1 and {MAX_WIDTH} channels or None, got {self.stem_width}")
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
        self._check_size()

    def _check_size(self) -> None:
        """Refuse a network too large to build, before anything is allocated (limits: see MAX_* above)."""
        if len(self.block_layers) > MAX_STAGES:
            raise ValueError(f"block_layers and widths may have at most {MAX_STAGES} stages, got {len(self.widths)}")
        if max(self.block_layers) > MAX_BLOCKS_PER_STAGE:
            raise ValueError(
                f"every entry of block_layers must be <= {MAX_BLOCKS_PER_STAGE} blocks, got {_brief(self.block_layers)}"
            )
        if max(self.widths) > MAX_WIDTH:
            raise ValueError(f"every entry of widths must be <= {MAX_WIDTH} channels, got {_brief(self.widths)}")
        if len(self.bn_branches) > MAX_BN_BRANCHES:
            raise ValueError(f"bn_branches may name at most {MAX_BN_BRANCHES} branches, got {len(self.bn_branches)}")
        if self.num_channels > MAX_WIDTH:
            raise ValueError(f"num_channels must be <= {MAX_WIDTH}, got {self.num_channels}")
        # Of the plain-BN encoder (what an export holds): BN branches add a fraction of a percent.
        size = estimate_parameters(
            self.block_layers, self.widths, self.stem, self.num_channels, block=self.block, stem_width=self.stem_width
        )
        if size > MAX_PARAMETERS:
            raise ValueError(
                f"block_layers {_brief(self.block_layers)} and widths {_brief(self.widths)} make about {size:,} "
                f"parameters, more than the {MAX_PARAMETERS:,} robustcl builds: lower block_layers or widths"
            )

    def estimated_parameters(self) -> int:
        """Values in the model's state dict (parameters and BatchNorm statistics, every BN branch), from the
        config alone: what building the model allocates, known before building it."""
        return estimate_parameters(
            self.block_layers,
            self.widths,
            self.stem,
            self.num_channels,
            max(1, len(self.bn_branches)),
            block=self.block,
            stem_width=self.stem_width,
        )

    @property
    def hidden_size(self) -> int:
        """Dimension of the pooled feature (output channels of the last stage: 4× its width for bottlenecks)."""
        return self.widths[-1] * BLOCK_EXPANSION[self.block]

    @property
    def stem_channels(self) -> int:
        """Output channels of the stem conv, with the block's default filled in."""
        return stem_channels(self.widths, self.block, self.stem_width)

    @property
    def resolved_stem_padding(self) -> int:
        """Stem conv padding, with the stem's default filled in."""
        return STEM_PADDING[self.stem] if self.stem_padding is None else self.stem_padding


def _int_list(name: str, values: Any) -> list[int]:
    """``values`` as a list of integers; a ValueError (which transformers and robustcl report) for anything else,
    e.g. a number where config.json needs a list, a fraction, or an infinite float."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(map(_is_integer, values)):
        raise ValueError(f"{name} must be a list of integers, got {_brief(values)}")
    return [int(value) for value in values]


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # False for inf and NaN


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _batch_norm_values(channels: int, copies: int) -> int:
    # weight, bias, running_mean, running_var per channel; num_batches_tracked once; per BN branch.
    return copies * (4 * channels + 1)


def stem_channels(widths: Sequence[int], block: str = "basic", stem_width: int | None = None) -> int:
    """Output channels of the stem conv: ``stem_width``, else 16 for WideResNets and ``widths[0]`` otherwise."""
    if stem_width is not None:
        return stem_width
    return WIDE_STEM_WIDTH if block == "wide_preact" else widths[0]


def _block_values(block: str, in_planes: int, width: int, stride: int, bn_copies: int) -> int:
    """Values in one block's state dict (see resnet.py for the layouts)."""
    out = width * BLOCK_EXPANSION[block]
    projection = stride != 1 or in_planes != out  # the 1×1 shortcut conv of a block that changes the shape
    if block == "bottleneck":
        total = in_planes * width + 9 * width * width + width * out
        total += 2 * _batch_norm_values(width, bn_copies) + _batch_norm_values(out, bn_copies)
        return total + (in_planes * out + _batch_norm_values(out, bn_copies) if projection else 0)
    if block == "wide_preact":  # BN on the block's input; the shortcut conv has no BN
        total = 9 * in_planes * width + 9 * width * width
        total += _batch_norm_values(in_planes, bn_copies) + _batch_norm_values(width, bn_copies)
        return total + (in_planes * width if projection else 0)
    total = 9 * in_planes * width + 9 * width * width + 2 * _batch_norm_values(width, bn_copies)
    return total + (in_planes * width + _batch_norm_values(width, bn_copies) if projection else 0)


def estimate_parameters(
    block_layers: Sequence[int],
    widths: Sequence[int],
    stem: str = "cifar",
    num_channels: int = 3,
    bn_copies: int = 1,
    block: str = "basic",
    stem_width: int | None = None,
) -> int:
    """Values in the state dict of the ResNet these numbers describe (convolutions, BatchNorm parameters and
    statistics, the normalisation buffers), in closed form: no tensor is built, so any size is cheap to check.

    ``bn_copies`` is the number of BN branches (1 for plain BatchNorm).
    """
    kernel = STEM_KERNEL.get(stem, 7)
    first = stem_channels(widths, block, stem_width)
    total = 2 * num_channels + num_channels * first * kernel * kernel
    if block != "wide_preact":  # pre-activation blocks normalise their own input instead
        total += _batch_norm_values(first, bn_copies)
    in_planes = first
    for stage, (blocks, width) in enumerate(zip(block_layers, widths)):
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            total += _block_values(block, in_planes, width, stride, bn_copies)
            in_planes = width * BLOCK_EXPANSION[block]
    if block == "wide_preact":  # the final BN-ReLU of a pre-activation network
        total += _batch_norm_values(in_planes, bn_copies)
    return total


__all__ = [
    "BLOCKS",
    "BLOCK_EXPANSION",
    "MAX_BLOCKS_PER_STAGE",
    "MAX_BN_BRANCHES",
    "MAX_PARAMETERS",
    "MAX_STAGES",
    "MAX_WIDTH",
    "RobustCLResNetConfig",
    "WIDE_STEM_WIDTH",
    "estimate_parameters",
    "stem_channels",
]
