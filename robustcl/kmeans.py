"""k-means on the device (k-means++ seeding, Lloyd iterations), deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Points per distance block: 8192 × 500 clusters is 16 MB of float32, small next to the features themselves.
_BLOCK = 8192


@dataclass
class KMeansResult:
    labels: torch.Tensor  # int64 [N]
    centroids: torch.Tensor  # float32 [K, D]
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for every row of ``x`` (blocked over rows)."""
    c_sq = centroids.square().sum(1)
    labels, dists = [], []
    for block in x.split(_BLOCK):
        d = block.square().sum(1, keepdim=True) - 2 * block @ centroids.T + c_sq
        best, idx = d.min(1)
        labels.append(idx)
        dists.append(best.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii's seeding: each new centre drawn with probability ∝ squared distance to the nearest."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = x[first]
    closest = (x - centroids).square().sum(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: repeat one, Lloyd's empty-cluster rule spreads them
            pick = torch.randint(n, (1,), generator=generator, device=x.device)
        else:
            pick = torch.multinomial(closest / total, 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, (x - x[pick]).square().sum(1))
    return centroids


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-4) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups on ``x``'s device.

    Stops when no label changes or the centroids move less than ``tol`` × the mean squared feature norm. A
    cluster that empties takes the point farthest from its centroid, so every cluster keeps at least one point.
    """
    if x.dim() != 2:
        raise ValueError(f"k-means needs features [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot form {k} clusters from {n} points")
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, generator)
    scale = x.square().sum(1).mean().clamp_min(1e-12)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        new_labels, dists = _nearest(x, centroids)
        counts = torch.bincount(new_labels, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dists.argmax())
            new_labels[far] = empty
            dists[far] = 0
            counts = torch.bincount(new_labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, new_labels, x)
        new_centroids = sums / counts.clamp_min(1)[:, None].float()
        shift = (new_centroids - centroids).square().sum(1).max()
        converged = bool((new_labels == labels).all()) or bool(shift <= tol * scale)
        labels, centroids = new_labels, new_centroids
        if converged:
            break
    inertia = sum(float((b - centroids[lb]).square().sum()) for b, lb in zip(x.split(_BLOCK), labels.split(_BLOCK)))
    return KMeansResult(labels=labels, centroids=centroids, inertia=inertia, iterations=iterations)
