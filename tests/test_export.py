"""`robustcl export`: the folder, its model card, and loading it both ways (remote code in an environment without
robustcl; registered classes after `import robustcl`), for the encoder and for a finetuned classifier."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import cli_env, robustcl
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow


def _checkpoint_method(run):
    from robustcl.methods import build_method
    from robustcl.run_dir import latest_checkpoint, read_run_recipe

    method = build_method(read_run_recipe(run))
    method.load_state_dict(load_file(latest_checkpoint(run) / "model.safetensors"))
    return method.eval()


def _pixels(n=6):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _run_script(python, script, cwd, **env):
    environment = cli_env(**env)
    environment.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-c", script], cwd=cwd, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_export_folder_holds_exactly_the_export_files(exported, run):
    folder = exported / "encoder"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "config.json",
        "configuration_robustcl.py",
        "eval/aff/eval.json",
        "eval/aff/robustness_curve.png",
        "eval/slf/eval.json",
        "eval/slf/robustness_curve.png",
        "model.safetensors",
        "modeling_robustcl.py",
        "preprocessor_config.json",
        "recipe.yaml",
        "resnet.py",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_robustcl.RobustCLResNetConfig",
        "AutoModel": "modeling_robustcl.RobustCLResNetModel",
    }
    assert (config["widths"], config["block_layers"], config["stem"]) == ([8, 16, 32, 64], [1, 1, 1, 1], "cifar")
    assert config["image_mean"] == [0.485, 0.456, 0.406] and config["bn_branches"] == []
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["do_normalize"] is False and pre["do_rescale"] and pre["crop_size"] == {"height": 8, "width": 8}
    for protocol in ("slf", "aff"):  # the run's own reports, byte for byte
        assert (folder / "eval" / protocol / "eval.json").read_bytes() == (
            run / "eval" / protocol / "eval.json"
        ).read_bytes()
    assert (folder / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()


def test_card_states_the_measured_numbers_and_nothing_else(exported, run):
    card = ModelCard.load(exported / "encoder" / "README.md")
    reports = {p: json.loads((run / "eval" / p / "eval.json").read_text()) for p in ("slf", "aff")}
    expected = set()
    for p, r in reports.items():
        expected |= {(p, "clean", round(100 * r["SA"], 2)), (p, "pgd5", round(100 * r["RA"], 2))}
    results = card.data.eval_results
    assert {(e.metric_config, e.metric_args["attack"], e.metric_value) for e in results} == expected
    assert all(e.task_type == "image-classification" and e.dataset_split == "test" for e in results)
    # Every percentage in the text is one of the measured accuracies.
    measured = {f"{100 * r[k]:.2f}%" for r in reports.values() for k in ("SA", "RA")}
    assert set(re.findall(r"\d+\.\d\d%", card.text)) == measured
    assert 'AutoModel.from_pretrained("my-org/digits-acl", trust_remote_code=True)' in card.text
    assert "Robust Pre-Training by Adversarial Contrastive Learning" in card.text
    state = json.loads(next((run / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert state["compute"]["images_seen"] == 4 * 32 and f"| steps | {state['step']} |" in card.text
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-feature-extraction"


def test_bare_environment_loads_the_export_with_remote_code(exported, run, bare, tmp_path):
    x = _pixels()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = f"""
import importlib.util
assert all(importlib.util.find_spec(m) is None for m in ("robustcl", "accelerate", "datasets")), "not bare"
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification
x = load_file("x.safetensors")["x"]
encoder = AutoModel.from_pretrained({str(exported / "encoder")!r}, trust_remote_code=True).eval()
classifier = AutoModelForImageClassification.from_pretrained({str(exported / "aff")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = encoder(x)
    save_file({{"pooled": out.pooler_output, "map": out.last_hidden_state.contiguous(),
               "logits": classifier(x).logits}}, "out.safetensors")
"""
    _run_script(bare, script, tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))
    method = _checkpoint_method(run)
    with torch.no_grad():
        expected = method.encoder(x, bn_branch="pgd")
    assert (got["pooled"] - expected.pooler_output).abs().max() <= 1e-5
    assert (got["map"] - expected.last_hidden_state).abs().max() <= 1e-5
    assert got["logits"].shape == (6, 10)


def test_import_robustcl_loads_without_remote_code(exported, run, tmp_path):
    x = _pixels()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    # The export's *.py files are removed from a copy: only the registered classes can load it.
    script = f"""
import shutil, robustcl, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification
for name in ("encoder", "aff"):
    shutil.copytree({str(exported)!r} + "/" + name, name, ignore=shutil.ignore_patterns("*.py"))
x = load_file("x.safetensors")["x"]
encoder = AutoModel.from_pretrained("encoder").eval()
aff_encoder = AutoModel.from_pretrained("aff").eval()
classifier = AutoModelForImageClassification.from_pretrained("aff").eval()
assert type(classifier).__module__ == "robustcl.models.modeling_robustcl"
with torch.no_grad():
    save_file({{"pooled": encoder(x).pooler_output, "aff_pooled": aff_encoder(x).pooler_output,
               "logits": classifier(x).logits, "aff_from_classifier": classifier.robustcl(x).pooler_output}},
              "out.safetensors")
"""
    _run_script(sys.executable, script, tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))
    method = _checkpoint_method(run)
    with torch.no_grad():
        expected = method.encoder(x, bn_branch="pgd").pooler_output
    assert (got["pooled"] - expected).abs().max() <= 1e-5
    # AFF finetuned the encoder: AutoModel on the classifier export gives that encoder, not the pretrained one.
    assert torch.equal(got["aff_pooled"], got["aff_from_classifier"])
    assert (got["aff_pooled"] - expected).abs().max() > 1e-4


def test_classifier_export_reproduces_its_evaluation(exported, run):
    """The exported AFF classifier is the one whose accuracy the card states: its clean accuracy on the test split
    equals eval.json's SA."""
    from transformers import AutoModelForImageClassification

    import robustcl  # noqa: F401
    from robustcl.evaluation import load_eval_data
    from robustcl.recipe import load_recipe

    report = json.loads((exported / "aff" / "eval" / "aff" / "eval.json").read_text())
    card = ModelCard.load(exported / "aff" / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert {e.metric_config for e in card.data.eval_results} == {"aff"}
    classifier = AutoModelForImageClassification.from_pretrained(exported / "aff").eval()
    recipe = load_recipe(exported / "aff" / "recipe.yaml")
    data = load_eval_data(recipe, progress=False)
    with torch.no_grad():
        predictions = classifier(data.test.images.float() / 255).logits.argmax(1)
    assert (predictions == data.test.labels).float().mean().item() == pytest.approx(report["SA"], abs=1e-9)


def test_stale_evaluations_are_left_out_and_stale_classifiers_refused(run, tmp_path):
    import shutil

    stale = tmp_path / "run"
    shutil.copytree(run, stale)
    report_path = stale / "eval" / "aff" / "eval.json"
    report = json.loads(report_path.read_text())
    report["encoder_sha256"] = "0" * 64  # as if measured on an earlier checkpoint
    report_path.write_text(json.dumps(report))
    res = robustcl("export", str(stale), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation not exported — aff: measured other weights" in res.stderr
    assert not (tmp_path / "out" / "eval" / "aff").exists() and (tmp_path / "out" / "eval" / "slf").is_dir()
    res = robustcl("export", str(stale), str(tmp_path / "cls"), "--classifier", "aff")
    assert res.returncode == 2 and "finetuned from other weights" in res.stderr
    assert not (tmp_path / "cls").exists()
    res = robustcl("export", str(stale), str(tmp_path / "cls"), "--classifier", "alf")
    assert res.returncode == 2 and "no ALF classifier in the run directory" in res.stderr


def test_export_never_replaces_other_folders_and_fails_without_damage(run, exported, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    res = robustcl("export", str(run), str(precious))
    assert res.returncode == 2 and "not a robustcl export" in res.stderr
    assert (precious / "notes.txt").read_text() == "keep me"

    import shutil

    previous = tmp_path / "previous"
    shutil.copytree(exported / "encoder", previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}
    bad = tmp_path / "bad.md"
    bad.write_text("---\n{{ card_data }}\n---\n{% for x in %}")  # a jinja syntax error
    res = robustcl("export", str(run), str(previous), "--card-template", str(bad))
    assert res.returncode == 2 and "model card template" in res.stderr and str(bad) in res.stderr
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_card_without_evaluation_claims_no_numbers(tmp_path):
    from robustcl.export import export_encoder
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel

    model = RobustCLResNetModel(RobustCLResNetConfig(widths=[8, 8, 8, 8], block_layers=[1, 1, 1, 1]))
    export_encoder(model, None, tmp_path / "bare-encoder")
    card = ModelCard.load(tmp_path / "bare-encoder" / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "has not been evaluated yet" in card.text and not re.findall(r"\d+\.\d\d%", card.text)


def test_the_card_states_the_attack_and_schedule_settings_a_reader_compares_with_the_paper():
    """The settings that make a figure comparable (attack precision and negatives, the lr schedule's unit and
    warm-up start) are on the card, as the recipe trained them."""
    from robustcl.model_card import CardFacts, render_model_card
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel
    from robustcl.recipe import load_recipe

    recipe = load_recipe("recipes/deacl.yaml", ["attack.negatives=local"])
    model = RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1], widths=[8, 16]))
    text = str(render_model_card(CardFacts(repo_id="org/x", license="mit", model=model, resolution=8, recipe=recipe)))
    assert "BN in eval mode, fp32, local negatives" in text
    assert "cosine schedule set every epoch, 10 warm-up epochs from lr 0.003" in text
