"""``robustcl export --format native``: an ImageNet-stem basic/bottleneck encoder as transformers' own
``ResNetModel`` (``model_type: resnet``), which loads with plain transformers and no remote code. What that model
cannot express (a CIFAR stem, wide blocks, another stem padding or BatchNorm setting) is refused in one line."""

from __future__ import annotations

import re
from typing import Any

from .errors import UserError, shown
from .export_layout import EXPORT_MARKER, NATIVE_FORMAT
from .models import RobustCLResNetModel
from .models.configuration_robustcl import BLOCK_EXPANSION

REMOTE_CODE_FORMAT = "remote-code"
EXPORT_FORMATS = (REMOTE_CODE_FORMAT, NATIVE_FORMAT)
_NATIVE_FIX = "leave --format out (remote-code, the default: it loads with trust_remote_code=True)"
# robustcl's state-dict names, mapped onto transformers ResNetModel's by _native_name.
_STEM_ENTRY = re.compile(r"^backbone\.(conv|bn)1\.(.+)$")
_BLOCK_ENTRY = re.compile(r"^backbone\.layer(\d+)\.(\d+)\.(conv|bn)(\d)\.(.+)$")
_SHORTCUT_ENTRY = re.compile(r"^backbone\.layer(\d+)\.(\d+)\.shortcut\.([01])\.(.+)$")
_NATIVE_PART = {"conv": "convolution", "bn": "normalization", "0": "convolution", "1": "normalization"}


def checked_format(export_format: str, classifier: str | None = None) -> str:
    """``export_format`` when robustcl can write it (a native export holds an encoder only)."""
    if export_format not in EXPORT_FORMATS:
        raise UserError(
            f"unknown export format {shown(export_format)}", "--format", f"choose {' or '.join(EXPORT_FORMATS)}"
        )
    if export_format == NATIVE_FORMAT and classifier is not None:
        raise UserError(
            "a native export holds an encoder only, not a finetuned classifier",
            "--format native --classifier",
            f"drop --classifier to export the encoder natively, or {_NATIVE_FIX}",
        )
    return export_format


def check_native(config: Any) -> None:
    """Refuse (in one line) an encoder transformers' ResNet cannot express, before anything is written."""
    reason = _native_refusal(config)
    if reason is not None:
        raise UserError(f"--format native cannot export this encoder: {reason}", "--format native", _NATIVE_FIX)


def _native_refusal(config: Any) -> str | None:
    """Why transformers' ResNet cannot express the encoder ``config`` describes, or None when it can."""
    if config.stem != "imagenet":
        return (
            "transformers' ResNet has no CIFAR stem (3×3 stride-1 conv, no max-pool), only the ImageNet stem (7×7 "
            "stride-2 conv + max-pool)"
        )
    if config.block not in ("basic", "bottleneck"):
        return f"transformers' ResNet has no {config.block} (WideResNet) blocks, only basic and bottleneck ones"
    if config.resolved_stem_padding != 3:
        return f"transformers' ResNet pads its 7×7 stem conv by 3, this encoder's stem_padding is {config.stem_padding}"
    if config.batch_norm_eps != 1e-5 or config.batch_norm_momentum != 0.1:
        return (
            f"transformers' ResNet uses BatchNorm eps 1e-05 and momentum 0.1, this encoder's are eps "
            f"{config.batch_norm_eps:g} and momentum {config.batch_norm_momentum:g}"
        )
    if config.bn_branches:
        branches = len(config.bn_branches)
        return f"transformers' ResNet has one BatchNorm per layer, this encoder has {branches} BN branches"
    return None


def _native_name(name: str) -> str | None:
    """transformers' name for one of the encoder's state-dict entries; None for the normalisation buffers, which
    move to the image processor. Stages and the convs of a block count from 1 in robustcl, from 0 there."""
    if name in ("image_mean", "image_std"):
        return None
    if match := _STEM_ENTRY.match(name):
        return f"embedder.embedder.{_NATIVE_PART[match[1]]}.{match[2]}"
    if match := _BLOCK_ENTRY.match(name):
        stage, block, kind, index, rest = match.groups()
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(index) - 1}.{_NATIVE_PART[kind]}.{rest}"
    if match := _SHORTCUT_ENTRY.match(name):
        stage, block, index, rest = match.groups()
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{_NATIVE_PART[index]}.{rest}"
    raise ValueError(f"no transformers ResNet name for {name!r}")


def native_resnet(encoder: RobustCLResNetModel) -> Any:
    """The plain-BN ``encoder`` as transformers' ``ResNetModel`` (same weights, eval mode), which gives its features
    on pixels normalised with ``encoder.config.image_mean``/``image_std``. Refuses what that model cannot express."""
    from transformers import ResNetConfig, ResNetModel

    config = encoder.config
    check_native(config)
    native_config = ResNetConfig(
        num_channels=config.num_channels,
        embedding_size=config.stem_channels,
        hidden_sizes=[width * BLOCK_EXPANSION[config.block] for width in config.widths],
        depths=list(config.block_layers),
        layer_type=config.block,
        hidden_act="relu",
        downsample_in_first_stage=False,  # the first stage keeps the max-pool's resolution, as robustcl's
        downsample_in_bottleneck=False,  # stride on the 3×3 conv (torchvision v1.5), as robustcl's
        **{EXPORT_MARKER: NATIVE_FORMAT},
    )
    model = ResNetModel(native_config)
    state = {}
    for name, value in encoder.state_dict().items():
        target = _native_name(name)
        if target is not None:
            state[target] = value
    model.load_state_dict(state, strict=True)  # every tensor placed, none left at its initial value
    return model.eval()
