"""ACL-AIR and DynACL-AIR (robustcl/methods/air.py): what AIR adds to ACL and DynACL and nothing else, the
regularisers' mathematics, and the options' rules. The step against the authors' code: test_parity_air.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import user_error

from robustcl.data.images import DecodedImages
from robustcl.methods import build_method
from robustcl.methods.air import invariance_regularisers
from robustcl.recipe import load_recipe
from robustcl.setup_context import SetupContext

SMALL = ["model.widths=[8,16,32,64]", "model.block_layers=[1,1,1,1]", "data.resolution=16", "attack.steps=2"]
OFF = ["method.air.lambda1=0", "method.air.lambda2=0"]


def _images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _built(recipe, *sets, steps_per_epoch=1, total_steps=4):
    method = build_method(load_recipe(f"recipes/{recipe}.yaml", [*SMALL, *sets])).train()
    method.setup(SetupContext(None, DecodedImages(_images()), steps_per_epoch, total_steps))
    return method


def _step(method, step=0):
    """Loss, gradients and state (BN statistics included) after one forward and backward."""
    method.zero_grad()
    loss, metrics = method(_images(), torch.Generator().manual_seed(1), torch.arange(8), step)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v.clone() for k, v in method.state_dict().items()}, metrics


def _assert_equal_steps(ours, theirs, factor=1.0):
    assert torch.equal(ours[0], factor * theirs[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 20
    assert all(torch.equal(ours[1][k], factor * theirs[1][k]) for k in ours[1])
    assert ours[2].keys() == theirs[2].keys()
    assert all(torch.equal(ours[2][k], theirs[2][k]) for k in ours[2])


def test_acl_air_without_its_regularisers_is_acls_step_exactly():
    """λ1 = λ2 = 0 and the ½-average: ACL-DS's loss, gradients and BN statistics, bit for bit (no pass of the
    original images). With AIR.py's sum of the two NT-Xent: exactly twice the loss and gradients."""
    torch.manual_seed(0)
    air = _built("acl_air", *OFF, "method.air.contrastive_sum=false")
    acl = _built("acl")
    acl.load_state_dict(air.state_dict())
    start = {k: v.clone() for k, v in air.state_dict().items()}
    theirs = _step(acl)
    ours = _step(air)
    _assert_equal_steps(ours, theirs)
    assert "sir" not in ours[3]
    doubled = _built("acl_air", *OFF)
    doubled.load_state_dict(start)
    _assert_equal_steps(_step(doubled), theirs, factor=2.0)


def test_dynacl_air_without_its_regularisers_is_dynacls_one_encoder_step_where_their_weights_agree():
    """λ1 = λ2 = 0, ½-average, DynACL without its moving average (AIR's script has none), same crops: at step 2 of
    4 (stages of 2 epochs) both weigh the adversarial loss 1 + ⅔·½, and the steps are equal bit for bit. At step 1
    DynACL's code already weighs the next epoch's stage, AIR's the current one."""
    torch.manual_seed(0)
    stages = ["method.dynacl.reload_every_epochs=2"]
    air = _built("dynacl_air", *OFF, *stages, "method.air.contrastive_sum=false")
    dyn = _built("dynacl", *stages, "method.dynacl.momentum=null", "augment.interpolation=bicubic")
    dyn.load_state_dict(air.state_dict())
    assert air.adversarial_weight(2) == dyn.adversarial_weight(2) == 1 + 2 / 3 * 0.5 and air.strength(2) == 0.5
    _assert_equal_steps(_step(air, step=2), _step(dyn, step=2))
    assert air.adversarial_weight(1) == 1.0 and dyn.adversarial_weight(1) > 1.3


def _features(seed: int, n: int = 8, d: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(5)]


def _regularisers(zi, zj, zo, ai, aj, kl_input="log_probabilities"):
    return invariance_regularisers((zi, zj), zo, (ai, aj), 0.5, kl_input)


def _log_softmax_of_own_similarities(a, b):
    return (F.cosine_similarity(a, b, dim=1) / 0.5).log_softmax(0)


@pytest.mark.parametrize("seed", range(5))
def test_with_log_probabilities_sir_is_the_kl_divergence_of_the_views_rankings_of_their_originals(seed):
    """SIR = KL(p_j ‖ p_i), p_v = softmax over the batch of each image's view-v similarity to its original: ≥ 0,
    and, like AIR, 0 when the two views (and the two adversarial views) coincide."""
    zi, zj, zo, ai, aj = _features(seed)
    sir, air = _regularisers(zi, zj, zo, ai, aj)
    log_pi, log_pj = _log_softmax_of_own_similarities(zi, zo), _log_softmax_of_own_similarities(zj, zo)
    assert sir > 0 and math.isclose(float(sir), float((log_pj.exp() * (log_pj - log_pi)).sum()), rel_tol=1e-12)
    assert math.isclose(float(sir), float(F.kl_div(log_pi, log_pj, log_target=True, reduction="sum")), rel_tol=1e-12)
    log_product_i = _log_softmax_of_own_similarities(ai, zo) + _log_softmax_of_own_similarities(ai, zi)
    log_product_j = _log_softmax_of_own_similarities(aj, zo) + _log_softmax_of_own_similarities(aj, zj)
    expected_air = (log_product_j.exp() * (log_product_j - log_product_i)).sum()
    assert math.isclose(float(air), float(expected_air), rel_tol=1e-12)
    same = _regularisers(zi, zi, zo, ai, ai)
    assert abs(float(same[0])) < 1e-15 and abs(float(same[1])) < 1e-15


def test_the_authors_kl_call_is_not_a_divergence():
    """AIR.py's F.kl_div on probabilities (the default, kl_input: probabilities): Σ q·(log q − p), which is not 0
    for coinciding views but −H(q) − Σ q² < 0."""
    zi, _, zo, ai, _ = _features(0)
    sir, air = _regularisers(zi, zi, zo, ai, ai, kl_input="probabilities")
    q = _log_softmax_of_own_similarities(zi, zo).exp()
    assert sir < 0 and math.isclose(float(sir), float((q * q.log()).sum() - (q * q).sum()), rel_tol=1e-12)
    assert air < 0


def test_the_regularisers_read_directions_and_the_batch_as_a_set():
    """Cosine similarities (feature scale does not matter) and distributions over the batch's images (the order
    of the rows does not matter: a batch gathered from several processes is one in another order)."""
    zi, zj, zo, ai, aj = _features(1)
    base = _regularisers(zi, zj, zo, ai, aj, kl_input="probabilities")
    scaled = _regularisers(3 * zi, 0.5 * zj, 2 * zo, 7 * ai, aj, kl_input="probabilities")
    order = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    permuted = _regularisers(*(z[order] for z in (zi, zj, zo, ai, aj)), kl_input="probabilities")
    for other in (scaled, permuted):
        assert all(math.isclose(float(a), float(b), rel_tol=1e-12) for a, b in zip(base, other))
    # Each image is scored against its own original only: pairing a view with another image's original changes it.
    moved = _regularisers(zi, zj, zo.roll(1, 0), ai, aj, kl_input="probabilities")
    assert abs(float(moved[0] - base[0])) > 1e-3


def test_the_options_refuse_what_air_does_not_train():
    message = user_error(load_recipe, "recipes/dynacl_air.yaml", ["method.dynacl.momentum=0.99"])
    assert "method.dynacl.momentum must be null with method.name dynacl_air" in message
    for recipe in ("acl_air", "dynacl_air"):
        message = user_error(load_recipe, f"recipes/{recipe}.yaml", ["method.acl.variant=a2a"])
        assert f"method.acl.variant must be 'ds' with method.name {recipe}" in message
    message = user_error(load_recipe, "recipes/acl_air.yaml", ["method.air.lambda1=-1"])
    assert "method.air.lambda1" in message


@pytest.mark.parametrize("recipe, display", [("acl_air", "ACL-AIR"), ("dynacl_air", "DynACL-AIR")])
def test_the_recipe_pretrains_and_exports_with_a_card_naming_the_air_paper(tmp_path, monkeypatch, recipe, display):
    """2 steps of the shipped recipe on the embedded digits (in process), then `robustcl export`: the model card
    names the method and the AIR paper, and the run logged both regularisers."""
    import json
    import sys

    from helpers import TINY, call_main, with_sets

    monkeypatch.setattr(sys, "argv", sys.argv)
    run, out = tmp_path / "run", tmp_path / "export"
    sets = with_sets(*TINY, "data.path=builtin:digits", "training.max_steps=2", "eval.after_pretrain=false")
    assert call_main(["pretrain", f"recipes/{recipe}.yaml", "-o", str(run), *sets]) == 0
    assert call_main(["export", str(run), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"**Method:** {display} — [" in card
    assert "Adversarial Invariant Regularization" in card and "https://arxiv.org/abs/2305.00374" in card
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any({"sir", "air"} <= set(m) for m in metrics), metrics[:2]
