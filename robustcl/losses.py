"""Pure loss functions on feature tensors (no modules, no state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .collectives import gather_with_grad, world

# How a contrastive loss treats the other processes (see multi_positive_nt_xent): False, True (training) or
# "share" (attacks).
AcrossProcesses = bool | Literal["share"]


def multi_positive_nt_xent(
    views: Sequence[torch.Tensor],
    temperature: float,
    scale: float = 1.0,
    across_processes: AcrossProcesses = False,
    detach_keys: bool = False,
) -> torch.Tensor:
    """Contrastive loss over V views of N images (SupCon without labels; SimCLR's NT-Xent when V = 2).

    Row i of every tensor in ``views`` is the same image. Features are L2-normalised; each of the V·N anchors is
    scored against the V·N − 1 others (cosine / ``temperature``, its own similarity removed), its positives are
    the other V − 1 views of its image, and its loss is −``scale`` × the mean log-probability of its positives.
    Returns the mean over anchors.

    ``across_processes``: the keys are the views of the *global* batch (every process's rows, gathered with
    gradient), the anchors this process's rows, its positives found at their global rows (rank × N + i). True
    (training): the mean over this process's anchors; under DDP gradient averaging this equals the loss and
    gradients of one process holding the whole batch. ``"share"`` (attacks, attack.negatives: global): this
    process's share of the global loss, the sum over its anchors divided by the global anchor count. The
    processes' values sum to the global loss, and as the gather's backward sums over processes and nothing
    averages an input gradient afterwards, the gradient w.r.t. this process's rows is exactly the one the global
    loss gives them in one process. False: this process's rows only (attack.negatives: local; no communication).

    ``detach_keys``: the keys carry no gradient, so a feature's gradient comes only through its own anchor row
    (RoCL's ``pairwise_similarity`` multiplies by a detached transpose).
    """
    shapes = {tuple(v.shape) for v in views}
    if len(views) < 2 or len(shapes) != 1:
        raise ValueError(f"need at least two view feature tensors of one shape, got {sorted(shapes)}")
    n, v = views[0].shape[0], len(views)
    stacked = torch.stack(list(views))
    # At least float32 (features come in bf16 under mixed precision); float64 features stay float64.
    local = F.normalize(stacked.to(torch.promote_types(stacked.dtype, torch.float32)), dim=2)  # [V, n, d]
    rank, size = world() if across_processes else (0, 1)
    keys = local.detach() if detach_keys else local
    if size > 1:
        keys = gather_with_grad(keys.transpose(0, 1).contiguous()).transpose(0, 1)  # [V, size·n, d]
    total = keys.shape[1]
    anchors, keys = local.flatten(0, 1), keys.flatten(0, 1)
    logits = anchors @ keys.T / temperature  # [V·n, V·total]
    # Anchor (view a, local row i) is key (a, rank·n + i); its image's rows in every view are its positives.
    image = rank * n + torch.arange(n, device=anchors.device).repeat(v)
    own = torch.arange(v, device=anchors.device).repeat_interleave(n) * total + image
    key_image = torch.arange(total, device=anchors.device).repeat(v)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(v * n, device=anchors.device), own] = True
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (image[:, None] == key_image[None, :]) & ~self_mask
    mean_log_prob_pos = (log_prob * positives).sum(1) / (v - 1)
    if across_processes == "share":
        return -scale * mean_log_prob_pos.sum() / (v * total)
    return -scale * mean_log_prob_pos.mean()


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, across_processes: AcrossProcesses = False
) -> torch.Tensor:
    """SimCLR's NT-Xent: row i of ``z1`` and row i of ``z2`` are a positive pair, every other row a negative.

    Cosine similarity divided by ``temperature``; each of the 2N anchors is scored against the 2N − 1 others
    (its own similarity removed); the loss is the mean over the 2N anchors. ``across_processes``: negatives from
    every process, for training (True) or an attack ("share"; see :func:`multi_positive_nt_xent`).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"view features differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    return multi_positive_nt_xent([z1, z2], temperature, across_processes=across_processes)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, student_adv: torch.Tensor, adversarial_weight: float
) -> torch.Tensor:
    """DeACL's stage-2 loss: −cos(s, t) − λ·cos(s_adv, s), each cosine averaged over the batch.

    Gradients flow into both student terms; the teacher features are taken as given (the caller detaches them).
    """
    clean = F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    robust = F.cosine_similarity(student_adv.float(), student.float(), dim=1).mean()
    return -clean - adversarial_weight * robust
