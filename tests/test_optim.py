import torch
from torch import nn

from robustcl.optim import LARS, build_scheduler, lr_factor
from robustcl.recipe import ScheduleConfig


def _reference_lars_step(params, grads, bufs, lr, momentum, wd, eta):
    """ACL's LARS update, written out per tensor."""
    out = []
    for p, g, buf in zip(params, grads, bufs):
        w_norm, g_norm = p.norm(), g.norm()
        local = eta * w_norm / (g_norm + wd * w_norm)
        if w_norm < 1e-15 or g_norm < 1e-15:
            local = torch.tensor(1.0)
        buf = buf * momentum + local * lr * (g + wd * p)
        out.append((p - buf, buf))
    return out


def test_lars_matches_reference_update_over_two_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = LARS(model.parameters(), lr=5.0, momentum=0.9, weight_decay=1e-6, trust_coefficient=1e-3)
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        ref = _reference_lars_step(params, grads, bufs, 5.0, 0.9, 1e-6, 1e-3)
        opt.step()
        params, bufs = [r[0] for r in ref], [r[1] for r in ref]
        for p, expected in zip(model.parameters(), params):
            assert torch.allclose(p, expected, atol=1e-7)


def test_cosine_schedule_with_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.0)
    assert lr_factor(0, 100, 10, cfg, 1.0) == 0.1
    assert lr_factor(9, 100, 10, cfg, 1.0) == 1.0
    assert abs(lr_factor(10, 100, 10, cfg, 1.0) - 1.0) < 1e-9
    assert abs(lr_factor(55, 100, 10, cfg, 1.0) - 0.5) < 1e-9
    assert lr_factor(100, 100, 10, cfg, 1.0) < 1e-9
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    build_scheduler(opt, cfg, total_steps=100, steps_per_epoch=5, peak_lr=2.0)
    assert abs(opt.param_groups[0]["lr"] - 0.2) < 1e-9  # step 0 of a 10-step warm-up
