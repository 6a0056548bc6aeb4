"""DeACL — Decoupled Adversarial Contrastive Learning for Self-supervised Adversarial Robustness (Zhang et al.,
ECCV 2022), stage 2.

Stage 1 is any non-robust encoder (``method.deacl.teacher``: a SimCLR run of recipes/simclr.yaml, an export or a
Hub id). Stage 2 distils it into a robust student: weak views x (crop + flip), t = teacher(x) in eval mode without
gradient, x_adv = PGD maximising −cos(student(x + δ), t) with the student in the recipe's BN mode (eval), and
L = −cos(s, t) − λ·cos(s_adv, s) from one train-mode forward over [x; x_adv]. No projector.

The teacher is loaded in ``setup`` and kept outside the module tree: it is not trained, not checkpointed and not
exported; the student starts as a copy of it (``student_init: teacher``) when it is a robustcl encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import BatchRandom
from ..encoder_loading import load_encoder
from ..encoder_record import Paper
from ..errors import UserError
from ..losses import distillation_loss
from ..models import RobustCLResNetModel
from ..recipe import Recipe
from ..setup_context import SetupContext
from .base import Method, encoder_config
from .views import weak_augment

# The architecture keys a student must share with its teacher to start as a copy of it.
_ARCHITECTURE_KEYS = (
    "block",
    "block_layers",
    "widths",
    "stem",
    "stem_padding",
    "stem_width",
    "image_mean",
    "image_std",
)


class DeACL(Method):
    display_name = "DeACL"
    contrastive = False
    paper = Paper(
        title="Decoupled Adversarial Contrastive Learning for Self-supervised Adversarial Robustness",
        authors="Zhang et al.",
        venue="ECCV 2022",
        url="https://arxiv.org/abs/2207.10899",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.opts = recipe.method.deacl
        self.bn_branches = []
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        self.augment = weak_augment(recipe)
        self._teacher: list[nn.Module] = []  # a list keeps the teacher out of parameters(), state_dict() and DDP

    def describe(self) -> str:
        return (
            f"DeACL stage 2: −cos(s, t) − {self.opts.adversarial_weight:g}·cos(s_adv, s), student distilled from "
            "a frozen non-robust teacher with a feature-space PGD"
        )

    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError("DeACL.setup(context) must be called before training (it loads the teacher)")
        return self._teacher[0]

    def frozen_networks(self) -> dict[str, nn.Module]:
        return {"teacher": self._teacher[0]} if self._teacher else {}

    def setup(self, context: SetupContext) -> None:
        reference, revision = self.opts.teacher, self.opts.teacher_revision
        teacher = context.load_once(lambda: load_encoder(reference, revision=revision).encoder, "loading the teacher")
        teacher = teacher.to(context.device).eval().requires_grad_(False)
        if self.opts.student_init == "teacher":
            self._copy_teacher(teacher.backbone, self.opts.teacher)
        probe = torch.zeros(2, 3, self.recipe.data.resolution, self.recipe.data.resolution, device=context.device)
        with torch.no_grad():
            dim = teacher(probe).shape[1]
        if dim != self.encoder.config.hidden_size:
            raise UserError(
                f"the teacher's features have {dim} dimensions, the student's {self.encoder.config.hidden_size}",
                "method.deacl.teacher",
                "give model.widths whose last entry matches the teacher's feature size",
            )
        self._teacher = [teacher]

    def _copy_teacher(self, backbone: nn.Module, reference: str) -> None:
        if not isinstance(backbone, RobustCLResNetModel):
            raise UserError(
                f"the teacher is a {type(backbone).__name__}, not a robustcl encoder, so the student cannot start "
                "as a copy of it",
                reference,
                "set method.deacl.student_init=random, or use a robustcl run / export as the teacher",
            )
        ours, theirs = self.encoder.config.to_dict(), backbone.config.to_dict()
        # The padding as built: null means the stem's default, the same network as that default written out.
        ours["stem_padding"] = self.encoder.config.resolved_stem_padding
        theirs["stem_padding"] = backbone.config.resolved_stem_padding
        ours["stem_width"], theirs["stem_width"] = self.encoder.config.stem_channels, backbone.config.stem_channels
        differ = [k for k in _ARCHITECTURE_KEYS if ours.get(k) != theirs.get(k)]
        if differ or theirs.get("bn_branches"):
            what = ", ".join(f"model.{k}" for k in differ) or "bn_branches"
            raise UserError(
                f"the student's architecture differs from the teacher's ({what})",
                reference,
                "set the student's model section to the teacher's (see the teacher's recipe.yaml / config.json)",
            )
        self.encoder.load_state_dict(backbone.state_dict(), strict=True)

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        x = self.augment(images, random)
        with torch.no_grad():
            target = self.teacher(x)

        def away_from_teacher(x_adv: torch.Tensor) -> torch.Tensor:
            return -F.cosine_similarity(self.encoder(x_adv).pooler_output, target, dim=1).sum()

        x_adv = self.attack(away_from_teacher, x, random, module=self.encoder)
        student, student_adv = self.encoder(torch.cat([x, x_adv])).pooler_output.chunk(2)
        loss = distillation_loss(student, target, student_adv, self.opts.adversarial_weight)
        with torch.no_grad():
            cos_clean = F.cosine_similarity(student, target, dim=1).mean()
            cos_adv = F.cosine_similarity(student_adv, student, dim=1).mean()
        return loss, {"cos_teacher": cos_clean, "cos_adversarial": cos_adv}
