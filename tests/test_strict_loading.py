"""Strict model loading: a model whose weights do not match its config exactly (a tensor missing, renamed, extra or
of another shape), holds NaN/inf, cannot be read (pickled objects, a truncated or forged safetensors file) or is
too large to build is refused with one line and exit code 2 before anything is evaluated, exported or written —
never scored with the random values transformers fills in, never a traceback, never a hang.

Model folders are real ``save_pretrained`` exports of a tiny encoder, damaged afterwards; commands run through the
real CLI entry point in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from helpers import REPO, call_main, with_sets
from safetensors.torch import load_file, save_file

import robustcl.models  # noqa: F401  (registers the model type)
from robustcl.models import RobustCLResNetConfig, RobustCLResNetForImageClassification, RobustCLResNetModel

ERROR = "robustcl: error: "
WEIGHTS = "model.safetensors"
QUICK = str(REPO / "recipes" / "quickstart.yaml")
# Fast evaluation settings: every refusal below happens while loading, before data or finetuning.
EVAL_SETS = with_sets(
    "eval.data.path=builtin:digits",
    "eval.data.resolution=8",
    "eval.slf.epochs=1",
    "eval.data.max_train=64",
    "eval.data.max_test=32",
    "eval.attacks=[]",
)
TINY_MODEL = ["model.widths=[8,16]", "model.block_layers=[1,1]", "data.resolution=8"]

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model folder as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("models") / "good"
    torch.manual_seed(0)
    RobustCLResNetModel(RobustCLResNetConfig(widths=[8, 16], block_layers=[1, 1])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished ACL run (one step, one checkpoint)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    sets = [*TINY_MODEL, "training.batch_size=32", "attack.steps=1", "training.max_steps=1"]
    sets += ["eval.after_pretrain=false", "logging.progress_bar=false", "logging.trackers=[]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)
        assert call_main(["pretrain", QUICK, "-o", str(run), *with_sets(*sets)]) == 0
    return run


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Cli:
    """``robustcl ARGS`` in this process, offline, from an empty working directory: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "argv", sys.argv)
    capfd.readouterr()

    def run(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()  # what the test itself printed (save_pretrained's progress bar)
        code = call_main(list(args))
        out = capfd.readouterr()
        return code, out.out, out.err

    return run


def files_under(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(Path(root).rglob("*"))
    }


def refused(code: int, out: str, err: str, *parts: str) -> str:
    """The single error line, after checking exit code 2, no traceback and that it names ``parts``."""
    assert code == 2, (code, out[-2000:], err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR), err[-3000:]
    what, sep, fix = lines[0].partition(" — ")
    assert sep and fix.strip(), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def damaged_copy(good: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(good, folder)
    return folder


def rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def evaluate_refuses(cli: Cli, folder: Path, tmp_path: Path, *parts: str) -> str:
    """``robustcl evaluate FOLDER`` (run from ``tmp_path``) fails in one line naming ``parts`` and writes nothing,
    neither in the model folder nor in the working directory."""
    before = files_under(folder), files_under(tmp_path)
    line = refused(*cli("evaluate", str(folder), *EVAL_SETS), *parts)
    assert (files_under(folder), files_under(tmp_path)) == before
    return line


# ------------------------------------------------------------------- 1. missing, renamed, extra, non-finite


def _drop(state: dict[str, torch.Tensor]) -> None:
    del state["backbone.conv1.weight"]


def _rename(state: dict[str, torch.Tensor]) -> None:
    state["backbone.conv1.kernel"] = state.pop("backbone.conv1.weight")


def _extra(state: dict[str, torch.Tensor]) -> None:
    state["backbone.layer3.0.conv1.weight"] = torch.zeros(16, 16, 3, 3)


def _extra_named_with_a_newline(state: dict[str, torch.Tensor]) -> None:
    state["backbone.extra\nrobustcl: all fine"] = torch.zeros(1)


@pytest.mark.parametrize(
    "change, named",
    [
        (_drop, ["1 tensor(s) missing", "backbone.conv1.weight"]),
        (_rename, ["missing from the file (backbone.conv1.weight)", "does not have (backbone.conv1.kernel)"]),
        (_extra, ["the model does not have (backbone.layer3.0.conv1.weight)"]),
        (_extra_named_with_a_newline, ["the model does not have (backbone.extra\\nrobustcl: all fine)"]),
    ],
    ids=["missing", "renamed", "unexpected", "unexpected-name-with-newline"],
)
def test_weights_that_do_not_match_the_config_are_refused_not_scored(cli, good, tmp_path, change, named):
    """transformers would fill the absent tensor with random values (or drop the extra one) and the random model
    would be evaluated with exit code 0."""
    folder = damaged_copy(good, tmp_path, "model")
    rewrite_weights(folder, change)
    evaluate_refuses(cli, folder, tmp_path, "do not fit the model's config", *named, str(folder))


def test_many_missing_keys_name_the_first_few_and_the_count(cli, good, tmp_path):
    folder = damaged_copy(good, tmp_path, "model")
    rewrite_weights(folder, lambda state: [state.pop(k) for k in list(state) if k.startswith("backbone.layer2.")])
    line = evaluate_refuses(cli, folder, tmp_path, "tensor(s) missing", "backbone.layer2.0.bn1.bias")
    assert " more)" in line and len(line) < 600


def _nan_weight(state: dict[str, torch.Tensor]) -> None:
    state["backbone.layer1.0.conv2.weight"][0, 0, 0, 0] = float("nan")


def _inf_statistic(state: dict[str, torch.Tensor]) -> None:
    state["backbone.bn1.running_var"][3] = float("inf")


@pytest.mark.parametrize(
    "change, tensor",
    [(_nan_weight, "backbone.layer1.0.conv2.weight"), (_inf_statistic, "backbone.bn1.running_var")],
    ids=["nan-parameter", "inf-buffer"],
)
def test_non_finite_weights_are_refused(cli, good, tmp_path, change, tensor):
    folder = damaged_copy(good, tmp_path, "model")
    rewrite_weights(folder, change)
    evaluate_refuses(cli, folder, tmp_path, "NaN or infinite", tensor)


def test_an_aff_classifier_export_still_loads_its_encoder(tmp_path):
    """The encoder of a classifier export loads with AutoModel: its head (`classifier.*`) is expected there."""
    from robustcl.encoder_loading import load_encoder

    torch.manual_seed(0)
    config = RobustCLResNetConfig(widths=[8, 16], block_layers=[1, 1], num_labels=3)
    classifier = RobustCLResNetForImageClassification(config).eval()
    classifier.save_pretrained(tmp_path / "aff")
    loaded = load_encoder(tmp_path / "aff")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), classifier.robustcl(x).pooler_output)


def test_a_foreign_backbone_from_a_task_checkpoint_loads_but_not_with_layers_missing(cli, tmp_path):
    """A transformers ResNet saved with its classification head loads as a bare backbone (the head is unused, not
    random); the same weights under a config with fewer layers than the file (its extra layers dropped) do not."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from robustcl.encoder_loading import load_encoder

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], num_labels=3)
    task = ResNetForImageClassification(config).eval()
    task.save_pretrained(tmp_path / "task")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_encoder(tmp_path / "task").encoder(x), task.resnet(x).pooler_output.flatten(1))

    shallower = damaged_copy(tmp_path / "task", tmp_path, "shallower")
    saved = json.loads((shallower / "config.json").read_text())
    (shallower / "config.json").write_text(json.dumps({**saved, "depths": [1, 1]}))
    evaluate_refuses(cli, shallower, tmp_path, "does not have", "encoder.stages.0.layers.1")


def test_deacl_teachers_and_clustering_encoders_load_strictly(cli, good, tmp_path):
    """Both load through the same loader as evaluation: a teacher with a missing tensor is not distilled from."""
    folder = damaged_copy(good, tmp_path, "teacher")
    rewrite_weights(folder, _drop)
    deacl = ["method.name=deacl", f"method.deacl.teacher={folder}", "training.max_steps=1", *TINY_MODEL]
    refused(*cli("pretrain", QUICK, "-o", str(tmp_path / "run"), *with_sets(*deacl)), "backbone.conv1.weight")
    refused(*cli("cluster", QUICK, "--encoder", str(folder), *with_sets("data.resolution=8")), "backbone.conv1.weight")


def _with_marker_rewritten(checkpoint: Path) -> None:
    """Make the COMPLETE marker vouch for the current model.safetensors, as if robustcl had written it."""
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    data = (checkpoint / WEIGHTS).read_bytes()
    marker["files"][WEIGHTS] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


@pytest.mark.parametrize("damage", ["missing", "shape", "nan"])
def test_a_run_checkpoint_of_another_architecture_is_refused_by_evaluate_and_export(
    cli, finished_run, tmp_path, damage
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    key = "encoder.backbone.layer2.0.conv1.weight"

    def change(state: dict[str, torch.Tensor]) -> None:
        if damage == "missing":
            del state[key]
        elif damage == "shape":
            state[key] = torch.zeros(16, 4, 3, 3)
        else:
            state[key][0, 0, 0, 0] = float("inf")

    state = load_file(checkpoint / WEIGHTS)
    change(state)
    save_file(state, checkpoint / WEIGHTS, metadata={"format": "pt"})
    _with_marker_rewritten(checkpoint)
    before = files_under(run)
    expect = {"missing": "1 tensor(s) missing", "shape": "[16, 4, 3, 3] in the file", "nan": "NaN or infinite"}

    refused(*cli("evaluate", str(run), *EVAL_SETS), expect[damage], key, str(checkpoint))
    refused(*cli("export", str(run), str(tmp_path / "out")), expect[damage], key)
    assert files_under(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("damage", ["truncated", "shape"])
def test_a_damaged_saved_classifier_is_refused_by_export(cli, finished_run, tmp_path, damage):
    """``export --classifier`` loads the classifier evaluation saved: strictly too (a traceback before)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, _, err = cli("evaluate", str(run), "--protocol", "slf", *EVAL_SETS)
    assert code == 0, err[-3000:]
    weights = run / "eval" / "slf" / "classifier" / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        state = load_file(weights)
        state["classifier.weight"] = torch.zeros(3, 16)
        save_file(state, weights, metadata={"format": "pt"})
    before = files_under(run)
    named = {"truncated": "damaged or not a safetensors file", "shape": "classifier.weight: [3, 16] in the file"}
    refused(*cli("export", str(run), str(tmp_path / "out"), "--classifier", "slf"), named[damage], "--protocol slf")
    assert files_under(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --------------------------------------------------------------------- 2. unreadable files: one line, not a traceback


def _pickle_bin(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    torch.save({"weights": argparse.Namespace(x=1)}, folder / "pytorch_model.bin")


def _truncated(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _header_bomb(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + data[8:])


def _garbage_header(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 20_000_000) + b"{" + b"x" * 20_000_000)


def _other_shape(folder: Path) -> None:
    rewrite_weights(folder, lambda state: state.update({"backbone.conv1.weight": torch.zeros(8, 3, 5, 5)}))


def _other_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "widths": [8, 32]}))


@pytest.mark.parametrize(
    "damage, named",
    [
        (_pickle_bin, "pickled Python objects"),
        (_truncated, "damaged or not a safetensors file"),
        (_header_bomb, "damaged or not a safetensors file"),
        (_garbage_header, "damaged or not a safetensors file"),
        (_other_shape, "backbone.conv1.weight: [8, 3, 5, 5] in the file, [8, 3, 3, 3] in the model"),
        (_other_config, "of another shape"),
    ],
    ids=["pickle-bin", "truncated", "header-bomb", "garbage-header", "shape-mismatch", "config-of-another-model"],
)
def test_unreadable_or_mismatched_files_are_one_line_not_a_traceback(cli, good, tmp_path, damage, named):
    folder = damaged_copy(good, tmp_path, "model")
    damage(folder)
    evaluate_refuses(cli, folder, tmp_path, named, str(folder))


@pytest.mark.parametrize(
    "config, named",
    [
        ({"widths": [100000, 100000]}, "widths must be <= 8192"),
        ({"widths": 1e5}, "widths must be a list of integers"),
        ({"block_layers": [200000, 1]}, "block_layers must be <= 512"),
        ({"widths": [8192, 8192], "block_layers": [512, 512]}, "lower block_layers or widths"),
    ],
    ids=["widths-1e5", "widths-not-a-list", "block-layers-200000", "too-many-parameters"],
)
def test_a_config_too_large_to_build_is_refused_at_once(cli, good, tmp_path, config, named):
    """Before: widths 1e5 was a traceback, block_layers 200000 hung for minutes growing past 3 GB."""
    folder = damaged_copy(good, tmp_path, "model")
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config}))
    started = time.perf_counter()
    evaluate_refuses(cli, folder, tmp_path, named, "config.json")
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------------------ 3. bounds before allocation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_layers": [200000, 2, 2, 2]},
        {"widths": [100000, 128, 256, 512]},
        {"widths": [64] * 17, "block_layers": [1] * 17},
        {"widths": [8192] * 4},
        {"bn_branches": [f"b{i}" for i in range(100)]},
        {"widths": [float("inf")] * 4},
    ],
    ids=["block-layers", "widths", "stages", "parameters", "bn-branches", "infinite-width"],
)
def test_config_refuses_sizes_beyond_the_limits_without_building(kwargs):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"block_layers|widths|stages|bn_branches"):
        RobustCLResNetConfig(**kwargs)
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"widths": [8, 16], "block_layers": [1, 1]},
        {"widths": [8, 16, 8], "block_layers": [3, 1, 2], "stem": "imagenet", "bn_branches": ["a", "b", "c"]},
        {"widths": [4], "block_layers": [2], "num_channels": 1, "image_mean": [0.5], "image_std": [0.5]},
    ],
)
def test_parameter_estimate_is_exactly_what_building_allocates(kwargs):
    config = RobustCLResNetConfig(**kwargs)
    model = RobustCLResNetModel(config)
    assert config.estimated_parameters() == sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.block_layers=[200000,2,2,2]", "model.block_layers"),
        ("model.widths=[100000,128,256,512]", "model.widths"),
        ("model.widths=[8192,8192,8192,8192]", "model.widths"),
    ],
)
def test_recipe_and_pretrain_refuse_a_model_too_large_naming_the_key(cli, tmp_path, override, key):
    refused(*cli("recipe", "validate", QUICK, "--set", override), key)
    refused(*cli("pretrain", QUICK, "-o", str(tmp_path / "run"), "--set", override), key)
    assert not (tmp_path / "run").exists()


def test_a_model_larger_than_the_available_memory_is_refused_before_building(cli, good, tmp_path, monkeypatch):
    import robustcl.memory

    monkeypatch.setattr(robustcl.memory, "available_memory", lambda: 10_000)
    line = evaluate_refuses(cli, good, tmp_path, "5,252 parameters", "of memory", "more memory")
    assert "widths" in line and "block_layers" in line
