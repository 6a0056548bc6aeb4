"""``method.*`` of DeACL (robustcl/methods/deacl.py); no temperature: its loss is cosine similarities."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..recipe import MethodOptions, Section


class DeACLSection(Section):
    """DeACL (Zhang et al., ECCV 2022) stage 2: adversarial distillation of a student from a frozen teacher."""

    teacher: str = Field(
        "runs/simclr", description="stage-1 encoder: a robustcl run directory, an export folder or a Hub id"
    )
    teacher_revision: str | None = Field(None, description="Hub revision of the teacher")
    student_init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: the student starts as a copy of the teacher (needs the same model.*)"
    )
    adversarial_weight: float = Field(2.0, ge=0, description="λ in −cos(s, t) − λ·cos(s_adv, s) (trades_k)")


class DeACLOptions(MethodOptions):
    name: Literal["deacl"] = "deacl"
    deacl: DeACLSection = Field(default_factory=DeACLSection)
