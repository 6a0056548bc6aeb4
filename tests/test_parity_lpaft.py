"""Reference parity of DynACL++'s stage (PKU-ML/DYNACL assign_label.py, LPAFT.py, utils.py), written out here from
the authors' code:

- the encoder finetuned is their ``cvt_state_dict(bnNameCnt=1)``: the dual-BN network's 'pgd' BatchNorms in a
  single-BN resnet18;
- one LP step (``train_head``): the whole model in eval mode, CE (mean) of the head on the frozen encoder;
- one AFT step (``train`` → ``utils.trades_loss``): the KL attack from x itself, 10 steps, model in eval mode, KL
  summed; then in train mode CE(model(x)) + 6 · KL_sum(model(x_adv) ‖ model(x)) / batch, two train-mode passes;
- the pseudo-labels are clustered from the features assign_label.py uses: the 'normal' branch in eval mode, pooled,
  not normalised.

robustcl's step is the first step of :func:`finetune` with the stage's settings, its loss and gradients read just
before the optimizer steps; the reference takes the same (augmented) batch. Loss, every gradient and the BN running
statistics agree within 1e-5 (relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import (
    CPU,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TOLERANCE,
    WIDTHS,
    RefResNet,
    load_reference,
    randomise_batch_norms,
    reference_name,
    relative,
)
from torch import nn

import robustcl.evaluation.finetune as finetune_module
import robustcl.pseudo_labels as pseudo_labels_module
from robustcl.data.images import DecodedImages
from robustcl.encoder_loading import FeatureEncoder
from robustcl.evaluation.finetune import LabelledImages, finetune
from robustcl.kmeans import OneProcess
from robustcl.lpaft import cluster_pseudo_labels, plain_branch
from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel
from robustcl.recipe import LpaftConfig

BRANCHES = ["normal", "pgd"]
N, K, RES = 16, 4, 16  # one batch of 16 images of 16×16, 4 pseudo-classes
EPS, ALPHA = 8 / 255, 2 / 255  # utils.trades_loss defaults
# robustcl's classifier (FeatureEncoder → RobustCLResNetModel, linear head) → the reference's names.
TABLE = [("encoder.backbone.backbone.", "backbone."), ("head.", "fc.")]


class RefClassifier(nn.Module):
    """LPAFT.py's model: ``models/resnet.py`` resnet18 (single BN, ImageNet normalisation inside) with
    ``model.fc = nn.Linear(512, num_classes)``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = RefResNet([], IMAGENET_MEAN, IMAGENET_STD)
        self.fc = nn.Linear(WIDTHS[-1], K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def dual_encoder(seed: int = 3) -> RobustCLResNetModel:
    """A pretrained-looking dual-BN encoder: random weights, every BN branch with its own random statistics."""
    torch.manual_seed(seed)
    config = RobustCLResNetConfig(
        widths=WIDTHS, block_layers=[1, 1, 1, 1], bn_branches=BRANCHES, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )  # fmt: skip
    encoder = RobustCLResNetModel(config)
    randomise_batch_norms(encoder, seed)
    return encoder.eval()


def authors_model(dual: RobustCLResNetModel, head: nn.Linear) -> RefClassifier:
    """cvt_state_dict(bnNameCnt=1): the dual-BN checkpoint's bn_list.1 ('pgd') tensors under the single-BN names,
    the other branch dropped; the head's weights (LPAFT.py zeroes fc; AFT starts from LP's head)."""
    dual_ref = load_reference(RefResNet(BRANCHES, IMAGENET_MEAN, IMAGENET_STD), dual.state_dict(), [("backbone.", "")],
                              BRANCHES)  # fmt: skip
    state = {
        k.replace(".bn_list.1.", ".bn_list.0."): v for k, v in dual_ref.state_dict().items() if ".bn_list.0." not in k
    }
    model = RefClassifier()
    model.backbone.load_state_dict(state, strict=True)
    model.fc.load_state_dict(head.state_dict())
    return model


class Captured(Exception):
    """Raised after robustcl's first step was read."""


def robustcl_first_step(monkeypatch, dual: RobustCLResNetModel, cfg, head: nn.Linear, labels: torch.Tensor):
    """The first step of finetune(cfg) on the plain 'pgd' copy of ``dual``: its classifier's weights and buffers
    before, its batch (augmented), loss, gradients and buffers after the forward passes."""
    seen: dict = {}
    original = finetune_module._training_loss

    def training_loss(model, x, y, cfg, random, total):
        seen.update(model=model, x=x.detach().clone(), y=y.clone())
        seen["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(model, x, y, cfg, random, total)

    def step(optimizer, params, loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        seen["loss"] = loss.detach()
        seen["grads"] = {n: p.grad.clone() for n, p in seen["model"].named_parameters() if p.grad is not None}
        seen["buffers"] = {k: v.clone() for k, v in seen["model"].named_buffers()}
        raise Captured

    monkeypatch.setattr(finetune_module, "_training_loss", training_loss)
    monkeypatch.setattr(finetune_module, "_step", step)
    images = torch.randint(0, 256, (N, 3, RES, RES), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    data = LabelledImages(images, labels)
    encoder = FeatureEncoder(plain_branch(dual, "pgd", "lpaft.bn_branch"))
    with pytest.raises(Captured):
        finetune(encoder, data, data.take(torch.arange(0)), K, cfg, device=CPU, seed=11, progress=False, head=head)
    return seen


def assert_same(seen: dict, loss: torch.Tensor, reference: nn.Module) -> None:
    """Loss and every gradient robustcl computed equal the reference's; no other reference tensor has one."""
    assert relative(seen["loss"], loss.detach()) <= TOLERANCE, (float(seen["loss"]), float(loss))
    theirs = {n: p for n, p in reference.named_parameters()}
    mapped = {reference_name(n, TABLE, []): g for n, g in seen["grads"].items()}
    assert set(mapped) == {n for n, p in theirs.items() if p.grad is not None}
    largest = max(float(g.norm()) for g in mapped.values())
    for name, ours in mapped.items():
        expected = theirs[name].grad
        if float(expected.norm()) <= TOLERANCE * largest:  # zero in exact arithmetic: rounding noise only
            assert float(ours.norm()) <= TOLERANCE * largest, name
            continue
        assert relative(ours, expected) <= TOLERANCE, f"gradient of {name}: {relative(ours, expected):.2e}"


def test_lp_step_matches_train_head(monkeypatch):
    """LPAFT.py train_head: the zeroed head on the frozen encoder in eval mode, CE on the pseudo-labels; only the
    head gets gradients and no BN statistic moves."""
    dual, cfg = dual_encoder(), LpaftConfig().lp.model_copy(update={"batch_size": N, "epochs": 1})
    labels = torch.arange(N) % K
    zero = nn.Linear(WIDTHS[-1], K)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    seen = robustcl_first_step(monkeypatch, dual, cfg, None, labels)
    model = authors_model(dual, zero)
    model.backbone.requires_grad_(False)  # every parameter but fc.weight / fc.bias
    loss = F.cross_entropy(model.eval()(seen["x"]), seen["y"])
    loss.backward()
    assert_same(seen, loss, model)
    assert set(seen["grads"]) == {"head.weight", "head.bias"}
    for key, value in seen["buffers"].items():
        assert torch.equal(value, seen["before"][key]), f"{key} moved in the linear probe"


def authors_trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, beta: float = 6.0, steps: int = 10):
    """utils.py trades_loss (distance l_inf), written out."""
    kl = nn.KLDivLoss(reduction="sum")  # size_average=False
    model.eval()
    x_adv = x.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    logits_adv = model(x_adv)
    return loss + beta * (1.0 / len(x)) * kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))


def test_aft_step_matches_trades_loss(monkeypatch):
    """LPAFT.py train: TRADES on the pseudo-labels from LP's head, encoder and head trained, BN statistics of the two
    train-mode passes."""
    dual, cfg = dual_encoder(), LpaftConfig().aft.model_copy(update={"batch_size": N, "epochs": 1})
    torch.manual_seed(9)
    head = nn.Linear(WIDTHS[-1], K)  # as LP leaves it
    with torch.no_grad():
        head.weight.mul_(20)  # confident logits: the KL attack has something to push against
    start = {k: v.clone() for k, v in head.state_dict().items()}
    labels = torch.arange(N) % K
    seen = robustcl_first_step(monkeypatch, dual, cfg, head, labels)
    model = authors_model(dual, _linear(start))
    loss = authors_trades(model, seen["x"], seen["y"])
    loss.backward()
    assert_same(seen, loss, model)
    assert any(n.startswith("encoder.") for n in seen["grads"])  # the encoder trains
    theirs = dict(model.named_buffers())
    for key, value in seen["buffers"].items():
        name = reference_name(key, TABLE, [])
        if name in theirs and value.is_floating_point():
            assert relative(value, theirs[name]) <= TOLERANCE, f"BN statistics {key}"


def _linear(state: dict) -> nn.Linear:
    layer = nn.Linear(WIDTHS[-1], K)
    layer.load_state_dict(state)
    return layer


def test_pseudo_labels_cluster_the_features_assign_label_uses(monkeypatch):
    """assign_label.py: model.eval()(x, 'normal', return_features=True) on the unaugmented images, the pooled
    features as they are (not L2-normalised) into k-means."""
    dual = dual_encoder()
    images = torch.randint(0, 256, (40, 3, RES, RES), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    clustered = {}
    real = pseudo_labels_module.kmeans  # the clustering of every pseudo-label path

    def kmeans(rows, k, **kwargs):
        clustered["rows"] = rows.clone()
        return real(rows, k, **kwargs)

    monkeypatch.setattr(pseudo_labels_module, "kmeans", kmeans)
    encoder = plain_branch(dual, "normal", "lpaft.cluster_bn_branch")
    labels = cluster_pseudo_labels(encoder, DecodedImages(images), K, 0, CPU, OneProcess(), progress=False)
    reference = load_reference(RefResNet(BRANCHES, IMAGENET_MEAN, IMAGENET_STD), dual.state_dict(), [("backbone.", "")],
                               BRANCHES)  # fmt: skip
    with torch.no_grad():
        features = reference.eval()(images.float() / 255, "normal")
    assert relative(clustered["rows"], features) <= TOLERANCE
    assert labels.shape == (40,) and set(labels.tolist()) == set(range(K))
