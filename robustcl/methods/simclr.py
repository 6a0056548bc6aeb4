"""SimCLR — A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020).

The non-robust baseline and DeACL's stage-1 teacher: two SimCLR views, one BN, a 2-layer projector and NT-Xent. No
attack. recipes/simclr.yaml trains it as solo-learn's CIFAR SimCLR (the teacher DeACL distilled from) does: projector
fc → ReLU → fc (``method.simclr.projector_bn: false``), each view encoded alone (``bn_per_view``), per-view blur and
solarisation (``augment.blur_p``, ``augment.solarize_p``). The defaults (fc → BN → ReLU → fc, one 2N pass) are those
of earlier runs.
"""

from __future__ import annotations

import torch

from ..data.batches import BatchRandom
from ..encoder_record import Paper
from ..losses import nt_xent
from ..models import ProjectionHead, RobustCLResNetModel
from ..recipe import Recipe
from .base import Method, encoder_config
from .views import simclr_view_pair


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
            dim,
            opts.projector_hidden_dim,
            opts.projector_dim,
            num_layers=2,
            last_bn=False,
            last_bias=True,
            hidden_bn=opts.projector_bn,
        )
        self.augments = simclr_view_pair(recipe)
        self.bn_per_view = opts.bn_per_view
        self.temperature = recipe.method.temperature

    def describe(self) -> str:
        return f"SimCLR: NT-Xent of two augmented views (no adversary), temperature {self.temperature:g}"

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        views = [augment(images, random) for augment in self.augments]
        if self.bn_per_view:
            z1, z2 = (self.projector(self.encoder(view).pooler_output) for view in views)
        else:
            z1, z2 = self.projector(self.encoder(torch.cat(views)).pooler_output).chunk(2)
        loss = nt_xent(z1, z2, self.temperature, across_processes=True)
        return loss, {}
