"""``method.*`` of ACL (robustcl/methods/acl.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
