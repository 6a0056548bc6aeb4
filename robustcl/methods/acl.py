"""ACL — Robust Pre-Training by Adversarial Contrastive Learning (Jiang et al., NeurIPS 2020).

Variants: ``ds`` (dual stream, the paper's best): L = ½[NT-Xent(clean pair, 'normal' BN) + NT-Xent(adversarial
pair, 'pgd' BN)]; ``a2a``: both views attacked, one BN; ``a2s``: the first view attacked, the second clean, one
BN. The attack maximises the NT-Xent of the (partly) adversarial pair, with the model in the recipe's BN mode
(eval in the reference code).
"""

from __future__ import annotations

import torch

from ..data.batches import BatchRandom
from ..encoder_record import Paper
from ..losses import AcrossProcesses, nt_xent
from ..models import ProjectionHead, RobustCLResNetModel
from ..recipe import Recipe
from .base import Method, encoder_config
from .views import simclr_augment


class ACL(Method):
    display_name = "ACL"
    original_crops = 2  # its two SimCLR views
    paper = Paper(
        title="Robust Pre-Training by Adversarial Contrastive Learning",
        authors="Jiang et al.",
        venue="NeurIPS 2020",
        url="https://arxiv.org/abs/2010.13337",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        opts = recipe.method.acl
        self.variant = opts.variant
        self.bn_branches = ["normal", "pgd"] if self.variant == "ds" else ["normal"]
        self.adv_branch = self.bn_branches[-1]
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        dim = self.encoder.config.hidden_size
        proj = opts.projector_dim or dim
        self.projector = ProjectionHead(dim, proj, proj, num_layers=opts.projector_layers, bn_branches=self.bn_branches)
        self.augment = simclr_augment(recipe)
        self.temperature = recipe.method.temperature

    def describe(self) -> str:
        t = f"temperature {self.temperature:g}"
        if self.variant == "ds":
            return f"ACL-DS: ½ [NT-Xent(clean pair, 'normal' BN) + NT-Xent(PGD pair, 'pgd' BN)], {t}"
        if self.variant == "a2a":
            return f"ACL-A2A: NT-Xent of the pair with both views attacked by PGD, {t}"
        return f"ACL-A2S: NT-Xent of a PGD-attacked view against a clean view, {t}"

    def embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.projector(self.encoder(x, bn_branch=branch).pooler_output, bn_branch=branch)

    def pair_loss(self, x: torch.Tensor, branch: str, across_processes: AcrossProcesses = False) -> torch.Tensor:
        """NT-Xent of a stacked pair [view1; view2]; the training loss takes its negatives from every process, the
        attack's loss as attack.negatives says (:attr:`attack_across_processes`)."""
        z1, z2 = self.embed(x, branch).chunk(2)
        return nt_xent(z1, z2, self.temperature, across_processes)

    def views(self, images: torch.Tensor, random: BatchRandom, step: int) -> torch.Tensor:
        """Two SimCLR views of every image, stacked [view1; view2]."""
        return torch.cat([self.augment(images, random), self.augment(images, random)])

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        views = self.views(images, random, step)
        branch, across = self.adv_branch, self.attack_across_processes
        if self.variant == "a2s":
            view1, clean2 = views.chunk(2)
            adv1 = self.attack(lambda x1: self.pair_loss(torch.cat([x1, clean2]), branch, across), view1, random)
            loss = self.pair_loss(torch.cat([adv1, clean2]), branch, across_processes=True)
            return loss, {"loss_adv": loss.detach()}
        adv = self.attack(lambda x: self.pair_loss(x, branch, across), views, random)
        loss_adv = self.pair_loss(adv, branch, across_processes=True)
        if self.variant == "a2a":
            return loss_adv, {"loss_adv": loss_adv.detach()}
        loss_clean = self.pair_loss(views, "normal", across_processes=True)
        loss = 0.5 * (loss_clean + loss_adv)
        return loss, {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}
