"""AdvCL — When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to Finetuning?
(Fan et al., NeurIPS 2021).

Per image: two SimCLR views x1, x2, a weak view x (crop + flip) and its high-frequency view x_hf (radius
``high_frequency_radius``, not clamped, 'normal' BN, not attacked). Two adversarial images from x:
x_cl maximises the contrastive loss through the 'pgd' BN, x_ce the pseudo-label cross-entropy through 'pgd_ce'.

    L = scale · SupCon-without-labels([z(x_cl, 'pgd'), z(x1), z(x2), z(x_hf)], T)
        + ce_weight · mean_K CE(head_K(f(x_ce, 'pgd_ce')), pseudo-label_K)

z is a 2-layer projector (512 → 512 → BN → ReLU → 128, one BN shared by all branches as in the authors' model)
L2-normalised; every view is a separate forward (its own BN batch statistics), as in the authors' code.
Quirks, as recipe options: ``scale`` = 0.5/0.07 (the SupCon base temperature) and attack.bn_mode = train.
The clean views' features are computed once per step and enter the attack as constants (the authors recompute
them at every PGD step and again for the loss: the same values, as BN uses batch statistics in train mode; the
BN running averages are updated once instead of seven times).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import module_mode
from ..data.batches import BatchRandom
from ..data.frequency import high_frequency
from ..encoder_loading import load_encoder
from ..encoder_record import Paper
from ..errors import UserError
from ..losses import AcrossProcesses, multi_positive_nt_xent
from ..models import ProjectionHead, RobustCLResNetModel
from ..pseudo_labels import (
    PseudoLabels,
    check_cluster_counts,
    cluster_labels,
    load_pseudo_labels,
    save_pseudo_labels,
)
from ..recipe import Recipe
from ..run_layout import PSEUDO_LABELS_FILE
from ..setup_context import SetupContext
from .base import Method, encoder_config
from .views import simclr_augment, weak_augment


class AdvCL(Method):
    display_name = "AdvCL"
    paper = Paper(
        title="When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to Finetuning?",
        authors="Fan et al.",
        venue="NeurIPS 2021",
        url="https://arxiv.org/abs/2111.01124",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.opts = recipe.method.advcl
        self.bn_branches = ["normal", "pgd", "pgd_ce"]
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        dim = self.encoder.config.hidden_size
        self.projector = ProjectionHead(dim, dim, self.opts.projector_dim, num_layers=2, last_bn=False, last_bias=True)
        self.pseudo_heads = nn.ModuleDict({f"k{k}": nn.Linear(dim, k) for k in self.opts.clusters})
        self.augment = simclr_augment(recipe)
        self.weak = weak_augment(recipe)
        self.temperature = recipe.method.temperature
        # A plain attribute, not a buffer: DDP would broadcast a buffer to every process at every step.
        self.pseudo_labels: torch.Tensor | None = None  # int64 [len(clusters), N] on the device, set by setup

    def describe(self) -> str:
        ks = ", ".join(map(str, self.opts.clusters))
        return (
            f"AdvCL: contrastive loss over [PGD view, two augmented views, high-frequency view] (temperature "
            f"{self.temperature:g}, × {self.opts.temperature_scale:.3g}) + {self.opts.ce_weight:g} × pseudo-label "
            f"cross-entropy on a second PGD view (k-means K = {ks})"
        )

    def setup(self, context: SetupContext) -> None:
        path = self.label_file(context.run_dir)
        if self.opts.pseudo_labels is None and not path.is_file():
            self.cluster(context, path)
        self.pseudo_labels = load_pseudo_labels(path, self.opts.clusters, context.images).to(context.device)

    def cluster(self, context: SetupContext, path: Path) -> None:
        """k-means of the cluster encoder's features of the pretraining images (the trainer shards the feature pass
        and the clustering over its processes), written into ``path`` once. A failure anywhere raises everywhere."""
        reference, clusters, seed = self.opts.cluster_encoder, self.opts.clusters, self.recipe.training.seed
        check_cluster_counts(clusters, len(context.images))
        encoder = context.load_once(lambda: load_encoder(reference).encoder, "loading the cluster encoder")
        labels = cluster_labels(context.features(encoder), clusters, seed=seed, progress=context.progress)

        def write() -> None:
            found = PseudoLabels(labels, context.images.identity(), str(reference), seed, normalized=True)
            save_pseudo_labels(path, found)

        context.write_once(write, "writing the pseudo-labels")

    def label_file(self, run_dir: Path) -> Path:
        """The recipe's labels file, else the one computed into the run directory."""
        if self.opts.pseudo_labels is not None:
            return Path(self.opts.pseudo_labels)
        if self.opts.cluster_encoder is None:
            raise UserError(
                "AdvCL needs pseudo-labels",
                "method.advcl",
                "set method.advcl.pseudo_labels to a file from robustcl cluster, or method.advcl.cluster_encoder to "
                "an encoder (run directory, export or Hub id) whose features are clustered before training",
            )
        return Path(run_dir) / PSEUDO_LABELS_FILE

    def embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return F.normalize(self.projector(self.encoder(x, bn_branch=branch).pooler_output), dim=1)

    def contrastive_loss(
        self, z_adv: torch.Tensor, clean: list[torch.Tensor], across_processes: AcrossProcesses = False
    ) -> torch.Tensor:
        return multi_positive_nt_xent(
            [z_adv, *clean], self.temperature, self.opts.temperature_scale, across_processes=across_processes
        )

    def attack_contrastive_loss(
        self, z_adv: torch.Tensor, clean: list[torch.Tensor], across_processes: AcrossProcesses
    ) -> torch.Tensor:
        """The contrastive loss x_cl ascends (a subclass may attack another one than it trains on)."""
        return self.contrastive_loss(z_adv, clean, across_processes)

    def training_contrastive_loss(
        self, x_cl: torch.Tensor, weak: torch.Tensor, clean: list[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The contrastive loss trained on and its extra metrics, from the attacked and the clean weak view."""
        return self.contrastive_loss(self.embed(x_cl, "pgd"), clean, across_processes=True), {}

    def pseudo_label_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x, bn_branch="pgd_ce").pooler_output
        losses = [F.cross_entropy(head(features), t) for head, t in zip(self.pseudo_heads.values(), targets)]
        return torch.stack(losses).mean()

    def forward(self, images: torch.Tensor, random: BatchRandom, indices: torch.Tensor, step: int):  # type: ignore[override]
        if self.pseudo_labels is None:
            raise RuntimeError("AdvCL.setup(run) must be called before training (it loads the pseudo-labels)")
        x1, x2 = self.augment(images, random), self.augment(images, random)
        weak = self.weak(images, random)
        x_hf = high_frequency(weak, self.opts.high_frequency_radius)
        targets = self.pseudo_labels[:, indices.to(self.pseudo_labels.device)].to(images.device)
        clean_views = (x1, x2, x_hf)

        clean = [self.embed(v, "normal") for v in clean_views]
        attack_in_train_mode = self.recipe.attack.bn_mode == "train"
        if attack_in_train_mode == self.training:  # the attack sees these very features (the default quirk)
            clean_const = [z.detach() for z in clean]
        else:
            with torch.no_grad(), module_mode(self, train=attack_in_train_mode):
                clean_const = [self.embed(v, "normal") for v in clean_views]
        across = self.attack_across_processes
        contrastive = self.attack_contrastive_loss
        x_cl = self.attack(lambda x: contrastive(self.embed(x, "pgd"), clean_const, across), weak, random)
        x_ce = self.attack(lambda x: self.pseudo_label_loss(x, targets), weak, random)

        loss_cl, extra = self.training_contrastive_loss(x_cl, weak, clean, step)
        loss_ce = self.pseudo_label_loss(x_ce, targets)
        loss = loss_cl + self.opts.ce_weight * loss_ce
        return loss, {"loss_contrastive": loss_cl.detach(), "loss_pseudo_label": loss_ce.detach(), **extra}
