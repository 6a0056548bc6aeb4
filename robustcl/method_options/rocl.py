"""``method.*`` of RoCL (robustcl/methods/rocl.py). Defaults: the authors' (Kim-Minseon/RoCL src/argument.py
``parser``, README's training command)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..recipe import MethodOptions, Section


class RoCLSection(Section):
    """RoCL (Kim et al., NeurIPS 2020): one view attacked instance-wise against the other, a three-view contrastive
    loss over [view 1, view 2, adversarial view] plus a regulariser NT-Xent(adversarial view, its target) / lamda."""

    lamda: float = Field(
        256,
        gt=0,
        description="the regulariser NT-Xent(adversarial view, regularize_to view) is divided by lamda (argument.py "
        "--lamda 256; attack_lib.py RepresentationAdv.get_loss: (1.0/weight) * NT_xent)",
    )
    attack_to: Literal["other", "original"] = Field(
        "other",
        description="the view the attack pushes the first view's embedding away from: other: the second view; "
        "original: the first view's own clean image (argument.py --attack_to, default other)",
    )
    regularize_to: Literal["other", "original"] = Field(
        "other",
        description="the view the regulariser pairs the adversarial view with: other: the second view; original: "
        "the first view it was made from (argument.py --regularize_to, default other)",
    )
    detach_keys: bool = Field(
        True,
        description="quirk of the authors' loss.py pairwise_similarity (similarity = z·z̄ᵀ with the right factor "
        "detached): every contrastive loss, the attack's included, sends its gradient through each row's anchor "
        "only, never through the keys it is compared with; false: through both, as the paper's NT-Xent",
    )
    projector_hidden_dim: int = Field(2048, gt=0, description="projector hidden width (models/projector.py: 2048)")
    projector_dim: int = Field(128, gt=0, description="projector output width (models/projector.py: 128)")


class RoCLOptions(MethodOptions):
    name: Literal["rocl"] = "rocl"
    temperature: float = Field(
        0.5,
        gt=0,
        description="temperature of every contrastive loss: the training loss's (argument.py --temperature 0.5); "
        "the authors' attack and regulariser fix 0.5 (attack_lib.py RepresentationAdv.get_loss), here they take "
        "this one value too",
    )
    rocl: RoCLSection = Field(default_factory=RoCLSection)
