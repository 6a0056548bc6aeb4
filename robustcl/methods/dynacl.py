"""DynACL — Rethinking the Effect of Data Augmentation in Adversarial Contrastive Learning (Luo et al., ICLR 2023).

ACL-DS with two schedules over training (E epochs, stages of N = ``reload_every_epochs``):

- augmentation strength s = 1 − ⌊e/N⌋·N/E at epoch e (1 → 0.05 for N = 50, E = 1000): crop area from
  1 − 0.9·s, jitter strengths and probabilities × s (the authors reload their data loader every N epochs);
- adversarial weight w = min(1 + ⌊(e+1)/N⌋·(N/E)·slope, 2) (1 → 1.67), L = ½[(2 − w)·clean + w·adv]. The +1 is
  the authors' 1-based epoch count, so w rises one epoch before s falls (the lead is capped at one stage when N < 1).

Quirk (``method.dynacl.momentum``, default 0.99 as in the authors' code): the second view of every pair goes
through an exponential-moving-average copy of the encoder and projector (no gradient; after each optimizer step it
moves towards the online weights the step's forward passes saw, as the authors' update between forward and
optimizer step does); ``null`` sends both views through the one encoder as the paper describes. With it, the
encoder exported and evaluated is the moving-average one, as the authors' evaluation scripts load
(``export_encoder: momentum``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..data.augment import SimCLRAugment
from ..data.batches import BatchRandom
from ..losses import AcrossProcesses, nt_xent
from ..method_options.dynacl import DYNACL_PAPER
from ..models import RobustCLResNetModel
from ..recipe import Recipe
from ..setup_context import SetupContext
from .acl import ACL
from .views import simclr_augment


class DynACL(ACL):
    display_name = "DynACL"
    original_crops = 0  # its crop's area range is annealed with the epoch, which the data workers do not follow
    paper = DYNACL_PAPER

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        opts = recipe.method.dynacl
        self.stage_epochs = opts.reload_every_epochs
        self.slope = opts.adversarial_weight_slope
        self.momentum = opts.momentum
        if self.momentum is not None:
            self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.export_encoder = opts.export_encoder
        self._augments: dict[float, SimCLRAugment] = {}
        self._schedule: tuple[int, float] | None = None  # steps per epoch, epochs: set by setup
        self._online_before_step: list[torch.Tensor] | None = None  # set by before_step, used by after_step

    def describe(self) -> str:
        return (
            "DynACL: ½ [(2 − w)·NT-Xent(clean pair, 'normal' BN) + w·NT-Xent(PGD pair, 'pgd' BN)] with the "
            f"augmentation annealed and w raised every {self.stage_epochs:g} epochs, temperature {self.temperature:g}"
        )

    @property
    def downstream_encoder(self) -> RobustCLResNetModel:
        # The authors evaluate and finetune their key encoder: train_DynACL.py saves encoder_k's weights as
        # model_encoder_k.pt (the file test_LF.py / LPAFT.py / assign_label.py load strictly) and validates encoder_k.
        if self.momentum is not None and self.export_encoder == "momentum":
            return self.momentum_encoder
        return self.encoder

    def setup(self, context: SetupContext) -> None:
        self._schedule = (context.steps_per_epoch, context.total_epochs)

    def frozen_networks(self) -> dict[str, nn.Module]:
        if self.momentum is None:
            return {}
        return {"momentum_encoder": self.momentum_encoder, "momentum_projector": self.momentum_projector}

    def _epochs(self, step: int) -> tuple[float, float]:
        if self._schedule is None:
            raise RuntimeError("DynACL.setup(context) must be called before training (the schedules need its length)")
        steps_per_epoch, total_epochs = self._schedule
        return step / steps_per_epoch, total_epochs

    def strength(self, step: int) -> float:
        epoch, total = self._epochs(step)
        return max(0.0, 1 - math.floor(epoch / self.stage_epochs) * self.stage_epochs / total)

    def adversarial_weight(self, step: int) -> float:
        epoch, total = self._epochs(step)
        lead = min(1.0, self.stage_epochs)
        return min(1 + math.floor((epoch + lead) / self.stage_epochs) * (self.stage_epochs / total) * self.slope, 2.0)

    def views(self, images: torch.Tensor, random: BatchRandom, step: int) -> torch.Tensor:
        s = self.strength(step)
        if s not in self._augments:
            self._augments[s] = simclr_augment(self.recipe, strength=s)
        augment = self._augments[s]
        return torch.cat([augment(images, random), augment(images, random)])

    def pair_loss(self, x: torch.Tensor, branch: str, across_processes: AcrossProcesses = False) -> torch.Tensor:
        if self.momentum is None:
            return super().pair_loss(x, branch, across_processes)
        x1, x2 = x.chunk(2)
        z1 = self.embed(x1, branch)
        z2 = self.momentum_projector(self.momentum_encoder(x2, bn_branch=branch).pooler_output, bn_branch=branch)
        return nt_xent(z1, z2, self.temperature, across_processes)

    def _online_parameters(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def before_step(self, step: int) -> None:
        if self.momentum is not None:
            # The authors average the online weights between the step's forward and its update; the update has
            # happened by after_step, so the weights are kept here, before the step.
            self._online_before_step = [p.detach().clone() for p in self._online_parameters()]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.momentum is None:
            return
        if self._online_before_step is None:
            raise RuntimeError("DynACL.before_step(step) must be called before after_step(step)")
        ema = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        torch._foreach_mul_(ema, self.momentum)
        torch._foreach_add_(ema, self._online_before_step, alpha=1 - self.momentum)
        self._online_before_step = None

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        views = self.views(images, random, step)
        adv = self.attack(lambda x: self.pair_loss(x, "pgd", self.attack_across_processes), views, random)
        loss_adv = self.pair_loss(adv, "pgd", across_processes=True)
        loss_clean = self.pair_loss(views, "normal", across_processes=True)
        w = self.adversarial_weight(step)
        loss = 0.5 * ((2 - w) * loss_clean + w * loss_adv)
        metrics = {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}
        # torch.full writes on the device; torch.tensor would copy from the host and wait for the queued step.
        metrics["adv_weight"] = torch.full((), w, device=loss.device)
        metrics["strength"] = torch.full((), self.strength(step), device=loss.device)
        return loss, metrics
