"""AIR — Enhancing Adversarial Contrastive Learning via Adversarial Invariant Regularization (Xu et al., NeurIPS 2023),
on ACL-DS (``acl_air``) and on DynACL (``dynacl_air``), as GodXuxilie/Enhancing_ACL_via_AIR trains them
(``pretraining.py`` ``train``, ``AIR.py`` ``AIR_Loss``).

One step: two SimCLR views x_i, x_j of each image x; PGD on their NT-Xent through the 'pgd' BN (ACL's attack); then,
in train mode, the adversarial pair through 'pgd', the clean pair through 'normal' and the original image x itself
(unaugmented) through 'normal', three passes in that order. Over the batch's N images (the global batch when
several processes train: their rows are gathered), with cosine similarity sim and temperature t:

- p_i = softmax_n(sim(z_i, z_x) / t), p_j likewise: how a view ranks its own original among the batch's;
  SIR = KL(p_j ‖ p_i) (the standard invariant regulariser);
- P_i = softmax_n(sim(z̃_i, z_x) / t) · softmax_n(sim(z̃_i, z_i) / t) for the adversarial view z̃_i, P_j likewise;
  AIR = KL(P_j ‖ P_i) (the adversarial invariant regulariser);
- L = (2 − w)·NT-Xent(clean pair) + w·NT-Xent(adversarial pair) + λ1·SIR + λ2·AIR, w = 1 (ACL) or DynACL's
  weight. No stop-gradient anywhere: both sides of each KL and the original image's features are trained.

Quirks of AIR.py, each an option (``method.air.*``): F.kl_div is handed probabilities where it takes
log-probabilities, so each "KL" is Σ q·(log q − p) (``kl_input``); the two NT-Xent are added, where ACL and
DynACL average them (``contrastive_sum``). DynACL-AIR runs pretraining.py's ``--DynAug``: DynACL's annealed views
with one encoder (no moving average) and w − 1 = ⅔·(1 − strength) of the same epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collectives import gather_with_grad
from ..data.augment import to_float_rgb
from ..data.batches import BatchRandom
from ..encoder_record import Paper
from ..losses import nt_xent
from ..recipe import Recipe
from .acl import ACL
from .dynacl import DynACL

AIR_PAPER = Paper(
    title="Enhancing Adversarial Contrastive Learning via Adversarial Invariant Regularization",
    authors="Xu et al.",
    venue="NeurIPS 2023",
    url="https://arxiv.org/abs/2305.00374",
)


def _kl_sum(log_input: torch.Tensor, log_target: torch.Tensor, kl_input: str) -> torch.Tensor:
    """``F.kl_div(input, log_target, log_target=True, reduction="sum")`` = Σ q·(log q − input), with input the
    log-probabilities (the KL) or, as AIR.py passes them, the probabilities themselves."""
    given = log_input.exp() if kl_input == "probabilities" else log_input
    return (log_target.exp() * (log_target - given)).sum()


def invariance_regularisers(
    clean: tuple[torch.Tensor, torch.Tensor],
    original: torch.Tensor,
    adversarial: tuple[torch.Tensor, torch.Tensor],
    temperature: float,
    kl_input: str = "probabilities",
    across_processes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SIR, AIR) of this module's docstring from the projections of the clean views (z_i, z_j), the original
    images and the adversarial views (z̃_i, z̃_j); row n of each is image n.

    Each distribution is over the batch's images, and only image n's own pairs enter its score, so a process
    needs one number per pair and image: ``across_processes`` gathers them (with gradient) from every process and
    each returns the whole batch's value. Under DDP's gradient averaging that is the gradient of one process
    holding the batch: the gather's backward sums the processes' identical losses, the averaging divides again.
    """
    dtype = torch.promote_types(original.dtype, torch.float32)
    zi, zj, zo, ai, aj = (F.normalize(z.to(dtype), dim=1) for z in (*clean, original, *adversarial))
    pairs = [(zi, zo), (zj, zo), (ai, zo), (aj, zo), (ai, zi), (aj, zj)]
    scores = torch.stack([(a * b).sum(1) for a, b in pairs], dim=1) / temperature  # [n, 6]
    if across_processes:
        scores = gather_with_grad(scores)
    log_p = scores.log_softmax(dim=0)  # each column: a distribution over the batch's images
    sir = _kl_sum(log_p[:, 0], log_p[:, 1], kl_input)
    air = _kl_sum(log_p[:, 2] + log_p[:, 4], log_p[:, 3] + log_p[:, 5], kl_input)
    return sir, air


class AIRRegularised:
    """What AIR adds to ACL-DS or DynACL (mixed in before either): the original images' pass and the regularisers.
    The class it is mixed into provides ``views``, ``attack``, ``pair_loss``, ``embed`` and ``temperature``; the
    Method provides :meth:`adversarial_weight`."""

    paper = AIR_PAPER
    original_crops = 0  # the regularisers need the decoded image itself, not crops taken by the data workers

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)  # type: ignore[call-arg]  # the Method after this mixin: ACL or DynACL
        opts = recipe.method.air
        self.lambda1, self.lambda2, self.kl_input = opts.lambda1, opts.lambda2, opts.kl_input
        # AIR.py's (1 − weight)·clean + (1 + weight)·adv is twice DynACL's ½[(2 − w)·clean + w·adv], w = 1 + weight.
        self.contrastive_scale = 2.0 if opts.contrastive_sum else 1.0

    def adversarial_weight(self, step: int) -> float:
        raise NotImplementedError

    def _terms(self) -> str:
        scale = "" if self.contrastive_scale == 1 else f"{self.contrastive_scale:g} × "
        kl = "KL" if self.kl_input == "log_probabilities" else "AIR.py's KL on probabilities"
        return (
            f"{scale}½[(2 − w)·NT-Xent(clean pair, 'normal' BN) + w·NT-Xent(PGD pair, 'pgd' BN)] + "
            f"{self.lambda1:g}·SIR + {self.lambda2:g}·AIR (invariance of the views' and the adversarial views' "
            f"similarity to the original image, {kl}), temperature {self.temperature:g}"
        )

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        views = self.views(images, random, step)
        adv = self.attack(lambda x: self.pair_loss(x, "pgd", self.attack_across_processes), views, random)
        # AIR.py's order of train-mode passes (the 'normal' BN's running statistics see the views, then x).
        z_adv, z_clean = self.embed(adv, "pgd"), self.embed(views, "normal")
        loss_adv = nt_xent(*z_adv.chunk(2), self.temperature, across_processes=True)
        loss_clean = nt_xent(*z_clean.chunk(2), self.temperature, across_processes=True)
        w = self.adversarial_weight(step)
        loss = self.contrastive_scale * 0.5 * ((2 - w) * loss_clean + w * loss_adv)
        metrics = {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}
        if self.lambda1 or self.lambda2:  # both off: ACL's / DynACL's step, without the original images' pass
            z_orig = self.embed(to_float_rgb(images), "normal")
            sir, air = invariance_regularisers(
                z_clean.chunk(2), z_orig, z_adv.chunk(2), self.temperature, self.kl_input, across_processes=True
            )
            loss = loss + self.lambda1 * sir + self.lambda2 * air
            metrics.update(sir=sir.detach(), air=air.detach())
        return loss, metrics


class ACLAIR(AIRRegularised, ACL):
    display_name = "ACL-AIR"

    def adversarial_weight(self, step: int) -> float:
        return 1.0

    def describe(self) -> str:
        return f"ACL-AIR (ACL-DS with AIR's invariance regularisers, w = 1): {self._terms()}"


class DynACLAIR(AIRRegularised, DynACL):
    display_name = "DynACL-AIR"

    def adversarial_weight(self, step: int) -> float:
        # pretraining.py: weight = LAMBDA·(1 − strength) of the epoch's own strength (DynACL's code leads by one epoch).
        return 1 + self.slope * (1 - self.strength(step))

    def describe(self) -> str:
        return (
            f"DynACL-AIR (DynACL's annealed augmentation, w = 1 + {self.slope:.3g}·(1 − strength) stepped every "
            f"{self.stage_epochs:g} epochs, with AIR's invariance regularisers): {self._terms()}"
        )

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        loss, metrics = super().forward(images, random, indices, step)
        metrics["adv_weight"] = torch.full((), self.adversarial_weight(step), device=loss.device)
        metrics["strength"] = torch.full((), self.strength(step), device=loss.device)
        return loss, metrics
