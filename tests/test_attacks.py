import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcl.attacks import module_mode, pgd_attack
from robustcl.data.batches import batch_random
from robustcl.losses import nt_xent


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )


def test_pgd_increases_the_loss_and_respects_eps_and_pixel_range():
    model = _classifier().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g)
    x[:4] = 0.0  # pixels at the border of [0, 1] must stay inside it
    x[4:8] = 1.0
    y = torch.randint(0, 4, (32,), generator=g)
    eps = 8 / 255

    def loss_fn(z):
        return F.cross_entropy(model(z), y)

    x_adv = pgd_attack(loss_fn, x, epsilon=eps, step_size=2 / 255, steps=10, random=g)
    with torch.no_grad():
        noise = (x + eps * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
        gain_adv, gain_noise = loss_fn(x_adv) - loss_fn(x), (loss_fn(noise) - loss_fn(x)).abs()
        assert gain_adv > 0.02 and gain_adv > 5 * gain_noise
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_leaves_parameter_grads_untouched_and_is_seeded():
    model = _classifier().eval()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])

    def run(seed):
        return pgd_attack(
            lambda z: F.cross_entropy(model(z), y),
            x,
            epsilon=0.03,
            step_size=0.01,
            steps=3,
            random=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_steps_without_random_start_is_identity():
    x = torch.rand(2, 3, 4, 4)
    out = pgd_attack(lambda z: z.sum(), x, epsilon=0.1, step_size=0.1, steps=0, random_start=False)
    assert torch.equal(out, x)


def test_module_mode_restores_each_submodule_flag():
    model = _classifier().train()
    model[1].eval()
    with module_mode(model, train=False):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


# ------------------------------------------------------------------------------------------------
# pgd_attack against a textbook PGD


def _reference_pgd(loss_fn, x, noise, eps, alpha, steps, clamp_start=True):
    """Madry et al.'s PGD as usually written: x_adv itself is the leaf, the loss goes through ``.backward()``
    (filling the model's ``.grad`` fields too), and each step is projected onto the ε-box around x and [0, 1].
    Without ``clamp_start``, ACL's ``PGD_contrastive`` (VITA-Group/Adversarial-Contrastive-Learning, utils.py):
    x + uniform(−ε, ε) is attacked as it is, outside [0, 1] where x is at the border."""
    x_adv = x + (noise * 2 - 1) * eps
    if clamp_start:
        x_adv = x_adv.clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_()
        loss = loss_fn(x_adv)
        loss.backward()
        x_adv = x_adv + alpha * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16)
    )


@pytest.mark.parametrize("clamp_start", [True, False])
@pytest.mark.parametrize("source", ["generator", "batch_random"])
@pytest.mark.parametrize("loss", ["cross_entropy", "nt_xent"])
def test_pgd_matches_textbook_reference(loss, source, clamp_start):
    eps, alpha, steps, n = 8 / 255, 2 / 255, 5, 16
    data = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, 8, 8, generator=data, dtype=torch.float32)
    x[:2] = 0.0  # pixels on the border of [0, 1], where the two projections could disagree
    x[2:4] = 1.0
    if loss == "cross_entropy":
        model = _classifier().eval()  # BatchNorm uses its running statistics
        y = torch.randint(0, 4, (n,), generator=data)

        def make_loss(m):
            return lambda z: F.cross_entropy(m(z), y)
    else:
        model = _encoder().train()  # BatchNorm couples the batch, as in ACL's 'train' BN mode

        def make_loss(m):
            def pair_loss(z):  # ACL.pair_loss: NT-Xent of the stacked pair [view1; view2]
                z1, z2 = m(z).chunk(2)
                return nt_xent(z1, z2, 0.5)

            return pair_loss

    reference_model = copy.deepcopy(model)  # the textbook version fills .grad fields; keep them off `model`

    if source == "generator":

        def random():
            return torch.Generator().manual_seed(1234)

        noise = torch.rand(x.shape, generator=random())
    else:

        def random():  # this process's half of a two-process global micro-batch of n // 2 image pairs
            return batch_random(7, 3, 1, torch.device("cpu"), n // 2, process_index=1, num_processes=2)

        noise = random().rand(tuple(x.shape))

    ours = pgd_attack(
        make_loss(model), x, epsilon=eps, step_size=alpha, steps=steps, random=random(), clamp_start=clamp_start
    )
    want = _reference_pgd(make_loss(reference_model), x, noise, eps, alpha, steps, clamp_start)

    assert ours.dtype == want.dtype == torch.float32
    # both compute x + δ in a different association order ((x + δ) + α·s vs x + (δ + α·s)), so equal up to
    # a few float32 ulps of values ≤ 1; a flipped gradient sign or another start would differ by ≥ 1/255
    assert (ours - want).abs().max().item() <= 1e-6
    # the attack moved from its random start and pushed pixels to the ε-boundary
    start = (x + (noise * 2 - 1) * eps).clamp(0, 1)
    assert (ours - start).abs().max() > alpha / 2
    assert ((ours - x).abs() > eps - 1e-6).float().mean() > 0.2
    assert all(p.grad is None for p in model.parameters())
