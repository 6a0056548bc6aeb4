"""What a checkpoint records about the encoder it hands over, beside the weights: the encoder's transformers config
(its BN branches included), where its tensors sit in the checkpoint's weights file, the branch an export keeps and
the method's facts a model card states. With it a run's encoder is read back — and described — from ``models/``
and the checkpoint alone, without the training method's code (``encoder_loading`` reads it; ``Method.encoder_record``
writes it into ``train_state.json``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

TRAIN_STATE_KEY = "encoder"  # the record's key in a checkpoint's train_state.json


class Paper(BaseModel):
    """The publication a method follows (cited in model cards)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str
    authors: str
    venue: str
    url: str


class MethodCard(BaseModel):
    """The training method as a model card states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # method.name in the recipe
    display_name: str  # as the paper spells it
    paper: Paper | None
    objective: str  # the training objective in one line
    adversarial: bool  # trained against an adversary (False: a non-robust baseline)


class EncoderRecord(BaseModel):
    """A checkpoint's downstream encoder: how to build it, where its weights are, what to say about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict[str, Any]  # RobustCLResNetConfig.to_diff_dict(), as config.json holds it
    weights_prefix: str  # state-dict prefix of its tensors in the checkpoint's weights file, e.g. "encoder."
    export_branch: str | None  # the BN branch exports keep unless asked otherwise (None: a plain-BN encoder)
    method: MethodCard
