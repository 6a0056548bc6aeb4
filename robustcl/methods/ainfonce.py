"""A-InfoNCE — Adversarial Contrastive Learning via Asymmetric InfoNCE (Yu et al., ECCV 2022), on AdvCL.

AdvCL's step (views, high-frequency view, pseudo-label heads, both attacks: robustcl/methods/advcl.py) with its
four-view contrastive loss made asymmetric, as yqy2001/A-InfoNCE ``Asym-AdvCL`` trains it (the version the
RobustSSL leaderboard's A-InfoNCE weights come from: it loads them as AdvCL checkpoints):

- IP, inferior positives (``pretraining_advCL.py --stop_grad``, ``losses.py`` ``stop_grad_sd``): the term of an
  adversarial view i and a clean view (v, i) is taken from both sides, each with the other side's feature held
  constant: C = d·ℓ[(v, i) → adv i, adv feature constant] + (1 − d)·ℓ[adv i → (v, i), clean feature constant], and
  w·C is counted for both anchors. d (``stop_degree``) is 0.2, or, after ``adaptive_after_epochs``, rises towards
  0.5 for batches whose adversarial features lie closer to the clean ones than the early epochs' average.
- HN, hard negatives (``--HN``, ``losses.py`` ``SupConLoss``, from HCL): the denominator's negatives reweighted by
  their importance exp(β·s), less τ⁺·N·(mean positive), over 1 − τ⁺, floored at N·e^(−1/0.5) on logits shifted by
  their row's maximum (quirk kept: the floor is applied after the shift).

ℓ[a → c] is −log of anchor a's probability of c (SupCon's denominator over the V·N − 1 others, or HN's), the
loss is scale × the mean over anchors of the mean over its V − 1 positives. The attack maximises the plain loss
with w and without IP (their ``--attack_ori``). Quirks (``method.ainfonce``): HN's normalisers taken column-wise
(``hard_negative_normalisers``) and, without IP, the mirrored w²-weighted copy (``mirror_adversarial_terms``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..collectives import gather_with_grad, world
from ..encoder_record import Paper
from ..losses import AcrossProcesses
from ..recipe import Recipe
from ..setup_context import SetupContext
from .advcl import AdvCL

# Asym-AdvCL losses.py SupConLoss: the temperature of HN's floor N·e^(−1/0.5), a constant whatever --nce_t.
FLOOR_TEMPERATURE = 0.5
IMPORTANCE_EPS = 1e-9  # their (β·log(neg + 1e-9)).exp()


@dataclass(frozen=True)
class HardNegatives:
    tau_plus: float
    beta: float
    normalisers: Literal["columns", "own"]


@dataclass(frozen=True)
class Asymmetry:
    """How the adversarial view (view 0) enters the loss: its terms' weight w, IP's stop degree d (None: no IP),
    HN's parameters (None: plain InfoNCE) and, without IP, whether the mirrored-copy quirk applies."""

    weight: float = 1.0
    stop_degree: float | torch.Tensor | None = None
    hard_negatives: HardNegatives | None = None
    mirror: bool = False


@dataclass(frozen=True)
class _Layout:
    """Where each local anchor's positives and negatives sit among the V·total keys."""

    views: int
    local: int
    total: int
    rank: int

    def masks(self, device: torch.device, rows: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
        """(positives, negatives) of the local anchors (or of every global row), [rows, V·total] booleans."""
        v, key_image = self.views, torch.arange(self.total, device=device).repeat(self.views)
        if rows == "local":
            image = self.rank * self.local + torch.arange(self.local, device=device).repeat(v)
            own = torch.arange(v, device=device).repeat_interleave(self.local) * self.total + image
        else:
            image, own = key_image, torch.arange(v * self.total, device=device)
        same = image[:, None] == key_image[None, :]
        not_self = torch.ones_like(same)
        not_self[torch.arange(len(own), device=device), own] = False
        return same & not_self, ~same

    def pair_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of ℓ[(view a, image i) → (view c, image i)], shaped [V, V, local]."""
        i = torch.arange(self.local, device=device)
        views = torch.arange(self.views, device=device)[:, None]
        rows = views * self.local + i  # [V, local]
        cols = views * self.total + self.rank * self.local + i
        return rows[:, None, :].expand(-1, self.views, -1), cols[None, :, :].expand(self.views, -1, -1)


def _plain_terms(anchors, keys, layout: _Layout, temperature: float) -> torch.Tensor:
    """ℓ[a → c] = −log softmax over the V·N − 1 keys other than a itself."""
    positives, negatives = layout.masks(anchors.device)
    logits = anchors @ keys.T / temperature
    others = positives | negatives
    return torch.logsumexp(logits.masked_fill(~others, float("-inf")), dim=1, keepdim=True) - logits


def _importance(logits: torch.Tensor, negatives: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(e: exp of the logits less their row's (constant) maximum, the negatives' importance (e + 1e-9)^β; at the
    other entries (1e-9)^β, which their row means include)."""
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values.detach())
    return e, torch.exp(beta * torch.log(e * negatives + IMPORTANCE_EPS))


def _denominators(anchors, keys, masks, n: int, temperature: float, hn: HardNegatives, column_means=None):
    """(e, pos + Ng per anchor), n negatives each: HCL's denominator, the negatives' importance normalised by each
    anchor's own mean (``column_means`` None) or, entry (a, c), by ``column_means[c]``."""
    positives, negatives = masks
    e, imp = _importance(anchors @ keys.T / temperature, negatives, hn.beta)
    e_neg = e * negatives
    pos = (e * positives).sum(1) / positives.sum(1)
    if column_means is None:
        reweighted = (imp * e_neg).sum(1) / ((imp * negatives).sum(1) / negatives.sum(1))
    else:
        reweighted = (imp * e_neg / column_means[None, :]).sum(1)
    ng = (-hn.tau_plus * n * pos + reweighted) / (1 - hn.tau_plus)
    return e, pos + ng.clamp(min=n * math.exp(-1 / FLOOR_TEMPERATURE))


def _hard_negative_terms(anchors, keys, rows, layout: _Layout, temperature: float, hn: HardNegatives) -> torch.Tensor:
    """ℓ[a → c] = −log(e[a, c] / (pos + Ng)) with HCL's reweighted negatives Ng (Asym-AdvCL ``SupConLoss``).

    normalisers "columns" (quirk): their two per-anchor vectors, the importance mean and pos + Ng, divide the
    square [V·N, V·N] matrices by broadcasting, so entry (a, c) takes anchor c's. Those come from every global
    anchor's row: ``rows`` (the keys with gradient, also in IP's pass where the keys are constant, as theirs)."""
    masks, n = layout.masks(anchors.device), (layout.total - 1) * layout.views
    if hn.normalisers == "own":
        e, denominator = _denominators(anchors, keys, masks, n, temperature, hn)
        return -torch.log(e / denominator[:, None])
    row_masks = layout.masks(anchors.device, rows="global")
    _, imp_rows = _importance(rows @ keys.T / temperature, row_masks[1], hn.beta)
    _, column_denominators = _denominators(rows, keys, row_masks, n, temperature, hn, imp_rows.mean(dim=1))
    e, _ = _importance(anchors @ keys.T / temperature, masks[1], hn.beta)
    return -torch.log(e / column_denominators[None, :])


def _pair_terms(anchors, keys, rows, layout: _Layout, temperature: float, hn: HardNegatives | None) -> torch.Tensor:
    """ℓ between the views of each local image: [V (anchor view), V (key view), local]."""
    if hn is None:
        terms = _plain_terms(anchors, keys, layout, temperature)
    else:
        terms = _hard_negative_terms(anchors, keys, rows, layout, temperature, hn)
    r, c = layout.pair_index(anchors.device)
    return terms[r, c]


def _anchor_sums(full: torch.Tensor, stopped: torch.Tensor | None, asym: Asymmetry) -> torch.Tensor:
    """Each anchor's sum over its positives, [V, local]: the clean–clean terms as they are, the adversarial–clean
    ones (view 0 with view v) as the asymmetry makes them."""
    v = full.shape[0]
    w = asym.weight
    if stopped is not None:  # IP: both sides, each with the other's feature constant, for both anchors
        cross = asym.stop_degree * stopped[1:, 0] + (1 - asym.stop_degree) * stopped[0, 1:]  # [V−1, local]
        to_clean, from_clean = w * cross, w * cross
    elif asym.mirror:  # quirk: the adversarial anchors' terms copied over the clean anchors', × w twice
        to_clean, from_clean = w * full[0, 1:], w * w * full[0, 1:]
    else:
        to_clean, from_clean = w * full[0, 1:], w * full[1:, 0]
    off_diagonal = ~torch.eye(v - 1, dtype=torch.bool, device=full.device)
    clean_clean = (full[1:, 1:] * off_diagonal[:, :, None]).sum(1)  # [V−1, local]
    return torch.cat([to_clean.sum(0, keepdim=True), from_clean + clean_clean])


def asymmetric_info_nce(
    views: Sequence[torch.Tensor],
    temperature: float,
    scale: float,
    asym: Asymmetry,
    across_processes: AcrossProcesses = False,
) -> torch.Tensor:
    """A-InfoNCE's loss over V views of N images, view 0 the adversarial one (see the module docstring).

    With w = 1, no IP, no HN and no mirror it is :func:`robustcl.losses.multi_positive_nt_xent`. ``across_processes``
    as there: the keys (and HN's column normalisers) from every process, gathered with gradient; True: the mean
    over this process's anchors; "share": its share of the global loss (attacks)."""
    stacked = torch.stack(list(views))
    local = F.normalize(stacked.to(torch.promote_types(stacked.dtype, torch.float32)), dim=2)  # [V, n, d]
    rank, size = world() if across_processes else (0, 1)
    keys = local if size == 1 else gather_with_grad(local.transpose(0, 1).contiguous()).transpose(0, 1)
    layout = _Layout(views=local.shape[0], local=local.shape[1], total=keys.shape[1], rank=rank)
    anchors, keys = local.flatten(0, 1), keys.flatten(0, 1)
    hn = asym.hard_negatives
    full = _pair_terms(anchors, keys, keys, layout, temperature, hn)
    stopped = None
    if asym.stop_degree is not None:  # their stop-gradient pass: every anchor against constant keys
        stopped = _pair_terms(anchors, keys.detach(), keys, layout, temperature, hn)
    per_anchor = scale * _anchor_sums(full, stopped, asym) / (layout.views - 1)
    if across_processes == "share":
        return per_anchor.sum() / (layout.views * layout.total)
    return per_anchor.mean()


class AInfoNCE(AdvCL):
    display_name = "A-InfoNCE"
    paper = Paper(
        title="Adversarial Contrastive Learning via Asymmetric InfoNCE",
        authors="Yu et al.",
        venue="ECCV 2022",
        url="https://arxiv.org/abs/2207.08374",
    )

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.asym = recipe.method.ainfonce
        # The mean weak-view ↔ x_cl feature distance over the first epochs (their dis_avg), kept in checkpoints.
        # The same on every process (summed over all of them), so DDP's buffer broadcast changes nothing.
        self.register_buffer("distance_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("distance_count", torch.zeros((), dtype=torch.float64))
        self._steps_per_epoch: int | None = None

    def describe(self) -> str:
        a = self.asym
        parts = [f"w = {a.adversarial_weight:g}"]
        if a.inferior_positive:
            adaptive = "" if a.adaptive_after_epochs is None else f", adaptive after {a.adaptive_after_epochs} epochs"
            parts.append(f"inferior positives (stop degree {a.stop_degree:g}{adaptive})")
        if a.hard_negative:
            parts.append(f"hard negatives (τ⁺ {a.tau_plus:g}, β {a.beta:g})")
        return f"A-InfoNCE on {super().describe()}; asymmetric loss: {', '.join(parts)}"

    def setup(self, context: SetupContext) -> None:
        super().setup(context)
        self._steps_per_epoch = context.steps_per_epoch

    def asymmetry(self, stop_degree: float | torch.Tensor | None, hard: bool) -> Asymmetry:
        a = self.asym
        hn = HardNegatives(a.tau_plus, a.beta, a.hard_negative_normalisers) if hard else None
        return Asymmetry(a.adversarial_weight, stop_degree, hn, a.mirror_adversarial_terms)

    def asymmetric_loss(self, z_adv, clean, asym: Asymmetry, across_processes: AcrossProcesses) -> torch.Tensor:
        scale = self.opts.temperature_scale
        return asymmetric_info_nce([z_adv, *clean], self.temperature, scale, asym, across_processes)

    def attack_contrastive_loss(
        self, z_adv: torch.Tensor, clean: list[torch.Tensor], across_processes: AcrossProcesses
    ) -> torch.Tensor:
        # Their attack criterion: ori_SupConLoss under --attack_ori (or without --HN), always without stop_grad.
        hard = self.asym.hard_negative and self.asym.attack_hard_negative
        return self.asymmetric_loss(z_adv, clean, self.asymmetry(None, hard), across_processes)

    def training_contrastive_loss(
        self, x_cl: torch.Tensor, weak: torch.Tensor, clean: list[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_adv = self.embed(x_cl, "pgd")
        metrics: dict[str, torch.Tensor] = {}
        stop_degree = None
        if self.asym.inferior_positive:
            stop_degree = self.stop_degree(x_cl, weak, step)
            metrics["stop_degree"] = torch.as_tensor(stop_degree, dtype=torch.float32, device=z_adv.device)
        asym = self.asymmetry(stop_degree, self.asym.hard_negative)
        return self.asymmetric_loss(z_adv, clean, asym, across_processes=True), metrics

    def stop_degree(self, x_cl: torch.Tensor, weak: torch.Tensor, step: int) -> float | torch.Tensor:
        """IP's d for this step (pretraining_advCL.py ``train``, --stop_grad_adaptive): during the first epochs the
        batch's mean distance between the pooled 'normal'-branch features of the weak view and of x_cl (forwards
        without gradient in the current BN mode, as theirs) is averaged and d is the base; afterwards a batch
        farther than that average keeps the base, one closer than ``min_distance`` gets ``max_stop_degree``, one
        in between a linear interpolation. The distance is the whole batch's (summed over processes)."""
        a = self.asym
        if a.adaptive_after_epochs is None:
            return a.stop_degree
        if self._steps_per_epoch is None:
            raise RuntimeError("AInfoNCE.setup(context) must be called before training (its schedule needs it)")
        with torch.no_grad():
            f_weak = self.encoder(weak, bn_branch="normal").pooler_output.float()
            f_cl = self.encoder(x_cl, bn_branch="normal").pooler_output.float()
            distance = F.pairwise_distance(f_weak, f_cl)
            summed = gather_with_grad(torch.stack([distance.sum(), distance.new_tensor(len(distance))])[None])
            total, count = summed.double().sum(0)
            mean = total / count
            if step // self._steps_per_epoch < a.adaptive_after_epochs:
                self.distance_sum += total
                self.distance_count += count
                return a.stop_degree
            average = torch.where(self.distance_count > 0, self.distance_sum / self.distance_count, 0.0)
            between = (average - mean) / (average - a.min_distance) * (a.max_stop_degree - a.stop_degree)
            degree = torch.where(mean < a.min_distance, a.max_stop_degree, between + a.stop_degree)
            return torch.where(mean > average, a.stop_degree, degree).float()
