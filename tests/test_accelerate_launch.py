"""The user's literal commands: `accelerate launch robustcl pretrain recipes/acl.yaml` from the repo root, on
real CIFAR-10, with one process and with two gloo processes."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import BIN, CIFAR10, REPO, cli_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 copy not found at {CIFAR10}"),
]

# The first 512 images: decoding all 50,000 would add seconds per process and test nothing more.
ACL_SETS = [
    "--set",
    f"data.path={CIFAR10}",
    "--set",
    "data.max_samples=512",
    "--set",
    "training.max_steps=2",
    "--set",
    "training.batch_size=8",
]


def _launch(launch_args, run_dir, **env):
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        *launch_args,
        "robustcl",
        "pretrain",
        "recipes/acl.yaml",
        *ACL_SETS,
        "--output-dir",
        str(run_dir),
    ]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=900)


# Every flag given, so accelerate uses no machine-local config file.
FIXED = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize(
    "launch_args, env, processes",
    [
        (["--num_processes", "1", *FIXED], {}, 1),
        (["--multi_gpu", "--num_processes", "2", *FIXED], {"ACCELERATE_USE_CPU": "true"}, 2),
    ],
    ids=["1-process", "2-processes-gloo"],
)
def test_acl_ds_two_real_steps_on_cifar10(tmp_path, launch_args, env, processes):
    run = tmp_path / "run"
    res = _launch(launch_args, run, **env)
    assert res.returncode == 0, res.stderr[-4000:]
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "model.safetensors").exists()
    assert len(list(ckpt.glob("random_states_*.pkl"))) == processes
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["loss_adv"] > 0
    assert (run / "encoder" / "model.safetensors").exists()


def test_literal_launch_without_flags_from_repo_root(tmp_path):
    """`accelerate launch robustcl ...` runs the package folder as a script; __main__ must fix sys.path."""
    res = subprocess.run(
        [str(BIN / "accelerate"), "launch", "robustcl", "recipe", "show", "recipes/acl.yaml"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "name: acl" in res.stdout
