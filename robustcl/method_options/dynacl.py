"""``method.*`` of DynACL (robustcl/methods/dynacl.py): ACL's keys (its projector under ``method.acl``) and its
schedules under ``method.dynacl``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..encoder_record import Paper
from ..recipe import Recipe, Section
from .acl import ACLOptions

# DynACL's and DynACL++'s (the post-pretraining stage, robustcl/lpaft.py) paper.
DYNACL_PAPER = Paper(
    title="Rethinking the Effect of Data Augmentation in Adversarial Contrastive Learning",
    authors="Luo et al.",
    venue="ICLR 2023",
    url="https://arxiv.org/abs/2303.01289",
)


class DynACLSection(Section):
    """DynACL (Luo et al., ICLR 2023): ACL-DS with annealed augmentation and a growing adversarial weight."""

    reload_every_epochs: float = Field(
        50, gt=0, description="augmentation strength steps down every N epochs: 1 − ⌊e/N⌋·N/E (ends at 0.05)"
    )
    adversarial_weight_slope: float = Field(
        2 / 3,
        ge=0,
        description="adversarial weight w = min(1 + ⌊(e+1)/N⌋·(N/E)·slope, 2); loss = ½[(2−w)·clean + w·adv]",
    )
    momentum: float | None = Field(
        0.99,
        ge=0,
        lt=1,
        description="authors' code: the second view goes through an EMA copy of encoder and head with this "
        "momentum (quirk); null: both views through the same encoder, as in the paper",
    )
    export_encoder: Literal["momentum", "online"] = Field(
        "momentum",
        description="encoder exported and evaluated: momentum (the EMA copy, as PKU-ML/DYNACL train_DynACL.py saves "
        "model_encoder_k.pt for test_LF.py / LPAFT.py and validates encoder_k) or online (the trained one); "
        "with momentum null there is only the online one, which is exported either way",
    )


class DynACLOptions(ACLOptions):
    name: Literal["dynacl"] = "dynacl"  # type: ignore[assignment]
    dynacl: DynACLSection = Field(default_factory=DynACLSection)
    dual_stream_because: ClassVar[str | None] = "DynACL is dual-stream"

    def check_recipe(self, recipe: Recipe) -> None:
        # DynACL moves the crop's lower bound towards 1 as augmentation weakens (the authors' scale=(1 − 0.9·s, 1)):
        # below a high end of 1 the bounds cross at the first step-down, in the middle of training.
        if recipe.augment.crop_scale[1] != 1:
            raise ValueError(
                f"DynACL anneals the crop towards the whole image: augment.crop_scale must end at 1.0 with "
                f"method.name dynacl, got {list(recipe.augment.crop_scale)}"
            )
        super().check_recipe(recipe)
