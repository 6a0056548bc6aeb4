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


def _supcon_loop(views, t, scale):
    """SupCon without labels, written out anchor by anchor (the definition in Khosla et al. / AdvCL's code)."""
    n, v = views[0].shape[0], len(views)
    z = F.normalize(torch.cat(views), dim=1)
    total = 0.0
    for i in range(v * n):
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(v * n) if k != i)
        positives = [k for k in range(v * n) if k != i and k % n == i % n]
        total += -scale * sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in positives) / len(positives)
    return total / (v * n)


def test_multi_positive_nt_xent_matches_anchor_by_anchor_supcon():
    from robustcl.losses import multi_positive_nt_xent

    torch.manual_seed(3)
    views = [torch.randn(4, 6) for _ in range(4)]  # AdvCL: adversarial, two augmented, high-frequency
    expected = _supcon_loop(views, 0.5, 0.5 / 0.07)
    assert torch.isclose(multi_positive_nt_xent(views, 0.5, 0.5 / 0.07), torch.tensor(expected), rtol=1e-5)


def test_multi_positive_nt_xent_with_two_views_is_nt_xent():
    from robustcl.losses import multi_positive_nt_xent

    torch.manual_seed(4)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.isclose(multi_positive_nt_xent([z1, z2], 0.2), torch.tensor(_supcon_loop([z1, z2], 0.2, 1.0)))


def test_distillation_loss_hand_computed():
    from robustcl.losses import distillation_loss

    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # cosines with the student: 1/√2 and 1
    student_adv = torch.tensor([[0.0, 1.0], [0.0, 5.0]])  # cosines with the student: 0 and 1
    expected = -(1 / math.sqrt(2) + 1) / 2 - 2.0 * (0 + 1) / 2
    assert math.isclose(float(distillation_loss(student, teacher, student_adv, 2.0)), expected, rel_tol=1e-6)


def test_contrastive_loss_computes_in_float32_at_least_and_keeps_float64():
    # bf16 features (mixed precision) are scored in float32; float64 ones in float64 (the distributed equivalence
    # tests compare float64 steps, where float32 rounding would flip ReLUs and PGD signs between 1 and 2 processes).
    from robustcl.losses import multi_positive_nt_xent

    torch.manual_seed(5)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    assert multi_positive_nt_xent([z1, z2], 0.5).dtype == torch.float64
    assert multi_positive_nt_xent([z1.bfloat16(), z2.bfloat16()], 0.5).dtype == torch.float32
    exact = _supcon_loop([z1, z2], 0.5, 1.0)
    assert abs(multi_positive_nt_xent([z1, z2], 0.5).item() - exact) < 1e-12
