"""Encoders and heads (torch + transformers only; also shipped as remote code with exported models)."""

from transformers import AutoConfig, AutoModel

from .configuration_robustcl import RobustCLResNetConfig
from .heads import ProjectionHead
from .modeling_robustcl import RobustCLResNetModel, RobustCLResNetPreTrainedModel
from .resnet import MultiBatchNorm, make_batch_norm, set_bn_branch

# Lets AutoModel.from_pretrained(dir) resolve "robustcl-resnet" without trust_remote_code
# once robustcl is imported.
AutoConfig.register(RobustCLResNetConfig.model_type, RobustCLResNetConfig, exist_ok=True)
AutoModel.register(RobustCLResNetConfig, RobustCLResNetModel, exist_ok=True)

__all__ = [
    "MultiBatchNorm",
    "ProjectionHead",
    "RobustCLResNetConfig",
    "RobustCLResNetModel",
    "RobustCLResNetPreTrainedModel",
    "make_batch_norm",
    "set_bn_branch",
]
