"""k-means on the device (k-means++ seeding, Lloyd iterations), deterministic for a seed, over rows sharded across
processes: each process holds a contiguous block of the rows (in global row order) and the processes combine only
per-cluster sums and counts, per-shard totals and one picked row at a time. One process is the same code with one
shard, and every process takes the same branches, as each decision comes from reduced quantities.

Sums that decide a pick, an assignment or the convergence are float64, so that one process and several (which add
in another order) agree to float64 rounding, not float32's: the same labels, the same centroids to ~1e-12.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from .distributed import first_failure

T = TypeVar("T")

# Points per distance block: 8192 × 500 clusters is 16 MB of float32, small next to the features themselves.
_BLOCK = 8192
# A float32 distance gap below this fraction of (|x|² + max |c|²) may be float32 rounding (its GEMM error grows
# with the dimension: ~D × 6e-8 at worst, 1.2e-4 for D = 2048): such rows are assigned again in float64.
_TIE = 1e-3


class OneProcess:
    """The collectives k-means needs, for a single process holding every row: nothing to combine."""

    rank = 0
    size = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the processes."""
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t``, stacked in rank order: ``[size, *t.shape]``."""
        return t[None]

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows`` (its block of the global rows) concatenated in rank order, on every process."""
        return rows

    def agree(self, work: Callable[[], T], doing: str) -> T:
        """``work()``; when it fails on any process, every process raises that failure (see :class:`ProcessGroup`)."""
        return work()


class ProcessGroup(OneProcess):
    """The collectives over torch.distributed's default group (the one Accelerate set up: gloo on CPU, NCCL on
    GPUs); tensors live on the device the group's backend uses."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        sizes = self.all_gather(torch.tensor(len(rows), device=rows.device)).tolist()
        # The collective needs one shape: pad every block to the longest.
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        return torch.cat([part[:size] for part, size in zip(self.all_gather(padded), sizes)])

    def agree(self, work: Callable[[], T], doing: str) -> T:
        """``work()`` on every process, then each hears of the others' outcome: a failure anywhere ends every process
        with the same one-line error (a :class:`UserError` as itself, with its exit code; anything else as a
        RuntimeError naming it, the failing process keeping its own traceback) instead of a hang in the next
        collective."""
        result, error = None, None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 — re-raised below, once the others have heard of it
            error = exc
        reported = first_failure(error, doing)
        if error is not None:
            raise error
        if reported is not None:
            raise reported
        return result  # type: ignore[return-value]


@dataclass
class KMeansResult:
    labels: torch.Tensor  # int64 [n], the rows of this process's shard
    centroids: torch.Tensor  # float32 [K, D], the same on every process
    inertia: float  # sum over all shards of the squared distances to the assigned centroid
    iterations: int


def _squared_distances(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """float64 squared distance of every row of ``x`` to ``centre`` [D] (float64), blocked over rows. Row by row,
    independent of the other rows of the block: a row's value does not depend on how the rows are sharded."""
    return torch.cat([(block.double() - centre).square().sum(1) for block in x.split(_BLOCK)])


def _exact_nearest(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of ``rows``, in float64 (the rows whose float32 gap was too small to trust)."""
    r = rows.double()
    d = r.square().sum(1, keepdim=True) - 2 * r @ centroids.T + centroids.square().sum(1)
    return d.argmin(1)


@contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 matmuls on GPUs: TF32 (which training switches on) rounds 1000× coarser than _TIE allows for."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@_no_tf32()
def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (float64 [K, D]) for every row of ``x``: float32 distances, rows whose best two
    are within float32 rounding of each other decided again in float64."""
    c32 = centroids.float()
    c_sq = c32.square().sum(1)
    labels = []
    for block in x.split(_BLOCK):
        x_sq = block.square().sum(1, keepdim=True)
        d = x_sq - 2 * block @ c32.T + c_sq
        best = d.argmin(1)
        if len(c32) > 1:
            two = d.topk(2, dim=1, largest=False).values
            near = (two[:, 1] - two[:, 0]) <= _TIE * (x_sq[:, 0] + c_sq.max())
            if bool(near.any()):
                best[near] = _exact_nearest(block[near], centroids)
        labels.append(best)
    return torch.cat(labels)


def _row(x: torch.Tensor, index: int, offset: int, group: OneProcess) -> torch.Tensor:
    """Global row ``index`` as float64 on every process: its owner contributes it to a sum, the others zeros."""
    row = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    if offset <= index < offset + len(x):
        row = x[index - offset].double()
    return group.all_reduce(row)


def _inverse_cdf_pick(closest: torch.Tensor, u: float, offset: int, group: OneProcess) -> int | None:
    """The global row where the running sum of ``closest`` (float64, over the global row order) first exceeds
    u × its total; None when the total is 0. Shard totals are all-gathered; the shard that holds the target finds the
    row and the index is summed over processes."""
    running = closest.cumsum(0)
    local_total = running[-1] if len(running) else closest.new_zeros(())
    totals = group.all_gather(local_total).cpu()
    grand = float(totals.sum())
    if grand <= 0:
        return None
    starts = totals.cumsum(0) - totals
    target = u * grand
    # The last shard with mass that starts at or before the target: rounding at the very end cannot leave it ownerless.
    owner = max(r for r in range(len(totals)) if totals[r] > 0 and float(starts[r]) <= target)
    pick = torch.zeros((), dtype=torch.float64, device=closest.device)
    if owner == group.rank:
        j = int(torch.searchsorted(running, running.new_tensor(target - float(starts[owner])), right=True))
        last = int(torch.searchsorted(running, running[-1], right=False))  # the last row with mass
        pick += offset + min(j, last)
    return int(group.all_reduce(pick))


def kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, group: OneProcess, offset: int, n: int
) -> torch.Tensor:
    """Arthur & Vassilvitskii's seeding over the shards: each new centre is drawn with probability ∝ squared distance
    to the nearest centre, by inverse-CDF sampling with one uniform from ``generator`` (the same on every process).
    ``offset`` is this shard's first global row, ``n`` the total row count. Returns float64 [k, D]."""
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [_row(x, first, offset, group)]
    closest = _squared_distances(x, centroids[0])
    for _ in range(1, k):
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        pick = _inverse_cdf_pick(closest, u, offset, group)
        if pick is None:  # fewer distinct points than k: repeat one, Lloyd's empty-cluster rule spreads them
            pick = int(torch.randint(n, (1,), generator=generator))
        centroids.append(_row(x, pick, offset, group))
        closest = torch.minimum(closest, _squared_distances(x, centroids[-1]))
    return torch.stack(centroids)


def _assigned_distances(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 squared distance of every row to its assigned centroid, row by row."""
    return torch.cat(
        [(b.double() - centroids[lb]).square().sum(1) for b, lb in zip(x.split(_BLOCK), labels.split(_BLOCK))]
    )


def _fill_empty(
    x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor, offset: int, group: OneProcess
) -> None:
    """Give each empty cluster (in index order) the point farthest from its centroid among clusters that keep another
    point (ties: the lowest global row), so that no cluster empties in turn. Updates ``labels`` and ``counts``."""
    far = _assigned_distances(x, centroids, labels)
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        candidates = torch.where(counts[labels] > 1, far, torch.full_like(far, -1.0))
        mine = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=x.device)
        if len(candidates):
            j = int(candidates.argmax())  # the first of equal maxima: the lowest row of this shard
            mine = torch.stack([candidates[j], candidates.new_tensor(offset + j), labels[j].double()])
        offers = group.all_gather(mine).cpu()
        best = max(range(len(offers)), key=lambda r: (float(offers[r, 0]), -float(offers[r, 1])))
        row, source = int(offers[best, 1]), int(offers[best, 2])
        if offset <= row < offset + len(x):
            labels[row - offset] = empty
            far[row - offset] = 0
        counts[source] -= 1
        counts[empty] += 1


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    group: OneProcess | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups on ``x``'s device; under a ``group``, ``x`` is this process's
    block of the rows (:func:`~robustcl.collectives.shard_range`) and every process calls this with the same arguments.

    Stops when no label changes or the centroids move less than ``tol`` × the mean squared feature norm. A
    cluster that empties takes the point farthest from its centroid in a cluster of two or more points.
    """
    group = group or OneProcess()
    if x.dim() != 2:
        raise ValueError(f"k-means needs features [N, D], got shape {tuple(x.shape)}")
    sizes = group.all_gather(torch.tensor(len(x), device=x.device)).cpu()
    n, offset = int(sizes.sum()), int(sizes[: group.rank].sum())
    if not 1 <= k <= n:
        raise ValueError(f"cannot form {k} clusters from {n} points")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)  # on the host: the same numbers on every process and device
    centroids = kmeans_plus_plus(x, k, generator, group, offset, n)
    norms = sum((block.double().square().sum() for block in x.split(_BLOCK)), x.new_zeros((), dtype=torch.float64))
    scale = float(group.all_reduce(norms)) / n
    labels = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        new_labels = _nearest(x, centroids)
        counts = group.all_reduce(torch.bincount(new_labels, minlength=k))
        if bool((counts == 0).any()):
            _fill_empty(x, new_labels, counts, centroids, offset, group)
        sums = torch.zeros_like(centroids)
        for block, lb in zip(x.split(_BLOCK), new_labels.split(_BLOCK)):
            sums.index_add_(0, lb, block.double())
        new_centroids = group.all_reduce(sums) / counts.clamp_min(1)[:, None]
        shift = float((new_centroids - centroids).square().sum(1).max())
        changed = int(group.all_reduce((new_labels != labels).sum()))
        labels, centroids = new_labels, new_centroids
        if changed == 0 or shift <= tol * scale:
            break
    inertia = float(group.all_reduce(_assigned_distances(x, centroids, labels).sum()))
    return KMeansResult(labels=labels, centroids=centroids.float(), inertia=inertia, iterations=iterations)
