"""End to end through the real CLI: train, export, load the export in a fresh process; help; batch plan. (Kills and
exact resume: tests/test_kill_resume.py; refusals: tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY, cli_env, robustcl, with_sets
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
        return method.encoder(x, bn_branch=method.encoder_record().export_branch).pooler_output


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


def test_recipe_validate_and_show_accept_shipped_recipes():
    res = robustcl("recipe", "validate", QUICK)
    assert res.returncode == 0 and "image column 'image'" in res.stdout
    res = robustcl("recipe", "show", "recipes/acl.yaml", "--set", "training.max_steps=3")
    assert res.returncode == 0 and "max_steps: 3" in res.stdout and "variant: ds" in res.stdout


def test_help_documents_every_command_without_loading_the_training_stack():
    # Every --help in one process (a process each would cost seconds of imports): the same entry point as the script.
    script = """
import sys
from robustcl.cli import main
for argv in ([], ["pretrain"], ["export"], ["push-to-hub"], ["recipe", "show"], ["recipe", "validate"]):
    sys.argv = ["robustcl", *argv, "--help"]
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, (argv, exit.code)
heavy = ("datasets", "matplotlib", "robustcl.train", "robustcl.evaluation", "robustcl.export", "robustcl.hub")
heavy = sorted(m for m in heavy if m in sys.modules)
assert not heavy, heavy
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for command in ("pretrain", "evaluate", "export", "push-to-hub", "recipe"):
        assert command in res.stdout
    assert res.stdout.count("Usage: robustcl") == 6
    for text in ("Usage: robustcl pretrain", "Usage: robustcl recipe validate", "--output-dir", "--repo-id"):
        assert text in res.stdout
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
    # A micro-batch that does not divide the batch: test_bad_input.py.
