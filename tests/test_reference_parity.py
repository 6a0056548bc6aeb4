"""One training step of every method against the authors' code, written out again here in plain torch.

Each test opens a real training session (``open_session``) on 16 small colour images and runs robustcl's step
(``accumulate_gradients``: the forward and backward of ``train_step``, before the optimizer update). A reference
network built in this file, loaded with robustcl's weights *before* the step, then takes the step the way the
authors' training script does — their loss, their PGD loop, their BN branches and modes, their data layout —
with the same augmented views and the same PGD start noise (replayed from the step's ``batch_random`` in the order
robustcl draws it). The loss and every parameter gradient must agree to 1e-5 relative (per tensor, L2), in fp32 on
the CPU. Every BatchNorm gets random affine parameters and running statistics first, so a wrong BN branch or mode
shows. The shared machinery (the step, the reference networks, the comparison) is in parity.py; the references
follow these files (read at their default branches, not copied):

- ACL: VITA-Group/Adversarial-Contrastive-Learning ``train_simCLR.py`` (``train``, ``PGD_contrastive``),
  ``utils.py`` (``nt_xent``), ``models/resnet_multi_bn.py`` (``proj_head``, ImageNet mean/std inside the model).
- AdvCL: LijieFan/AdvCL ``pretraining_advCL.py`` (``AttackPGD``, ``train``), ``losses.py`` (``SupConLoss``),
  ``fr_util.py`` (``generate_high``), ``models/resnet_cifar_multibn_ensembleFC.py`` (``head_proj``, ``fc_*``).
- DeACL: pantheon5100/DeACL ``solo/methods/mocov2_distillation_AT.py`` (``training_step``,
  ``generate_training_AE``), ``solo/models/resnet_add_normalize.py`` (CIFAR mean/std), stem padding 2.
- DynACL: PKU-ML/DYNACL ``train_DynACL.py`` (``train``, ``PGD_contrastive``), ``models/resnet_multi_bn.py``
  (``resnet18_momentum``), ``utils.py`` (``nt_xent``).
- SimCLR: vturrisi/solo-learn ``solo/methods/simclr.py``, ``solo/losses/simclr.py``, ``solo/methods/base.py``
  (``training_step``), ``scripts/pretrain/cifar/simclr.yaml`` (temperature 0.2).

What is not compared: the augmentations themselves (both sides use robustcl's views), the online linear classifiers
DeACL and solo-learn train on detached features (no gradient reaches the encoder), the optimizer update, and
multi-GPU layouts (AdvCL's DataParallel + SyncBN): one process holding the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from parity import (
    ADVCL_BRANCHES,
    CIFAR_MEAN,
    CIFAR_STD,
    DYNACL_EPOCHS,
    DYNACL_MOMENTUM,
    DYNACL_RELOAD,
    DYNACL_STEP,
    DYNACL_SWAP,
    EPSILON,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PGD_STEPS,
    STEP_SIZE,
    TOLERANCE,
    WIDTHS,
    RefResNet,
    Step,
    acl_reference,
    acl_sets,
    advcl_labels,
    advcl_reference,
    advcl_sets,
    assert_same_buffers,
    assert_same_step,
    common,
    dynacl_reference,
    load_reference,
    pgd_start,
    randomise_batch_norms,
    reference_name,
    relative,
)
from torch import nn

from robustcl.methods import build_method
from robustcl.recipe import load_recipe


@pytest.mark.parametrize("variant", ["ds", "a2a", "a2s"])
def test_acl_step_equals_the_authors_pgd_contrastive_and_dual_bn_step(tmp_path, parity_data, variant):
    """ACL: same loss and gradients as VITA-Group's train_simCLR.py step (dual BN, eval-mode PGD_contrastive with
    its unclamped first gradient, ½ clean + ½ adversarial NT-Xent at temperature 0.5), and the same BN
    statistics after it (the attack updates none)."""
    step = Step(tmp_path, "acl.yaml", [*common(parity_data), *acl_sets(variant)], step=1)
    loss, net, table = acl_reference(step, variant)
    branches = ["normal", "pgd"] if variant == "ds" else ["normal"]
    assert_same_step(step, loss, net, table, branches)
    assert_same_buffers(step.method.state_dict(), net, table, branches)


# ------------------------------------------------------------------------------------------------------ AdvCL


def test_advcl_step_equals_the_authors_joint_attack_and_supcon_step(tmp_path, parity_data):
    """AdvCL: same loss and gradients as LijieFan/AdvCL's step: four views with the high-frequency one, SupCon
    scaled by T/0.07, mean pseudo-label CE × 0.2, and the attack's two adversarial views from x + U(−ε, ε) with
    BN in train mode. (BN running statistics are not compared: the authors recompute the clean views at every
    PGD step, robustcl once; the values the step uses are the same.)"""
    sets = [*common(parity_data), *advcl_sets()]
    path, labels = advcl_labels(parity_data, tmp_path, sets)
    step = Step(tmp_path, "advcl.yaml", [*sets, f"method.advcl.pseudo_labels={path}"], step=1)
    loss, net, table = advcl_reference(step, labels)
    assert_same_step(step, loss, net, table, ADVCL_BRANCHES)


# ------------------------------------------------------------------------------------------------------ DeACL

DEACL_LAMBDA = 2.0  # trades_k in bash_files/DeACL_cifar10_resnet18.sh


def _deacl_reference(step: Step) -> tuple[torch.Tensor, RefResNet, list]:
    """DeACL's stage-2 step (mocov2_distillation_AT.py): t = teacher(x_weak) (eval); ``generate_training_AE``
    from x + U(−ε, ε) with the student backbone in eval mode maximises −Σ cos(student(x'), t) (× 256, for fp16),
    projecting onto the ε-ball around x and [0, 1]; then, in train mode, one forward of [x; x_adv] and
    L = −mean cos(s, t) − λ·mean cos(s_adv, s). No projector (Identity)."""
    table = [("encoder.backbone.", "")]
    student = load_reference(RefResNet([], CIFAR_MEAN, CIFAR_STD, stem_padding=2), step.before, table, [])
    teacher_state = step.method.teacher.backbone.state_dict()
    teacher = load_reference(
        RefResNet([], CIFAR_MEAN, CIFAR_STD, stem_padding=2), teacher_state, [("backbone.", "")], []
    )
    teacher.eval().requires_grad_(False)
    weak = step.method.augment(step.images, step.random)
    target = teacher(weak)
    x = weak + pgd_start(step.noise(weak))
    student.eval()
    for _ in range(PGD_STEPS):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(-F.cosine_similarity(student(x), target, dim=1).sum() * 256, x)
        x = torch.min(torch.max(x.detach() + STEP_SIZE * grad.sign(), weak - EPSILON), weak + EPSILON).clamp(0, 1)
    student.train()
    clean, adversarial = student(torch.cat([weak, x])).chunk(2)
    loss = -F.cosine_similarity(clean, target).mean() - DEACL_LAMBDA * F.cosine_similarity(adversarial, clean).mean()
    loss.backward()
    return loss, student, table


def test_deacl_step_equals_the_authors_distillation_step(tmp_path, parity_data):
    """DeACL stage 2: same loss and gradients as pantheon5100/DeACL's step (teacher frozen in eval mode, the
    student attacked in eval mode away from the teacher's features, −cos(s, t) − 2·cos(s_adv, s) from one
    train-mode pass), and the same BN statistics after it."""
    sets = [
        *common(parity_data), "method.name=deacl", "method.deacl.student_init=teacher",
        f"method.deacl.adversarial_weight={DEACL_LAMBDA}", "attack.bn_mode=eval", "augment.weak_padding=4",
        f"model.image_mean={CIFAR_MEAN}", f"model.image_std={CIFAR_STD}", "model.stem_padding=2",
    ]  # fmt: skip
    torch.manual_seed(3)
    teacher = build_method(load_recipe(REPO / "recipes" / "deacl.yaml", sets)).encoder
    randomise_batch_norms(teacher, seed=13)
    teacher.save_pretrained(tmp_path / "teacher")

    def move_student_off_the_teacher(method: nn.Module) -> None:
        with torch.no_grad():  # it started as the teacher's copy: make s ≠ t so −cos(s, t) has a gradient
            g = torch.Generator().manual_seed(17)
            for p in method.encoder.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))

    sets.append(f"method.deacl.teacher={tmp_path / 'teacher'}")
    step = Step(tmp_path, "deacl.yaml", sets, step=1, prepare=move_student_off_the_teacher)
    loss, student, table = _deacl_reference(step)
    assert_same_step(step, loss, student, table, [])
    assert_same_buffers(step.method.state_dict(), student, table, [])


def test_dynacl_step_equals_the_authors_momentum_step_at_a_later_epoch(tmp_path, parity_data):
    """DynACL in its third epoch: same loss and gradients as PKU-ML/DYNACL's step (second views through the
    momentum encoder in the attack and the loss, adversarial weight 1.5), the same momentum encoder after the
    step's update, the same BN statistics, and the augmentation strength its data reload uses (1 − (e−1)/E)."""
    sets = [
        *common(parity_data), "method.name=dynacl", "method.temperature=0.5", "method.acl.variant=ds",
        "method.acl.projector_layers=3", "method.acl.projector_dim=null",
        f"method.dynacl.reload_every_epochs={DYNACL_RELOAD}", f"method.dynacl.adversarial_weight_slope={DYNACL_SWAP!r}",
        f"method.dynacl.momentum={DYNACL_MOMENTUM}", f"training.epochs={DYNACL_EPOCHS}", "attack.bn_mode=eval",
        "augment.crop_scale=[0.1,1.0]", f"model.image_mean={IMAGENET_MEAN}", f"model.image_std={IMAGENET_STD}",
        "model.stem_padding=1",
    ]  # fmt: skip

    def move_momentum_encoder_off_the_online_one(method: nn.Module) -> None:
        with torch.no_grad():  # a later epoch: the moving average lags the online weights
            g = torch.Generator().manual_seed(19)
            for p in [*method.momentum_encoder.parameters(), *method.momentum_projector.parameters()]:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))

    step = Step(tmp_path, "dynacl.yaml", sets, step=DYNACL_STEP, prepare=move_momentum_encoder_off_the_online_one)
    loss, net, table = dynacl_reference(step)
    assert_same_step(step, loss, net, table, ["normal", "pgd"])
    after = step.method.state_dict()
    assert_same_buffers(after, net, table, ["normal", "pgd"])
    ours = {reference_name(k, table, ["normal", "pgd"]): v for k, v in after.items()}
    for name, value in net.encoder_k.named_parameters():  # the moving average taken inside the step
        assert relative(ours[f"encoder_k.{name}"], value) <= TOLERANCE, f"momentum encoder {name} after the step"
    epoch = DYNACL_STEP // step.session.data.batches.steps_per_epoch + 1
    reload_epoch = (epoch - 1) // DYNACL_RELOAD * DYNACL_RELOAD + 1  # the epoch whose reload made the views
    assert math.isclose(float(step.metrics["strength"]), 1 - (reload_epoch - 1) / DYNACL_EPOCHS, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------- SimCLR

SIMCLR_TEMPERATURE, SIMCLR_HIDDEN, SIMCLR_OUT = 0.2, 32, 8  # cifar/simclr.yaml: 0.2 (2048, 256 at full size)


class RefSoloSimCLR(nn.Module):
    """solo-learn's CIFAR SimCLR: torchvision ResNet with a conv3×3 padding-2 stem and no max-pool (normalisation
    in the data pipeline: the same numbers), projector Linear → ReLU → Linear (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = RefResNet([], CIFAR_MEAN, CIFAR_STD, stem_padding=2)
        self.projector = nn.Sequential(
            nn.Linear(WIDTHS[-1], SIMCLR_HIDDEN), nn.ReLU(), nn.Linear(SIMCLR_HIDDEN, SIMCLR_OUT)
        )


def _solo_simclr_loss(z: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
    """``simclr_loss_func``: z L2-normalised, exp(z·z / T); positives: same image index, self excluded; negatives:
    other indexes; −mean log(pos / (pos + neg))."""
    z = F.normalize(z, dim=-1)
    sim = torch.exp(z @ z.T / SIMCLR_TEMPERATURE)
    same = indexes[:, None] == indexes[None, :]
    positive = same & ~torch.eye(len(z), dtype=torch.bool)
    pos, neg = (sim * positive).sum(1), (sim * ~same).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


def _simclr_reference(step: Step) -> tuple[torch.Tensor, RefSoloSimCLR, list]:
    """solo-learn's step: ``BaseMethod.training_step`` forwards each crop on its own (BN statistics per view), the
    projector per crop, then ``simclr_loss_func`` over the crops' z with the dataset indexes repeated per crop."""
    table = [("encoder.backbone.", "backbone."), ("projector.fc1.", "projector.0."), ("projector.fc2.", "projector.2.")]
    net = load_reference(RefSoloSimCLR(), step.before, table, [])
    crops = [augment(step.images, step.random) for augment in step.method.augments]  # each view's pipeline
    net.train()
    z = torch.cat([net.projector(net.backbone(x)) for x in crops])
    loss = _solo_simclr_loss(z, step.indices.repeat(len(crops)))
    loss.backward()
    return loss, net, table


def test_simclr_step_equals_solo_learns_step(tmp_path, parity_data):
    """SimCLR: same loss and gradients as solo-learn's CIFAR SimCLR step (temperature 0.2, projector without
    BatchNorm: method.simclr.projector_bn false; each view encoded alone, so BN normalises it by its own
    statistics: method.simclr.bn_per_view true), and the same BN statistics after it."""
    sets = [
        *common(parity_data), "method.name=simclr", f"method.temperature={SIMCLR_TEMPERATURE}",
        f"method.simclr.projector_hidden_dim={SIMCLR_HIDDEN}", f"method.simclr.projector_dim={SIMCLR_OUT}",
        "method.simclr.projector_bn=false", "method.simclr.bn_per_view=true", "attack.steps=0",
        f"model.image_mean={CIFAR_MEAN}", f"model.image_std={CIFAR_STD}", "model.stem_padding=2",
    ]  # fmt: skip
    step = Step(tmp_path, "simclr.yaml", sets, step=1)
    loss, net, table = _simclr_reference(step)
    assert_same_step(step, loss, net, table, [])
    assert_same_buffers(step.method.state_dict(), net, table, [])
