"""ACL-AIR and DynACL-AIR: one training step against GodXuxilie/Enhancing_ACL_via_AIR, written out here in plain
torch (how the comparison works: the top of test_reference_parity.py; the machinery: parity.py).

The reference follows ``pretraining.py`` (``train`` with ``--ACL_DS``, and ``--DynAug`` for DynACL-AIR; its
``PGD_contrastive`` and ``nt_xent`` are ACL's) and ``AIR.py`` (``AIR_Loss.forward``): interleaved views (rows 2i,
2i + 1), PGD in eval mode through 'pgd', then train-mode passes of the adversarial views ('pgd'), the views
('normal') and the unaugmented images (``ToTensor``, 'normal'); even rows are z_i, odd rows z_j; the NT-Xent as
a cross-entropy over [positive, negatives] logits, the regularisers as ``F.kl_div`` of softmaxes over the batch's
diagonal similarities, with the probabilities as its input (the quirk ``method.air.kl_input: probabilities``).
DynACL-AIR has one encoder (AIR's script has no moving average): its reference network is ACL's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from parity import (
    DYNACL_EPOCHS,
    DYNACL_RELOAD,
    DYNACL_STEP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RefACLNet,
    Step,
    assert_same_buffers,
    assert_same_step,
    common,
    dual_bn_attack,
    load_reference,
)

LAMBDA1, LAMBDA2, TEMPERATURE = 0.5, 0.5, 0.5  # pretraining.py --lambda1 / --lambda2, AIR_Loss(temperature=0.5)
DYNAUG_LAMBDA = 2 / 3  # pretraining.py: train(..., LAMBDA=2/3)
BRANCHES = ["normal", "pgd"]
TABLE = [("encoder.backbone.", "backbone."), ("projector.", "fc.")]


def _contrastive(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AIR_Loss's NT-Xent of normalised pairs (a_n, b_n): logits [positive, N − 1 same-view and N − 1 other-view
    negatives] for the N anchors of a, then of b; cross-entropy with the positive at index 0."""
    bs = len(a)
    ii, ij, ji, jj = (x @ y.T / TEMPERATURE for x, y in ((a, a), (a, b), (b, a), (b, b)))
    pos = torch.cat([ij[~mask], ji[~mask]]).unsqueeze(1)
    neg_i = torch.cat([ii[mask].reshape(bs, -1), ij[mask].reshape(bs, -1)], dim=1)
    neg_j = torch.cat([ji[mask].reshape(bs, -1), jj[mask].reshape(bs, -1)], dim=1)
    logits = torch.cat([pos, torch.cat([neg_i, neg_j])], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * bs, dtype=torch.long))


def _air_loss(zi, zj, z_orig, zi_adv, zj_adv, weight: float):
    """``AIR_Loss.forward`` (normalize=True): (loss, SIR, AIR)."""
    mask = torch.ones(len(zi), len(zi), dtype=torch.bool).fill_diagonal_(False)
    zi, zj, zo, ai, aj = (F.normalize(z, p=2, dim=-1) for z in (zi, zj, z_orig, zi_adv, zj_adv))
    nat, adv = _contrastive(zi, zj, mask), _contrastive(ai, aj, mask)

    def diagonal(x, y):  # logits[torch.logical_not(mask)]: each image against its own
        return (x @ y.T / TEMPERATURE)[~mask]

    sir = F.kl_div(
        F.softmax(diagonal(zi, zo), -1), F.log_softmax(diagonal(zj, zo), -1), log_target=True, reduction="sum"
    )
    probs_i = F.softmax(diagonal(ai, zo), -1) * F.softmax(diagonal(ai, zi), -1)
    probs_j = F.softmax(diagonal(aj, zo), -1) * F.softmax(diagonal(aj, zj), -1)
    air = F.kl_div(probs_i, torch.log(probs_j), log_target=True, reduction="sum")
    loss = nat * (1 - weight) + adv * (1 + weight) + LAMBDA1 * sir + LAMBDA2 * air
    return loss, sir, air


def _air_reference(step: Step, weight: float) -> tuple[torch.Tensor, RefACLNet]:
    """pretraining.py's step with ``--ACL_DS``: PGD_contrastive, then features_adv, features, z_orig (train mode,
    in that order), AIR_Loss; checks that the regularisers are nonzero and move the gradients well beyond the
    tolerance before the backward."""
    net = load_reference(RefACLNet(BRANCHES), step.before, TABLE, BRANCHES)
    inputs, adv = dual_bn_attack(step, net)
    features_adv = net(adv, "pgd")
    features = net(inputs, "normal")
    z_orig = net(step.images.float() / 255, "normal")  # ori_transfor: ToTensor of the image itself
    loss, sir, air = _air_loss(features[0::2], features[1::2], z_orig, features_adv[0::2], features_adv[1::2], weight)
    _assert_regularisers_matter(net, loss, LAMBDA1 * sir + LAMBDA2 * air)
    assert math.isclose(float(step.metrics["sir"]), float(sir.detach()), rel_tol=1e-5)
    assert math.isclose(float(step.metrics["air"]), float(air.detach()), rel_tol=1e-5)
    loss.backward()
    return loss, net


def _assert_regularisers_matter(net: RefACLNet, loss: torch.Tensor, regularisers: torch.Tensor) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    total = torch.autograd.grad(loss, params, retain_graph=True)
    part = torch.autograd.grad(regularisers, params, retain_graph=True, allow_unused=True)
    norm = lambda gs: math.sqrt(sum(float(g.square().sum()) for g in gs if g is not None))  # noqa: E731
    value = float(regularisers.detach().abs())
    print(f"regularisers {value:.3g}, their share of the gradient norm {norm(part) / norm(total):.3g}")
    assert value > 1e-2 and norm(part) > 1e-2 * norm(total), (value, norm(part), norm(total))


def _sets(parity_data: Path, name: str) -> list[str]:
    return [
        *common(parity_data), f"method.name={name}", f"method.temperature={TEMPERATURE}", "method.acl.variant=ds",
        "method.acl.projector_layers=3", "method.acl.projector_dim=null", f"method.air.lambda1={LAMBDA1}",
        f"method.air.lambda2={LAMBDA2}", "method.air.kl_input=probabilities", "method.air.contrastive_sum=true",
        "attack.bn_mode=eval", f"model.image_mean={IMAGENET_MEAN}", f"model.image_std={IMAGENET_STD}",
        "model.stem_padding=1",
    ]  # fmt: skip


def test_acl_air_step_equals_the_authors_air_loss_step(tmp_path, parity_data):
    """ACL-AIR: same loss and gradients as pretraining.py --ACL_DS (no --DynAug: weight 0): clean + adversarial
    NT-Xent added, + 0.5·SIR + 0.5·AIR with the probabilities handed to kl_div, gradients through every view and
    the original image; the same BN statistics after the step ('normal' updated by the views, then the originals)."""
    step = Step(tmp_path, "acl_air.yaml", _sets(parity_data, "acl_air"), step=1)
    loss, net = _air_reference(step, weight=0.0)
    assert_same_step(step, loss, net, TABLE, BRANCHES)
    assert_same_buffers(step.method.state_dict(), net, TABLE, BRANCHES)


def test_dynacl_air_step_equals_the_authors_dynaug_step_at_a_later_epoch(tmp_path, parity_data):
    """DynACL-AIR in its third epoch (stages of one epoch over four): same loss and gradients as pretraining.py
    --ACL_DS --DynAug, whose views have strength 1 − ⌊(e − 1)/K⌋·K/E = 0.5 and whose weight is LAMBDA·(1 − 0.5):
    the strength of the epoch itself (DynACL's own code would weigh the next epoch's); one encoder."""
    sets = [
        *_sets(parity_data, "dynacl_air"), f"method.dynacl.reload_every_epochs={DYNACL_RELOAD}",
        f"method.dynacl.adversarial_weight_slope={DYNAUG_LAMBDA!r}", "method.dynacl.momentum=null",
        f"training.epochs={DYNACL_EPOCHS}", "augment.crop_scale=[0.1,1.0]",
    ]  # fmt: skip
    step = Step(tmp_path, "dynacl_air.yaml", sets, step=DYNACL_STEP)
    epoch = DYNACL_STEP // step.session.data.batches.steps_per_epoch + 1
    strength = 1 - int((epoch - 1) / DYNACL_RELOAD) * DYNACL_RELOAD / DYNACL_EPOCHS
    assert strength == 0.5 and math.isclose(float(step.metrics["strength"]), strength, rel_tol=1e-6)
    loss, net = _air_reference(step, weight=DYNAUG_LAMBDA * (1 - strength))
    assert_same_step(step, loss, net, TABLE, BRANCHES)
    assert_same_buffers(step.method.state_dict(), net, TABLE, BRANCHES)
