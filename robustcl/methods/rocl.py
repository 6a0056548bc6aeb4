"""RoCL — Adversarial Self-Supervised Contrastive Learning (Kim et al., NeurIPS 2020).

As the authors' code trains it (Kim-Minseon/RoCL src/rocl_train.py ``train``, attack_lib.py
``RepresentationAdv.get_loss``, loss.py ``pairwise_similarity`` / ``NT_xent``), one BN throughout:

- two SimCLR views t(x), t'(x) of every image;
- an instance-wise attack: PGD from the first view (the recipe's attack.*: 7 steps, random start clamped into
  [0, 1]) maximising the NT-Xent of [first view + δ, its target] with the model in eval mode; the target is the
  second view (``attack_to: other``) or the first view's clean image (``original``);
- a regulariser NT-Xent(adversarial view, second view (``regularize_to: other``) or first view) / ``lamda``, in a
  train-mode pass of its own (before the loss's: BN running statistics are updated by both, in this order);
- the loss: the contrastive loss over [view 1, view 2, adversarial view] in one train-mode pass, where each anchor's
  two other views of its image are its positives and their −log-probabilities are summed (loss.py ``NT_xent`` with
  'Rep'), plus the regulariser.

The attack and the regulariser take their negatives as attack.negatives says (the authors compute both on each
GPU's own images, ``multi_gpu=False``: ``local``); the loss takes them from every process, as their all-gather does.
Quirk (``method.rocl.detach_keys``, default on as in loss.py): the similarity matrix's right factor is detached, so
gradients reach a feature only through its own row (as an anchor).
"""

from __future__ import annotations

import torch

from ..data.batches import BatchRandom
from ..encoder_record import Paper
from ..losses import AcrossProcesses, multi_positive_nt_xent
from ..models import ProjectionHead, RobustCLResNetModel
from ..recipe import Recipe
from .base import Method, encoder_config
from .views import simclr_augment


def rocl_nt_xent(
    views: list[torch.Tensor], temperature: float, across_processes: AcrossProcesses, detach_keys: bool
) -> torch.Tensor:
    """RoCL's NT-Xent over V views of N images (loss.py ``NT_xent``: 'None' for V = 2, 'Rep' for V = 3): each
    anchor's −log-probabilities of its V − 1 positives are *summed* (the multi-positive loss's mean × (V − 1)),
    then averaged over the V·N anchors; SimCLR's NT-Xent for two views. ``across_processes`` as in
    :func:`~robustcl.losses.multi_positive_nt_xent`. ``detach_keys``: the keys an anchor is scored against carry
    no gradient (``pairwise_similarity``'s detached transpose)."""
    return multi_positive_nt_xent(
        views, temperature, scale=len(views) - 1, across_processes=across_processes, detach_keys=detach_keys
    )


class RoCL(Method):
    display_name = "RoCL"
    original_crops = 2  # its two SimCLR views
    paper = Paper(
        title="Adversarial Self-Supervised Contrastive Learning",
        authors="Kim et al.",
        venue="NeurIPS 2020",
        url="https://arxiv.org/abs/2006.07589",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.opts = recipe.method.rocl
        self.bn_branches = []
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        # models/projector.py: Linear(512, 2048) → ReLU → Linear(2048, 128), both with bias, no BN.
        self.projector = ProjectionHead(
            self.encoder.config.hidden_size,
            self.opts.projector_hidden_dim,
            self.opts.projector_dim,
            num_layers=2,
            last_bn=False,
            last_bias=True,
            hidden_bn=False,
        )
        self.augment = simclr_augment(recipe)
        self.temperature = recipe.method.temperature

    def describe(self) -> str:
        target = "the second view" if self.opts.attack_to == "other" else "its clean image"
        return (
            f"RoCL: contrastive loss over [view 1, view 2, PGD view 1 attacked against {target}] (each view's two "
            f"others its positives) + NT-Xent(PGD view, {'view 2' if self.opts.regularize_to == 'other' else 'view 1'})"
            f" / {self.opts.lamda:g}, temperature {self.temperature:g}"
        )

    def contrastive(self, views: list[torch.Tensor], across_processes: AcrossProcesses) -> torch.Tensor:
        """:func:`rocl_nt_xent` of the views' projections, all views in one pass (as the authors concatenate)."""
        z = self.projector(self.encoder(torch.cat(views)).pooler_output).chunk(len(views))
        return rocl_nt_xent(list(z), self.temperature, across_processes, self.opts.detach_keys)

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        view1, view2 = self.augment(images, random), self.augment(images, random)
        target = view2 if self.opts.attack_to == "other" else view1
        across = self.attack_across_processes
        adv = self.attack(lambda x: self.contrastive([x, target], across), view1, random)
        paired = view2 if self.opts.regularize_to == "other" else view1
        # The regulariser's negatives are the attack's (attack.negatives), its value the mean over this process's
        # anchors: under DDP's gradient averaging, the global batch's loss (global) or the mean of each process's.
        regularizer = self.contrastive([adv, paired], self.recipe.attack.negatives == "global") / self.opts.lamda
        loss_rocl = self.contrastive([view1, view2, adv], across_processes=True)
        loss = loss_rocl + regularizer
        return loss, {"loss_rocl": loss_rocl.detach(), "loss_regularizer": regularizer.detach()}
