"""What every reference-parity test shares: robustcl's step of a fresh session (:class:`Step`), the authors'
CIFAR networks written out in plain torch (multi-BN ResNet, ACL's projection head, DynACL's momentum pair), robustcl's
weights loaded into them, the comparison at 1e-5, and the ACL and DynACL reference steps that methods built on them
(AIR, DynACL++) extend. The tests themselves are in test_reference_parity.py and test_parity_<method>.py; how the
comparison works is described at the top of test_reference_parity.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from helpers import REPO
from torch import nn

from robustcl.data.batches import batch_random, uniform
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


def colour_images(folder: Path) -> Path:
    """16 random colour 16×16 images saved under ``folder`` (colour, so jitter and grayscale views differ per
    channel)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (IMAGES, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p) for p in pixels], "label": [i % 2 for i in range(IMAGES)]},
        features=features,
    )
    path = folder / "colours"
    datasets.DatasetDict({"train": train}).save_to_disk(str(path))
    return path


def common(data_dir: Path) -> list[str]:
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


def reset_accelerate() -> None:
    # One Accelerate state per process; each test opens its own session.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Step:
    """robustcl's step ``step`` of a fresh session whose BatchNorms were randomised: the weights before it, its
    images, loss and gradients, and the step's random numbers replayed for the reference."""

    def __init__(
        self, tmp_path: Path, recipe_file: str, sets: list[str], step: int, prepare: Callable | None = None
    ) -> None:
        reset_accelerate()
        self.recipe = load_recipe(REPO / "recipes" / recipe_file, sets)
        self.session = open_session(self.recipe, tmp_path / "run", resume=False)
        self.method, self.step = self.session.method, step
        try:
            randomise_batch_norms(self.method, seed=11)
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
            reset_accelerate()
        t = self.recipe.training
        # What accumulate_gradients hands the method: (seed, step, micro 0), this process's rows of the batch.
        self.random = batch_random(t.seed, step, 0, CPU, self.session.data.plan.micro_batch, 0, 1)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The next uniform [0, 1) draw of the step, shaped like ``like`` (a PGD start)."""
        return uniform(tuple(like.shape), self.random, CPU)


def randomise_batch_norms(module: nn.Module, seed: int) -> None:
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


BN_PARAMETER = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def reference_name(name: str, table: list[tuple[str, str]], branches: list[str]) -> str | None:
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
        name = re.sub(rf"(\bbn\d|downsample\.bn)\.{BN_PARAMETER}$", r"\1.bn_list.0.\2", name)
    return name


def load_reference(
    reference: nn.Module, state: dict[str, torch.Tensor], table: list[tuple[str, str]], branches: list[str]
):
    """The reference with robustcl's weights and BN statistics; strict, so every reference tensor has one of
    robustcl's of the same shape (the architectures agree)."""
    mapped = {}
    for key, value in state.items():
        name = reference_name(key, table, branches)
        if name is not None:
            mapped[name] = value.clone()
    reference.load_state_dict(mapped, strict=True)
    return reference


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = float(theirs.double().norm())
    diff = float((ours.double() - theirs.double()).norm())
    return diff / scale if scale > 0 else diff


def assert_same_step(step: Step, loss: torch.Tensor, reference: nn.Module, table, branches) -> float:
    """robustcl's loss and every trainable parameter's gradient equal the reference's; returns the worst relative
    difference. A parameter without a gradient on one side counts as a zero gradient there."""
    worst = relative(step.metrics["loss"], loss.detach())
    assert worst <= TOLERANCE, f"loss: robustcl {float(step.metrics['loss']):.8f}, reference {float(loss):.8f}"
    theirs = dict(reference.named_parameters())
    pairs = {}
    for name, p in step.method.named_parameters():
        if p.requires_grad:
            ref_name = reference_name(name, table, branches)
            assert ref_name in theirs, f"robustcl's {name} has no counterpart in the reference"
            q = theirs[ref_name]
            pairs[name] = (gradient(p), gradient(q))
    largest = max(float(expected.norm()) for _, expected in pairs.values())
    assert largest > 0, "the reference step has no gradient"
    for name, (ours, expected) in pairs.items():
        if float(expected.norm()) <= TOLERANCE * largest:
            # Zero in exact arithmetic (a bias feeding a train-mode BN, an unused branch): rounding noise on both
            # sides, which has no scale of its own to be relative to.
            assert float(ours.norm()) <= TOLERANCE * largest, f"gradient of {name} should be ~0"
            continue
        rel = relative(ours, expected)
        assert rel <= TOLERANCE, f"gradient of {name}: relative difference {rel:.2e}"
        worst = max(worst, rel)
    print(f"largest relative difference (loss, gradients): {worst:.1e}")  # shown with pytest -s / -rP
    return worst


def gradient(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def assert_same_buffers(after: dict[str, torch.Tensor], reference: nn.Module, table, branches) -> None:
    """BN running statistics after the step: each branch updated by exactly the train-mode passes the authors make
    (an attack in eval mode updates none)."""
    theirs = dict(reference.named_buffers())
    for key, value in after.items():
        name = reference_name(key, table, branches)
        if name in theirs and value.is_floating_point():
            rel = relative(value, theirs[name])
            assert rel <= TOLERANCE, f"BN statistics {key}: relative difference {rel:.2e}"


def pgd_start(uniform01: torch.Tensor) -> torch.Tensor:
    """The PGD start δ₀ ~ U(−ε, ε) from the step's uniform draw. The authors write it ``torch.rand_like(x) * eps * 2
    - eps`` (ACL, DynACL) or ``uniform_(-eps, eps)`` (AdvCL, DeACL); robustcl ``(2U − 1)·ε``: the same number up to
    one rounding (≤ 4e-9), which five fp32 PGD steps and the training pass amplify to ~7e-6 in the adversarial
    branch's gradients, too close to the 1e-5 tolerance. Rounded as robustcl does, the attack's images are equal
    bit for bit where the two PGD loops are written alike."""
    return (uniform01 * 2 - 1) * EPSILON


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """ACL's and DynACL's batch layout: the loader stacks an image's two views, ``view(2B, …)`` puts them on rows
    2i and 2i + 1."""
    return torch.stack([first, second], dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------------------------------- ACL


def acl_nt_xent(z: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """ACL's ``nt_xent`` (utils.py; DynACL's is the same): rows 2i, 2i+1 positives; exp(cosine / t); each
    column's positive over its column sum less the nominal self term exp(1/t); −mean log."""
    norms = z.norm(p=2, dim=1, keepdim=True)
    e = torch.exp(z @ z.T / (norms * norms.T).clamp(min=1e-8) / t)
    column = torch.arange(len(z))
    positive = e[column ^ 1, column]
    return -torch.log(positive / (e.sum(0) - torch.exp(torch.tensor(1 / t)))).mean()


def pgd_contrastive(embed, inputs: torch.Tensor, start: torch.Tensor, second_clean: bool = False) -> torch.Tensor:
    """ACL's ``PGD_contrastive`` (DynACL's is the same): δ₀ ~ U(−ε, ε) over the whole stacked batch; each step the
    NT-Xent of ``embed(inputs + δ)`` (the caller puts the model in eval mode), δ += α·sign(∇δ), δ clamped to the
    ε-ball, then ``inputs + δ`` to [0, 1]. The first gradient is at the unclamped ``inputs + δ₀``.
    ``second_clean``: ``singleImg``, δ of the odd rows (the second views) held at zero (ACL-A2S)."""
    delta = pgd_start(start)
    if second_clean:
        delta[1::2] = 0
    for _ in range(PGD_STEPS):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(acl_nt_xent(embed(inputs + delta)), delta)
        delta = (delta.detach() + STEP_SIZE * grad.sign()).clamp(-EPSILON, EPSILON)
        delta = (inputs + delta).clamp(0, 1) - inputs
        if second_clean:
            delta[1::2] = 0
    return (inputs + delta).detach()


def dual_bn_attack(step: Step, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """How ACL-DS's and DynACL's loops (and AIR's) attack: the two views interleaved (x1, x2, x1, x2, …),
    PGD_contrastive through the 'pgd' BN with the model in eval mode, the model back in train mode; (inputs, x_adv)."""
    view1, view2 = step.method.views(step.images, step.random, step.step).chunk(2)
    noise1, noise2 = step.noise(torch.cat([view1, view2])).chunk(2)
    inputs = interleave(view1, view2)
    net.eval()
    adv = pgd_contrastive(lambda x: net(x, "pgd"), inputs, interleave(noise1, noise2))
    net.train()
    return inputs, adv


def acl_reference(step: Step, variant: str) -> tuple[torch.Tensor, RefACLNet, list]:
    """ACL's training step (train_simCLR.py ``train``). DS: x_adv = PGD_contrastive through the 'pgd' BN with the
    model in eval mode; then, in train mode, L = ½[nt_xent(model(x, 'normal')) + nt_xent(model(x_adv, 'pgd'))].
    A2A / A2S (the paper's variants; the released loop trains only DS and plain SimCLR): PGD_contrastive with
    ``sameBN`` (one 'normal' BN), A2S also with ``singleImg``; L = nt_xent(model(x_adv, 'normal'))."""
    branches = ["normal", "pgd"] if variant == "ds" else ["normal"]
    table = [("encoder.backbone.", "backbone."), ("projector.", "fc.")]
    net = load_reference(RefACLNet(branches), step.before, table, branches)
    g = step.random
    view1, view2 = step.method.views(step.images, g, step.step).chunk(2)
    inputs = interleave(view1, view2)
    if variant == "a2s":
        start = interleave(step.noise(view1), torch.zeros_like(view2))  # the odd rows' draw is zeroed anyway
    else:
        noise1, noise2 = step.noise(torch.cat([view1, view2])).chunk(2)
        start = interleave(noise1, noise2)
    adv_branch = branches[-1]
    net.eval()
    adv = pgd_contrastive(lambda x: net(x, adv_branch), inputs, start, second_clean=variant == "a2s")
    net.train()
    loss_adv = acl_nt_xent(net(adv, adv_branch))
    loss = loss_adv if variant != "ds" else (acl_nt_xent(net(inputs, "normal")) + loss_adv) / 2
    loss.backward()
    return loss, net, table


def acl_sets(variant: str) -> list[str]:
    return [
        "method.name=acl", "method.temperature=0.5", f"method.acl.variant={variant}",
        "method.acl.projector_layers=3", "method.acl.projector_dim=null", "attack.bn_mode=eval",
        f"model.image_mean={IMAGENET_MEAN}", f"model.image_std={IMAGENET_STD}", "model.stem_padding=1",
    ]  # fmt: skip


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
        return interleave(self.encoder_q(x[0::2], branch), self.encoder_k(x[1::2], branch))

    @torch.no_grad()
    def momentum_update(self) -> None:
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data = k.data * DYNACL_MOMENTUM + q.data * (1.0 - DYNACL_MOMENTUM)


def dynacl_reference(step: Step) -> tuple[torch.Tensor, RefDynACLNet, list]:
    """DynACL's step at 1-based epoch e (train_DynACL.py ``train``): PGD_contrastive through the swapped model in
    eval mode; features of x_adv ('pgd') and x ('normal') in train mode; the momentum update of encoder_k right
    after those forwards; w = min(1 + ⌊e / N⌋·(N / E)·swap, 2); L = [(2 − w)·nt_xent(clean) + w·nt_xent(adv)] / 2."""
    table = [
        ("encoder.backbone.", "encoder_q.backbone."),
        ("projector.", "encoder_q.fc."),
        ("momentum_encoder.backbone.", "encoder_k.backbone."),
        ("momentum_projector.", "encoder_k.fc."),
    ]
    net = load_reference(RefDynACLNet(), step.before, table, ["normal", "pgd"])
    inputs, adv = dual_bn_attack(step, net)
    features_adv, features = net(adv, "pgd"), net(inputs, "normal")
    net.momentum_update()
    epoch = step.step // step.session.data.batches.steps_per_epoch + 1
    weight = min(1.0 + (epoch // DYNACL_RELOAD) * (DYNACL_RELOAD / DYNACL_EPOCHS) * DYNACL_SWAP, 2)
    loss = (acl_nt_xent(features) * (2 - weight) + acl_nt_xent(features_adv) * weight) / 2
    loss.backward()
    return loss, net, table


# ------------------------------------------------------------------------------------------------------ AdvCL

ADVCL_CLUSTERS = [2, 10, 50, 100, 500]  # the authors' num_classes_list
ADVCL_RADIUS = 4  # generate_high's r (the authors' 8 at 32 px; half the image size here)
ADVCL_TEMPERATURE, ADVCL_BASE_TEMPERATURE, ADVCL_CE_WEIGHT = 0.5, 0.07, 0.2
ADVCL_BRANCHES = ["normal", "pgd", "pgd_ce"]


class RefAdvCLNet(nn.Module):
    """AdvCL's ``resnet_cifar_multibn_ensembleFC.resnet18``: no input normalisation, backbone BN per branch
    ('normal', 'pgd', 'pgd_ce'); ``head_proj`` = Linear → BatchNorm1d (one, shared) → ReLU → Linear(128) on
    every branch's features, L2-normalised; ``fc_002`` … ``fc_500`` linear pseudo-label heads. (Its ``head_pred``
    and ``head_ce`` never reach the loss.)"""

    def __init__(self) -> None:
        super().__init__()
        dim = WIDTHS[-1]
        self.backbone = RefResNet(ADVCL_BRANCHES, [0.0] * 3, [1.0] * 3)
        self.head_proj = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, 128))
        for k in ADVCL_CLUSTERS:
            setattr(self, f"fc_{k:03d}", nn.Linear(dim, k))

    def project(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return F.normalize(self.head_proj(self.backbone(x, branch)), dim=1)

    def pseudo_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x, "pgd_ce")
        return [getattr(self, f"fc_{k:03d}")(features) for k in ADVCL_CLUSTERS]


def advcl_high_frequency(images: torch.Tensor, radius: float) -> torch.Tensor:
    """``fr_util.generate_high``: per image-channel FFT, shifted over *every* dimension as the authors call
    fftshift (the batch-dimension roll cancels in ifftshift), bins at distance < r from (H/2, H/2) zeroed
    (numpy sqrt per bin), inverse FFT, real part; not clamped."""
    n, c, h, w = images.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    low = torch.from_numpy((np.sqrt((rows - h / 2) ** 2 + (cols - h / 2) ** 2) < radius).astype(np.float32))
    x = images.reshape(n * c, h, w)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1))) * (1.0 - low)
    return torch.real(torch.fft.ifftn(torch.fft.ifftshift(spectrum), dim=(-2, -1))).reshape(n, c, h, w)


def advcl_supcon(features: torch.Tensor) -> torch.Tensor:
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


def advcl_views(net: RefAdvCLNet, x_cl: torch.Tensor, clean) -> torch.Tensor:
    """[bsz, 4, 128]: x_cl through 'pgd', the clean views (x1, x2, x_hfc) through 'normal' (features[:, 0] adv)."""
    return torch.stack([net.project(x_cl, "pgd"), *(net.project(v, "normal") for v in clean)], dim=1)


def advcl_cross_entropy(net: RefAdvCLNet, x_ce: torch.Tensor, targets, reduction: str) -> torch.Tensor:
    """Σ_K CE(fc_K(f(x_ce, 'pgd_ce')), y_K) / 5 × 0.2; the attack sums each CE over the batch
    (``size_average=False``), training averages it."""
    cross_entropy = sum(F.cross_entropy(lg, y, reduction=reduction) for lg, y in zip(net.pseudo_logits(x_ce), targets))
    return cross_entropy / len(ADVCL_CLUSTERS) * ADVCL_CE_WEIGHT


def advcl_projected(x: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    return torch.min(torch.max(x, weak - EPSILON), weak + EPSILON).clamp(0, 1)


def advcl_reference(
    step: Step,
    labels: dict[int, torch.Tensor],
    attack_contrastive: Callable[[torch.Tensor], torch.Tensor] = advcl_supcon,
    train_contrastive: Callable | None = None,
) -> tuple[torch.Tensor, RefAdvCLNet, list]:
    """AdvCL's training step (pretraining_advCL.py): ``AttackPGD`` moves x_cl and x_ce together, from x + U(−ε, ε)
    each, on one loss (contrastive + CE, model in train mode throughout: ``net.train()``), projecting onto the
    ε-ball around the weak view and [0, 1]; then the same loss with mean CE is trained on. A-InfoNCE's Asym-AdvCL
    keeps the step and changes the contrastive criteria: ``attack_contrastive(features)`` for the attack and
    ``train_contrastive(net, features, x_cl, weak)`` for training (default: the attack's)."""
    table = [("encoder.backbone.", "backbone."), ("projector.fc1.", "head_proj.0."),
             ("projector.bn1.", "head_proj.1."), ("projector.fc2.", "head_proj.3.")]  # fmt: skip
    table += [(f"pseudo_heads.k{k}.", f"fc_{k:03d}.") for k in ADVCL_CLUSTERS]
    net = load_reference(RefAdvCLNet(), step.before, table, ADVCL_BRANCHES)
    g, m = step.random, step.method
    x1, x2, weak = m.augment(step.images, g), m.augment(step.images, g), m.weak(step.images, g)
    x_cl = weak + pgd_start(step.noise(weak))  # x + uniform_(−ε, ε)
    x_ce = weak + pgd_start(step.noise(weak))
    clean = (x1, x2, advcl_high_frequency(weak, ADVCL_RADIUS))
    targets = [labels[k][step.indices] for k in ADVCL_CLUSTERS]
    net.train()
    for _ in range(PGD_STEPS):
        x_cl.requires_grad_(True)
        x_ce.requires_grad_(True)
        loss = attack_contrastive(advcl_views(net, x_cl, clean)) + advcl_cross_entropy(net, x_ce, targets, "sum")
        grad_cl, grad_ce = torch.autograd.grad(loss, [x_cl, x_ce])
        x_cl = advcl_projected(x_cl.detach() + STEP_SIZE * grad_cl.sign(), weak)
        x_ce = advcl_projected(x_ce.detach() + STEP_SIZE * grad_ce.sign(), weak)
    features = advcl_views(net, x_cl, clean)
    if train_contrastive is None:
        contrastive = attack_contrastive(features)
    else:
        contrastive = train_contrastive(net, features, x_cl, weak)
    loss = contrastive + advcl_cross_entropy(net, x_ce, targets, "mean")
    loss.backward()
    return loss, net, table


def advcl_labels(data_dir: Path, tmp_path: Path, sets: list[str]) -> tuple[Path, dict[int, torch.Tensor]]:
    """A pseudo-label file for the pretraining images as the session loads them (their identity recorded)."""
    from robustcl.data.loading import open_pretraining_split, pretraining_images
    from robustcl.pseudo_labels import PseudoLabels, save_pseudo_labels

    recipe = load_recipe(REPO / "recipes" / "advcl.yaml", sets)
    images = pretraining_images(open_pretraining_split(recipe.data, progress=False), recipe.data, progress=False)
    g = torch.Generator().manual_seed(5)
    labels = {k: torch.randint(0, k, (IMAGES,), generator=g) for k in ADVCL_CLUSTERS}
    path = save_pseudo_labels(tmp_path / "labels.safetensors", PseudoLabels(labels, images.identity(), "x", 0, True))
    return path, labels


def advcl_sets(name: str = "advcl") -> list[str]:
    """AdvCL's settings in the parity step (method ``name``: advcl, or a method built on it that reads its keys)."""
    return [
        f"method.name={name}", f"method.temperature={ADVCL_TEMPERATURE}",
        f"method.advcl.temperature_scale={ADVCL_TEMPERATURE / ADVCL_BASE_TEMPERATURE!r}",
        f"method.advcl.ce_weight={ADVCL_CE_WEIGHT}", f"method.advcl.clusters={ADVCL_CLUSTERS}",
        f"method.advcl.high_frequency_radius={ADVCL_RADIUS}", "method.advcl.projector_dim=128",
        "method.advcl.cluster_encoder=null", "attack.bn_mode=train", "augment.weak_padding=4",
        "model.image_mean=[0.0,0.0,0.0]", "model.image_std=[1.0,1.0,1.0]", "model.stem_padding=1",
    ]  # fmt: skip
