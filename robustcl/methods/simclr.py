"""SimCLR — A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020).

The non-robust baseline and DeACL's stage-1 teacher: two SimCLR views, one BN, a 2-layer projector
(fc → BN → ReLU → fc, as solo-learn's CIFAR SimCLR that DeACL's teacher came from) and NT-Xent. No attack.
"""

from __future__ import annotations

import torch

from ..data.batches import BatchRandom
from ..losses import nt_xent
from ..models import ProjectionHead, RobustCLResNetModel
from ..recipe import Recipe
from .base import Method, Paper, encoder_config
from .views import simclr_augment


class SimCLR(Method):
    display_name = "SimCLR"
    adversarial = False
    original_crops = 2  # its two SimCLR views
    paper = Paper(
        title="A Simple Framework for Contrastive Learning of Visual Representations",
        authors="Chen et al.",
        venue="ICML 2020",
        url="https://arxiv.org/abs/2002.05709",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        opts = recipe.method.simclr
        self.bn_branches = []
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        dim = self.encoder.config.hidden_size
        self.projector = ProjectionHead(
            dim, opts.projector_hidden_dim, opts.projector_dim, num_layers=2, last_bn=False, last_bias=True
        )
        self.augment = simclr_augment(recipe)
        self.temperature = recipe.method.temperature

    def describe(self) -> str:
        return f"SimCLR: NT-Xent of two augmented views (no adversary), temperature {self.temperature:g}"

    def forward(self, images: torch.Tensor, generator: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        views = torch.cat([self.augment(images, generator), self.augment(images, generator)])
        z1, z2 = self.projector(self.encoder(views).pooler_output).chunk(2)
        loss = nt_xent(z1, z2, self.temperature, across_processes=True)
        return loss, {}
