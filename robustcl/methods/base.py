"""What every method shares: the encoder built from the recipe and the interface the trainer calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..models import RobustCLResNetConfig, RobustCLResNetModel
from ..recipe import ModelConfig, Recipe


def encoder_config(cfg: ModelConfig, bn_branches: list[str]) -> RobustCLResNetConfig:
    return RobustCLResNetConfig(
        block_layers=list(cfg.block_layers),
        widths=list(cfg.widths),
        stem=cfg.stem,
        stem_padding=cfg.stem_padding,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        bn_branches=list(bn_branches),
    )


@dataclass(frozen=True)
class Paper:
    """The publication a method follows (cited in model cards)."""

    title: str
    authors: str
    venue: str
    url: str


class Method(nn.Module):
    """A self-supervised method: owns its encoder, heads and views; the trainer only calls ``forward``.

    ``forward(images, generator)`` takes a uint8 batch [N, C, H, W] on the device and the micro-batch's random
    generator, builds the method's views and attacks, and returns ``(loss, metrics)`` where metrics are detached
    scalar tensors (no host syncs in the step).
    """

    encoder: RobustCLResNetModel
    bn_branches: list[str]
    paper: ClassVar[Paper | None] = None

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> str:
        """The training objective in one line (model cards)."""
        raise NotImplementedError

    @property
    def export_branch(self) -> str | None:
        """The BN branch the downstream encoder uses: the adversarial one when the method has it."""
        if not self.bn_branches:
            return None
        return "pgd" if "pgd" in self.bn_branches else self.bn_branches[0]
