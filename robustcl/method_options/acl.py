"""``method.*`` of ACL (robustcl/methods/acl.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..recipe import MethodOptions, Section


class ACLSection(Section):
    """ACL (Jiang et al., NeurIPS 2020)."""

    variant: Literal["ds", "a2a", "a2s"] = Field(
        "ds",
        description="ds: clean+adversarial dual stream (dual BN); a2a: both views attacked; a2s: one view",
    )
    projector_layers: Literal[2, 3] = Field(3, description="projection head depth (paper: 3)")
    projector_dim: int | None = Field(None, gt=0, description="projection width (default: feature dim)")


class ACLOptions(MethodOptions):
    name: Literal["acl"] = "acl"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    acl: ACLSection = Field(default_factory=ACLSection)
    # Why a method built on ACL's options trains ACL-DS only (the start of its error), or None: every variant trains.
    dual_stream_because: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _dual_stream(self) -> ACLOptions:
        if self.dual_stream_because is not None and self.acl.variant != "ds":
            raise ValueError(
                f"{self.dual_stream_because}: method.acl.variant must be 'ds' with method.name {self.name}"
            )
        return self
