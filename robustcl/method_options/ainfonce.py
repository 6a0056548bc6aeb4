"""``method.*`` of A-InfoNCE (robustcl/methods/ainfonce.py): AdvCL's keys (``temperature``, ``method.advcl``) and the
asymmetric loss's under ``method.ainfonce``. Defaults: yqy2001/A-InfoNCE Asym-AdvCL
``shell/cifar10/advcl-IPHN-cifar10.sh`` over ``pretraining_advCL.py``'s argparse."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..recipe import Section
from .advcl import AdvCLOptions


class AInfoNCESection(Section):
    """A-InfoNCE (Yu et al., ECCV 2022) on AdvCL: adversarial views as inferior positives and hard negatives."""

    inferior_positive: bool = Field(
        True,
        description="IP (their --stop_grad, set by advcl-IP/-IPHN-cifar10.sh): each adversarial–clean positive term "
        "= w·[d·(clean anchor's term, the adversarial feature held constant) + (1 − d)·(adversarial anchor's "
        "term, the clean feature held constant)], counted for both anchors",
    )
    hard_negative: bool = Field(
        True,
        description="HN (their --HN, set by advcl-HN/-IPHN-cifar10.sh): HCL-reweighted negatives with tau_plus and "
        "beta (Asym-AdvCL losses.py SupConLoss); false: the plain InfoNCE denominator (ori_SupConLoss)",
    )
    adversarial_weight: float = Field(
        0.7, ge=0, description="w, the adversarial–clean terms' weight (--adv_weight: 0.7 in advcl-IPHN-cifar10.sh)"
    )
    stop_degree: float = Field(
        0.2,
        ge=0,
        le=1,
        description="d, the clean anchors' share of the IP term (--stpg_degree: 0.2 in advcl-IPHN-cifar10.sh; 0: "
        "the clean features get no gradient from the adversarial positives)",
    )
    adaptive_after_epochs: int | None = Field(
        30,
        ge=0,
        description="IP's adaptive d (--stop_grad_adaptive 30): for this many epochs the mean feature distance "
        "between the weak view and x_cl ('normal' BN) is averaged; afterwards a batch closer than that average "
        "raises d towards max_stop_degree. null: d fixed (their default -1)",
    )
    min_distance: float = Field(
        0.4, ge=0, description="distance at or below which the adaptive d is max_stop_degree (--d_min)"
    )
    max_stop_degree: float = Field(
        0.5, ge=0, le=1, description="the adaptive d's upper end (the constant 0.5 in pretraining_advCL.py train)"
    )
    tau_plus: float = Field(0.1, ge=0, lt=1, description="HN's class prior τ⁺ (--tau_plus, argparse default)")
    beta: float = Field(1.0, ge=0, description="HN's concentration β of the negatives' importance (--beta)")
    attack_hard_negative: bool = Field(
        False,
        description="whether the attack maximises the HN loss; false: the plain InfoNCE with w and without IP, as "
        "their --attack_ori (set with --HN by advcl-HN/-IPHN-cifar10.sh) and their IP-only run do",
    )
    hard_negative_normalisers: Literal["columns", "own"] = Field(
        "columns",
        description="HN's per-anchor normalisers. columns (quirk, Asym-AdvCL losses.py SupConLoss: `imp.mean(dim=-1)` "
        "and `pos + Ng` divide the square similarity matrix by broadcasting, so the term of anchor a and key c takes "
        "anchor c's importance mean, over all its V·N entries, and anchor c's denominator); own: anchor a's own, "
        "the mean over its negatives (HCL's reweighting)",
    )
    mirror_adversarial_terms: bool = Field(
        True,
        description="without IP (the attack's loss, or inferior_positive false): quirk of Asym-AdvCL losses.py "
        "(ori_)SupConLoss, the adversarial anchors' adversarial–clean terms × w replace the clean anchors' own, "
        "and the in-place slice assignment makes that copy × w²; false: every anchor keeps its own terms × w "
        "(AdvCL's loss when w = 1)",
    )


class AInfoNCEOptions(AdvCLOptions):
    name: Literal["ainfonce"] = "ainfonce"  # type: ignore[assignment]
    ainfonce: AInfoNCESection = Field(default_factory=AInfoNCESection)
