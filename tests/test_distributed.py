"""Data-parallel training computes what one process computes: two gloo processes × B/2 images against one
process × B images, through the real training step and the real trainer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import BIN, REPO, cli_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEP_SCRIPT = REPO / "tests" / "scripts" / "one_training_step.py"
# The quickstart's ACL-DS (dual BN, 3-layer projector with BN, LARS) at a tiny width. The attack has 0 steps in
# the compared step: PGD maximises each process's own contrastive loss (no communication), so adversarial views
# of a split batch are not those of the whole batch; its random start is the same for an image on any process.
TINY_ACL = [
    "model.widths=[8,16,16,16]",
    "training.batch_size=32",
    "attack.steps=0",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
]
GLOO_2 = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]  # fmt: skip


def _one_step(tmp_path, processes: int) -> tuple[dict, dict]:
    out = tmp_path / f"step-{processes}.safetensors"
    args = [str(STEP_SCRIPT), "recipes/quickstart.yaml", str(out), str(tmp_path / f"run-{processes}"), *TINY_ACL]
    if processes == 1:
        cmd, env = [sys.executable, *args], cli_env()
    else:
        cmd, env = [str(BIN / "accelerate"), "launch", *GLOO_2, *args], cli_env(ACCELERATE_USE_CPU="true")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return load_file(out), json.loads(out.with_suffix(".json").read_text())


def test_two_processes_compute_the_loss_and_gradients_of_one(tmp_path):
    one, _ = _one_step(tmp_path, 1)
    two, calls = _one_step(tmp_path, 2)
    assert calls["processes"] == 2
    assert one.keys() == two.keys() and sum(k.startswith("grad.encoder.") for k in one) > 20
    assert abs(one["loss"].item() - two["loss"].item()) < 1e-5
    # Equal to 1e-5 relative to each tensor's norm (float32 rounding: a split batch sums in another order; the
    # largest error here, the first conv's, is ~7e-6), and not trivially zero. fc1's bias feeds a BN: its gradient
    # is zero up to rounding.
    for name, tensor in one.items():
        if name == "grad.projector.fc1.bias":
            assert tensor.abs().max() < 1e-5 and two[name].abs().max() < 1e-5
            continue
        assert tensor.norm() > 1e-4, name
        assert (two[name] - tensor).norm() <= 1e-5 * tensor.norm(), name
    # SyncBN: the running statistics of both BN sets are those of the whole batch.
    assert sum(k.startswith("buffer.") and "running_var" in k for k in one) > 20
    # The second step ran a 2-step PGD: its input gradients made no gradient all-reduce; the backward made them.
    assert calls["inside_attack"] == 0 and calls["outside_attack"] > 0


def _pretrain(run_dir, processes: int, *sets: str) -> subprocess.CompletedProcess:
    args = ["pretrain", "recipes/quickstart.yaml", "-o", str(run_dir)]
    for s in (*TINY_ACL, "training.max_steps=3", "training.checkpoint_every=0", *sets):
        args += ["--set", s]
    if processes > 1:
        args = ["launch", "--cpu", "--gpus", str(processes), "--", *args]
    return subprocess.run([str(BIN / "robustcl"), *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.parametrize("loading", ["decoded", "streamed"])
def test_a_two_process_run_ends_with_the_weights_of_a_one_process_run(tmp_path, loading):
    # The one-process run decodes its data once; the two processes stream theirs (or decode it too): same weights.
    one = _pretrain(tmp_path / "one", 1, "data.loading=decoded")
    two = _pretrain(tmp_path / "two", 2, f"data.loading={loading}", "data.workers=1")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) × 16 images × 1 accumulation step(s)" in two.stdout and "SyncBN on" in two.stdout
    final = "checkpoints/step-00000003/model.safetensors"
    a, b = load_file(tmp_path / "one" / final), load_file(tmp_path / "two" / final)
    assert a.keys() == b.keys() and any("running_var" in k for k in a)
    # Parameters and BN statistics after 3 LARS steps, to 2e-5 relative (measured: ≤ 1.2e-5). Not fc1's bias:
    # it feeds a BN, so its true gradient is 0 and LARS scales float noise up to a step (BN cancels it).
    for name, tensor in a.items():
        if name == "projector.fc1.bias":
            continue
        if tensor.is_floating_point():
            assert (b[name] - tensor).norm() <= 2e-5 * tensor.norm() + 1e-7, name
        else:
            assert torch.equal(b[name], tensor), name
