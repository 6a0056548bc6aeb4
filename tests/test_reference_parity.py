"""One training step of every method against the authors' code, written out again here in plain torch.

Each test opens a real training session (``open_session``) on 16 small colour images and runs robustcl's step
(``accumulate_gradients``: the forward and backward of ``train_step``, before the optimizer update). A reference
network built in this file, loaded with robustcl's weights *before* the step, then takes the step the way the
authors' training script does — their loss, their PGD loop, their BN branches and modes, their data layout —
with the same augmented views and the same PGD start noise (replayed from the step's ``batch_random`` in the order
robustcl draws it). The loss and every parameter gradient must agree to 1e-5 relative (per tensor, L2), in fp32 on
the CPU. Every BatchNorm gets random affine parameters and running statistics first, so a wrong BN branch or mode
shows. The references follow these files (read at their default branches, not copied):

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
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torch import nn

from robustcl.data.batches import batch_random, uniform
from robustcl.data.loading import open_pretraining_split, pretraining_images
from robustcl.methods import build_method
from robustcl.pseudo_labels import PseudoLabels, save_pseudo_labels
from robustcl.recipe import load_recipe
from robustcl.train import accumulate_gradients, open_session

CPU = torch.device("cpu")
TOLERANCE = 1e-5  # relative, per tensor
IMAGES, BATCH, RESOLUTION, WIDTHS = 16, 8, 16, [8, 16, 16, 16]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ACL's / DynACL's model
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]  # DeACL's model, solo-learn's teacher
# The authors' PGD (ACL's and DynACL's PGD_contrastive defaults and --pgd_iter, AdvCL's config, DeACL's args).
EPSILON, STEP_SIZE, PGD_STEPS = 8 / 255, 2 / 255, 5


# ----------------------------------------------------------------------------------------------- the session


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 random colour 16×16 images (colour, so jitter and grayscale views differ per channel)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (IMAGES, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p) for p in pixels], "label": [i % 2 for i in range(IMAGES)]},
        features=features,
    )
    path = tmp_path_factory.mktemp("parity") / "colours"
    datasets.DatasetDict({"train": train}).save_to_disk(str(path))
    return path


def _common(data_dir: Path) -> list[str]:
    """Everything the step depends on, pinned (not the recipes' defaults): one process, fp32, the authors' PGD."""
    return [
        f"data.path={data_dir}", "data.split=train", f"data.resolution={RESOLUTION}", "data.loading=decoded",
        f"model.widths={WIDTHS}", "model.block_layers=[1,1,1,1]", "model.block=basic", "model.stem=cifar",
        "model.stem_width=null",
        f"training.batch_size={BATCH}", "training.micro_batch_size=null", "training.epochs=4",
        "training.max_steps=null", "training.precision=fp32", "training.compile=false",
        "training.channels_last=false", "training.data_placement=device", "training.seed=7",
        "attack.precision=fp32", f"attack.epsilon={EPSILON}", f"attack.step_size={STEP_SIZE}",
        f"attack.steps={PGD_STEPS}", "attack.random_start=true", "attack.clamp_start=false",
        "logging.trackers=[]", "logging.progress_bar=false",
    ]  # fmt: skip


def _reset_accelerate() -> None:
    # One Accelerate state per process; each test opens its own session.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Step:
    """robustcl's step ``step`` of a fresh session whose BatchNorms were randomised: the weights before it, its
    images, loss and gradients, and the step's random numbers replayed for the reference."""

    def __init__(
        self, tmp_path: Path, recipe_file: str, sets: list[str], step: int, prepare: Callable | None = None
    ) -> None:
        _reset_accelerate()
        self.recipe = load_recipe(REPO / "recipes" / recipe_file, sets)
        self.session = open_session(self.recipe, tmp_path / "run", resume=False)
        self.method, self.step = self.session.method, step
        try:
            _randomise_batch_norms(self.method, seed=11)
            if prepare is not None:
                prepare(self.method)
            self.before = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
            self.images, self.indices = self.session.data.feed.batch(step, 0)
            self.session.model.train()
            # train_step without its update: the method's hooks around the passes (DynACL's moving average).
            self.method.before_step(step)
            self.metrics = accumulate_gradients(self.session, step)
            self.method.after_step(step)
        finally:
            self.session.close()
            _reset_accelerate()
        t = self.recipe.training
        # What accumulate_gradients hands the method: (seed, step, micro 0), this process's rows of the batch.
        self.random = batch_random(t.seed, step, 0, CPU, self.session.data.plan.micro_batch, 0, 1)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The next uniform [0, 1) draw of the step, shaped like ``like`` (a PGD start)."""
        return uniform(tuple(like.shape), self.random, CPU)


def _randomise_batch_norms(module: nn.Module, seed: int) -> None:
    """Random BN scales, shifts and running statistics, different in every branch: a fresh network's (1, 0, 0, 1)
    would hide a swapped branch or an eval-mode pass that should have been a train-mode one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


# ------------------------------------------------------------------------------------ the reference networks


class RefBN(nn.Module):
    """The authors' ``batch_norm_multiple``: one BatchNorm per branch name, chosen by the name passed along with
    the activations (a single plain BatchNorm without names)."""

    def __init__(self, dim: int, channels: int, branches: list[str]) -> None:
        super().__init__()
        kind = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.index = {name: i for i, name in enumerate(branches)}
        self.bn_list = nn.ModuleList([kind(channels) for _ in branches or [None]])

    def forward(self, x: torch.Tensor, branch: str | None) -> torch.Tensor:
        return self.bn_list[self.index[branch] if self.index else 0](x)


class RefBlock(nn.Module):
    """torchvision's BasicBlock as the authors' multi-BN copies write it: conv3×3 (stride) → BN → ReLU → conv3×3
    → BN, plus the input (through conv1×1 (stride) → BN when the shape changes: ``Downsample_multiple``), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, branches: list[str]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = RefBN(2, cout, branches)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = RefBN(2, cout, branches)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Module()
            self.downsample.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample.bn = RefBN(2, cout, branches)

    def forward(self, x: torch.Tensor, branch: str | None) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), branch))
        out = self.bn2(self.conv2(out), branch)
        identity = x if self.downsample is None else self.downsample.bn(self.downsample.conv(x), branch)
        return F.relu(out + identity)


class RefResNet(nn.Module):
    """The CIFAR ResNet of all four repositories: per-channel normalisation inside the model (AdvCL: none), conv3×3
    stride 1 stem (padding 1; DeACL's and solo-learn's CIFAR stem: 2) → BN → ReLU, no max-pool, stages of basic
    blocks (stride 2 from the second), global average pool."""

    def __init__(self, branches: list[str], mean: list[float], std: list[float], stem_padding: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, stem_padding, bias=False)
        self.bn1 = RefBN(2, WIDTHS[0], branches)
        cin = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            setattr(self, f"layer{i + 1}", nn.ModuleList([RefBlock(cin, width, 1 if i == 0 else 2, branches)]))
            cin = width

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x), branch))
        for i in range(len(WIDTHS)):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x, branch)
        return x.mean(dim=(2, 3))


class RefACLHead(nn.Module):
    """ACL's and DynACL's ``proj_head`` (three layers): fc1 (bias) → BN → ReLU → fc2 → BN → ReLU → fc3 → BN, each
    BN per branch; the last two linears without bias."""

    def __init__(self, dim: int, branches: list[str]) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, dim), RefBN(1, dim, branches)
        self.fc2, self.bn2 = nn.Linear(dim, dim, bias=False), RefBN(1, dim, branches)
        self.fc3, self.bn3 = nn.Linear(dim, dim, bias=False), RefBN(1, dim, branches)

    def forward(self, h: torch.Tensor, branch: str) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(h), branch))
        h = F.relu(self.bn2(self.fc2(h), branch))
        return self.bn3(self.fc3(h), branch)


class RefACLNet(nn.Module):
    """ACL's ``resnet18(bn_names=…)`` with ``model.fc = proj_head(…)``: image → projection, one BN branch per call."""

    def __init__(self, branches: list[str]) -> None:
        super().__init__()
        self.backbone = RefResNet(branches, IMAGENET_MEAN, IMAGENET_STD)
        self.fc = RefACLHead(WIDTHS[-1], branches)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.fc(self.backbone(x, branch), branch)


# ------------------------------------------------------------------------- robustcl's weights in the reference


_BN_PARAMETER = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _reference_name(name: str, table: list[tuple[str, str]], branches: list[str]) -> str | None:
    """robustcl's state-dict name → the reference network's, or None for what the reference has no counterpart
    of (robustcl's normalisation buffers: the reference uses the authors' constants)."""
    for ours, theirs in table:
        if name.startswith(ours):
            name = theirs + name[len(ours) :]
            break
    else:
        return None
    name = name.replace(".shortcut.0.", ".downsample.conv.").replace(".shortcut.1.", ".downsample.bn.")
    for i, branch in enumerate(branches):
        name = name.replace(f".branches.{branch}.", f".bn_list.{i}.")
    if not branches:
        name = re.sub(rf"(\bbn\d|downsample\.bn)\.{_BN_PARAMETER}$", r"\1.bn_list.0.\2", name)
    return name


def _load(reference: nn.Module, state: dict[str, torch.Tensor], table: list[tuple[str, str]], branches: list[str]):
    """The reference with robustcl's weights and BN statistics; strict, so every reference tensor has one of
    robustcl's of the same shape (the architectures agree)."""
    mapped = {}
    for key, value in state.items():
        name = _reference_name(key, table, branches)
        if name is not None:
            mapped[name] = value.clone()
    reference.load_state_dict(mapped, strict=True)
    return reference


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = float(theirs.double().norm())
    diff = float((ours.double() - theirs.double()).norm())
    return diff / scale if scale > 0 else diff


def _assert_same_step(step: Step, loss: torch.Tensor, reference: nn.Module, table, branches) -> float:
    """robustcl's loss and every trainable parameter's gradient equal the reference's; returns the worst relative
    difference. A parameter without a gradient on one side counts as a zero gradient there."""
    worst = _relative(step.metrics["loss"], loss.detach())
    assert worst <= TOLERANCE, f"loss: robustcl {float(step.metrics['loss']):.8f}, reference {float(loss):.8f}"
    theirs = dict(reference.named_parameters())
    pairs = {}
    for name, p in step.method.named_parameters():
        if p.requires_grad:
            ref_name = _reference_name(name, table, branches)
            assert ref_name in theirs, f"robustcl's {name} has no counterpart in the reference"
            q = theirs[ref_name]
            pairs[name] = (_gradient(p), _gradient(q))
    largest = max(float(expected.norm()) for _, expected in pairs.values())
    assert largest > 0, "the reference step has no gradient"
    for name, (ours, expected) in pairs.items():
        if float(expected.norm()) <= TOLERANCE * largest:
            # Zero in exact arithmetic (a bias feeding a train-mode BN, an unused branch): rounding noise on both
            # sides, which has no scale of its own to be relative to.
            assert float(ours.norm()) <= TOLERANCE * largest, f"gradient of {name} should be ~0"
            continue
        rel = _relative(ours, expected)
        assert rel <= TOLERANCE, f"gradient of {name}: relative difference {rel:.2e}"
        worst = max(worst, rel)
    print(f"largest relative difference (loss, gradients): {worst:.1e}")  # shown with pytest -s / -rP
    return worst


def _gradient(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _assert_same_buffers(after: dict[str, torch.Tensor], reference: nn.Module, table, branches) -> None:
    """BN running statistics after the step: each branch updated by exactly the train-mode passes the authors make
    (an attack in eval mode updates none)."""
    theirs = dict(reference.named_buffers())
    for key, value in after.items():
        name = _reference_name(key, table, branches)
        if name in theirs and value.is_floating_point():
            rel = _relative(value, theirs[name])
            assert rel <= TOLERANCE, f"BN statistics {key}: relative difference {rel:.2e}"


def _start(uniform01: torch.Tensor) -> torch.Tensor:
    """The PGD start δ₀ ~ U(−ε, ε) from the step's uniform draw. The authors write it ``torch.rand_like(x) * eps * 2
    - eps`` (ACL, DynACL) or ``uniform_(-eps, eps)`` (AdvCL, DeACL); robustcl ``(2U − 1)·ε``: the same number up to
    one rounding (≤ 4e-9), which five fp32 PGD steps and the training pass amplify to ~7e-6 in the adversarial
    branch's gradients, too close to the 1e-5 tolerance. Rounded as robustcl does, the attack's images are equal
    bit for bit where the two PGD loops are written alike."""
    return (uniform01 * 2 - 1) * EPSILON


def _interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """ACL's and DynACL's batch layout: the loader stacks an image's two views, ``view(2B, …)`` puts them on rows
    2i and 2i + 1."""
    return torch.stack([first, second], dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------------------------------- ACL


def _acl_nt_xent(z: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """ACL's ``nt_xent`` (utils.py; DynACL's is the same): rows 2i, 2i+1 positives; exp(cosine / t); each
    column's positive over its column sum less the nominal self term exp(1/t); −mean log."""
    norms = z.norm(p=2, dim=1, keepdim=True)
    e = torch.exp(z @ z.T / (norms * norms.T).clamp(min=1e-8) / t)
    column = torch.arange(len(z))
    positive = e[column ^ 1, column]
    return -torch.log(positive / (e.sum(0) - torch.exp(torch.tensor(1 / t)))).mean()


def _pgd_contrastive(embed, inputs: torch.Tensor, start: torch.Tensor, second_clean: bool = False) -> torch.Tensor:
    """ACL's ``PGD_contrastive`` (DynACL's is the same): δ₀ ~ U(−ε, ε) over the whole stacked batch; each step the
    NT-Xent of ``embed(inputs + δ)`` (the caller puts the model in eval mode), δ += α·sign(∇δ), δ clamped to the
    ε-ball, then ``inputs + δ`` to [0, 1]. The first gradient is at the unclamped ``inputs + δ₀``.
    ``second_clean``: ``singleImg``, δ of the odd rows (the second views) held at zero (ACL-A2S)."""
    delta = _start(start)
    if second_clean:
        delta[1::2] = 0
    for _ in range(PGD_STEPS):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(_acl_nt_xent(embed(inputs + delta)), delta)
        delta = (delta.detach() + STEP_SIZE * grad.sign()).clamp(-EPSILON, EPSILON)
        delta = (inputs + delta).clamp(0, 1) - inputs
        if second_clean:
            delta[1::2] = 0
    return (inputs + delta).detach()


def _acl_reference(step: Step, variant: str) -> tuple[torch.Tensor, RefACLNet, list]:
    """ACL's training step (train_simCLR.py ``train``). DS: x_adv = PGD_contrastive through the 'pgd' BN with the
    model in eval mode; then, in train mode, L = ½[nt_xent(model(x, 'normal')) + nt_xent(model(x_adv, 'pgd'))].
    A2A / A2S (the paper's variants; the released loop trains only DS and plain SimCLR): PGD_contrastive with
    ``sameBN`` (one 'normal' BN), A2S also with ``singleImg``; L = nt_xent(model(x_adv, 'normal'))."""
    branches = ["normal", "pgd"] if variant == "ds" else ["normal"]
    table = [("encoder.backbone.", "backbone."), ("projector.", "fc.")]
    net = _load(RefACLNet(branches), step.before, table, branches)
    g = step.random
    view1, view2 = step.method.views(step.images, g, step.step).chunk(2)
    inputs = _interleave(view1, view2)
    if variant == "a2s":
        start = _interleave(step.noise(view1), torch.zeros_like(view2))  # the odd rows' draw is zeroed anyway
    else:
        noise1, noise2 = step.noise(torch.cat([view1, view2])).chunk(2)
        start = _interleave(noise1, noise2)
    adv_branch = branches[-1]
    net.eval()
    adv = _pgd_contrastive(lambda x: net(x, adv_branch), inputs, start, second_clean=variant == "a2s")
    net.train()
    loss_adv = _acl_nt_xent(net(adv, adv_branch))
    loss = loss_adv if variant != "ds" else (_acl_nt_xent(net(inputs, "normal")) + loss_adv) / 2
    loss.backward()
    return loss, net, table


def _acl_sets(variant: str) -> list[str]:
    return [
        "method.name=acl", "method.temperature=0.5", f"method.acl.variant={variant}",
        "method.acl.projector_layers=3", "method.acl.projector_dim=null", "attack.bn_mode=eval",
        f"model.image_mean={IMAGENET_MEAN}", f"model.image_std={IMAGENET_STD}", "model.stem_padding=1",
    ]  # fmt: skip


@pytest.mark.parametrize("variant", ["ds", "a2a", "a2s"])
def test_acl_step_equals_the_authors_pgd_contrastive_and_dual_bn_step(tmp_path, data_dir, variant):
    """ACL: same loss and gradients as VITA-Group's train_simCLR.py step (dual BN, eval-mode PGD_contrastive with
    its unclamped first gradient, ½ clean + ½ adversarial NT-Xent at temperature 0.5), and the same BN
    statistics after it (the attack updates none)."""
    step = Step(tmp_path, "acl.yaml", [*_common(data_dir), *_acl_sets(variant)], step=1)
    loss, net, table = _acl_reference(step, variant)
    branches = ["normal", "pgd"] if variant == "ds" else ["normal"]
    _assert_same_step(step, loss, net, table, branches)
    _assert_same_buffers(step.method.state_dict(), net, table, branches)


# ------------------------------------------------------------------------------------------------------ AdvCL

ADVCL_CLUSTERS = [2, 10, 50, 100, 500]  # the authors' num_classes_list
ADVCL_RADIUS = 4  # generate_high's r (the authors' 8 at 32 px; half the image size here)
ADVCL_TEMPERATURE, ADVCL_BASE_TEMPERATURE, ADVCL_CE_WEIGHT = 0.5, 0.07, 0.2


class RefAdvCLNet(nn.Module):
    """AdvCL's ``resnet_cifar_multibn_ensembleFC.resnet18``: no input normalisation, backbone BN per branch
    ('normal', 'pgd', 'pgd_ce'); ``head_proj`` = Linear → BatchNorm1d (one, shared) → ReLU → Linear(128) on
    every branch's features, L2-normalised; ``fc_002`` … ``fc_500`` linear pseudo-label heads. (Its ``head_pred``
    and ``head_ce`` never reach the loss.)"""

    def __init__(self) -> None:
        super().__init__()
        dim = WIDTHS[-1]
        self.backbone = RefResNet(["normal", "pgd", "pgd_ce"], [0.0] * 3, [1.0] * 3)
        self.head_proj = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, 128))
        for k in ADVCL_CLUSTERS:
            setattr(self, f"fc_{k:03d}", nn.Linear(dim, k))

    def project(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return F.normalize(self.head_proj(self.backbone(x, branch)), dim=1)

    def pseudo_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x, "pgd_ce")
        return [getattr(self, f"fc_{k:03d}")(features) for k in ADVCL_CLUSTERS]


def _advcl_high_frequency(images: torch.Tensor, radius: float) -> torch.Tensor:
    """``fr_util.generate_high``: per image-channel FFT, shifted over *every* dimension as the authors call
    fftshift (the batch-dimension roll cancels in ifftshift), bins at distance < r from (H/2, H/2) zeroed
    (numpy sqrt per bin), inverse FFT, real part; not clamped."""
    n, c, h, w = images.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    low = torch.from_numpy((np.sqrt((rows - h / 2) ** 2 + (cols - h / 2) ** 2) < radius).astype(np.float32))
    x = images.reshape(n * c, h, w)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1))) * (1.0 - low)
    return torch.real(torch.fft.ifftn(torch.fft.ifftshift(spectrum), dim=(-2, -1))).reshape(n, c, h, w)


def _supcon(features: torch.Tensor) -> torch.Tensor:
    """AdvCL's ``SupConLoss(temperature=0.5)`` without labels, contrast_mode 'all': [bsz, V, d] → view-major
    anchors; logits = a·b / T less each row's (detached) max; self excluded from the denominator; the other views
    of the image are the positives; loss = −(T / 0.07) × mean log-probability of the positives, mean over anchors."""
    bsz, views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1))
    logits = contrast @ contrast.T / ADVCL_TEMPERATURE
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(views * bsz, dtype=torch.bool)
    positive = torch.eye(bsz, dtype=torch.bool).repeat(views, views) & not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_positive = (positive * log_prob).sum(1) / positive.sum(1)
    return (-(ADVCL_TEMPERATURE / ADVCL_BASE_TEMPERATURE) * mean_positive).mean()


def _advcl_loss(net, x_cl, x_ce, clean, targets, reduction: str) -> torch.Tensor:
    """SupCon over [x_cl ('pgd'), x1, x2, x_hfc ('normal')] + 0.2 × Σ_K CE(fc_K(f(x_ce, 'pgd_ce')), y_K) / 5; the
    attack sums each CE over the batch (``size_average=False``), training averages it."""
    views = [net.project(x_cl, "pgd"), *(net.project(v, "normal") for v in clean)]
    cross_entropy = sum(F.cross_entropy(lg, y, reduction=reduction) for lg, y in zip(net.pseudo_logits(x_ce), targets))
    return _supcon(torch.stack(views, dim=1)) + cross_entropy / len(ADVCL_CLUSTERS) * ADVCL_CE_WEIGHT


def _advcl_projected(x: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    return torch.min(torch.max(x, weak - EPSILON), weak + EPSILON).clamp(0, 1)


def _advcl_reference(step: Step, labels: dict[int, torch.Tensor]) -> tuple[torch.Tensor, RefAdvCLNet, list]:
    """AdvCL's training step (pretraining_advCL.py): ``AttackPGD`` moves x_cl and x_ce together, from x + U(−ε, ε)
    each, on one loss (contrastive + CE, model in train mode throughout: ``net.train()``), projecting onto the
    ε-ball around the weak view and [0, 1]; then the same loss with mean CE is trained on."""
    table = [("encoder.backbone.", "backbone."), ("projector.fc1.", "head_proj.0."),
             ("projector.bn1.", "head_proj.1."), ("projector.fc2.", "head_proj.3.")]  # fmt: skip
    table += [(f"pseudo_heads.k{k}.", f"fc_{k:03d}.") for k in ADVCL_CLUSTERS]
    branches = ["normal", "pgd", "pgd_ce"]
    net = _load(RefAdvCLNet(), step.before, table, branches)
    g, m = step.random, step.method
    x1, x2, weak = m.augment(step.images, g), m.augment(step.images, g), m.weak(step.images, g)
    x_cl = weak + _start(step.noise(weak))  # x + uniform_(−ε, ε)
    x_ce = weak + _start(step.noise(weak))
    clean = (x1, x2, _advcl_high_frequency(weak, ADVCL_RADIUS))
    targets = [labels[k][step.indices] for k in ADVCL_CLUSTERS]
    net.train()
    for _ in range(PGD_STEPS):
        x_cl.requires_grad_(True)
        x_ce.requires_grad_(True)
        grad_cl, grad_ce = torch.autograd.grad(_advcl_loss(net, x_cl, x_ce, clean, targets, "sum"), [x_cl, x_ce])
        x_cl = _advcl_projected(x_cl.detach() + STEP_SIZE * grad_cl.sign(), weak)
        x_ce = _advcl_projected(x_ce.detach() + STEP_SIZE * grad_ce.sign(), weak)
    loss = _advcl_loss(net, x_cl, x_ce, clean, targets, "mean")
    loss.backward()
    return loss, net, table


def _advcl_labels(data_dir: Path, tmp_path: Path, sets: list[str]) -> tuple[Path, dict[int, torch.Tensor]]:
    """A pseudo-label file for the pretraining images as the session loads them (their identity recorded)."""
    recipe = load_recipe(REPO / "recipes" / "advcl.yaml", sets)
    images = pretraining_images(open_pretraining_split(recipe.data, progress=False), recipe.data, progress=False)
    g = torch.Generator().manual_seed(5)
    labels = {k: torch.randint(0, k, (IMAGES,), generator=g) for k in ADVCL_CLUSTERS}
    path = save_pseudo_labels(tmp_path / "labels.safetensors", PseudoLabels(labels, images.identity(), "x", 0, True))
    return path, labels


def test_advcl_step_equals_the_authors_joint_attack_and_supcon_step(tmp_path, data_dir):
    """AdvCL: same loss and gradients as LijieFan/AdvCL's step: four views with the high-frequency one, SupCon
    scaled by T/0.07, mean pseudo-label CE × 0.2, and the attack's two adversarial views from x + U(−ε, ε) with
    BN in train mode. (BN running statistics are not compared: the authors recompute the clean views at every
    PGD step, robustcl once; the values the step uses are the same.)"""
    sets = [
        *_common(data_dir), "method.name=advcl", f"method.temperature={ADVCL_TEMPERATURE}",
        f"method.advcl.temperature_scale={ADVCL_TEMPERATURE / ADVCL_BASE_TEMPERATURE!r}",
        f"method.advcl.ce_weight={ADVCL_CE_WEIGHT}", f"method.advcl.clusters={ADVCL_CLUSTERS}",
        f"method.advcl.high_frequency_radius={ADVCL_RADIUS}", "method.advcl.projector_dim=128",
        "method.advcl.cluster_encoder=null", "attack.bn_mode=train", "augment.weak_padding=4",
        "model.image_mean=[0.0,0.0,0.0]", "model.image_std=[1.0,1.0,1.0]", "model.stem_padding=1",
    ]  # fmt: skip
    path, labels = _advcl_labels(data_dir, tmp_path, sets)
    step = Step(tmp_path, "advcl.yaml", [*sets, f"method.advcl.pseudo_labels={path}"], step=1)
    loss, net, table = _advcl_reference(step, labels)
    _assert_same_step(step, loss, net, table, ["normal", "pgd", "pgd_ce"])


# ------------------------------------------------------------------------------------------------------ DeACL

DEACL_LAMBDA = 2.0  # trades_k in bash_files/DeACL_cifar10_resnet18.sh


def _deacl_reference(step: Step) -> tuple[torch.Tensor, RefResNet, list]:
    """DeACL's stage-2 step (mocov2_distillation_AT.py): t = teacher(x_weak) (eval); ``generate_training_AE``
    from x + U(−ε, ε) with the student backbone in eval mode maximises −Σ cos(student(x'), t) (× 256, for fp16),
    projecting onto the ε-ball around x and [0, 1]; then, in train mode, one forward of [x; x_adv] and
    L = −mean cos(s, t) − λ·mean cos(s_adv, s). No projector (Identity)."""
    table = [("encoder.backbone.", "")]
    student = _load(RefResNet([], CIFAR_MEAN, CIFAR_STD, stem_padding=2), step.before, table, [])
    teacher_state = step.method.teacher.backbone.state_dict()
    teacher = _load(RefResNet([], CIFAR_MEAN, CIFAR_STD, stem_padding=2), teacher_state, [("backbone.", "")], [])
    teacher.eval().requires_grad_(False)
    weak = step.method.augment(step.images, step.random)
    target = teacher(weak)
    x = weak + _start(step.noise(weak))
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


def test_deacl_step_equals_the_authors_distillation_step(tmp_path, data_dir):
    """DeACL stage 2: same loss and gradients as pantheon5100/DeACL's step (teacher frozen in eval mode, the
    student attacked in eval mode away from the teacher's features, −cos(s, t) − 2·cos(s_adv, s) from one
    train-mode pass), and the same BN statistics after it."""
    sets = [
        *_common(data_dir), "method.name=deacl", "method.deacl.student_init=teacher",
        f"method.deacl.adversarial_weight={DEACL_LAMBDA}", "attack.bn_mode=eval", "augment.weak_padding=4",
        f"model.image_mean={CIFAR_MEAN}", f"model.image_std={CIFAR_STD}", "model.stem_padding=2",
    ]  # fmt: skip
    torch.manual_seed(3)
    teacher = build_method(load_recipe(REPO / "recipes" / "deacl.yaml", sets)).encoder
    _randomise_batch_norms(teacher, seed=13)
    teacher.save_pretrained(tmp_path / "teacher")

    def move_student_off_the_teacher(method: nn.Module) -> None:
        with torch.no_grad():  # it started as the teacher's copy: make s ≠ t so −cos(s, t) has a gradient
            g = torch.Generator().manual_seed(17)
            for p in method.encoder.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))

    sets.append(f"method.deacl.teacher={tmp_path / 'teacher'}")
    step = Step(tmp_path, "deacl.yaml", sets, step=1, prepare=move_student_off_the_teacher)
    loss, student, table = _deacl_reference(step)
    _assert_same_step(step, loss, student, table, [])
    _assert_same_buffers(step.method.state_dict(), student, table, [])


# ----------------------------------------------------------------------------------------------------- DynACL

DYNACL_EPOCHS, DYNACL_RELOAD, DYNACL_SWAP, DYNACL_MOMENTUM = 4, 1, 2 / 3, 0.99
DYNACL_STEP = 5  # 2 steps per epoch: the third epoch, where the adversarial weight is 1.5 and the strength 0.5


class RefDynACLNet(nn.Module):
    """DynACL's ``resnet18_momentum``: encoder_q (trained) and encoder_k (no gradient), each an ACL network with
    its own proj_head; ``swap=True`` sends the even rows through q and the odd rows through k."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_q, self.encoder_k = RefACLNet(["normal", "pgd"]), RefACLNet(["normal", "pgd"])
        self.encoder_k.requires_grad_(False)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return _interleave(self.encoder_q(x[0::2], branch), self.encoder_k(x[1::2], branch))

    @torch.no_grad()
    def momentum_update(self) -> None:
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data = k.data * DYNACL_MOMENTUM + q.data * (1.0 - DYNACL_MOMENTUM)


def _dynacl_reference(step: Step) -> tuple[torch.Tensor, RefDynACLNet, list]:
    """DynACL's step at 1-based epoch e (train_DynACL.py ``train``): PGD_contrastive through the swapped model in
    eval mode; features of x_adv ('pgd') and x ('normal') in train mode; the momentum update of encoder_k right
    after those forwards; w = min(1 + ⌊e / N⌋·(N / E)·swap, 2); L = [(2 − w)·nt_xent(clean) + w·nt_xent(adv)] / 2."""
    table = [
        ("encoder.backbone.", "encoder_q.backbone."),
        ("projector.", "encoder_q.fc."),
        ("momentum_encoder.backbone.", "encoder_k.backbone."),
        ("momentum_projector.", "encoder_k.fc."),
    ]
    net = _load(RefDynACLNet(), step.before, table, ["normal", "pgd"])
    views = step.method.views(step.images, step.random, step.step)
    noise1, noise2 = step.noise(views).chunk(2)
    view1, view2 = views.chunk(2)
    inputs = _interleave(view1, view2)
    net.eval()
    adv = _pgd_contrastive(lambda x: net(x, "pgd"), inputs, _interleave(noise1, noise2))
    net.train()
    features_adv, features = net(adv, "pgd"), net(inputs, "normal")
    net.momentum_update()
    epoch = step.step // step.session.data.batches.steps_per_epoch + 1
    weight = min(1.0 + (epoch // DYNACL_RELOAD) * (DYNACL_RELOAD / DYNACL_EPOCHS) * DYNACL_SWAP, 2)
    loss = (_acl_nt_xent(features) * (2 - weight) + _acl_nt_xent(features_adv) * weight) / 2
    loss.backward()
    return loss, net, table


def test_dynacl_step_equals_the_authors_momentum_step_at_a_later_epoch(tmp_path, data_dir):
    """DynACL in its third epoch: same loss and gradients as PKU-ML/DYNACL's step (second views through the
    momentum encoder in the attack and the loss, adversarial weight 1.5), the same momentum encoder after the
    step's update, the same BN statistics, and the augmentation strength its data reload uses (1 − (e−1)/E)."""
    sets = [
        *_common(data_dir), "method.name=dynacl", "method.temperature=0.5", "method.acl.variant=ds",
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
    loss, net, table = _dynacl_reference(step)
    _assert_same_step(step, loss, net, table, ["normal", "pgd"])
    after = step.method.state_dict()
    _assert_same_buffers(after, net, table, ["normal", "pgd"])
    ours = {_reference_name(k, table, ["normal", "pgd"]): v for k, v in after.items()}
    for name, value in net.encoder_k.named_parameters():  # the moving average taken inside the step
        assert _relative(ours[f"encoder_k.{name}"], value) <= TOLERANCE, f"momentum encoder {name} after the step"
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
    net = _load(RefSoloSimCLR(), step.before, table, [])
    crops = [augment(step.images, step.random) for augment in step.method.augments]  # each view's pipeline
    net.train()
    z = torch.cat([net.projector(net.backbone(x)) for x in crops])
    loss = _solo_simclr_loss(z, step.indices.repeat(len(crops)))
    loss.backward()
    return loss, net, table


def test_simclr_step_equals_solo_learns_step(tmp_path, data_dir):
    """SimCLR: same loss and gradients as solo-learn's CIFAR SimCLR step (temperature 0.2, projector without
    BatchNorm: method.simclr.projector_bn false; each view encoded alone, so BN normalises it by its own
    statistics: method.simclr.bn_per_view true), and the same BN statistics after it."""
    sets = [
        *_common(data_dir), "method.name=simclr", f"method.temperature={SIMCLR_TEMPERATURE}",
        f"method.simclr.projector_hidden_dim={SIMCLR_HIDDEN}", f"method.simclr.projector_dim={SIMCLR_OUT}",
        "method.simclr.projector_bn=false", "method.simclr.bn_per_view=true", "attack.steps=0",
        f"model.image_mean={CIFAR_MEAN}", f"model.image_std={CIFAR_STD}", "model.stem_padding=2",
    ]  # fmt: skip
    step = Step(tmp_path, "simclr.yaml", sets, step=1)
    loss, net, table = _simclr_reference(step)
    _assert_same_step(step, loss, net, table, [])
    _assert_same_buffers(step.method.state_dict(), net, table, [])
