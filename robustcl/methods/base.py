"""What every method shares: the encoder built from the recipe, the training attack, and the interface the trainer
calls."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import nn

from ..attacks import frozen_parameters, module_mode, pgd_attack
from ..data.batches import BatchRandom
from ..encoder_record import EncoderRecord, MethodCard, Paper
from ..losses import AcrossProcesses
from ..models import RobustCLResNetConfig, RobustCLResNetModel
from ..recipe import ModelConfig, Recipe
from ..setup_context import SetupContext


def attack_precision(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast the attack's passes run under: ``auto`` inherits the training step's (bf16 under mixed
    precision), ``fp32`` turns it off, ``bf16`` turns it on. The perturbation itself is always fp32: autocast casts
    the passes' inputs, and the gradient comes back in the perturbation's dtype."""
    if precision == "auto":
        return nullcontext()
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def encoder_config(cfg: ModelConfig, bn_branches: list[str]) -> RobustCLResNetConfig:
    return RobustCLResNetConfig(
        block_layers=list(cfg.block_layers),
        widths=list(cfg.widths),
        stem=cfg.stem,
        stem_padding=cfg.stem_padding,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        bn_branches=list(bn_branches),
        block=cfg.block,
        stem_width=cfg.stem_width,
    )


class Method(nn.Module):
    """A self-supervised method: owns its encoder, heads and views. The trainer calls, in this order:

    ``setup(context)`` once before training (before a checkpoint is restored and before DDP wraps the method): it
    loads what the method needs from outside its weights (a teacher, pseudo-labels computed over the pretraining
    images) and reads the schedule's length, through a :class:`SetupContext`.

    Then for every optimizer step: ``before_step(step)``; ``forward(images, random, indices, step)`` for each
    micro-batch, which takes a uint8 batch [N, C, H, W] on the device, the process's share of the micro-batch's
    random numbers (:class:`BatchRandom`), the images' dataset indices and the 0-based optimizer step, builds the
    method's views and attacks, and returns ``(loss, metrics)`` where metrics are detached scalar tensors (no host
    syncs in the step); and ``after_step(step)`` once the step's update was applied (not after a step skipped for a
    NaN/inf loss or gradient, which changes nothing).

    Networks the optimizer must not train are declared by :meth:`frozen_networks`; the card's facts are the class
    attributes below and :meth:`describe`.
    """

    encoder: RobustCLResNetModel
    bn_branches: list[str]
    paper: ClassVar[Paper | None] = None
    display_name: ClassVar[str]  # as the paper spells it (model cards)
    adversarial: ClassVar[bool] = True  # trained against an adversary (False: a non-robust baseline)
    # Its loss compares images of the batch with each other (negatives): multi-process runs synchronise BN by default.
    contrastive: ClassVar[bool] = True
    # SimCLR views a step takes when augment.crop_on is original (the data workers crop them from the original
    # images); 0: the method needs the decoded image itself (weak views, annealed crops) and cannot.
    original_crops: ClassVar[int] = 0

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe

    def setup(self, context: SetupContext) -> None:
        """Load what the method needs from outside its weights; nothing by default."""

    def before_step(self, step: int) -> None:
        """Before the first forward of optimizer step ``step`` (every step); nothing by default."""

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` updated the weights (not after a skipped step); nothing by default."""

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The networks a step runs that the optimizer does not train, by name: kept in the method's weights and
        updated by the method itself (a moving average, in ``after_step``), or kept outside them and never changed
        (a teacher). Every parameter of the method that requires no gradient belongs to one of them."""
        return {}

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> str:
        """The training objective in one line (model cards)."""
        raise NotImplementedError

    @property
    def attack_across_processes(self) -> AcrossProcesses:
        """``across_processes`` of the contrastive loss an attack maximises (attack.negatives). global: "share", the
        negatives of every process and this process's share of the global loss, so that its input gradient is the
        one a single process holding the whole (micro-)batch computes for these rows. Every process runs the same
        PGD steps, so the per-step all-gather always has all processes. local: this process's rows only."""
        return "share" if self.recipe.attack.negatives == "global" else False

    def attack(
        self,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        random: BatchRandom,
        module: nn.Module | None = None,
    ) -> torch.Tensor:
        """PGD on ``loss_fn`` around ``x`` with the recipe's attack, ``module`` (default: the whole method) in the
        recipe's BN mode (attack.bn_mode) and precision (attack.precision) for the duration of the attack."""
        a = self.recipe.attack
        attacked = module if module is not None else self
        with (
            module_mode(attacked, train=a.bn_mode == "train"),
            frozen_parameters(attacked),
            attack_precision(a.precision, x.device),
        ):
            return pgd_attack(
                loss_fn,
                x,
                epsilon=a.epsilon,
                step_size=a.step_size,
                steps=a.steps,
                random_start=a.random_start,
                random=random,
                clamp_start=a.clamp_start,
            )

    @property
    def downstream_encoder(self) -> RobustCLResNetModel:
        """The encoder exports and evaluations take (DynACL may hand over its moving-average copy instead)."""
        return self.encoder

    def encoder_record(self) -> EncoderRecord:
        """What every checkpoint records beside the weights (``train_state.json``): the downstream encoder's config,
        where its tensors sit in the method's state dict, the branch exports keep and the card's facts, so that
        export and evaluation read the encoder without building this method."""
        encoder = self.downstream_encoder
        prefix = next(name for name, module in self.named_modules() if module is encoder)
        branches = self.bn_branches
        return EncoderRecord(
            config=encoder.config.to_diff_dict(),
            weights_prefix=f"{prefix}.",
            # Exports keep the adversarial branch when the method has one: the robust encoder is the one handed over.
            export_branch=("pgd" if "pgd" in branches else branches[0]) if branches else None,
            method=MethodCard(
                name=self.recipe.method.name,
                display_name=self.display_name,
                paper=self.paper,
                objective=self.describe(),
                adversarial=self.adversarial,
            ),
        )
