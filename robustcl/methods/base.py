"""What every method shares: the encoder built from the recipe, the training attack, and the interface the trainer
calls."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..attacks import frozen_parameters, module_mode, pgd_attack
from ..data.batches import BatchRandom
from ..data.images import ImageRows
from ..encoder_record import EncoderRecord, MethodCard, Paper
from ..losses import AcrossProcesses
from ..models import RobustCLResNetConfig, RobustCLResNetModel
from ..recipe import ModelConfig, Recipe

if TYPE_CHECKING:
    from accelerate import Accelerator


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


@dataclass
class TrainingRun:
    """What a method may need beyond its weights before the first step: schedules (step counts), the dataset
    (pseudo-labels are checked against it) and the run directory (for files a stage computes)."""

    run_dir: Path
    images: ImageRows  # the pretraining split in dataset order (decoded, or encoded for the streamed path)
    steps_per_epoch: int
    total_steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Accelerator | None = None  # None in single-process use (tests, scripts)

    @property
    def total_epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def wait_for_everyone(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


class Method(nn.Module):
    """A self-supervised method: owns its encoder, heads and views; the trainer only calls ``setup`` and
    ``forward``.

    ``setup(run)`` runs once before training (and before a checkpoint is restored): it loads what the method needs
    from outside its weights (a teacher, pseudo-labels) and reads the schedule lengths.

    ``forward(images, generator, indices, step)`` takes a uint8 batch [N, C, H, W] on the device, the process's
    share of the micro-batch's random numbers (:class:`BatchRandom`), the images' dataset indices and the 0-based
    optimizer step; it builds the method's views and attacks, and returns ``(loss, metrics)`` where metrics are
    detached scalar tensors (no host syncs in the step).
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
        self.run: TrainingRun | None = None

    def setup(self, run: TrainingRun) -> None:
        self.run = run

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, generator: BatchRandom, indices: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> str:
        """The training objective in one line (model cards)."""
        raise NotImplementedError

    def networks(self) -> list[nn.Module]:
        """Every network a training step calls: the method's own (encoder, heads; module containers opened) and any
        kept outside its weights (DeACL's teacher). The throughput benchmark times their passes alone."""
        nets: list[nn.Module] = []
        for child in self.children():
            if isinstance(child, nn.ModuleDict):
                nets.extend(child.values())
            elif isinstance(child, nn.ModuleList):
                nets.extend(child)
            else:
                nets.append(child)
        return nets

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
        generator: BatchRandom,
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
                generator=generator,
                clamp_start=a.clamp_start,
            )

    @property
    def downstream_encoder(self) -> RobustCLResNetModel:
        """The encoder exports and evaluations take (DynACL may hand over its moving-average copy instead)."""
        return self.encoder

    @property
    def export_branch(self) -> str | None:
        """The BN branch the downstream encoder uses: the adversarial one when the method has it."""
        if not self.bn_branches:
            return None
        return "pgd" if "pgd" in self.bn_branches else self.bn_branches[0]

    def encoder_record(self) -> EncoderRecord:
        """What every checkpoint records beside the weights (``train_state.json``): the downstream encoder's config,
        where its tensors sit in the method's state dict, the branch exports keep and the card's facts, so that
        export and evaluation read the encoder without building this method."""
        encoder = self.downstream_encoder
        prefix = next(name for name, module in self.named_modules() if module is encoder)
        return EncoderRecord(
            config=encoder.config.to_diff_dict(),
            weights_prefix=f"{prefix}.",
            export_branch=self.export_branch,
            method=MethodCard(
                name=self.recipe.method.name,
                display_name=self.display_name,
                paper=self.paper,
                objective=self.describe(),
                adversarial=self.adversarial,
            ),
        )
