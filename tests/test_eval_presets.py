"""Evaluation presets (eval.preset / --preset): each preset's finetuning steps are the reference script's steps, the
preset fills what the user did not set and nothing the user did, and `robustcl evaluate --preset NAME` runs end to
end and names the preset in its report.

The reference steps below are written from the authors' code (the file each follows is named), not from robustcl's:
the same batch and the same random numbers (crop offsets, flips, attack starts) go into both, and the loss and the
updated weights must agree to 1e-5 (float32)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from helpers import with_sets
from torch import nn

from robustcl.encoder_loading import FeatureEncoder
from robustcl.evaluation.finetune import LabelledImages, finetune
from robustcl.evaluation.presets import PRESETS, PROTOCOL_KEYS, preset_values
from robustcl.evaluation.run import evaluation_recipe
from robustcl.evaluation.sharding import batch_random
from robustcl.recipe import FinetuneConfig, Recipe, override_recipe, read_yaml, recipe_from_dict

EPS, STEP, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0
MOMENTUM, WD = 0.9, 2e-4
N, BATCH, SIZE, CLASSES, SEED = 16, 8, 8, 4, 3  # two steps: the second one attacks a head that is no longer zero


# ------------------------------------------------------------------------------- the same inputs and draws


def _encoder() -> FeatureEncoder:
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel

    torch.manual_seed(0)
    model = RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1], widths=[8, 16]))
    with torch.no_grad():  # BatchNorm statistics and affine values away from their initial 0 / 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2), m.bias.uniform_(-0.1, 0.1)
    return FeatureEncoder(model).eval()


def _data() -> tuple[LabelledImages, LabelledImages]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N + 4, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.arange(N + 4) % CLASSES
    return LabelledImages(images[:N], labels[:N]), LabelledImages(images[N:], labels[N:])


def _batches(train: LabelledImages):
    """What robustcl's epoch 1 feeds its steps: the seeded order in batches of BATCH, and per batch the generator its
    random numbers come from (:func:`batch_random`). A reference script draws from torch's global generator instead;
    here it draws the same numbers, in the order robustcl does: crop tops, crop lefts, flips, then the attack start."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED))
    for number, index in enumerate(order.split(BATCH)):
        yield (
            train.images[index].float() / 255,
            train.labels[index],
            batch_random(SEED, 1, number, "cpu", BATCH, 0, BATCH),
        )


def _crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """torchvision RandomCrop(size, padding=4) + RandomHorizontalFlip, image by image."""
    top = torch.randint(0, 9, (1, len(x)), generator=g)[0]
    left = torch.randint(0, 9, (1, len(x)), generator=g)[0]
    flip = torch.rand((1, len(x)), generator=g)[0] < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    out = torch.stack([padded[i, :, t : t + SIZE, l : l + SIZE] for i, (t, l) in enumerate(zip(top, left))])  # noqa: E741
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def _uniform_start(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand((1, *x.shape), generator=g)[0]


def _gaussian_start(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g)


# ------------------------------------------------------------------------------- dual BatchNorm as the authors build it


class _DualBN(nn.Module):
    """models/resnet_multi_bn.py (DynACL, RobustSSL_Benchmark): bn_list[0] 'normal', bn_list[1] 'pgd', picked per
    forward call."""

    active = 1

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn_list = nn.ModuleList([copy.deepcopy(bn), copy.deepcopy(bn)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_list[_DualBN.active](x)


def _with_dual_bn(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _DualBN(child))
        else:
            _with_dual_bn(child)
    return module


def _pgd_branch_only(module: nn.Module) -> nn.Module:
    """What the scripts measure: cvt_state_dict keeps bn_list.1 ('pgd')."""
    for name, child in list(module.named_children()):
        if isinstance(child, _DualBN):
            setattr(module, name, child.bn_list[1])
        else:
            _pgd_branch_only(child)
    return module


@contextmanager
def _bn(name: str):
    _DualBN.active = {"normal": 0, "pgd": 1}[name]
    try:
        yield
    finally:
        _DualBN.active = 1


# ------------------------------------------------------------------------------- the reference scripts' steps


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WD)


def _pgd_ce(model, x, y, start, clamp_start: bool) -> torch.Tensor:
    """RobustSSL_Benchmark / DYNACL utils.pgd_attack (forceEval, CE averaged over the batch): δ uniform in [-ε, ε]
    (rand·2ε − ε), the first gradient at x + δ unclamped; each step: δ += α·sign(∇), δ clamped to the ε-ball, then
    x + δ to [0, 1]. ``clamp_start``: robustcl's own protocol clamps x + δ₀ first."""
    delta = start * EPS * 2 - EPS
    if clamp_start:
        delta = (x + delta).clamp(0, 1) - x
    for _ in range(STEPS):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), [delta])
        delta = (delta.detach() + STEP * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _trades_kl_attack(adv_model, clean_model, x, noise, clamp_start: bool = False) -> torch.Tensor:
    """trades.py (ACL, DeACL, RobustSSL_Benchmark): x_adv = x + 0.001·N(0, 1) (x itself when ``noise`` is None:
    DYNACL trades_loss_dual); each step ascends KL(sum)(f(x_adv) ‖ f(x)), x_adv projected to the ε-ball and [0, 1]."""
    x_adv = x.clone() if noise is None else x + 0.001 * noise
    if clamp_start:
        x_adv = x_adv.clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        with torch.no_grad():
            target = F.softmax(clean_model(x), dim=1)
        loss = F.kl_div(F.log_softmax(adv_model(x_adv), dim=1), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    return x_adv.detach()


def linear_step(encoder, head, optimizer, x, y, g, *, attack: bool, augment=True, bn_train=False, clamp_start=False,
                bf16_features=False):  # fmt: skip
    """SLF / ALF of RobustSSL_Benchmark utils.train_loop and DYNACL test_LF.py (model.eval(), only fc trained), of
    AdvCL finetuning_advCL_SLF.py (model.eval(), features under no_grad) and, with bn_train, of DeACL
    adv_finetune.py SLF (model.train(), features under no_grad). robustcl's own: no augmentation, clamped start, and
    SLF's features computed once and kept in bfloat16 (finetune.FEATURE_DTYPE)."""
    if augment:
        x = _crop_flip(x, g)
    model = lambda z: head(encoder(z))  # noqa: E731
    if attack:
        encoder.eval()
        x = _pgd_ce(model, x, y, _uniform_start(x, g), clamp_start)
    encoder.train(bn_train)
    with torch.no_grad():
        features = encoder(x)
    if bf16_features:
        features = features.to(torch.bfloat16).float()
    loss = F.cross_entropy(head(features), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def trades_step(encoder, head, optimizer, x, y, g, *, random_start=True, separate_target=False,
                clamp_start=False, augment=True):  # fmt: skip
    """TRADES finetuning of ACL trades.py, RobustSSL_Benchmark utils.trades_loss (single BN) and, with
    separate_target, DeACL trades/trades.py (the KL target from one more f(x), in train mode; ALF: only the
    classifier in the optimizer): attack in eval mode, then model.train(), loss CE(f(x)) + β/B·KL(f(x_adv) ‖ f(x))."""
    if augment:
        x = _crop_flip(x, g)
    model = lambda z: head(encoder(z))  # noqa: E731
    encoder.eval()
    x_adv = _trades_kl_attack(model, model, x, _gaussian_start(x, g) if random_start else None, clamp_start)
    encoder.train()
    logits = model(x)
    adv = model(x_adv)
    target = model(x) if separate_target else logits
    loss = F.cross_entropy(logits, y) + BETA / len(x) * F.kl_div(
        F.log_softmax(adv, dim=1), F.softmax(target, dim=1), reduction="sum"
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def dual_trades_step(encoder, head, optimizer, x, y, g, *, random_start):
    """trades_loss_dual of RobustSSL_Benchmark utils.py (start x + 0.001·N(0, 1)) and DYNACL utils.py (start x):
    the attack ascends KL(f_pgd(x_adv) ‖ f_normal(x)) in eval mode; then model.train(), nat = f_normal(x),
    adv = f_pgd(x_adv), loss CE(nat) + 6/B·KL(adv ‖ nat); every parameter (both branches) trained."""
    x = _crop_flip(x, g)

    def with_branch(name):
        def forward(z):
            with _bn(name):
                return head(encoder(z))

        return forward

    encoder.eval()
    x_adv = _trades_kl_attack(
        with_branch("pgd"), with_branch("normal"), x, _gaussian_start(x, g) if random_start else None
    )
    encoder.train()
    nat = with_branch("normal")(x)
    adv = with_branch("pgd")(x_adv)
    loss = F.cross_entropy(nat, y) + BETA / len(x) * F.kl_div(
        F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction="sum"
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _step(fn: Callable, **settings) -> Callable:
    return lambda *args: fn(*args, **settings)


# (preset, protocol) → (the reference's step, its lr, head start: zeros | default, dual BN). Read from the scripts:
# RobustSSL_Benchmark utils.py setup_hyperparameter (ACL row: SLF/ALF lr 0.01, AFF 0.1) / get_model (fc zeroed) /
# trades_loss_dual (--dualBN 1); ACL train_trades.py (lr 0.1, fc zeroed by cvt_state_dict); AdvCL
# finetuning_advCL_SLF.py (lr 0.01, a new Linear); DeACL adv_finetune.py (model.train(), a new LinearClassifier; SLF
# lr 0.1 in eval_cifar10_resnet18.sh, else the default 0.01); DYNACL test_LF.py (lr 0.01, fc zeroed), test_AFF.py
# (lr 0.1, dual BN, trades_loss_dual without random start). SLF / ALF train the head only, AFF every parameter.
LEADERBOARD_SLF = (_step(linear_step, attack=False), 0.01, "zeros", False)
LEADERBOARD_ALF = (_step(linear_step, attack=True), 0.01, "zeros", False)
REFERENCES = {
    ("robustssl", "slf"): LEADERBOARD_SLF,
    ("robustssl", "alf"): LEADERBOARD_ALF,
    ("robustssl", "aff"): (_step(dual_trades_step, random_start=True), 0.1, "zeros", True),
    ("acl", "slf"): LEADERBOARD_SLF,
    ("acl", "alf"): LEADERBOARD_ALF,
    ("acl", "aff"): (_step(trades_step), 0.1, "zeros", False),
    ("advcl", "slf"): (_step(linear_step, attack=False), 0.01, "default", False),
    ("advcl", "alf"): LEADERBOARD_ALF,
    ("advcl", "aff"): (_step(trades_step), 0.1, "zeros", False),
    ("deacl", "slf"): (_step(linear_step, attack=False, bn_train=True), 0.1, "default", False),
    ("deacl", "alf"): (_step(trades_step, separate_target=True), 0.01, "default", False),
    ("deacl", "aff"): (_step(trades_step, separate_target=True), 0.01, "default", False),
    ("dynacl", "slf"): LEADERBOARD_SLF,
    ("dynacl", "alf"): LEADERBOARD_ALF,
    ("dynacl", "aff"): (_step(dual_trades_step, random_start=False), 0.1, "zeros", True),
    # robustcl's protocol before presets: unaugmented SLF on bfloat16 features, x + δ₀ clamped before the first
    # gradient.
    ("robustcl", "slf"): (_step(linear_step, attack=False, augment=False, bf16_features=True), 0.1, "default", False),
    ("robustcl", "alf"): (_step(linear_step, attack=True, clamp_start=True), 0.1, "default", False),
    ("robustcl", "aff"): (_step(trades_step, clamp_start=True), 0.1, "default", False),
}


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("preset, protocol", sorted(REFERENCES))
def test_a_preset_trains_what_its_reference_script_trains(preset, protocol):
    reference_step, lr, head_init, dual = REFERENCES[(preset, protocol)]
    train, val = _data()
    cfg = FinetuneConfig(**{**preset_values(preset, protocol), "epochs": 1, "batch_size": BATCH})
    start = _encoder()
    result = finetune(
        copy.deepcopy(start), train, val, CLASSES, cfg, device=torch.device("cpu"), seed=SEED, progress=False
    )

    encoder = _with_dual_bn(copy.deepcopy(start)) if dual else copy.deepcopy(start)
    torch.manual_seed(SEED)  # robustcl seeds the head's initialisation with eval.seed
    head = nn.Linear(16, CLASSES)
    if head_init == "zeros":  # the scripts load fc.weight / fc.bias = zeros over the pretrained encoder
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    trained = list(head.parameters())
    if protocol == "aff":
        trained += list(encoder.parameters())
    else:
        encoder.requires_grad_(False)
    optimizer = _sgd(trained, lr)
    losses = [reference_step(encoder, head, optimizer, x, y, s.generator) for x, y, s in _batches(train)]
    if dual:
        _pgd_branch_only(encoder)

    assert result.selected_epoch == 1
    loss = sum(losses) / len(losses)
    assert abs(result.history[0]["train_loss"] - loss) <= 1e-5 * abs(loss), (result.history[0]["train_loss"], loss)
    got = {
        **result.classifier.encoder.state_dict(),
        **{f"head.{k}": v for k, v in result.classifier.head.state_dict().items()},
    }
    want = {**encoder.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}
    assert got.keys() == want.keys()
    gaps = {k: _relative_gap(got[k], want[k]) for k in want if want[k].is_floating_point()}
    assert max(gaps.values()) <= 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert all(torch.equal(got[k], want[k]) for k in want if not want[k].is_floating_point())  # BN batch counts
    # The steps moved what they should: the encoder's convolutions in AFF only, its BN statistics in train mode only.
    before = start.state_dict()
    moved = {k for k in before if not torch.equal(got[k], before[k])}
    assert any(k.endswith("running_mean") for k in moved) == (preset == "deacl" or protocol == "aff")
    assert any("conv" in k for k in moved) == (protocol == "aff")


def test_schedules_match_the_scripts():
    """ACL's train_trades.py steps MultiStepLR([40, 60]) at the START of each epoch, so epoch 40 already runs at
    lr/10; AdvCL's and DeACL's adjust_lr(lr, epoch − 1) divide from epoch 16 and 21; the others step after the epoch."""

    def robustcl_lrs(cfg: FinetuneConfig) -> list[float]:  # finetune(): scheduler.step() after each epoch
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
        lrs = []
        for _ in range(cfg.epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step(), scheduler.step()
        return lrs

    def acl_lrs(epochs: int) -> list[float]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [40, 60], 0.1)
        lrs = []
        for _ in range(epochs):
            optimizer.step(), scheduler.step()  # at the start of the epoch
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs

    def adjust_lr(lr: float, epochs: int) -> list[float]:
        return [lr / (10 if e - 1 >= 15 else 1) / (10 if e - 1 >= 20 else 1) for e in range(1, epochs + 1)]

    def close(a, b):
        return len(a) == len(b) and all(abs(x - y) <= 1e-12 for x, y in zip(a, b))

    assert close(robustcl_lrs(FinetuneConfig(**preset_values("acl", "aff"))), acl_lrs(100))
    assert close(robustcl_lrs(FinetuneConfig(**preset_values("advcl", "slf"))), adjust_lr(0.01, 25))
    assert close(robustcl_lrs(FinetuneConfig(**preset_values("deacl", "slf"))), adjust_lr(0.1, 25))
    assert close(robustcl_lrs(FinetuneConfig(**preset_values("deacl", "aff"))), adjust_lr(0.01, 25))


# The table README shows, as read from the scripts: (lr, batch, epochs, milestones, augment, BN mode, selection).
TABLE = {
    ("robustssl", "slf"): (0.01, 512, 25, [10, 20], True, "eval", "final"),
    ("robustssl", "alf"): (0.01, 512, 25, [10, 20], True, "eval", "final"),
    ("robustssl", "aff"): (0.1, 128, 100, [40, 60], True, "train", "final"),
    ("acl", "aff"): (0.1, 128, 100, [39, 59], True, "train", "robust"),
    ("advcl", "slf"): (0.01, 512, 25, [15, 20], True, "eval", "robust"),
    ("advcl", "alf"): (0.01, 512, 25, [15, 20], True, "eval", "final"),
    ("advcl", "aff"): (0.1, 128, 25, [15, 20], True, "train", "final"),
    ("deacl", "slf"): (0.1, 512, 25, [15, 20], True, "train", "final"),
    ("deacl", "alf"): (0.01, 512, 25, [15, 20], True, "train", "final"),
    ("deacl", "aff"): (0.01, 512, 25, [15, 20], True, "train", "final"),
    ("dynacl", "slf"): (0.01, 512, 25, [10, 20], True, "eval", "final"),
    ("dynacl", "aff"): (0.1, 128, 25, [15, 20], True, "train", "final"),
    ("robustcl", "slf"): (0.1, 512, 25, [15, 20], False, "eval", "clean"),
    ("robustcl", "alf"): (0.1, 512, 25, [15, 20], True, "eval", "robust"),
    ("robustcl", "aff"): (0.1, 128, 25, [15, 20], True, "train", "robust"),
}


def test_preset_table_is_complete_and_matches_the_scripts():
    for name, protocols in PRESETS.items():
        assert set(protocols) == set(PROTOCOL_KEYS)
        for protocol, values in protocols.items():
            assert set(values) == set(FinetuneConfig.model_fields), (name, protocol)  # a preset sets every key
            FinetuneConfig(**values)
    for (name, protocol), row in TABLE.items():
        c = FinetuneConfig(**preset_values(name, protocol))
        assert (c.lr, c.batch_size, c.epochs, c.milestones, c.augment, c.bn_mode, c.select_by) == row, (name, protocol)


# ------------------------------------------------------------------------------- the recipe: preset fills, user wins


def test_the_default_preset_is_the_leaderboard_and_fills_every_protocol():
    ev = Recipe().eval
    assert ev.preset == "robustssl"
    for protocol in PROTOCOL_KEYS:
        assert getattr(ev, protocol) == FinetuneConfig(**preset_values("robustssl", protocol))


def test_explicit_keys_override_the_preset_and_survive_a_preset_change():
    recipe = recipe_from_dict({"eval": {"preset": "deacl", "slf": {"lr": 0.5}, "aff": {"epochs": 3}}})
    assert recipe.eval.slf.lr == 0.5 and recipe.eval.slf.bn_mode == "train"  # the rest is DeACL's
    assert recipe.eval.aff.epochs == 3 and recipe.eval.aff.trades_target == "separate"
    # Written and read back (a run directory's recipe.yaml): the same recipe, storing only what the user chose.
    assert recipe_from_dict(read_yaml(recipe.to_yaml())) == recipe
    assert recipe.to_dict()["eval"]["slf"] == {"lr": 0.5}
    switched = override_recipe(recipe, ["eval.preset=dynacl"], "test")
    assert switched.eval.slf.lr == 0.5 and switched.eval.aff.epochs == 3  # chosen: kept
    assert switched.eval.slf.bn_mode == "eval" and switched.eval.aff.dual_bn  # not chosen: DynACL's


def test_evaluate_applies_preset_before_set_so_a_set_value_always_counts():
    """`--preset deacl --set eval.aff.lr=0.1`: 0.1 is also the recipe's own preset's value (robustssl), and still
    the user's choice over DeACL's 0.01; --preset wins over a --set eval.preset."""
    base = Recipe()
    recipe = evaluation_recipe(base, ["eval.aff.lr=0.1", "eval.preset=acl"], "deacl", "test")
    assert recipe.eval.preset == "deacl" and recipe.eval.aff.lr == 0.1 and recipe.eval.slf.lr == 0.1
    assert recipe.eval.slf.bn_mode == "train"
    assert evaluation_recipe(base, None, None, "test") == base


def test_a_recipe_stored_before_presets_keeps_only_what_its_user_changed():
    """A run directory written before presets stores every eval.slf key (robustcl's values then) and no preset."""
    old_slf = {
        "epochs": 5, "batch_size": 512, "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "milestones": [15, 20],
        "gamma": 0.1, "train_encoder": False, "augment": False, "train_attack": "none", "trades_beta": 6.0,
        "attack_steps": 10, "epsilon": 8 / 255, "step_size": 2 / 255, "select_by": "clean",
    }  # fmt: skip
    recipe = recipe_from_dict({"eval": {"protocol": "slf", "slf": old_slf}})
    expected = FinetuneConfig(**{**preset_values("robustssl", "slf"), "epochs": 5})
    assert recipe.eval.preset == "robustssl" and recipe.eval.slf == expected


def test_dual_bn_without_trades_is_refused_naming_the_key(cli):
    code, _, err = cli("recipe", "validate", "recipes/quickstart.yaml", "--set", "eval.alf.dual_bn=true")
    assert code == 2 and err.count("\n") == 1, err
    assert "eval.alf.dual_bn needs eval.alf.train_attack: trades" in err


def test_unknown_preset_is_a_one_line_error(cli, tiny_export):
    code, _, err = cli("evaluate", str(tiny_export), "--preset", "simclr")
    assert code == 2 and err.count("\n") == 1, err
    assert "unknown preset 'simclr' (--preset)" in err and "robustssl, acl, advcl, deacl, dynacl, robustcl" in err


# ------------------------------------------------------------------------------- end to end, through the CLI

E2E_SETS = [
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=120",
    "eval.data.max_test=40",
    "eval.attack.steps=2",
    "eval.attack.curve_epsilons=[]",
]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from robustcl.export import export_encoder

    out = tmp_path_factory.mktemp("export") / "tiny-encoder"
    export_encoder(_encoder().backbone, None, out)
    return out


@pytest.mark.parametrize(
    "preset, protocol",
    [("robustssl", "slf"), ("acl", "aff"), ("advcl", "slf"), ("deacl", "alf"), ("dynacl", "aff"), ("robustcl", "alf")],
)
def test_evaluate_with_a_preset_end_to_end(cli, tmp_path, tiny_export, preset, protocol):
    quick = [f"eval.{protocol}.epochs=2", f"eval.{protocol}.attack_steps=2", f"eval.{protocol}.select_attack_steps=2"]
    out = tmp_path / "report"
    code, stdout, err = cli(
        "evaluate", str(tiny_export), "--protocol", protocol, "--preset", preset, "--output", str(out),
        *with_sets(*E2E_SETS, *quick),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    ft = report["finetune"]
    assert report["preset"] == preset and f"{protocol.upper()} evaluation of" in stdout and f"preset {preset}" in stdout
    assert ft["preset_overrides"] == {"epochs": 2, "attack_steps": 2, "select_attack_steps": 2}
    assert {k: v for k, v in ft.items() if k in FinetuneConfig.model_fields} == {
        **FinetuneConfig(**preset_values(preset, protocol)).model_dump(mode="json"),
        **ft["preset_overrides"],
    }
    sizes = report["split_sizes"]
    if ft["select_by"] == "final":  # the reference scripts: every training image trains, the last epoch is kept
        assert sizes["val"] == 0 and sizes["train"] == 120 and ft["selected_epoch"] == 2 and ft["val_accuracy"] is None
        assert "no validation split" in ft["selection"] and "no validation split" in stdout
    else:
        assert sizes["val"] == 12 and sizes["train"] == 108 and ft["val_accuracy"] is not None
    assert ft["dual_bn_clean_start"] == ("the evaluated branch" if ft["dual_bn"] else None)
    assert (out / "classifier" / "model.safetensors").is_file()  # dual BN folded back to one branch: savable


def test_explicit_set_overrides_the_preset_end_to_end(cli, tmp_path, tiny_export):
    out = tmp_path / "report"
    code, _, err = cli(
        "evaluate", str(tiny_export), "--preset", "acl", "--output", str(out),
        *with_sets(*E2E_SETS, "eval.slf.epochs=1", "eval.slf.lr=0.5"),
    )  # fmt: skip
    assert code == 0, err
    ft = json.loads((out / "eval.json").read_text())["finetune"]
    assert ft["lr"] == 0.5 and ft["preset_overrides"] == {"epochs": 1, "lr": 0.5}
    assert ft["head_init"] == "zeros" and ft["select_by"] == "final"  # the rest: acl's SLF


# ------------------------------------------------------------------------------- several processes

SHARDED_SCRIPT = """
import sys
from pathlib import Path
from robustcl.evaluation import run

out, model, sets = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for preset, protocol in (("dynacl", "aff"), ("deacl", "alf")):
    run.evaluate(model, protocol=protocol, preset=preset, overrides=sets, output=out / preset, progress=False)
"""


@pytest.mark.slow
def test_two_processes_train_the_dual_bn_and_train_mode_bn_presets_as_one(tmp_path, tiny_export):
    """Dual-BN AFF (dynacl) and a frozen encoder whose BatchNorm runs in train mode (deacl ALF): BatchNorm statistics
    of the whole batch on every process (SyncBatchNorm, also for the frozen encoder, and on both branches), so 2
    processes train what 1 does, up to float reduction order. The attacks take 0 steps: a PGD step follows the
    gradient's sign, which reduction-order noise flips for the odd near-zero pixel, and the BN statistics of the
    adversarial batch then differ by ~1e-3 (the attacks' sharding is tests/test_evaluate_sharded.py's); with an
    unperturbed batch, a process that normalised with its half batch's statistics would be ~1e-2 off."""
    import subprocess

    from helpers import BIN, REPO, cli_env
    from safetensors.torch import load_file

    script = tmp_path / "both.py"
    script.write_text(SHARDED_SCRIPT)
    sets = [*E2E_SETS, "eval.aff.epochs=2", "eval.aff.batch_size=51", "eval.aff.attack_steps=0"]
    sets += ["eval.alf.epochs=2", "eval.alf.batch_size=51", "eval.alf.attack_steps=0"]
    reports, weights = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        cmd = [
            str(BIN / "accelerate"), "launch", *(["--multi_gpu"] if processes > 1 else []), "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
            str(out), str(tiny_export), *sets,
        ]  # fmt: skip
        env = {"OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "true"} if processes > 1 else {})}
        res = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        for preset in ("dynacl", "deacl"):
            reports[processes, preset] = json.loads((out / preset / "eval.json").read_text())
            weights[processes, preset] = load_file(out / preset / "classifier" / "model.safetensors")
    for preset in ("dynacl", "deacl"):
        one, two = reports[1, preset], reports[2, preset]
        assert (one["num_processes"], two["num_processes"]) == (1, 2) and one["split_sizes"] == two["split_sizes"]
        for a, b in zip(one["finetune"]["history"], two["finetune"]["history"], strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        w1, w2 = weights[1, preset], weights[2, preset]
        assert w1.keys() == w2.keys()
        gaps = {k: (w1[k].double() - w2[k].double()).abs().max().item() for k in w1}
        assert max(gaps.values()) <= 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
