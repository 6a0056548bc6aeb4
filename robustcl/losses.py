"""Pure loss functions on feature tensors (no modules, no state)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multi_positive_nt_xent(views: Sequence[torch.Tensor], temperature: float, scale: float = 1.0) -> torch.Tensor:
    """Contrastive loss over V views of N images (SupCon without labels; SimCLR's NT-Xent when V = 2).

    Row i of every tensor in ``views`` is the same image. Features are L2-normalised; each of the V·N anchors is
    scored against the V·N − 1 others (cosine / ``temperature``, its own similarity removed), its positives are
    the other V − 1 views of its image, and its loss is −``scale`` × the mean log-probability of its positives.
    Returns the mean over anchors.
    """
    shapes = {tuple(v.shape) for v in views}
    if len(views) < 2 or len(shapes) != 1:
        raise ValueError(f"need at least two view feature tensors of one shape, got {sorted(shapes)}")
    n, v = views[0].shape[0], len(views)
    z = F.normalize(torch.cat(list(views)).float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(v * n, dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    image = torch.arange(n, device=z.device).repeat(v)
    positives = (image[:, None] == image[None, :]) & ~self_mask
    mean_log_prob_pos = (log_prob * positives).sum(1) / (v - 1)
    return -scale * mean_log_prob_pos.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: row i of ``z1`` and row i of ``z2`` are a positive pair, every other row a negative.

    Cosine similarity divided by ``temperature``; each of the 2N anchors is scored against the 2N − 1 others
    (its own similarity removed); the loss is the mean over the 2N anchors.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"view features differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    return multi_positive_nt_xent([z1, z2], temperature)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, student_adv: torch.Tensor, adversarial_weight: float
) -> torch.Tensor:
    """DeACL's stage-2 loss: −cos(s, t) − λ·cos(s_adv, s), each cosine averaged over the batch.

    Gradients flow into both student terms; the teacher features are taken as given (the caller detaches them).
    """
    clean = F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    robust = F.cosine_similarity(student_adv.float(), student.float(), dim=1).mean()
    return -clean - adversarial_weight * robust
