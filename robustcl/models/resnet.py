"""Plain torch building blocks: multi-branch BatchNorm and the CIFAR/ImageNet-stem ResNet (basic, bottleneck or
wide pre-activation blocks).

This file is exported as transformers remote code, so it may import only torch and the
standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import nn

# Each stem's first convolution: its side, and its padding when the config gives none (stem_padding null).
STEM_KERNEL = {"cifar": 3, "imagenet": 7}
STEM_PADDING = {"cifar": 1, "imagenet": 3}


class MultiBatchNorm(nn.Module):
    """BatchNorm with one independent set of parameters and running statistics per branch.

    Dual BN (ACL/AdvCL) keeps clean and adversarial statistics apart; ``active_branch``
    selects which branch the next forward uses.
    """

    def __init__(
        self,
        num_features: int,
        branches: Sequence[str],
        dim: int = 2,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 (BatchNorm1d) or 2 (BatchNorm2d), got {dim}")
        if not branches:
            raise ValueError("MultiBatchNorm needs at least one branch")
        if len(set(branches)) != len(branches):
            raise ValueError(f"branch names must be unique, got {list(branches)}")
        bn_cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.num_features = num_features
        self.dim = dim
        self.branches = nn.ModuleDict({name: bn_cls(num_features, eps=eps, momentum=momentum) for name in branches})
        self.active_branch: str | None = None

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_branch is None:
            raise RuntimeError(
                f"MultiBatchNorm has no active branch (branches: {self.branch_names}); pass bn_branch=... "
                "to the model/head forward or use set_bn_branch(module, branch)"
            )
        return self.branches[self.active_branch](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, active_branch={self.active_branch!r}"


def make_batch_norm(
    num_features: int,
    branches: Sequence[str],
    dim: int = 2,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> nn.Module:
    """Plain ``BatchNorm{dim}d`` when ``branches`` is empty, else a :class:`MultiBatchNorm`."""
    if branches:
        return MultiBatchNorm(num_features, branches, dim=dim, eps=eps, momentum=momentum)
    if dim == 2:
        return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
    if dim == 1:
        return nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
    raise ValueError(f"dim must be 1 or 2, got {dim}")


def is_multi_batch_norm(module: nn.Module) -> bool:
    # Duck-typed too, because a checkpoint loaded as remote code has its own copy of the class.
    return isinstance(module, MultiBatchNorm) or (
        type(module).__name__ == "MultiBatchNorm" and hasattr(module, "active_branch")
    )


def multi_batch_norms(module: nn.Module) -> list[nn.Module]:
    """All multi-branch BatchNorms inside ``module`` (itself included)."""
    return [m for m in module.modules() if is_multi_batch_norm(m)]


def bn_branch_names(module: nn.Module) -> list[str]:
    """Branch names available in every multi-branch BatchNorm of ``module`` ([] if it has none)."""
    mbns = multi_batch_norms(module)
    if not mbns:
        return []
    common = set.intersection(*(set(m.branches.keys()) for m in mbns))
    return [name for name in mbns[0].branches.keys() if name in common]


class _BranchRestorer:
    """Returned by :func:`set_bn_branch`; as a context manager it restores the previous branches."""

    def __init__(self, previous: list[tuple[nn.Module, str | None]]) -> None:
        self._previous = previous

    def restore(self) -> None:
        for mbn, branch in self._previous:
            mbn.active_branch = branch

    def __enter__(self) -> _BranchRestorer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


def set_bn_branch(module: nn.Module, branch: str | None) -> _BranchRestorer:
    """Set ``active_branch`` on every MultiBatchNorm inside ``module``.

    Takes effect immediately; used as ``with set_bn_branch(m, "pgd"): ...`` the previous
    branches come back on exit. ``branch=None`` deactivates all branches.
    """
    mbns = multi_batch_norms(module)
    if branch is not None:
        valid = bn_branch_names(module)
        if not mbns:
            raise ValueError(
                f"bn_branch={branch!r} given, but {type(module).__name__} has only plain BatchNorm; use bn_branch=None"
            )
        if branch not in valid:
            raise ValueError(f"unknown BN branch {branch!r}; valid branches: {valid}")
    previous = [(m, m.active_branch) for m in mbns]
    for m in mbns:
        m.active_branch = branch
    return _BranchRestorer(previous)


def resolve_bn_branch(branches: Sequence[str], bn_branch: str | None) -> str | None:
    """Check a per-call ``bn_branch`` against a module's configured branches.

    Plain BN needs ``None``; several branches need an explicit choice; a single branch is
    the default.
    """
    branches = list(branches)
    if not branches:
        if bn_branch is not None:
            raise ValueError(f"bn_branch={bn_branch!r} given, but this module uses plain BatchNorm; use None")
        return None
    if bn_branch is None:
        if len(branches) == 1:
            return branches[0]
        raise ValueError(f"this module has several BN branches {branches}; pass bn_branch=<one of them>")
    if bn_branch not in branches:
        raise ValueError(f"unknown BN branch {bn_branch!r}; valid branches: {branches}")
    return bn_branch


def _shortcut(
    in_planes: int, out_planes: int, stride: int, bn_branches: Sequence[str], eps: float, momentum: float
) -> nn.Sequential:
    """The identity (an empty Sequential), or a 1x1 conv + BN projection when the block changes the shape."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        make_batch_norm(out_planes, bn_branches, 2, eps, momentum),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 conv + BN shortcut when the shape changes."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        bn_branches: Sequence[str] = (),
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = make_batch_norm(planes, bn_branches, 2, eps, momentum)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = make_batch_norm(planes, bn_branches, 2, eps, momentum)
        self.relu = nn.ReLU(inplace=False)
        # Empty Sequential for the identity keeps kuangliu/ACL state-dict names (shortcut.0, shortcut.1).
        self.shortcut = _shortcut(in_planes, planes, stride, bn_branches, eps, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 → 3x3 → 1x1 conv with 4x output channels, the stride on the 3x3 conv (torchvision's
    ResNet v1.5, transformers' ``downsample_in_bottleneck=False``); 1x1 conv + BN shortcut when the shape changes."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        bn_branches: Sequence[str] = (),
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = make_batch_norm(planes, bn_branches, 2, eps, momentum)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = make_batch_norm(planes, bn_branches, 2, eps, momentum)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = make_batch_norm(out_planes, bn_branches, 2, eps, momentum)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = _shortcut(in_planes, out_planes, stride, bn_branches, eps, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block as the robustness literature's WideResNets (TRADES, AWP) use it: BN-ReLU
    before each 3x3 conv, no activation after the sum. When the shape changes the shortcut is a 1x1 conv (no BN)
    of the *activated* input, else the raw input. No dropout (those WRN-34-10s train with a drop rate of 0)."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        bn_branches: Sequence[str] = (),
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.bn1 = make_batch_norm(in_planes, bn_branches, 2, eps, momentum)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = make_batch_norm(planes, bn_branches, 2, eps, momentum)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        residual = self.shortcut(activated) if len(self.shortcut) else x
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


BLOCK_CLASSES: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "wide_preact": WideBasicBlock,
}


class ResNetBackbone(nn.Module):
    """ResNet trunk without pooling or classifier; ``forward`` returns the final feature map.

    Module names follow kuangliu/pytorch-cifar and the ACL code (conv1, bn1, layer1..N). With pre-activation
    (``wide_preact``) blocks the stem is the conv alone (``bn1`` is None: each block normalises its input) and the
    trunk ends with BN-ReLU (``bn_final``), so the feature map is activated as with the other blocks.
    """

    def __init__(
        self,
        block_layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "cifar",
        stem_padding: int | None = None,
        num_channels: int = 3,
        bn_branches: Sequence[str] = (),
        eps: float = 1e-5,
        momentum: float = 0.1,
        block: str = "basic",
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if block not in BLOCK_CLASSES:
            raise ValueError(f"block must be one of {list(BLOCK_CLASSES)}, got {block!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if len(block_layers) != len(widths) or not widths:
            raise ValueError("block_layers and widths must be non-empty and of equal length")
        self.stem = stem
        self.block = block
        self.num_stages = len(widths)
        pre_activation = block == "wide_preact"
        first = stem_width if stem_width is not None else 16 if pre_activation else widths[0]
        kernel, pad = STEM_KERNEL[stem], STEM_PADDING[stem] if stem_padding is None else stem_padding
        if stem == "cifar":
            self.conv1 = nn.Conv2d(num_channels, first, kernel_size=kernel, stride=1, padding=pad, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(num_channels, first, kernel_size=kernel, stride=2, padding=pad, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = None if pre_activation else make_batch_norm(first, bn_branches, 2, eps, momentum)
        self.relu = nn.ReLU(inplace=False)
        block_class = BLOCK_CLASSES[block]
        in_planes = first
        for i, (n_blocks, width) in enumerate(zip(block_layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n_blocks):
                block_stride = stride if b == 0 else 1
                blocks.append(block_class(in_planes, width, block_stride, bn_branches, eps, momentum))
                in_planes = width * block_class.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = make_batch_norm(in_planes, bn_branches, 2, eps, momentum) if pre_activation else None
        self.out_channels = in_planes

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem output followed by the output of every stage (the last one is the feature map; with pre-activation
        blocks, after the final BN-ReLU)."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        x = self.maxpool(x)
        outputs = [x]
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            outputs.append(x)
        if self.bn_final is not None:
            outputs[-1] = self.relu(self.bn_final(outputs[-1]))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


__all__ = [
    "BLOCK_CLASSES",
    "BasicBlock",
    "Bottleneck",
    "WideBasicBlock",
    "MultiBatchNorm",
    "ResNetBackbone",
    "bn_branch_names",
    "is_multi_batch_norm",
    "make_batch_norm",
    "multi_batch_norms",
    "resolve_bn_branch",
    "set_bn_branch",
]
