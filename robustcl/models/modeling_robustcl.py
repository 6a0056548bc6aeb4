"""Hugging Face wrapper around the RobustCL ResNet encoder.

This file is exported as transformers remote code, so it may import only torch,
transformers, the standard library and sibling files (relative imports).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutputWithNoAttention

from .configuration_robustcl import RobustCLResNetConfig
from .resnet import ResNetBackbone, resolve_bn_branch, set_bn_branch

try:
    # transformers >= 5: these initialisers skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:
    from torch.nn import init


def _copy_(tensor: torch.Tensor, value: torch.Tensor) -> None:
    if hasattr(init, "copy_"):
        init.copy_(tensor, value)
    else:
        with torch.no_grad():
            tensor.copy_(value)


class RobustCLResNetPreTrainedModel(PreTrainedModel):
    config_class = RobustCLResNetConfig
    base_model_prefix = "robustcl"
    main_input_name = "pixel_values"
    input_modalities = "image"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BasicBlock", "Bottleneck", "WideBasicBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            # torch's own Linear default
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight.shape[1]) if module.weight.shape[1] > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, RobustCLResNetModel):
            cfg = module.config
            shape = module.image_mean.shape
            _copy_(module.image_mean, torch.tensor(cfg.image_mean, dtype=module.image_mean.dtype).view(shape))
            _copy_(module.image_std, torch.tensor(cfg.image_std, dtype=module.image_std.dtype).view(shape))


class RobustCLResNetModel(RobustCLResNetPreTrainedModel):
    """ResNet encoder taking pixels in [0, 1]; normalisation happens inside.

    With ``config.bn_branches`` set, every BatchNorm is a :class:`MultiBatchNorm` and each
    forward call picks its branch through ``bn_branch``.
    """

    # Loading the encoder alone from a classifier export leaves the head out on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]

    def __init__(self, config: RobustCLResNetConfig) -> None:
        super().__init__(config)
        shape = (1, config.num_channels, 1, 1)
        # Persistent so that exported checkpoints carry their own normalisation.
        self.register_buffer("image_mean", torch.tensor(config.image_mean, dtype=torch.float32).view(shape))
        self.register_buffer("image_std", torch.tensor(config.image_std, dtype=torch.float32).view(shape))
        self.backbone = ResNetBackbone(
            block_layers=config.block_layers,
            widths=config.widths,
            stem=config.stem,
            stem_padding=config.stem_padding,
            num_channels=config.num_channels,
            bn_branches=config.bn_branches,
            eps=config.batch_norm_eps,
            momentum=config.batch_norm_momentum,
            block=config.block,
            stem_width=config.stem_width,
        )
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    @property
    def bn_branches(self) -> list[str]:
        return list(self.config.bn_branches)

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the normalised input of the backbone."""
        x = (pixel_values - self.image_mean) / self.image_std
        # from_pretrained(dtype=...) may leave the buffers in float32 while the weights are half precision.
        return x.to(self.backbone.conv1.weight.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bn_branch: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        """Encode ``pixel_values`` (N×C×H×W in [0, 1]).

        ``last_hidden_state`` is the final feature map, ``pooler_output`` its global average
        (N×hidden_size); ``hidden_states`` holds the stem output then each stage output.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        branch = resolve_bn_branch(self.config.bn_branches, bn_branch)

        x = self.normalize(pixel_values)
        if branch is None:
            stages = self.backbone.forward_stages(x)
        else:
            # Restored on exit, so a later stray call to a BN fails loudly instead of using a stale branch.
            with set_bn_branch(self.backbone, branch):
                stages = self.backbone.forward_stages(x)
        feature_map = stages[-1]
        pooled = torch.flatten(self.pooler(feature_map), 1)
        hidden_states = tuple(stages) if output_hidden_states else None

        if not return_dict:
            return tuple(v for v in (feature_map, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=feature_map, pooler_output=pooled, hidden_states=hidden_states
        )

    def to_single_branch(self, branch: str | None = None) -> RobustCLResNetModel:
        """A new plain-BN model using ``branch``'s BatchNorm parameters and running statistics.

        In eval mode its outputs equal ``self(x, bn_branch=branch)``. ``branch`` may be omitted
        when there is exactly one branch. A plain-BN model returns a copy of itself (``branch``
        is then ignored).
        """
        if not self.config.bn_branches:
            return copy.deepcopy(self)
        if branch is None and len(self.config.bn_branches) > 1:
            raise ValueError(f"choose the BN branch to keep; valid branches: {list(self.config.bn_branches)}")
        branch = resolve_bn_branch(self.config.bn_branches, branch)

        new_config = copy.deepcopy(self.config)
        new_config.bn_branches = []
        new_model = type(self)(new_config)

        keep = f".branches.{branch}."
        state = {}
        for key, value in self.state_dict().items():
            if ".branches." not in key:
                state[key] = value
            elif keep in key:
                state[key.replace(keep, ".")] = value
        new_model.load_state_dict(state, strict=True)

        ref = next(self.parameters())
        new_model.to(device=ref.device, dtype=ref.dtype)
        new_model.train(self.training)
        return new_model


class RobustCLResNetForImageClassification(RobustCLResNetPreTrainedModel):
    """The encoder with a linear head on its pooled features: pixels in [0, 1] → class logits.

    This is what a finetuning protocol produces (SLF: the pretrained encoder with a trained head; AFF: both
    trained). ``AutoModel`` loads the encoder alone from the same folder (weights under ``robustcl.``).
    """

    def __init__(self, config: RobustCLResNetConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.robustcl = RobustCLResNetModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        bn_branch: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple[torch.Tensor, ...]:
        """Logits for ``pixel_values`` (N×C×H×W in [0, 1]); with ``labels``, also the cross-entropy loss."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        encoded = self.robustcl(
            pixel_values, bn_branch=bn_branch, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.classifier(encoded.pooler_output)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        if not return_dict:
            return tuple(v for v in (loss, logits, encoded.hidden_states) if v is not None)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=encoded.hidden_states)


__all__ = ["RobustCLResNetForImageClassification", "RobustCLResNetModel", "RobustCLResNetPreTrainedModel"]
