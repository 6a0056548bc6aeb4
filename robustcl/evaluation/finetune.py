"""Finetuning protocols (SLF / ALF / AFF): a linear head on a frozen or trainable encoder, trained clean, on PGD
examples or with TRADES, with the epoch picked on a validation split carved from the training split.

SLF (frozen encoder, clean data, no augmentation) trains the head on features computed once; the other protocols
go through the encoder every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks import module_mode, pgd_attack
from ..data.augment import WeakAugment, WeakAugmentParams
from ..features import CHUNK, encode, pixels
from ..recipe import FinetuneConfig
from .backbone import FeatureEncoder

_TRADES_START_STD = 0.001  # TRADES starts its KL attack from x + 0.001·N(0, 1)


@dataclass
class LabelledImages:
    images: torch.Tensor  # uint8 [N, 3, R, R], CPU
    labels: torch.Tensor  # int64 [N], CPU

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index])


def split_validation(data: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A seeded random ``fraction`` of the training split becomes the validation split (at least one image each)."""
    n = len(data)
    n_val = min(max(1, round(n * fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.take(order[n_val:].sort().values), data.take(order[:n_val].sort().values)


class Classifier(nn.Module):
    """Feature encoder + linear head: pixels in [0, 1] → logits. A frozen encoder stays in eval mode."""

    def __init__(self, encoder: FeatureEncoder, head: nn.Linear, frozen: bool) -> None:
        super().__init__()
        self.encoder, self.head, self.frozen = encoder, head, frozen
        self.encoder.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))


@dataclass
class FinetuneResult:
    classifier: Classifier
    selected_epoch: int
    val_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _ce_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, generator) -> torch.Tensor:
    with module_mode(model, False):
        return pgd_attack(
            lambda z: F.cross_entropy(model(z), y, reduction="sum"),
            x,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.attack_steps,
            random_start=True,
            generator=generator,
        )


def trades_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, generator: torch.Generator
) -> torch.Tensor:
    """TRADES (Zhang et al., 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)), x_adv maximising that KL (eval-mode BN)."""
    with module_mode(model, False):
        with torch.no_grad():
            clean_probs = F.softmax(model(x), dim=1)
        start = torch.randn(x.shape, generator=generator, device=x.device) * _TRADES_START_STD
        x_adv = pgd_attack(
            lambda z: F.kl_div(F.log_softmax(model(z), dim=1), clean_probs, reduction="sum"),
            x,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.attack_steps,
            start=start,
        )
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + cfg.trades_beta * robust


def _training_loss(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, generator: torch.Generator
) -> torch.Tensor:
    if cfg.train_attack == "trades":
        return trades_loss(model, x, y, cfg, generator)
    if cfg.train_attack == "pgd":
        x = _ce_attack(model, x, y, cfg, generator)
    return F.cross_entropy(model(x), y)


def _val_accuracy(
    model: Classifier, val: LabelledImages, cfg: FinetuneConfig, device: torch.device, seed: int
) -> float:
    """Clean or robust (the training attack's PGD with CE) validation accuracy; the same attack noise each epoch."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    correct = 0
    with module_mode(model, False):
        for images, labels in zip(val.images.split(CHUNK), val.labels.split(CHUNK)):
            x, y = pixels(images, device), labels.to(device)
            if cfg.select_by == "robust":
                x = _ce_attack(model, x, y, cfg, generator)
            with torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(val)


def finetune(
    encoder: FeatureEncoder,
    train: LabelledImages,
    val: LabelledImages,
    num_classes: int,
    cfg: FinetuneConfig,
    *,
    device: torch.device,
    seed: int,
    desc: str = "finetune",
    progress: bool = True,
) -> FinetuneResult:
    """Train a linear head (and the encoder when ``cfg.train_encoder``) by SGD with a step schedule; keep the
    weights of the epoch with the best validation accuracy (earliest on ties)."""
    torch.manual_seed(seed)
    encoder = encoder.to(device)
    feature_dim = encode(encoder, train.images[:1], device).shape[1]
    head = nn.Linear(feature_dim, num_classes).to(device)
    model = Classifier(encoder, head, frozen=not cfg.train_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    augment = WeakAugment(WeakAugmentParams(size=train.images.shape[-1])) if cfg.augment else None
    # Frozen encoder + clean, unaugmented inputs: the features never change, so compute them once.
    features = val_features = None
    if not cfg.train_encoder and cfg.train_attack == "none" and augment is None:
        features = encode(encoder, train.images, device, progress)
        if cfg.select_by == "clean":
            val_features = encode(encoder, val.images, device)

    best_state, best_epoch, best_acc = None, 0, -1.0
    history: list[dict[str, Any]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        model.train()
        total, seen = 0.0, 0
        for index in torch.randperm(len(train), generator=order_generator).split(cfg.batch_size):
            y = train.labels[index].to(device)
            if features is not None:
                loss = F.cross_entropy(head(features[index.to(device)]), y)
            else:
                images = train.images[index].to(device)
                x = augment(images, generator) if augment is not None else pixels(images, device)
                loss = _training_loss(model, x, y, cfg, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            seen += len(index)
        scheduler.step()
        if val_features is not None:
            with torch.no_grad():
                val_acc = (head(val_features).argmax(1) == val.labels.to(device)).sum().item() / len(val)
        else:
            val_acc = _val_accuracy(model, val, cfg, device, seed)
        history.append({"epoch": epoch, "train_loss": total / seen, "val_accuracy": val_acc})
        bar.set_postfix(loss=f"{total / seen:.4f}", val=f"{100 * val_acc:.1f}%")
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            trained = model if cfg.train_encoder else head
            best_state = copy.deepcopy(trained.state_dict())
    bar.close()
    (model if cfg.train_encoder else head).load_state_dict(best_state)
    return FinetuneResult(model.eval(), best_epoch, best_acc, history)
