import math

import pytest
import torch
from torch import nn

from robustcl.optim import LARS, build_optimizer, build_scheduler, lr_factor
from robustcl.recipe import OptimizerConfig, ScheduleConfig


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


def _solo_learn_lars_step(params, grads, bufs, lr, momentum, wd, eta, eps, clip, exclude):
    """One step of solo-learn's LARS (vturrisi/solo-learn solo/utils/lars.py; the LARSWrapper over torch SGD of the
    December 2021 tree that trained DeACL's teacher computes the same), written out per tensor:
    a 1-D tensor under exclude_bias_n_norm, or one whose weight or gradient norm is 0, steps by lr·g (no trust ratio,
    no weight decay); any other: trust = η‖w‖ / (‖g‖ + wd‖w‖ + eps), clipped to min(trust / lr, 1) with clip_lr,
    d = trust·(g + wd·w). Momentum as torch SGD: buf = d on the first step, then momentum·buf + d; w −= lr·buf."""
    out = []
    for p, g, buf in zip(params, grads, bufs):
        d = g
        if not (exclude and p.ndim == 1):
            w_norm, g_norm = float(p.norm()), float(g.norm())
            if w_norm != 0 and g_norm != 0:
                trust = eta * w_norm / (g_norm + w_norm * wd + eps)
                if clip:
                    trust = min(trust / lr, 1.0)
                d = (g + wd * p) * trust
        buf = d.clone() if buf is None else buf * momentum + d
        out.append((p - lr * buf, buf))
    return out


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_options_follow_solo_learn_formula(exclude, clip):
    """optimizer.exclude_bias_and_norm, clip_lr, trust_eps and lr_outside_momentum give solo-learn's LARS update,
    per tensor, ≤ 1e-6, also when the scheduler changes lr between steps."""
    model = _bn_model()
    wd, eta, eps = 1e-3, 0.02, 1e-8
    cfg = OptimizerConfig(
        name="lars",
        lr=0.4,
        weight_decay=wd,
        momentum=0.9,
        trust_coefficient=eta,
        trust_eps=eps,
        exclude_bias_and_norm=exclude,
        clip_lr=clip,
        lr_outside_momentum=True,
    )
    opt = build_optimizer(model.parameters(), cfg, 0.4)
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(params)
    clipped = set()
    # A tiny gradient first: its trust ratio exceeds lr, so clip_lr binds somewhere; then a new lr, as a schedule sets.
    for scale, lr in ((1e-3, 0.4), (1.0, 0.1)):
        opt.param_groups[0]["lr"] = lr
        model.zero_grad()
        (model(torch.randn(8, 4)).square().sum() * scale).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for p, g in zip(params, grads):
            trust = eta * float(p.norm()) / (float(g.norm()) + wd * float(p.norm()) + eps)
            clipped.add(trust > lr)
        ref = _solo_learn_lars_step(params, grads, bufs, lr, 0.9, wd, eta, eps, clip, exclude)
        opt.step()
        params, bufs = [r[0] for r in ref], [r[1] for r in ref]
        for p, expected in zip(model.parameters(), params):
            assert torch.allclose(p, expected, atol=1e-6, rtol=0), (p - expected).abs().max()
    assert clipped == {True, False}  # both sides of min(trust / lr, 1) were exercised


def test_lars_keeps_acls_momentum_by_default_when_lr_changes():
    # ACL's buffer holds lr·trust·(g + wd·w): an lr change scales only the new step, not the buffer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = build_optimizer(model.parameters(), OptimizerConfig(weight_decay=1e-6), 5.0)
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    for lr in (5.0, 1.0):
        opt.param_groups[0]["lr"] = lr
        model.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        ref = _reference_lars_step(params, [p.grad.clone() for p in model.parameters()], bufs, lr, 0.9, 1e-6, 1e-3)
        opt.step()
        params, bufs = [r[0] for r in ref], [r[1] for r in ref]
        for p, expected in zip(model.parameters(), params):
            assert torch.allclose(p, expected, atol=1e-7)


def test_lars_exclusion_means_no_trust_ratio_and_no_weight_decay_for_biases_and_norms():
    model = _bn_model()
    cfg = OptimizerConfig(name="lars", lr=0.4, weight_decay=0.5, momentum=0.9, exclude_bias_and_norm=True)
    opt = build_optimizer(model.parameters(), cfg, 0.4)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    for p, old in zip(model.parameters(), before):
        plain = old - 0.4 * p.grad
        assert torch.allclose(p, plain, atol=1e-7) == (p.ndim == 1)


def test_lars_defaults_are_acls_lars():
    cfg = OptimizerConfig()
    keys = ("exclude_bias_and_norm", "clip_lr", "trust_eps", "lr_outside_momentum")
    assert [getattr(cfg, k) for k in keys] == [False, False, 0.0, False]
    opt = build_optimizer([nn.Parameter(torch.ones(3))], cfg, 1.0)
    assert [opt.param_groups[0][k] for k in keys] == [False, False, 0.0, False]


def test_an_optimizer_state_saved_before_the_lars_options_still_loads_and_steps():
    # Checkpoints written before trust_eps / exclude_bias_and_norm / clip_lr existed lack them in their param groups;
    # resuming such a run takes the recipe's values (here: the defaults, ACL's LARS).
    model = _bn_model()
    old = build_optimizer(model.parameters(), OptimizerConfig(), 1.0)
    state = old.state_dict()
    for group in state["param_groups"]:
        for key in ("trust_eps", "exclude_bias_and_norm", "clip_lr", "lr_outside_momentum"):
            del group[key]
    new = build_optimizer(model.parameters(), OptimizerConfig(), 1.0)
    new.load_state_dict(state)
    model(torch.randn(8, 4)).square().sum().backward()
    new.step()
    assert new.param_groups[0]["clip_lr"] is False


# The learning-rate schedules of the references, written out from their code (peak lr 1 unless given).
def _dynacl_lr(epoch, epochs, warmup, peak, min_lr):
    """PKU-ML/DYNACL train_DynACL.py: LambdaLR(utils.cosine_annealing(k, epochs, 1, 1e-6/lr, warmup_steps=10)),
    scheduler.step() once at the end of every epoch, so epoch e (0-based) trains at k = e."""
    if epoch < warmup:
        return peak * (epoch + 1) / warmup
    floor = min_lr / peak
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos((epoch - warmup) / (epochs - warmup) * math.pi)))


def _deacl_lr(epoch, epochs, warmup, peak, start, eta_min):
    """pantheon5100/DeACL (solo-learn): pl_bolts LinearWarmupCosineAnnealingLR(warmup_epochs, max_epochs,
    warmup_start_lr, eta_min) returned from configure_optimizers without an interval: Lightning steps it per epoch."""
    if epoch < warmup:
        return start + epoch * (peak - start) / (warmup - 1)
    return eta_min + 0.5 * (peak - eta_min) * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def _acl_lr(step, total, warmup, peak, min_lr):
    """VITA-Group/Adversarial-Contrastive-Learning train_simCLR.py: LambdaLR(cosine_annealing(k, epochs·N, 1,
    1e-6/lr, warmup_steps=10·N)) with scheduler.step() before each update, so optimizer step i trains at k = i + 1."""
    k = step + 1
    if k < warmup:
        return peak * k / warmup
    floor = min_lr / peak
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos((k - warmup) / (total - warmup) * math.pi)))


def _lrs(cfg, total_steps, steps_per_epoch, peak, resume_at=None):
    """The lr of every optimizer step as training sees it; with ``resume_at``, a new scheduler takes over from the
    first one's saved state there, as a resumed run does."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(opt, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, peak_lr=peak)
    out = []
    for step in range(total_steps):
        if step == resume_at:  # as train.py resumes: a new optimizer and scheduler, both states loaded
            states = opt.state_dict(), scheduler.state_dict()
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
            scheduler = build_scheduler(opt, cfg, total_steps, steps_per_epoch, peak)
            opt.load_state_dict(states[0])
            scheduler.load_state_dict(states[1])
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_schedule_units_follow_the_references_step_by_step():
    """unit epoch holds the lr for a whole epoch and changes it at epoch boundaries exactly as DynACL's and DeACL's
    per-epoch schedulers; unit step (ACL) keeps the per-step schedule. Resuming mid-epoch gives the same lrs."""
    spe, epochs, peak = 4, 8, 5.0
    total = spe * epochs
    dyn = ScheduleConfig(name="cosine", warmup_epochs=3, min_lr=1e-6, unit="epoch")
    expected = [_dynacl_lr(s // spe, epochs, 3, peak, 1e-6) for s in range(total)]
    assert _lrs(dyn, total, spe, peak) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert _lrs(dyn, total, spe, peak, resume_at=13) == _lrs(dyn, total, spe, peak)
    assert len(set(_lrs(dyn, total, spe, peak)[4:8])) == 1  # constant inside an epoch

    deacl = ScheduleConfig(name="cosine", warmup_epochs=3, min_lr=0.0, warmup_start_lr=0.003, unit="epoch")
    expected = [_deacl_lr(s // spe, epochs, 3, 0.5, 0.003, 0.0) for s in range(total)]
    assert _lrs(deacl, total, spe, 0.5) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert _lrs(deacl, total, spe, 0.5)[0] == pytest.approx(0.003)  # DeACL's first epoch, not 0.5 / 3

    per_step = ScheduleConfig(name="cosine", warmup_epochs=3, min_lr=1e-6, unit="step")
    lrs = _lrs(per_step, total, spe, peak)
    assert lrs == pytest.approx([_dynacl_lr(s, total, 3 * spe, peak, 1e-6) for s in range(total)], rel=1e-12)
    # ACL's per-step schedule: the same warm-up; its cosine runs one step ahead (its scheduler steps before the
    # update), at most π/(2·(T − W)) of the peak away: 1.6e-5 of it for the CIFAR-10 recipe, left as is.
    acl = [_acl_lr(s, total, 3 * spe, peak, 1e-6) for s in range(total)]
    assert lrs[: 3 * spe] == pytest.approx(acl[: 3 * spe], rel=1e-12)
    assert max(abs(a - b) for a, b in zip(lrs, acl)) <= peak * math.pi / (2 * (total - 3 * spe))
    assert ScheduleConfig().unit == "step"


def test_epoch_schedule_needs_whole_warmup_epochs():
    from robustcl.errors import UserError
    from robustcl.recipe import load_recipe

    with pytest.raises(UserError) as info:
        load_recipe("recipes/quickstart.yaml", ["schedule.unit=epoch", "schedule.warmup_epochs=2.5"])
    message = str(info.value)
    assert "whole number of epochs" in message and "schedule.warmup_epochs" in message and "\n" not in message
