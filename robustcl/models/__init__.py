"""Encoders and heads (torch + transformers only; also shipped as remote code with exported models)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_robustcl import RobustCLResNetConfig
from .heads import ProjectionHead
from .modeling_robustcl import (
    RobustCLResNetForImageClassification,
    RobustCLResNetModel,
    RobustCLResNetPreTrainedModel,
)
from .resnet import MultiBatchNorm, make_batch_norm, set_bn_branch


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModel / AutoModelForImageClassification.from_pretrained(dir_or_repo) resolve
    "robustcl-resnet" without trust_remote_code. Idempotent. Runs when this package is imported, which
    ``import robustcl`` arranges as soon as the process loads transformers' Auto classes (robustcl.auto_registration).
    """
    AutoConfig.register(RobustCLResNetConfig.model_type, RobustCLResNetConfig, exist_ok=True)
    AutoModel.register(RobustCLResNetConfig, RobustCLResNetModel, exist_ok=True)
    AutoModelForImageClassification.register(RobustCLResNetConfig, RobustCLResNetForImageClassification, exist_ok=True)


register_auto_classes()

__all__ = [
    "MultiBatchNorm",
    "ProjectionHead",
    "RobustCLResNetConfig",
    "RobustCLResNetForImageClassification",
    "RobustCLResNetModel",
    "RobustCLResNetPreTrainedModel",
    "make_batch_norm",
    "register_auto_classes",
    "set_bn_branch",
]
