"""The speed machinery changes no result: data placement, attack precision, channels_last, the step profiler the
throughput benchmark reports from, and the benchmark script itself."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_env

from robustcl.data.batches import EpochBatches, batch_random
from robustcl.data.images import DecodedImages
from robustcl.data.placement import DeviceImages, HostImages, choose_placement, image_feed
from robustcl.methods import build_method
from robustcl.recipe import TrainingConfig, load_recipe
from robustcl.step_profile import count_flops, record_model_passes, replay_passes, step_networks
from robustcl.train import apply_speed_settings, open_session, train_step

CPU = torch.device("cpu")
SMALL = [
    "model.widths=[8,8,8,8]",
    "data.resolution=12",
    "training.batch_size=16",
    "attack.steps=2",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]


def _recipe(*sets: str):
    return load_recipe(REPO / "recipes" / "quickstart.yaml", [*SMALL, *sets])


def test_streamed_batches_equal_device_batches_in_order_and_after_a_jump() -> None:
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    batches = EpochBatches(50, 8, seed=3, grad_accum=2)
    device_feed = DeviceImages(images, batches, CPU)
    streamed = HostImages(images, batches, CPU)
    # Training order, a jump (resume at another step), then training order again; crosses epoch boundaries.
    order = [(s, m) for s in range(4) for m in range(2)] + [(11, 1), (12, 0), (12, 1), (13, 0)]
    try:
        for step, micro in order:
            want_images, want_indices = device_feed.batch(step, micro)
            got_images, got_indices = streamed.batch(step, micro)
            assert torch.equal(got_indices, want_indices) and torch.equal(got_images, want_images)
            assert torch.equal(got_images, images[batches.indices(step, micro)])
        assert streamed.pending is not None and streamed.pending[0] == (13, 1)  # the next one is on its way
    finally:
        streamed.close()
    assert streamed.worker._shutdown


def test_placement_auto_keeps_the_data_on_a_cpu_device_and_honours_explicit_choices() -> None:
    assert choose_placement("auto", 10**12, CPU) == "device"  # host memory is the CPU's device memory
    assert choose_placement("host", 1, CPU) == "host"
    assert choose_placement("device", 10**12, CPU) == "device"
    batches = EpochBatches(10, 2, 0, 1, 0, 1)
    images = DecodedImages(torch.zeros(10, 3, 2, 2, dtype=torch.uint8))
    assert isinstance(image_feed(images, batches, CPU, "host", workers=0, total_steps=5), HostImages)


@pytest.mark.parametrize("name", ["acl", "dynacl"])
def test_replayed_model_passes_carry_the_steps_model_flops(tmp_path: Path, name: str) -> None:
    """The overhead factor's denominator is the step's model passes replayed alone: they must be all of them, each
    with the backward it really had (the attack's input-only, training's full), so their FLOPs equal the step's.
    DynACL adds a frozen momentum network (input-only backward in the attack, none in training)."""
    session = open_session(_recipe(f"method.name={name}"), tmp_path / "run", resume=False)
    session.model.train()
    train_step(session, 0)
    networks = step_networks(session.method)
    with record_model_passes(networks, CPU) as calls:
        step_flops = count_flops(lambda: train_step(session, 1))
    passes = [c.freeze() for c in calls]
    replay_flops = count_flops(lambda: replay_passes(networks, passes, CPU))
    kinds = [p.backward for p in passes]
    # ACL-DS, PGD-2: 2 attack steps × (encoder, projector) + clean and adversarial pair × (encoder, projector).
    assert kinds.count("input") >= 4 and kinds.count("full") == 4
    # The step also multiplies the losses' similarity matrices and the crops' resampling weights: a little more.
    assert step_flops * 0.97 < replay_flops <= step_flops
    session.close()


def test_attack_precision_fp32_ignores_mixed_precision_and_bf16_keeps_the_perturbation_fp32() -> None:
    def attack(precision: str, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        recipe = _recipe(f"attack.precision={precision}", "attack.steps=3")
        torch.manual_seed(0)
        method = build_method(recipe)
        images = torch.rand(8, 3, 12, 12)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            views = method.views(images, batch_random(0, 0, 0, CPU, 8), 0)
            adv = method.attack(lambda x: method.pair_loss(x, "pgd"), views, batch_random(0, 0, 1, CPU, 8))
        return views, adv

    views, plain = attack("auto", autocast=False)
    autocast_views, fp32 = attack("fp32", autocast=True)
    assert torch.equal(autocast_views, views)  # views are pixels: made in fp32 under autocast too
    assert torch.equal(fp32, plain)  # the step's autocast is off inside the attack
    (_, inherited), (_, forced) = attack("auto", autocast=True), attack("bf16", autocast=False)
    assert inherited.dtype == forced.dtype == torch.float32  # the perturbation stays fp32
    assert torch.equal(inherited, forced)  # bf16 passes either way
    assert not torch.equal(forced, plain)
    assert (forced - views).abs().max() <= 8 / 255 + 1e-6
    # Rounding changes some gradient signs, not the attack: most pixels move the same way.
    same = torch.sign(forced - views) == torch.sign(plain - views)
    assert same.float().mean() > 0.7


def test_channels_last_keeps_names_and_the_step_within_rounding() -> None:
    recipe = _recipe("attack.steps=1")
    torch.manual_seed(0)
    method = build_method(recipe)
    fast = copy.deepcopy(method)
    done = apply_speed_settings(fast, TrainingConfig(channels_last=True, compile=False), CPU)
    assert done == "channels_last"
    assert fast.encoder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(method.state_dict())
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    results = []
    for m in (method, fast):
        loss, _ = m(images, batch_random(0, 0, 0, CPU, 8), torch.arange(8), 0)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in m.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    # Relative to the largest gradient: a bias before a BN has a true gradient of 0 and only rounding noise.
    scale = max(g.abs().max().item() for g in grads_a.values())
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).abs().max() <= 1e-5 * scale, name
    assert apply_speed_settings(build_method(recipe), TrainingConfig(), CPU) == ""  # CPU defaults: both off


def test_throughput_script_prints_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    sets = [arg for s in SMALL for arg in ("--set", s)]
    cmd = [sys.executable, "benchmarks/throughput.py", "recipes/quickstart.yaml", *sets]
    res = subprocess.run(
        [*cmd, "--steps", "2", "--warmup", "1", "--phase-steps", "1", "--out", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("images/s", "MFU", "peak memory", "overhead factor", "augmentation"):
        assert label in res.stdout
    r = json.loads(out.read_text())
    positive = ["ms_per_step", "images_per_s", "step_gflop", "mfu", "peak_memory_mib", "passes_alone_ms"]
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in positive)
    assert r["images_per_s"] == pytest.approx(16 / (r["ms_per_step"] / 1e3))
    # ACL-DS with PGD-2: 2 × (forward + input backward) of 2 views + 4 views forward and backward ≈ 20 forwards.
    assert 16 < r["forward_equivalents_per_image"] < 24
    assert 0.5 < r["overhead_factor"] < 5 and 0 < r["augmentation_share"] < 1 and 0 < r["attack_share"] < 1
    res = subprocess.run(
        [*cmd, "--set", "training.batchsize=8"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "training.batchsize" in res.stderr and "Traceback" not in res.stderr
