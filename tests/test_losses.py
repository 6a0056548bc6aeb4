import math

import torch
import torch.nn.functional as F

from robustcl.losses import nt_xent


def test_nt_xent_matches_hand_computed_value():
    # Two images, orthogonal unit features: view 1 = [e1, e2], view 2 = [e1, e2]  (positives identical).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scale must not matter (cosine similarity)
    t = 0.5
    # For every anchor: positive similarity 1, the two negatives similarity 0; self excluded.
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert torch.isclose(nt_xent(z1, z2, t), torch.tensor(expected), atol=1e-6)


def test_nt_xent_against_independent_loop_implementation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    t = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = 5
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    assert torch.isclose(nt_xent(z1, z2, t), torch.tensor(total / (2 * n)), atol=1e-5)


def test_nt_xent_invariant_to_batch_order():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    perm = torch.randperm(8)
    assert torch.isclose(nt_xent(z1, z2), nt_xent(z1[perm], z2[perm]), atol=1e-6)
    # Swapping the two views is also a relabelling of anchors.
    assert torch.isclose(nt_xent(z1, z2), nt_xent(z2, z1), atol=1e-6)


def test_nt_xent_is_lower_for_aligned_views():
    torch.manual_seed(2)
    z = torch.randn(16, 32)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z)) < nt_xent(z, torch.randn_like(z))
