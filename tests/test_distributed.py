"""Data-parallel training computes what one process computes: two gloo processes × B/2 images against one
process × B images, through the real training step and the real trainer.

Run as a script (``python tests/test_distributed.py OUT RUNS CASES.json``, under ``accelerate launch`` for several
processes) it is the worker of the attacked-step test: one training step of every case in one launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BIN, REPO, cli_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEP_SCRIPT = REPO / "tests" / "scripts" / "one_training_step.py"
# The quickstart's ACL-DS (dual BN, 3-layer projector with BN, LARS) at a tiny width. The attack has 0 steps in
# these comparisons (they are about the loss, SyncBN and the data paths); test_two_processes_attack_as_one turns
# it on.
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
    # The second step ran a 2-step PGD (negatives from both processes, by all-gathers): its input gradients made no
    # gradient all-reduce; the backward made them.
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


# One training step with a 2-step PGD per method whose attacked loss has negatives; AdvCL attacks with BN in train
# mode (its recipe's quirk: SyncBN couples the processes inside the attack too), DynACL through its momentum encoder.
ATTACKED = {
    "acl": [],
    "advcl": ["method.name=advcl", "method.advcl.clusters=[3,7]", "method.advcl.pseudo_labels=fixed-by-the-worker",
              "attack.bn_mode=train"],
    "dynacl": ["method.name=dynacl"],
    "dynacl_air": ["method.name=dynacl_air"],  # its KL terms: softmaxes over the whole batch, gathered
    "ainfonce": ["method.name=ainfonce", "method.advcl.clusters=[3,7]",
                 "method.advcl.pseudo_labels=fixed-by-the-worker", "attack.bn_mode=train"],  # IP, HN: global rows
    "rocl": ["method.name=rocl"],  # its regulariser takes the attack's negatives: -local changes it too
}  # fmt: skip


def _attacked_cases(processes: int) -> dict[str, list[str]]:
    cases = {}
    for name, sets in ATTACKED.items():
        cases[name] = [*TINY_ACL, "attack.steps=2", *sets]
        cases[f"{name}-local"] = [*cases[name], "attack.negatives=local"]
    # Gradient accumulation: the reference of a 2 × 8-image micro-batch is one process's 16-image micro-batch.
    cases["acl-micro"] = [*TINY_ACL, "attack.steps=2", f"training.micro_batch_size={16 // processes}"]
    return cases


def _attacked_steps(tmp_path, processes: int) -> dict[str, dict]:
    out, runs, spec = tmp_path / f"attacked-{processes}", tmp_path / f"runs-{processes}", tmp_path / f"{processes}.json"
    out.mkdir()
    spec.write_text(json.dumps(_attacked_cases(processes)))
    args = [str(Path(__file__).resolve()), str(out), str(runs), str(spec)]
    if processes == 1:  # one thread, as accelerate gives each of the two processes: two would fight for the cores
        cmd, env = [sys.executable, *args], cli_env(OMP_NUM_THREADS="1")
    else:
        cmd, env = [str(BIN / "accelerate"), "launch", *GLOO_2, *args], cli_env(ACCELERATE_USE_CPU="true")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return {name: load_file(out / f"{name}.safetensors") for name in _attacked_cases(processes)}


def _gradient_differences(one: dict, two: dict) -> dict[str, float]:
    """‖two − one‖ / ‖one‖ of every gradient but those of biases that feed a BN (0 up to rounding)."""
    names = [k for k in one if k.startswith("grad.") and not (k.endswith("fc1.bias") and one[k].norm() < 1e-6)]
    assert one.keys() == two.keys() and sum(k.startswith("grad.encoder.") for k in names) > 20
    return {k: ((two[k] - one[k]).norm() / one[k].norm()).item() for k in names}


def _changed_pixels(one: dict, two: dict) -> float:
    """The fraction of adversarial pixels (all the step's attacks, global rows) that differ."""
    names = [k for k in one if k.startswith("adversarial.")]
    assert names and all(one[k].shape == two[k].shape for k in names)
    return sum((one[k] != two[k]).sum().item() for k in names) / sum(one[k].numel() for k in names)


def test_two_processes_attack_as_one(tmp_path):
    """With the attack on, 2 processes × 16 images make the adversarial images, loss and gradients of 1 process × 32
    (and of its 16-image micro-batches under accumulation): each process's PGD ascends the whole batch's loss, its
    negatives gathered from both. With attack.negatives=local each attacks with its own 16 images: another step."""
    one, two = _attacked_steps(tmp_path, 1), _attacked_steps(tmp_path, 2)
    for name in [*ATTACKED, "acl-micro"]:
        assert _changed_pixels(one[name], two[name]) == 0, name
        loss = one[name]["loss"].item()
        assert abs(two[name]["loss"].item() - loss) <= 1e-5 * abs(loss), name
        # The attack-off tests' tolerance: 1e-5 relative to each tensor's norm.
        worst = max(_gradient_differences(one[name], two[name]).items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-5, (name, worst)
    for name in ATTACKED:
        local_one, local_two = one[f"{name}-local"], two[f"{name}-local"]
        assert _changed_pixels(local_one, local_two) > 0.05, name
        assert max(_gradient_differences(local_one, local_two).values()) > 1e-2, name


def _fixed_pseudo_labels(path, clusters, images):
    """AdvCL's pseudo-labels in the worker: any labels fixed by the images' count do (the clustering has its own
    one-versus-two-process test)."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, k, (len(images),), generator=g) for k in clusters])


def _in_float64(build_method):
    """``build_method`` whose networks compute in float64 (their pixel inputs cast on entry; the contrastive
    losses follow their features). A float32 step of 1 and of 2 processes rounds differently, and with ~10⁶
    activations per step a pre-activation within rounding of 0 now and then flips its ReLU between the two, or a
    gradient component within rounding of 0 its PGD sign: a whole activation's or pixel's gradient (measured: 4e-3
    relative on a BN's gradient in AdvCL at training.seed 0 and in ACL at seed 1, attack on or off). In float64 the
    comparison is of the computation, not of that lottery (measured: ≤ 2e-13 relative, no pixel differs)."""
    from robustcl.models import RobustCLResNetModel

    def build(recipe):
        method = build_method(recipe).double()
        for module in method.modules():
            if isinstance(module, RobustCLResNetModel):
                module.register_forward_pre_hook(lambda _, args: (args[0].double(), *args[1:]))
        return method

    return build


def _attacked_steps_worker(out: Path, runs: Path, cases: dict[str, list[str]]) -> None:
    """Every case's first training step, saved from process 0: the loss averaged over processes, the averaged
    gradients and every attack's adversarial images (all processes' rows, gathered in rank order)."""
    from safetensors.torch import save_file

    import robustcl.methods.advcl as advcl
    import robustcl.train as train
    from robustcl.collectives import gather_with_grad
    from robustcl.methods.base import Method
    from robustcl.recipe import load_recipe

    advcl.load_pseudo_labels = _fixed_pseudo_labels
    train.build_method = _in_float64(train.build_method)
    adversarial: list[torch.Tensor] = []
    plain_attack = Method.attack

    def recorded_attack(self, loss_fn, x, random, *args, **kwargs):
        x_adv = plain_attack(self, loss_fn, x, random, *args, **kwargs)
        # Stacked views [view 1; view 2; …] of this process's rows: each view's rows gathered in rank order.
        views = x_adv.unflatten(0, (-1, random.local)).transpose(0, 1).contiguous()
        adversarial.append(gather_with_grad(views).transpose(0, 1).flatten(0, 1))
        return x_adv

    Method.attack = recorded_attack
    for name, sets in cases.items():
        session = train.open_session(load_recipe("recipes/quickstart.yaml", sets), runs / name, resume=False)
        session.model.train()
        adversarial.clear()
        metrics = train.accumulate_gradients(session, 0)
        tensors = {"loss": session.accelerator.reduce(metrics["loss"], "mean").reshape(1)}
        tensors.update({f"adversarial.{i}": x for i, x in enumerate(adversarial)})
        for param, p in session.method.named_parameters():
            if p.grad is not None:
                tensors[f"grad.{param}"] = p.grad.detach().clone()
        if session.accelerator.is_main_process:
            save_file(tensors, out / f"{name}.safetensors")
        session.close()
    session.accelerator.wait_for_everyone()
    session.accelerator.end_training()


if __name__ == "__main__":
    _attacked_steps_worker(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()))
