"""Every shipped method recipe, as a user runs it: 2 real steps on CIFAR-10 (tiny batch and width), then the
export and an SLF evaluation at the end of pretraining. DeACL distils the SimCLR run; AdvCL clusters its features."""

from __future__ import annotations

import json

import pytest
from helpers import CIFAR10, robustcl, with_sets
from safetensors import safe_open

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 copy not found at {CIFAR10}"),
]

STEPS = [
    f"data.path={CIFAR10}",
    "data.max_samples=64",
    "model.widths=[8,16,32,64]",
    "model.block_layers=[1,1,1,1]",
    "training.max_steps=2",
    "training.batch_size=16",
    "attack.steps=2",
    "logging.every_steps=1",
    "eval.after_pretrain=true",
    "eval.data.max_train=200",
    "eval.data.max_test=50",
    "eval.slf.epochs=2",
    "eval.attack.steps=2",
    "eval.attack.curve_epsilons=[]",
]
ADVCL = ["method.advcl.clusters=[2,10]"]  # a recipe sets only its own method's keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def _pretrain(recipe, run_dir, *sets):
    own = ADVCL if recipe in ("advcl", "ainfonce") else []  # AdvCL's keys: A-InfoNCE reads them too
    res = robustcl("pretrain", f"recipes/{recipe}.yaml", "-o", str(run_dir), *with_sets(*STEPS, *own, *sets))
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _check_run(run_dir, display_name):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["evaluation"]["SA"] is not None
    report = json.loads((run_dir / "encoder" / "eval" / "slf" / "eval.json").read_text())
    assert report["encoder_sha256"] == summary["evaluation"]["encoder_sha256"]
    card = (run_dir / "encoder" / "README.md").read_text()
    assert f"**Method:** {display_name} — [" in card and "model-index" in card


@pytest.fixture(scope="module")
def simclr(runs):
    _pretrain("simclr", runs / "simclr", "method.simclr.projector_hidden_dim=64", "method.simclr.projector_dim=32")
    return runs / "simclr"


def test_simclr_recipe(simclr):
    _check_run(simclr, "SimCLR")
    card = (simclr / "encoder" / "README.md").read_text()
    assert "non-robust baseline" in card and "| attack during training | none |" in card


@pytest.mark.parametrize(
    "recipe, display",
    [("acl", "ACL"), ("dynacl", "DynACL"), ("acl_air", "ACL-AIR"), ("dynacl_air", "DynACL-AIR"), ("rocl", "RoCL")],
)
def test_acl_family_recipes(runs, recipe, display):
    _pretrain(recipe, runs / recipe)
    _check_run(runs / recipe, display)


def test_deacl_recipe_distils_the_simclr_run(runs, simclr):
    _pretrain("deacl", runs / "deacl", f"method.deacl.teacher={simclr}")
    _check_run(runs / "deacl", "DeACL")
    metrics = [json.loads(line) for line in (runs / "deacl" / "metrics.jsonl").read_text().splitlines()]
    # The student (train-mode BN) against the teacher (eval-mode BN) and against its own adversarial views.
    assert {"cos_teacher", "cos_adversarial"} <= set(metrics[0])


def test_advcl_recipe_clusters_the_simclr_features_itself(runs, simclr):
    _pretrain("advcl", runs / "advcl", f"method.advcl.cluster_encoder={simclr}")
    _check_run(runs / "advcl", "AdvCL")
    with safe_open(str(runs / "advcl" / "pseudo_labels.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["k10", "k2"] and f.get_tensor("k10").shape == (64,)
        assert f.metadata()["encoder"] == str(simclr)


def test_ainfonce_recipe_clusters_the_simclr_features_and_names_its_paper(runs, simclr):
    _pretrain("ainfonce", runs / "ainfonce", f"method.advcl.cluster_encoder={simclr}")
    _check_run(runs / "ainfonce", "A-InfoNCE")
    card = (runs / "ainfonce" / "encoder" / "README.md").read_text()
    assert "Adversarial Contrastive Learning via Asymmetric InfoNCE" in card and "arxiv.org/abs/2207.08374" in card
    metrics = [json.loads(line) for line in (runs / "ainfonce" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["stop_degree"] == pytest.approx(0.2)  # IP's base stop degree in the first epochs


def test_cluster_command_feeds_advcl_and_refuses_other_images(runs, simclr, tmp_path):
    labels = tmp_path / "labels.safetensors"
    res = robustcl("cluster", "recipes/advcl.yaml", "--encoder", str(simclr / "encoder"), "-o", str(labels),
                   *with_sets(*STEPS, *ADVCL))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pseudo-labels of 64 images (K=2: 2 clusters, K=10: 10 clusters)" in res.stdout
    # The same labels from the run directory and from its export: the same encoder, the same features.
    with (
        safe_open(str(labels), framework="pt") as f,
        safe_open(str(runs / "advcl" / "pseudo_labels.safetensors"), framework="pt") as g,
    ):
        assert all((f.get_tensor(k) == g.get_tensor(k)).all() for k in ("k2", "k10"))

    run = tmp_path / "advcl"
    sets = [f"method.advcl.pseudo_labels={labels}", "eval.after_pretrain=false", "training.max_steps=1"]
    _pretrain("advcl", run, *sets)
    assert not (run / "pseudo_labels.safetensors").exists()

    res = robustcl("pretrain", "recipes/advcl.yaml", "-o", str(tmp_path / "other"),
                   *with_sets(*STEPS, *ADVCL, *sets, "data.max_samples=48"))  # fmt: skip
    assert res.returncode == 2
    assert "pseudo-labels were computed on other images" in res.stderr and "Traceback" not in res.stderr
