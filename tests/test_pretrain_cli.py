"""End to end through the real CLI: train, checkpoint, resume, export, load the export in a fresh process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import BIN, REPO, TINY, cli_env, robustcl, with_sets
from safetensors.torch import load_file, save_file

QUICK = "recipes/quickstart.yaml"

pytestmark = pytest.mark.slow


def _encoder_features_from_checkpoint(run_dir, x):
    """Features of the trained encoder as the trainer holds it: checkpoint weights, the 'pgd' BN branch."""
    from robustcl.methods import build_method
    from robustcl.run_dir import latest_checkpoint, read_run_recipe

    method = build_method(read_run_recipe(run_dir))
    method.load_state_dict(load_file(latest_checkpoint(run_dir) / "model.safetensors"))
    method.eval()
    with torch.no_grad():
        return method.encoder(x, bn_branch=method.export_branch).pooler_output


def test_quickstart_trains_reports_accuracy_and_exports_a_loadable_encoder(tmp_path):
    run = tmp_path / "run"
    res = robustcl("pretrain", QUICK, "-o", str(run), *with_sets(*TINY, "training.max_steps=6"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "encoder exported to" in res.stdout
    assert "SLF evaluation of" in res.stdout and "PGD-5 CE, eps 8/255" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "eval" / "slf" / "eval.json").read_text())
    assert summary["steps"] == 6 and summary["evaluation"] == report
    assert report["split_sizes"] == {"train": 270, "val": 30, "test": 100, "attacked": 100}
    assert 0 <= report["RA"] <= report["SA"] <= 1 and (run / "eval" / "slf" / "robustness_curve.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(set(r) >= {"loss", "loss_clean", "loss_adv", "lr", "images_per_s"} for r in records)

    encoder = run / "encoder"
    assert {"model.safetensors", "config.json", "modeling_robustcl.py", "configuration_robustcl.py"} <= {
        p.name for p in encoder.iterdir()
    }
    assert not list(encoder.glob("*.bin")) and not list(encoder.glob("*.pt"))  # safetensors only
    config = json.loads((encoder / "config.json").read_text())
    assert config["model_type"] == "robustcl-resnet" and "AutoModel" in config["auto_map"]
    assert config["bn_branches"] == []  # one branch exported as a plain-BN model

    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = f"""
import sys
from safetensors.torch import load_file, save_file
from transformers import AutoModel
import torch
model = AutoModel.from_pretrained({str(encoder)!r}, trust_remote_code=True).eval()
assert "robustcl" not in sys.modules, "the export must load without robustcl"
with torch.no_grad():
    out = model(load_file({str(tmp_path / "x.safetensors")!r})["x"])
save_file({{"f": out.pooler_output.contiguous()}}, {str(tmp_path / "f.safetensors")!r})
"""
    env = cli_env()
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_file(str(tmp_path / "f.safetensors"))["f"]
    expected = _encoder_features_from_checkpoint(run, x)
    assert (loaded - expected).abs().max().item() <= 1e-5

    # `robustcl export` of the same run writes the same weights as the trainer's own export.
    again = robustcl("export", str(run), str(tmp_path / "exported"))
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (
        load_file(str(encoder / "model.safetensors")),
        load_file(str(tmp_path / "exported/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    sets = with_sets(
        *TINY,
        "training.max_steps=8",
        "training.checkpoint_every=2",
        "training.keep_checkpoints=8",
        "eval.after_pretrain=false",
    )
    straight = tmp_path / "straight"
    res = robustcl("pretrain", QUICK, "-o", str(straight), *sets)
    assert res.returncode == 0, res.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [str(BIN / "robustcl"), "pretrain", QUICK, "-o", str(interrupted), *sets],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = interrupted / "checkpoints" / "step-00000002" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (interrupted / "checkpoints" / "step-00000008").exists(), "killed too late to test resumption"

    res = robustcl("pretrain", QUICK, "-o", str(interrupted), *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    a, b = _final_weights(straight, 8), _final_weights(interrupted, 8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa = json.loads((straight / "checkpoints/step-00000008/train_state.json").read_text())
    sb = json.loads((interrupted / "checkpoints/step-00000008/train_state.json").read_text())
    # Wall time is the only thing allowed to differ; images seen add up over the two sessions.
    assert sa["compute"].pop("wall_time_s") > 0 and sb["compute"].pop("wall_time_s") > 0
    assert sa == sb and sa["compute"]["images_seen"] == 8 * 32


def test_run_dir_refuses_a_different_recipe_and_no_resume(tmp_path):
    run = tmp_path / "run"
    sets = [*TINY, "training.max_steps=2", "eval.after_pretrain=false"]
    assert robustcl("pretrain", QUICK, "-o", str(run), *with_sets(*sets)).returncode == 0
    res = robustcl("pretrain", QUICK, "-o", str(run), *with_sets(*sets, "optimizer.lr=0.1"))
    assert res.returncode == 2 and "differs in: optimizer.lr" in res.stderr and "Traceback" not in res.stderr
    res = robustcl("pretrain", QUICK, "-o", str(run), "--no-resume", *with_sets(*sets))
    assert res.returncode == 2 and "already holds a run" in res.stderr
    # Only the training length may change: extending the run continues it.
    res = robustcl(
        "pretrain",
        QUICK,
        "-o",
        str(run),
        *with_sets(*sets[:-2], "training.max_steps=3", "eval.after_pretrain=false"),
    )
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr
    assert (run / "checkpoints" / "step-00000003" / "COMPLETE").exists()


@pytest.fixture
def dataset_without_images(tmp_path):
    import datasets

    path = tmp_path / "no_images"
    datasets.Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["training.batch_sise=8"], "did you mean 'training.batch_size'"),
        (["training.batch_size=eight"], "invalid value for 'training.batch_size'"),
        (["data.path=./no/such/dataset"], "dataset path not found"),
        (["data.path={no_images}"], "no image column"),
    ],
)
def test_recipe_validate_rejects_bad_recipes_with_one_line(sets, expected, dataset_without_images):
    sets = [s.format(no_images=dataset_without_images) for s in sets]
    res = robustcl("recipe", "validate", QUICK, *with_sets(*sets))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: ") and expected in lines[0]


def test_recipe_validate_and_show_accept_shipped_recipes():
    res = robustcl("recipe", "validate", QUICK)
    assert res.returncode == 0 and "image column 'image'" in res.stdout
    res = robustcl("recipe", "show", "recipes/acl.yaml", "--set", "training.max_steps=3")
    assert res.returncode == 0 and "max_steps: 3" in res.stdout and "variant: ds" in res.stdout


def test_help_documents_every_command_without_loading_the_training_stack():
    script = """
import sys
from robustcl.cli import main
sys.argv = ["robustcl", "--help"]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
heavy = ("datasets", "matplotlib", "robustcl.train", "robustcl.evaluation", "robustcl.export", "robustcl.hub")
heavy = sorted(m for m in heavy if m in sys.modules)
assert not heavy, heavy
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for command in ("pretrain", "evaluate", "export", "push-to-hub", "recipe"):
        assert command in res.stdout
    for command in (["pretrain"], ["export"], ["push-to-hub"], ["recipe", "show"], ["recipe", "validate"]):
        res = robustcl(*command, "--help")
        assert res.returncode == 0 and "Usage" in res.stdout
    res = subprocess.run([sys.executable, "-m", "robustcl", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "pretrain" in res.stdout


def test_gradient_accumulation_splits_the_global_batch(tmp_path):
    run = tmp_path / "run"
    sets = [*TINY, "training.max_steps=2", "training.micro_batch_size=16", "eval.after_pretrain=false"]
    res = robustcl("pretrain", QUICK, "-o", str(run), *with_sets(*sets))
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert "global batch 32 = 1 process(es) × 16 images × 2 accumulation step(s)" in res.stdout
    bad = tmp_path / "bad"
    res = robustcl("pretrain", QUICK, "-o", str(bad), *with_sets(*sets, "training.micro_batch_size=12"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "training.micro_batch_size 12 does not divide the per-process batch 32" in res.stderr
    assert not (bad / "checkpoints").exists()
