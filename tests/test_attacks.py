import torch
import torch.nn.functional as F
from torch import nn

from robustcl.attacks import module_mode, pgd_attack


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

    x_adv = pgd_attack(loss_fn, x, epsilon=eps, step_size=2 / 255, steps=10, generator=g)
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
            generator=torch.Generator().manual_seed(seed),
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
