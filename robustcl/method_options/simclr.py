"""``method.*`` of SimCLR (robustcl/methods/simclr.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..recipe import MethodOptions, Section


class SimCLRSection(Section):
    """SimCLR (Chen et al., ICML 2020): the non-robust baseline and DeACL's teacher stage."""

    projector_hidden_dim: int = Field(2048, gt=0, description="projector hidden width (solo-learn CIFAR: 2048)")
    projector_dim: int = Field(256, gt=0, description="projector output width (solo-learn CIFAR: 256)")
    projector_bn: bool = Field(
        True,
        description="BatchNorm after the projector's hidden layer (fc → BN → ReLU → fc); false: fc → ReLU → fc, "
        "as solo-learn's solo/methods/simclr.py (recipes/simclr.yaml). true is the projector of runs recorded "
        "before this key",
    )
    bn_per_view: bool = Field(
        False,
        description="encode each view in a forward pass of its own, so BatchNorm normalises a view by its own "
        "statistics, as solo-learn's BaseMethod.training_step (solo/methods/base.py); false: both views in one pass",
    )


class SimCLROptions(MethodOptions):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    simclr: SimCLRSection = Field(default_factory=SimCLRSection)
    per_view_extras = True  # augment.blur_p / solarize_p: solo-learn's per-view pipelines (views.simclr_view_pair)
