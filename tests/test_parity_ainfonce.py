"""A-InfoNCE: one training step against yqy2001/A-InfoNCE's Asym-AdvCL step, written out again here, and the
properties of its asymmetric loss.

The reference is AdvCL's step (parity.py ``advcl_reference``: the same views, joint train-mode attack and pseudo-label
heads, as Asym-AdvCL's ``pretraining_advCL.py`` keeps them) with Asym-AdvCL's criteria, read from (not copied):
``losses.py`` ``SupConLoss`` (HN) and ``ori_SupConLoss`` (plain) with ``stop_grad`` / ``stop_grad_sd`` and
``args.adv_weight``, including their in-place writes of the adversarial–clean blocks and their broadcasts; and
``pretraining_advCL.py`` ``train`` (the attack criterion under ``--attack_ori``, the adaptive stop degree from the
'normal'-branch features of the weak view and x_cl, ``dis_avg``). The shell scripts' variants are the cases:
``shell/cifar10/advcl-IPHN-cifar10.sh`` (the recipe), ``advcl-IP-cifar10.sh``, ``advcl-HN-cifar10.sh``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from parity import (
    ADVCL_BASE_TEMPERATURE,
    ADVCL_BRANCHES,
    ADVCL_TEMPERATURE,
    Step,
    advcl_labels,
    advcl_reference,
    advcl_sets,
    assert_same_step,
    common,
)

from robustcl.losses import multi_positive_nt_xent
from robustcl.methods.ainfonce import Asymmetry, HardNegatives, asymmetric_info_nce

# ------------------------------------------------------------------------------------------ the authors' loss


def _their_square(dot: torch.Tensor, mask, logits_mask, hard: dict | None) -> torch.Tensor:
    """Asym-AdvCL's per-(anchor, key) matrix at the positives: ``ori_SupConLoss`` log-probabilities (negative), or
    ``SupConLoss``'s −log(e / (pos + Ng)) with HCL's reweighting, both of their per-anchor vectors broadcast over
    the square matrix as written (``imp.mean(dim=-1)``, ``pos + Ng``), Ng floored at N·e^(−1/0.5)."""
    logits = dot - dot.max(dim=1, keepdim=True).values.detach()
    if hard is None:
        return mask * (logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True)))
    n = (len(dot) // int(mask[0].sum() + 1) - 1) * int(mask[0].sum() + 1)  # (batch − 1) × contrast_count
    e = torch.exp(logits)
    e_neg = e * (1 - mask) * logits_mask
    pos = (e * mask).sum(1) / mask.sum(1)
    imp = (hard["beta"] * (e_neg + 1e-9).log()).exp()
    reweighted = (imp * e_neg) / imp.mean(dim=-1)
    ng = (-hard["tau_plus"] * n * pos + reweighted.sum(dim=-1)) / (1 - hard["tau_plus"])
    ng = torch.clamp(ng, min=n * math.e ** (-1 / 0.5))
    return mask * -torch.log(e / (pos + ng))


def their_loss(features: torch.Tensor, weight: float, hard: dict | None = None, stop_degree=None) -> torch.Tensor:
    """``(ori_)SupConLoss(features, stop_grad=stop_degree is not None, stop_grad_sd=stop_degree)``, temperature 0.5,
    base 0.07, no labels: features [bsz, V, d], view 0 the adversarial one. Their mix: the adversarial rows' block
    ``ac`` (or, with stop_grad, d·(clean rows, keys detached)ᵀ + (1 − d)·(adversarial rows, keys detached)) × w
    written over the upper-right block, then ``ac``ᵀ × w over the lower-left one — without stop_grad ``ac`` is a view
    of the matrix just overwritten, as in their code."""
    bsz, views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1))
    logits_mask = 1 - torch.eye(bsz * views)
    mask = torch.eye(bsz).repeat(views, views) * logits_mask
    square = _their_square(contrast @ contrast.T / ADVCL_TEMPERATURE, mask, logits_mask, hard)
    if stop_degree is not None:
        stopped = _their_square(contrast @ contrast.T.detach() / ADVCL_TEMPERATURE, mask, logits_mask, hard)
        cross = stop_degree * stopped[bsz:, :bsz].T + (1 - stop_degree) * stopped[:bsz, bsz:]
    else:
        cross = square[:bsz, bsz:]
    square[:bsz, bsz:] = cross * weight
    square[bsz:, :bsz] = cross.T * weight
    mean = square.sum(1) / mask.sum(1)
    sign = 1.0 if hard is not None else -1.0
    return (sign * (ADVCL_TEMPERATURE / ADVCL_BASE_TEMPERATURE) * mean).view(views, bsz).mean()


def their_stop_degree(net, x_cl, weak, epoch: int, average: float, opts: dict) -> tuple[float, float]:
    """pretraining_advCL.py ``train``: the mean ‖f(weak) − f(x_cl)‖ ('normal' BN, the model in train mode, no
    gradient) and the stop degree (the base before epoch --stop_grad_adaptive, adaptive after it)."""
    with torch.no_grad():
        distance = F.pairwise_distance(net.backbone(weak, "normal"), net.backbone(x_cl, "normal")).mean()
    degree = opts["stop_degree"]
    if epoch + 1 > opts["adaptive_after_epochs"]:
        if distance > average:
            pass
        elif distance < opts["min_distance"]:
            degree = 0.5
        else:
            degree = (average - distance) / (average - opts["min_distance"]) * (0.5 - degree) + degree
    return float(distance), degree


# --------------------------------------------------------------------------------------------- the step


IPHN = {"inferior_positive": True, "hard_negative": True, "adversarial_weight": 0.7, "stop_degree": 0.2,
        "adaptive_after_epochs": 30, "min_distance": 0.4, "tau_plus": 0.1, "beta": 1.0}  # fmt: skip
VARIANTS = {
    "iphn": IPHN,  # advcl-IPHN-cifar10.sh
    "ip": {**IPHN, "hard_negative": False, "adversarial_weight": 1.2},  # advcl-IP-cifar10.sh
    "hn": {**IPHN, "inferior_positive": False, "adversarial_weight": 1.0, "tau_plus": 0.12},  # advcl-HN-cifar10.sh
    # A later epoch: the adaptive stop degree between its ends (the early epochs' average distance set before).
    "iphn-adaptive": {**IPHN, "adaptive_after_epochs": 1, "min_distance": 0.0},
}
ADAPTIVE_STEP, ADAPTIVE_AVERAGE = 2, 1.0  # 2 steps per epoch: the second epoch


def _sets(parity_data: Path, opts: dict) -> list[str]:
    own = [f"method.ainfonce.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()]
    fixed = ["method.ainfonce.attack_hard_negative=false", "method.ainfonce.hard_negative_normalisers=columns",
             "method.ainfonce.mirror_adversarial_terms=true", "method.ainfonce.max_stop_degree=0.5"]  # fmt: skip
    return [*common(parity_data), *advcl_sets("ainfonce"), *own, *fixed]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ainfonce_step_equals_the_authors_asym_advcl_step(tmp_path, parity_data, variant):
    """A-InfoNCE: same loss and gradients as Asym-AdvCL's step: AdvCL's attack on the plain criterion with w
    (--attack_ori), then the asymmetric criterion (IP's two stop-gradient sides mixed by the stop degree, HN's
    reweighted negatives, the adversarial terms × w) + AdvCL's pseudo-label CE; and the same stop degree and
    distance average."""
    opts = VARIANTS[variant]
    sets = _sets(parity_data, opts)
    path, labels = advcl_labels(parity_data, tmp_path, sets)
    adaptive = variant == "iphn-adaptive"

    def seen_distances(method) -> None:  # the average --stop_grad_adaptive's first epochs left behind
        method.distance_sum.fill_(ADAPTIVE_AVERAGE * 8)
        method.distance_count.fill_(8)

    step = Step(tmp_path, "ainfonce.yaml", [*sets, f"method.advcl.pseudo_labels={path}"],
                step=ADAPTIVE_STEP if adaptive else 1, prepare=seen_distances if adaptive else None)  # fmt: skip
    hard = {"tau_plus": opts["tau_plus"], "beta": opts["beta"]} if opts["hard_negative"] else None
    seen = {}

    def train_contrastive(net, features, x_cl, weak):
        degree = None
        if opts["inferior_positive"]:
            epoch = step.step // step.session.data.batches.steps_per_epoch
            seen["distance"], degree = their_stop_degree(net, x_cl, weak, epoch, ADAPTIVE_AVERAGE, opts)
            seen["degree"] = degree
        return their_loss(features, opts["adversarial_weight"], hard, degree)

    def attack_contrastive(features):
        return their_loss(features, opts["adversarial_weight"])

    loss, net, table = advcl_reference(step, labels, attack_contrastive, train_contrastive)
    assert_same_step(step, loss, net, table, ADVCL_BRANCHES)
    if opts["inferior_positive"]:
        assert math.isclose(float(step.metrics["stop_degree"]), seen["degree"], rel_tol=1e-5)
        sums = step.method.state_dict()
        if adaptive:
            assert 0.2 + 1e-3 < seen["degree"] < 0.5 - 1e-3, seen  # between its ends: the interpolation is compared
            assert float(sums["distance_count"]) == 8  # no longer averaged
        else:
            assert float(sums["distance_count"]) == 8  # this batch's distance joins the average
            assert math.isclose(float(sums["distance_sum"]) / 8, seen["distance"], rel_tol=1e-5)


# ------------------------------------------------------------------------------------- loss properties


def _views(seed: int, n: int = 6, v: int = 4, d: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(v, n, d, generator=g, dtype=torch.float64).unbind(0))


HN = HardNegatives(tau_plus=0.1, beta=1.0, normalisers="columns")


def test_without_ip_hn_and_mirror_at_weight_one_the_loss_is_advcls():
    """With IP and HN off, w = 1 and no mirrored copy, A-InfoNCE's loss is AdvCL's four-view SupCon, value and
    gradient (so only the asymmetric parts are new)."""
    views = [v.requires_grad_() for v in _views(0)]
    ours = asymmetric_info_nce(views, 0.5, 2.0, Asymmetry(weight=1.0))
    advcl = multi_positive_nt_xent(views, 0.5, 2.0)
    assert torch.allclose(ours, advcl, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, views), torch.autograd.grad(advcl, views)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "asym",
    [
        Asymmetry(0.7, None, None, True),
        Asymmetry(1.2, 0.2, None, True),
        Asymmetry(0.7, 0.2, HN, True),
        Asymmetry(1.0, None, HN, True),
        Asymmetry(0.7, torch.tensor(0.35, dtype=torch.float64), HN, True),
    ],
)
def test_the_loss_equals_their_supcon_losses_with_its_quirks(asym):
    """Every IP / HN / weight combination of the scripts equals their (ori_)SupConLoss, value and gradient, in
    float64 (with the column-wise normalisers, the row-max-shifted floor and the w²-mirrored block)."""
    views = [v.requires_grad_() for v in _views(1)]
    features = F.normalize(torch.stack(views, dim=1), dim=2)
    hard = None if asym.hard_negatives is None else {"tau_plus": 0.1, "beta": 1.0}
    theirs = their_loss(features, asym.weight, hard, asym.stop_degree)
    ours = asymmetric_info_nce(views, 0.5, 0.5 / 0.07, asym)
    assert torch.allclose(ours, theirs, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, views), torch.autograd.grad(theirs, views)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("hard", [None, HardNegatives(0.1, 1.0, "own")])
def test_ip_sends_the_adversarial_clean_terms_gradient_to_one_side_per_stop_degree(hard):
    """IP: with d = 0 the adversarial–clean terms move only the adversarial feature, with d = 1 only the clean
    ones (each side's term is taken with the other side held constant). So at d = 0 the clean views' gradients
    are those of the loss without those terms (w = 0), at d = 1 the adversarial view's are; in between both move.
    (Not with HN's column-wise normalisers: their rows keep the gradient, as the authors' anchor features do.)"""
    views = [v.requires_grad_() for v in _views(2)]

    def grads(weight: float, d: float):
        return torch.autograd.grad(asymmetric_info_nce(views, 0.5, 1.0, Asymmetry(weight, d, hard, True)), views)

    without = grads(0.0, 0.5)
    at_0, at_1, half = grads(0.7, 0.0), grads(0.7, 1.0), grads(0.7, 0.5)
    for clean in (1, 2, 3):
        assert torch.allclose(at_0[clean], without[clean], rtol=1e-10, atol=1e-14)
        assert (half[clean] - without[clean]).norm() > 1e-3 * without[clean].norm()
    assert torch.allclose(at_1[0], without[0], rtol=1e-10, atol=1e-14)
    assert (half[0] - without[0]).norm() > 1e-3 * without[0].norm()


def test_hard_negatives_reduce_to_their_denominator_and_weight_closer_negatives_more():
    """HN with τ⁺ = 0, β = 0 and each anchor's own normaliser (the floor not reached: similar features) is
    −log(e / (mean positive + Σ negatives)); raising β weights the closer negatives more, which raises the loss."""
    g = torch.Generator().manual_seed(3)
    common = 3 * torch.randn(5, generator=g, dtype=torch.float64)
    views = [common + torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = asymmetric_info_nce(views, 0.5, 1.0, Asymmetry(1.0, None, HardNegatives(0.0, 0.0, "own"), False))
    z = F.normalize(torch.stack(views), dim=2).flatten(0, 1)  # [V·n, d], view-major
    sim = torch.exp(z @ z.T / 0.5)
    same = torch.arange(6).repeat(4)[:, None] == torch.arange(6).repeat(4)[None, :]
    positive = same & ~torch.eye(24, dtype=torch.bool)
    denominator = (sim * positive).sum(1) / 3 + (sim * ~same).sum(1)
    assert (denominator - (sim * positive).sum(1) / 3 > 20 * math.exp(-2) * math.exp(2)).all()  # above the floor
    expected = (-(torch.log(sim / denominator[:, None]) * positive).sum(1) / 3).mean()
    assert torch.allclose(ours, expected, rtol=1e-10)
    sharper = asymmetric_info_nce(views, 0.5, 1.0, Asymmetry(1.0, None, HardNegatives(0.0, 2.0, "own"), False))
    assert sharper > ours


def test_the_attack_share_of_two_halves_sums_to_the_whole():
    """``across_processes="share"`` in one process is the loss's share of the global batch: with one process it is
    the mean over anchors (what a process's share sums to over processes)."""
    views = _views(4)
    asym = Asymmetry(0.7, None, HN, True)
    assert torch.allclose(
        asymmetric_info_nce(views, 0.5, 1.0, asym, "share"), asymmetric_info_nce(views, 0.5, 1.0, asym), rtol=1e-12
    )
