"""DynACL++ end to end on CPU at small scale, through the CLI: pretrain → pseudo-labels → LPAFT → export → evaluate
(recipes/dynacl_plus_plus.yaml), and the same stage on a finished DynACL run (robustcl lpaft RUN_DIR). Plus the
finetuning option the stage added (drop_last) and the recipes' relation to their base recipes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from helpers import BIN, REPO, call_main, cli_env, user_error, with_sets
from parity import reset_accelerate
from safetensors import safe_open
from safetensors.torch import load_file

from robustcl.encoder_loading import load_run
from robustcl.fingerprint import weights_sha256
from robustcl.lpaft import command_section
from robustcl.recipe import FinetuneConfig, LpaftConfig, Recipe, load_recipe

TINY = [
    "data.path=builtin:digits", "data.max_samples=64", "data.resolution=8", "model.widths=[8,16,32,64]",
    "model.block_layers=[1,1,1,1]", "training.max_steps=2", "training.batch_size=32", "attack.steps=1",
    "logging.progress_bar=false", "logging.trackers=[]", "eval.after_pretrain=true", "eval.data.max_train=100",
    "eval.data.max_test=40", "eval.slf.epochs=1", "eval.attack.steps=1", "eval.attack.curve_epsilons=[]",
]  # fmt: skip
STAGE = [
    "lpaft.lp.epochs=1", "lpaft.aft.epochs=2", "lpaft.lp.batch_size=16", "lpaft.aft.batch_size=16",
    "lpaft.aft.attack_steps=1",
]  # fmt: skip


def _main(args: list[str]) -> int:
    reset_accelerate()
    return call_main(args)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    run = tmp_path_factory.mktemp("lpaft") / "pipeline"
    assert _main(["pretrain", "recipes/dynacl_plus_plus.yaml", "-o", str(run), *with_sets(*TINY, *STAGE)]) == 0
    return run


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """A DynACL run, then robustcl lpaft on it; the checkpoint's weights file before the stage."""
    run = tmp_path_factory.mktemp("lpaft") / "command"
    assert _main(["pretrain", "recipes/dynacl.yaml", "-o", str(run), *with_sets(*TINY)]) == 0
    checkpoint = next((run / "checkpoints").iterdir()) / "model.safetensors"
    before = checkpoint.read_bytes()
    assert _main(["lpaft", str(run), *with_sets(*STAGE)]) == 0
    return run, checkpoint, before


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_pretrain_runs_pseudo_labels_lpaft_export_evaluate(pipeline):
    """The pipeline records its pseudo-labels (which images they label), hands over the finetuned plain-BN encoder
    (different from the pretrained 'pgd' branch), exports it loadable by transformers alone and evaluates exactly it."""
    from transformers import AutoModel

    with safe_open(str(pipeline / "lpaft" / "pseudo_labels.safetensors"), framework="pt") as f:
        labels, meta = f.get_tensor("k10"), f.metadata()
    assert labels.shape == (64,) and int(labels.max()) < 10 and meta["normalized"] == "false"
    assert meta["images_sha256"] and "BN branch normal" in meta["encoder"]
    record = json.loads((pipeline / "lpaft" / "encoder" / "lpaft.json").read_text())
    assert record["source_step"] == 2 and sum(record["cluster_sizes"]) == 64
    pretrained, _ = load_run(pipeline, post_pretraining=False).single_branch("pgd")
    exported = AutoModel.from_pretrained(pipeline / "encoder", trust_remote_code=True).eval()
    assert not exported.config.bn_branches
    assert weights_sha256(exported) != weights_sha256(pretrained)
    assert weights_sha256(exported) == weights_sha256(load_run(pipeline).encoder)
    report = json.loads((pipeline / "encoder" / "eval" / "slf" / "eval.json").read_text())
    assert report["encoder_sha256"] == weights_sha256(exported)
    assert (
        json.loads((pipeline / "summary.json").read_text())["evaluation"]["encoder_sha256"] == report["encoder_sha256"]
    )


def test_model_card_names_dynacl_plus_plus_its_paper_and_the_pretraining(pipeline):
    card = (pipeline / "encoder" / "README.md").read_text()
    assert "**Method:** DynACL++ — [Rethinking the Effect of Data Augmentation in Adversarial Contrastive" in card
    assert "(Luo et al., ICLR 2023)" in card and "| objective | DynACL pretraining" in card
    shipped = load_recipe(pipeline / "encoder" / "recipe.yaml")
    assert shipped.lpaft is not None and shipped.lpaft.aft.epochs == 2


def test_command_on_a_finished_dynacl_run_gives_the_pipelines_encoder(pipeline, command):
    """Same recipe (up to the lpaft section), same seed: robustcl lpaft RUN_DIR finetunes what pretrain does, leaves
    the checkpoint as it was and re-exports the run's encoder as DynACL++."""
    run, checkpoint, before = command
    ours, theirs = _weights(run / "lpaft" / "encoder"), _weights(pipeline / "lpaft" / "encoder")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    assert checkpoint.read_bytes() == before
    assert "**Method:** DynACL++" in (run / "encoder" / "README.md").read_text()
    assert weights_sha256(load_run(run).encoder) == weights_sha256(load_run(pipeline).encoder)


def test_rerun_runs_only_the_missing_stage(pipeline, capsys):
    """An interrupted stage (its encoder folder and the summary not written) runs again from the kept checkpoint and
    pseudo-labels, to the same encoder; a finished run is left as it is."""
    labels = pipeline / "lpaft" / "pseudo_labels.safetensors"
    stamp, encoder = labels.stat().st_mtime_ns, _weights(pipeline / "lpaft" / "encoder")
    import shutil

    shutil.rmtree(pipeline / "lpaft" / "encoder")
    (pipeline / "summary.json").unlink()
    assert _main(["pretrain", "recipes/dynacl_plus_plus.yaml", "-o", str(pipeline), *with_sets(*TINY, *STAGE)]) == 0
    assert labels.stat().st_mtime_ns == stamp  # reused, not clustered again
    again = _weights(pipeline / "lpaft" / "encoder")
    assert all(torch.equal(again[k], encoder[k]) for k in encoder)
    capsys.readouterr()
    assert _main(["pretrain", "recipes/dynacl_plus_plus.yaml", "-o", str(pipeline), *with_sets(*TINY, *STAGE)]) == 0
    assert "already finished" in capsys.readouterr().out


def test_command_sets_only_lpaft_keys():
    message = user_error(command_section, Recipe(), ["training.seed=3"], "RUN")
    assert "lpaft.* keys only" in message
    assert command_section(Recipe(), ["lpaft.aft.epochs=3"], "RUN").aft.epochs == 3


@pytest.mark.parametrize("base", ["dynacl", "dynacl_air"])
def test_plus_plus_recipes_are_their_base_recipe_and_the_stage(base):
    """recipes/<base>_plus_plus.yaml = recipes/<base>.yaml + an lpaft section, whose values are the authors'."""
    plus = load_recipe(f"recipes/{base}_plus_plus.yaml")
    assert load_recipe(f"recipes/{base}.yaml").model_copy(update={"lpaft": plus.lpaft}) == plus
    expected = LpaftConfig(bn_branch="pgd")
    if base == "dynacl_air":  # AIR's finetuning_utils.py trades_loss_dual starts at x + 0.001·N(0, 1)
        expected = LpaftConfig.model_validate({"bn_branch": "pgd", "aft": {"trades_random_start": True}})
    assert plus.lpaft == expected


def test_drop_last_trains_only_full_batches(monkeypatch):
    """A drop_last epoch takes ⌊N / batch⌋ steps; without it the partial batch is one more; too few images for one
    full batch are refused."""
    import robustcl.evaluation.finetune as ft

    steps = []
    real = ft._step
    monkeypatch.setattr(ft, "_step", lambda *a: (steps.append(1), real(*a)))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    data = ft.LabelledImages(torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8), torch.arange(10) % 3)
    for drop, expected in [(True, 2), (False, 3)]:
        steps.clear()
        cfg = FinetuneConfig(epochs=1, batch_size=4, select_by="final", drop_last=drop)
        ft.finetune(encoder, data, data.take(torch.arange(0)), 3, cfg, device=torch.device("cpu"), seed=0,
                    progress=False)  # fmt: skip
        assert len(steps) == expected
    cfg = FinetuneConfig(epochs=1, batch_size=16, select_by="final", drop_last=True)
    message = user_error(ft.finetune, encoder, data, data, 3, cfg, device=torch.device("cpu"), seed=0)
    assert "no full batch" in message


def _launched_lpaft(run, processes: int) -> None:
    """``robustcl lpaft RUN`` under ``accelerate launch`` with 1 or 2 gloo processes."""
    fixed = [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    launch = [*(["--multi_gpu"] if processes > 1 else []), *fixed]
    env = {"OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "true"} if processes > 1 else {})}
    # No training attack: PGD's sign steps turn float32 reduction-order noise into a drift (see test_evaluate_sharded)
    stage = [*STAGE, "lpaft.aft.attack_steps=0", "lpaft.lp.batch_size=32", "lpaft.aft.batch_size=32"]
    cmd = [str(BIN / "accelerate"), "launch", *launch, "robustcl", "lpaft", str(run), *with_sets(*stage)]
    res = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_make_the_pseudo_labels_and_encoder_of_one(command, tmp_path):
    """The stage shared between 2 processes (features of disjoint blocks for k-means, every finetuning batch split)
    gives one process's pseudo-labels exactly and its finetuned encoder up to float32 reduction order."""
    finished, _, _ = command
    runs = {}
    for processes in (1, 2):
        runs[processes] = tmp_path / f"p{processes}"
        shutil.copytree(finished, runs[processes], ignore=shutil.ignore_patterns("lpaft", "encoder"))
        _launched_lpaft(runs[processes], processes)
    labels = [load_file(str(runs[p] / "lpaft" / "pseudo_labels.safetensors"))["k10"] for p in (1, 2)]
    assert torch.equal(*labels) and len(labels[0].unique()) > 1
    one, two = (_weights(runs[p] / "lpaft" / "encoder") for p in (1, 2))
    assert one.keys() == two.keys()
    pretrained = load_run(finished, post_pretraining=False).single_branch("pgd")[0].state_dict()
    assert pretrained.keys() >= one.keys()
    moved = max((one[k] - pretrained[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert moved > 1e-3  # the finetuning changed the encoder: the two agree by computing, not by doing nothing
    for name in one:
        difference = (one[name] - two[name]).abs().max().item()
        assert difference <= 1e-5, (name, difference)  # rounding: ~1e-8 measured on a BN bias
