"""Evaluation: the attacks measure what they claim, the protocols train what they claim, the report is complete,
sharding changes nothing, and an export is evaluated without the training code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers import BIN, CIFAR10, REPO, cli_env, with_sets
from torch import nn

from robustcl.data.loading import load_images
from robustcl.encoder_loading import FeatureEncoder, load_encoder
from robustcl.errors import UserError
from robustcl.evaluation.finetune import LabelledImages, finetune, split_validation, trades_loss
from robustcl.evaluation.measure import NOT_ATTACKED, measure
from robustcl.recipe import EvalAttackConfig, FinetuneConfig

needs_cifar = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 copy not found at {CIFAR10}")


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def standard_cifar_classifier():
    """A small MLP trained the ordinary way (clean CE) on 3,000 CIFAR-10 images: better than chance, not robust.
    Cheap per forward pass, so even the full AutoAttack suite runs in seconds on a CPU."""
    torch.manual_seed(0)
    train = load_images(str(CIFAR10), "train", resolution=32, max_samples=3000, progress=False)
    test = load_images(str(CIFAR10), "test", resolution=32, max_samples=100, progress=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(20):
        for index in torch.randperm(len(train.labels)).split(64):
            loss = F.cross_entropy(model(train.images[index].float() / 255), train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), test


def _measure(model, test, accelerator, attacks=("pgd20",), attack_subset=None, **cfg):
    settings = EvalAttackConfig(**{"curve_epsilons": [], **cfg})
    return measure(
        model,
        test.images,
        test.labels,
        settings,
        list(attacks),
        accelerator,
        num_classes=10,
        seed=0,
        attack_subset=attack_subset,
        progress=False,
    )


@needs_cifar
@pytest.mark.slow
def test_pgd20_breaks_a_standard_classifier_and_eps0_changes_nothing(standard_cifar_classifier, accelerator):
    model, test = standard_cifar_classifier
    m = _measure(model, test, accelerator)
    sa, ra = m.accuracy(m.clean), m.accuracy(m.pgd)
    assert sa > 0.3 and ra < 0.10 and ra < sa / 3, (sa, ra)
    still = _measure(model, test, accelerator, epsilon=0.0)
    assert torch.equal(still.pgd, still.clean) and still.accuracy(still.clean) == sa


@needs_cifar
@pytest.mark.slow
def test_autoattack_is_at_least_as_strong_as_pgd20(standard_cifar_classifier, accelerator):
    pytest.importorskip("pyautoattack")
    model, test = standard_cifar_classifier
    m = _measure(model, test, accelerator, attacks=("pgd20", "autoattack"))
    assert m.accuracy(m.autoattack) <= m.accuracy(m.pgd) < m.accuracy(m.clean)


@needs_cifar
def test_results_do_not_depend_on_batching_and_subset_marks_the_rest(standard_cifar_classifier, accelerator):
    """What makes N processes agree with one: an image's PGD outcome is independent of its batch."""
    model, test = standard_cifar_classifier
    big = _measure(model, test, accelerator, batch_size=100, steps=3, curve_epsilons=[0, 4 / 255])
    small = _measure(model, test, accelerator, batch_size=7, steps=3, curve_epsilons=[0, 4 / 255])
    assert torch.equal(big.pgd, small.pgd) and torch.equal(big.curve[4 / 255], small.curve[4 / 255])
    part = _measure(model, test, accelerator, batch_size=7, steps=3, attack_subset=30)
    assert part.attacked == 30 and torch.equal(part.pgd[:30], big.pgd[:30])
    assert (part.pgd[30:] == NOT_ATTACKED).all() and torch.equal(part.clean, big.clean)


def test_missing_pyautoattack_names_the_install_command(monkeypatch, accelerator):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    test = LabelledImages(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match=r'pip install "robustcl\[autoattack\]"'):
        _measure(model, test, accelerator, attacks=("pgd20", "autoattack"))


def test_validation_split_is_seeded_disjoint_and_complete():
    data = LabelledImages(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    fit, val = split_validation(data, 0.1, seed=3)
    again, _ = split_validation(data, 0.1, seed=3)
    other, _ = split_validation(data, 0.1, seed=4)
    assert len(val) == 5 and len(fit) == 45 and torch.equal(fit.labels, again.labels)
    assert sorted(fit.labels.tolist() + val.labels.tolist()) == list(range(50))
    assert not torch.equal(fit.labels, other.labels)


@pytest.fixture(scope="module")
def digits():
    train = load_images("builtin:digits", "train", resolution=8, max_samples=400, progress=False)
    test = load_images("builtin:digits", "test", resolution=8, max_samples=60, progress=False)
    fit, val = split_validation(LabelledImages(train.images, train.labels), 0.2, seed=0)
    return fit, val, LabelledImages(test.images, test.labels)


def _tiny_encoder(seed: int = 0) -> FeatureEncoder:
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel

    torch.manual_seed(seed)
    config = RobustCLResNetConfig(block_layers=[1, 1], widths=[8, 16])
    return FeatureEncoder(RobustCLResNetModel(config)).eval()


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "protocol, cfg",
    [
        ("slf", FinetuneConfig(epochs=4, batch_size=64)),
        (
            "alf",
            FinetuneConfig(
                epochs=2, batch_size=64, augment=True, train_attack="pgd", attack_steps=2, select_by="robust"
            ),
        ),
        (
            "aff",
            FinetuneConfig(
                epochs=2,
                batch_size=64,
                train_encoder=True,
                augment=True,
                train_attack="trades",
                attack_steps=2,
                select_by="robust",
            ),
        ),
    ],
)
def test_protocols_train_what_they_claim_and_select_on_validation(digits, protocol, cfg):
    fit, val, _ = digits
    encoder = _tiny_encoder()
    before = _params(encoder)
    result = finetune(encoder, fit, val, 10, cfg, device=torch.device("cpu"), seed=0, progress=False)
    after = _params(result.classifier.encoder)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if cfg.train_encoder:
        assert changed, "AFF must train the encoder"
    else:
        assert not changed, f"{protocol} must leave the frozen encoder (and its BN statistics) alone: {changed[:3]}"
    history = [h["val_accuracy"] for h in result.history]
    assert len(history) == cfg.epochs and result.selected_epoch == 1 + history.index(max(history))
    assert result.val_accuracy == max(history)
    # The returned classifier is the selected epoch's: it reproduces that validation accuracy.
    if cfg.select_by == "clean":
        with torch.no_grad():
            predictions = result.classifier(val.images.float() / 255).argmax(1)
        assert (predictions == val.labels).float().mean().item() == pytest.approx(result.val_accuracy)


def test_trades_with_beta_zero_is_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    cfg = FinetuneConfig(trades_beta=0.0, attack_steps=2)
    loss = trades_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item())
    assert trades_loss(model, x, y, FinetuneConfig(attack_steps=2), torch.Generator().manual_seed(0)) >= loss


def test_any_transformers_backbone_with_pooled_features(tmp_path):
    """A stock transformers ResNet (pooler output N×C×1×1, normalised inputs) is evaluated like a robustcl one."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3))
    model.save_pretrained(tmp_path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"do_normalize": True, "image_mean": mean, "image_std": std})
    )
    loaded = load_encoder(tmp_path)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(
            pixel_values=(x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        ).pooler_output.flatten(1)
        assert torch.allclose(loaded.encoder(x), expected, atol=1e-6)
    assert loaded.kind == "export_dir" and loaded.recipe is None


# ------------------------------------------------------------------------------- end to end, through the CLI

EVAL_SETS = [
    "eval.preset=robustcl",  # the epoch picked on a validation split (checked below), not the last one
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=200",
    "eval.data.max_test=101",  # odd, so the 2-process loader pads its last batch
    "eval.slf.epochs=3",
    "eval.attack.steps=3",
    "eval.attack.batch_size=16",
    "eval.attack.curve_epsilons=[0,4/255,8/255]",
]


def test_export_dir_is_evaluated_without_importing_training_code(tmp_path, tiny_export):
    out = tmp_path / "report" / "eval.json"
    script = f"""
import sys
from robustcl.cli import main
sys.argv = ["robustcl", "evaluate", {str(tiny_export)!r}, "--protocol", "slf", "--attack", "pgd20",
            "--output", {str(out)!r}] + {with_sets(*EVAL_SETS)!r}
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
training = ("robustcl.train", "robustcl.methods", "robustcl.optim", "robustcl.export", "robustcl.losses")
loaded = sorted(m for m in sys.modules if m in training or m.startswith("robustcl.methods."))
assert not loaded, loaded
"""
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SLF evaluation of" in res.stdout and "RA" in res.stdout
    report = json.loads(out.read_text())
    assert report["protocol"] == "slf" and report["model_kind"] == "export_dir" and report["AA"] is None
    assert report["split_sizes"] == {"train": 180, "val": 20, "test": 101, "attacked": 101}
    assert report["attack"]["pgd"] == {
        "loss": "ce",
        "epsilon": 8 / 255,
        "step_size": 2 / 255,
        "steps": 3,
        "random_start": True,
    }
    assert [p["epsilon"] for p in report["curve"]] == [0, 4 / 255, 8 / 255]
    assert report["curve"][0]["accuracy"] == report["SA"] and report["curve"][2]["accuracy"] == report["RA"]
    assert 1 <= report["finetune"]["selected_epoch"] <= 3 and len(report["finetune"]["history"]) == 3
    assert {"torch", "transformers", "robustcl"} <= set(report["versions"]) and report["wall_time_s"] > 0
    png = (out.parent / "robustness_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.slow
def test_two_processes_give_the_same_figures_as_one(tmp_path, tiny_export):
    def launch(processes: int) -> dict:
        out = tmp_path / f"p{processes}" / "eval.json"  # given as its folder: --output DIR writes DIR/eval.json
        args = ["--multi_gpu"] if processes > 1 else []
        cmd = [
            str(BIN / "accelerate"), "launch", *args, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "robustcl", "evaluate", str(tiny_export), "--output", str(out.parent), *with_sets(*EVAL_SETS),
        ]  # fmt: skip
        env = {"ACCELERATE_USE_CPU": "true"} if processes > 1 else {}
        res = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(out.read_text())

    one, two = launch(1), launch(2)
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    for key in ("SA", "RA", "curve", "split_sizes"):
        assert one[key] == two[key], key
    # The processes share the finetuning (each its rows, gradients summed): float reduction order may differ.
    for a, b in zip(one["finetune"]["history"], two["finetune"]["history"], strict=True):
        assert a["val_accuracy"] == b["val_accuracy"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
