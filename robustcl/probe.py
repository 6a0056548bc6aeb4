"""A quick linear probe after pretraining: frozen encoder, linear head, clean and PGD accuracy on held-out data.

This is a smoke-level measurement printed at the end of a run (the full SLF/ALF/AFF protocols are separate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd_attack
from .data.loading import load_images
from .errors import UserError
from .recipe import Recipe

_CHUNK = 256


class LinearProbe(nn.Module):
    """Encoder (frozen, eval mode) + linear head: pixels in [0, 1] → class logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).pooler_output)


@torch.no_grad()
def _features(encoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = [encoder(chunk.to(device).float() / 255).pooler_output for chunk in images.split(_CHUNK)]
    return torch.cat(out)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic, no learning rate to tune)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), labels) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    # Fold the standardisation into the head so it reads raw encoder features.
    with torch.no_grad():
        head.weight /= std
        head.bias -= head.weight @ mean
    return head


def run_probe(encoder: nn.Module, recipe: Recipe, device: torch.device, seed: int | None = None) -> dict[str, Any]:
    """Train a linear head on ``data.split`` and measure clean / PGD accuracy on ``data.eval_split``."""
    d, p = recipe.data, recipe.probe
    common = dict(
        resolution=d.resolution,
        name=d.name,
        image_column=d.image_column,
        label_column=d.label_column,
        progress=False,
    )
    train = load_images(d.path, d.split, max_samples=p.max_train, **common)
    test = load_images(d.path, d.eval_split, max_samples=p.max_test, **common)
    if train.labels is None or test.labels is None or not train.num_classes:
        raise UserError(
            "the linear probe needs class labels",
            "data.label_column",
            "name the label column, or set probe.enabled=false",
        )
    encoder = encoder.to(device).eval()
    head = fit_linear_head(
        _features(encoder, train.images, device), train.labels.to(device), train.num_classes, p.steps
    )
    model = LinearProbe(encoder, head).eval()
    generator = torch.Generator(device=device).manual_seed(recipe.training.seed if seed is None else seed)
    clean = robust = 0
    for images, labels in zip(test.images.split(_CHUNK), test.labels.split(_CHUNK)):
        x, y = images.to(device).float() / 255, labels.to(device)
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
        x_adv = pgd_attack(
            lambda z, y=y: F.cross_entropy(model(z), y),
            x,
            epsilon=p.epsilon,
            step_size=p.step_size,
            steps=p.pgd_steps,
            random_start=True,
            generator=generator,
        )
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == y).sum().item()
    n = len(test.images)
    return {
        "train_images": len(train.images),
        "test_images": n,
        "clean_accuracy": clean / n,
        "pgd_accuracy": robust / n,
        "pgd_steps": p.pgd_steps,
        "epsilon": p.epsilon,
        "split": d.eval_split,
    }
