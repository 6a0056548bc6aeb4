"""DeepSpeed ZeRO-2 through `robustcl launch` on 2 CPU processes (gloo): it trains, checkpoints, resumes (the
engine's files read with weights_only=True), computes what DDP computes, and exports a model that transformers
loads."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from helpers import BIN, REPO, cli_env, with_sets
from safetensors.torch import load_file

from robustcl.deepspeed_support import configure_deepspeed
from robustcl.errors import UserError
from robustcl.recipe import load_recipe

pytest.importorskip("deepspeed")

# ACL-DS at a tiny width with SGD (LARS is refused under ZeRO).
SETS = with_sets(
    "model.widths=[8,16,16,16]", "training.batch_size=32", "attack.steps=2", "optimizer.name=sgd",
    "optimizer.lr=0.5", "training.checkpoint_every=2", "eval.after_pretrain=false", "logging.progress_bar=false",
)  # fmt: skip


def _pretrain(launch: list[str], run_dir, steps: int) -> subprocess.CompletedProcess:
    command = ["pretrain", "recipes/quickstart.yaml", "-o", str(run_dir), *SETS, "--set", f"training.max_steps={steps}"]
    cmd = [str(BIN / "robustcl"), "launch", *launch, "--", *command] if launch else [str(BIN / "robustcl"), *command]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_zero2_trains_checkpoints_resumes_and_exports(tmp_path):
    run = tmp_path / "zero2"
    zero2 = ["--cpu", "--gpus", "2", "--deepspeed", "launch/zero2.json"]
    first = _pretrain(zero2, run, 2)
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's engine checkpoint
    assert len(list((ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # sharded states
    resumed = _pretrain(zero2, run, 4)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "(step 2)" in resumed.stdout

    # The same 4 steps with plain DDP (uninterrupted): DeepSpeed's sharded SGD, its gradient averaging and the
    # resume from its engine files change nothing. (DDP against one process: tests/test_distributed.py.)
    ddp = _pretrain(["--cpu", "--gpus", "2"], tmp_path / "ddp", 4)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    ours = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    reference = load_file(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-5, atol=1e-7), name

    # The export of the DeepSpeed run loads with transformers alone, in another process, and gives the features of
    # the trained weights.
    probe = (
        "import sys, torch; from transformers import AutoModel; "
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
        "torch.manual_seed(0); x = torch.rand(4, 3, 16, 16); "
        "print(m(pixel_values=x).pooler_output.sum().item())"
    )
    features = []
    for path in (run / "encoder", tmp_path / "ddp" / "encoder"):
        res = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=cli_env())
        assert res.returncode == 0, res.stderr[-2000:]
        features.append(float(res.stdout.strip().splitlines()[-1]))
    assert abs(features[0] - features[1]) <= 1e-3 * max(1.0, abs(features[1]))
    assert json.loads((run / "encoder" / "config.json").read_text())["model_type"] == "robustcl-resnet"


def _deepspeed_accelerator(stage: int) -> SimpleNamespace:
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_the_recipe_fills_the_deepspeed_batch_keys_and_zero_refuses_lars():
    recipe = load_recipe(REPO / "recipes" / "acl.yaml", ["optimizer.name=sgd"])
    accelerator = _deepspeed_accelerator(2)
    configure_deepspeed(accelerator, recipe, micro_batch=64, accumulation=2, frozen=[])
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (64, 2)
    assert config["train_batch_size"] == recipe.training.batch_size
    assert config["gradient_clipping"] == 0.0  # not Accelerate's silent 1.0
    with pytest.raises(UserError, match="LARS cannot run under DeepSpeed ZeRO stage 1") as err:
        configure_deepspeed(_deepspeed_accelerator(1), load_recipe(REPO / "recipes" / "acl.yaml"), 64, 1, [])
    assert "optimizer.name=sgd" in str(err.value)
    configure_deepspeed(_deepspeed_accelerator(0), load_recipe(REPO / "recipes" / "acl.yaml"), 64, 1, [])
    with pytest.raises(UserError, match="ZeRO stage 3"):
        configure_deepspeed(_deepspeed_accelerator(3), recipe, 64, 1, frozen=["momentum_encoder"])
