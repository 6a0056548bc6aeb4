"""``method.*`` of ACL-AIR and DynACL-AIR (robustcl/methods/air.py): ACL's / DynACL's keys and the two invariance
regularisers under ``method.air``. Defaults: GodXuxilie/Enhancing_ACL_via_AIR ``pretraining.py`` (argparse) and
``AIR.py`` (``AIR_Loss``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..recipe import Section
from .acl import ACLOptions
from .dynacl import DynACLOptions, DynACLSection


class AIRSection(Section):
    """AIR (Xu et al., NeurIPS 2023): KL invariance regularisers on ACL's / DynACL's dual-stream loss."""

    lambda1: float = Field(
        0.5, ge=0, description="weight of the standard invariant regulariser (SIR; pretraining.py --lambda1)"
    )
    lambda2: float = Field(
        0.5, ge=0, description="weight of the adversarial invariant regulariser (AIR; pretraining.py --lambda2)"
    )
    kl_input: Literal["probabilities", "log_probabilities"] = Field(
        "probabilities",
        description="AIR.py hands F.kl_div probabilities where it expects log-probabilities (quirk): each term is "
        "Σ q·(log q − p); log_probabilities: the KL divergences Σ q·(log q − log p) the paper writes",
    )
    contrastive_sum: bool = Field(
        True,
        description="AIR.py adds the clean and adversarial NT-Xent ((1 − w)·clean + (1 + w)·adv); false: ACL's / "
        "DynACL's ½-average, so that with lambda1 = lambda2 = 0 the loss is method acl's / dynacl's",
    )


class ACLAIROptions(ACLOptions):
    name: Literal["acl_air"] = "acl_air"  # type: ignore[assignment]
    air: AIRSection = Field(default_factory=AIRSection)
    dual_stream_because: ClassVar[str | None] = "AIR regularises ACL-DS"


class DynACLAIRSection(DynACLSection):
    """DynACL's schedules as AIR's pretraining.py --DynAug runs them: one encoder, the weight of the same epoch."""

    adversarial_weight_slope: float = Field(
        2 / 3,
        ge=0,
        description="adversarial weight w = 1 + slope·(1 − s), s the epoch's augmentation strength (pretraining.py "
        "LAMBDA = 2/3: weight = LAMBDA·(1 − strength), no lead of one epoch, no cap); loss (2 − w)·clean + w·adv",
    )
    momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="must be null: AIR's pretraining.py trains one encoder (no moving-average copy, unlike "
        "PKU-ML/DYNACL's train_DynACL.py)",
    )
    export_encoder: Literal["momentum", "online"] = Field(
        "online", description="the one encoder is exported (momentum is null, so there is no other)"
    )


class DynACLAIROptions(DynACLOptions):
    name: Literal["dynacl_air"] = "dynacl_air"  # type: ignore[assignment]
    dynacl: DynACLAIRSection = Field(default_factory=DynACLAIRSection)
    air: AIRSection = Field(default_factory=AIRSection)
    dual_stream_because: ClassVar[str | None] = "AIR regularises ACL-DS"

    @model_validator(mode="after")
    def _one_encoder(self) -> DynACLAIROptions:
        if self.dynacl.momentum is not None:
            raise ValueError(
                f"method.dynacl.momentum must be null with method.name dynacl_air (AIR's pretraining.py has no "
                f"moving-average encoder), got {self.dynacl.momentum}"
            )
        return self
