import itertools

import pytest
import torch

from robustcl.kmeans import kmeans


def _planted(k=6, per=200, dim=16, spread=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    truth = torch.arange(k).repeat_interleave(per)
    points = centres[truth] + torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return points[perm], truth[perm], centres


def _same_partition(a, b):
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def test_kmeans_recovers_planted_clusters_and_their_centres():
    points, truth, centres = _planted()
    result = kmeans(points, 6, seed=0)
    assert _same_partition(result.labels, truth)
    # Each found centroid sits next to one planted centre (distance ~ noise / sqrt(200 points)).
    d = torch.cdist(result.centroids, centres)
    assert (d.min(1).values < 0.5).all()


def test_kmeans_is_deterministic_for_a_seed_and_keeps_every_cluster_non_empty():
    points, _, _ = _planted(k=3, per=50)
    a, b = kmeans(points, 20, seed=7), kmeans(points, 20, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert torch.bincount(a.labels, minlength=20).min() >= 1


def test_kmeans_plus_plus_inertia_beats_a_bad_partition():
    points, truth, _ = _planted(k=4, per=100, spread=3.0)
    result = kmeans(points, 4, seed=1)
    shuffled = truth[torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))]
    centroids = torch.stack([points[shuffled == c].mean(0) for c in range(4)])
    bad = float((points - centroids[shuffled]).square().sum())
    assert result.inertia < 0.5 * bad


def test_kmeans_with_duplicate_points_and_k_equal_n():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    result = kmeans(points, 3, seed=0)
    assert sorted(result.labels.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot form 4 clusters"):
        kmeans(points, 4)


def test_partition_helper_can_fail():
    assert not _same_partition(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    assert all(_same_partition(torch.tensor(p), torch.tensor([2, 0, 1])) for p in itertools.permutations([0, 1, 2]))
