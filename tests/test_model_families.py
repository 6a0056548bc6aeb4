"""The model families robustcl trains, exports and loads beyond the basic-block ResNet: bottleneck ResNets
(ResNet-50/101, torchvision v1.5 layout) and pre-activation WideResNets (WRN-28-10/34-10 as TRADES/AWP use them);
and the native export (`robustcl export --format native`), a plain transformers ResNet that loads without
trust_remote_code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, bare_python, user_error
from safetensors.torch import load_file, save_file
from test_export import _run_script
from torch import nn

from robustcl.models import MultiBatchNorm, RobustCLResNetConfig, RobustCLResNetModel

ADVCL_BRANCHES = ["normal", "pgd", "pgd_ce"]
RESNET50 = {"block": "bottleneck", "block_layers": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "stem": "imagenet"}
WRN_34_10 = {"block": "wide_preact", "block_layers": [5, 5, 5], "widths": [160, 320, 640], "stem": "cifar"}
WRN_28_10 = {**WRN_34_10, "block_layers": [4, 4, 4]}
TINY_BOTTLENECK = {"block": "bottleneck", "block_layers": [1, 1], "widths": [4, 8]}
TINY_WIDE = {"block": "wide_preact", "block_layers": [1, 1, 1], "widths": [4, 8, 8], "stem_width": 4}

# One pretraining step of ACL-DS (dual BN: the export keeps the pgd branch) per family, nothing optional written.
RUN_SETS = [
    *TINY,
    "training.max_steps=1",
    "training.checkpoint_every=1",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]
FAMILIES = {
    "bottleneck-imagenet": ["model.block=bottleneck", "model.block_layers=[1,1]", "model.widths=[4,8]",
                            "model.stem=imagenet", "data.resolution=16"],
    "basic-imagenet": ["model.block_layers=[1,1]", "model.widths=[4,8]", "model.stem=imagenet", "data.resolution=16"],
    "wide-cifar": ["model.block=wide_preact", "model.block_layers=[1,1,1]", "model.widths=[4,8,8]",
                   "model.stem_width=4"],
    # The real sizes, one step of 4 images at 32 px (WRN-34-10's step is ~5 s on 2 cores).
    "resnet50": ["model.block=bottleneck", "model.block_layers=[3,4,6,3]", "model.widths=[64,128,256,512]",
                 "model.stem=imagenet", "data.resolution=32", "training.batch_size=4"],
    "wrn-34-10": ["model.block=wide_preact", "model.block_layers=[5,5,5]", "model.widths=[160,320,640]",
                  "data.resolution=32", "training.batch_size=4"],
}  # fmt: skip
BLOCKS = {"bottleneck-imagenet": "bottleneck", "wide-cifar": "wide_preact", "resnet50": "bottleneck",
          "wrn-34-10": "wide_preact"}  # fmt: skip
RESOLUTIONS = {"bottleneck-imagenet": 16, "wide-cifar": 8, "resnet50": 32, "wrn-34-10": 32}


def _meta_model(**kwargs) -> RobustCLResNetModel:
    with torch.device("meta"):
        return RobustCLResNetModel(RobustCLResNetConfig(**kwargs))


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_values(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def _block_kind(model: RobustCLResNetModel) -> str:
    """The family of the model's blocks, by their class (one class per family)."""
    stages = [getattr(model.backbone, f"layer{i + 1}") for i in range(model.backbone.num_stages)]
    kinds = {type(block).__name__ for stage in stages for block in stage}
    assert len(kinds) == 1, kinds
    return {"BasicBlock": "basic", "Bottleneck": "bottleneck", "WideBasicBlock": "wide_preact"}[kinds.pop()]


def _pixels(size: int, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------ published sizes


def test_resnet50_and_wrn_34_10_have_their_published_parameter_counts():
    """torchvision's resnet50 has 25,557,032 parameters, of which its 2048→1000 fc holds 2,049,000: the encoder
    23,508,032. WRN-34-10 (TRADES/AWP layout, dropout 0) has 46,160,474 with its 640→10 fc (6,410): the encoder
    46,154,064. Both built on the meta device (no memory), and estimate_parameters agrees with what they allocate."""
    resnet50 = _meta_model(**RESNET50)
    assert _parameters(resnet50) == 25_557_032 - (2048 * 1000 + 1000) == 23_508_032
    assert resnet50.config.hidden_size == 2048
    wrn = _meta_model(**WRN_34_10)
    assert _parameters(wrn) + 640 * 10 + 10 == 46_160_474
    assert wrn.config.hidden_size == 640 and wrn.backbone.conv1.out_channels == 16  # the 16-channel stem
    # WRN-28-10: 36,479,194 with its fc (Zagoruyko & Komodakis: 36.5M).
    assert _parameters(_meta_model(**WRN_28_10)) + 6410 == 36_479_194
    for model in (resnet50, wrn):
        assert model.config.estimated_parameters() == _state_values(model)


@pytest.mark.parametrize(
    "kwargs",
    [
        TINY_BOTTLENECK,
        {**TINY_BOTTLENECK, "stem": "imagenet", "bn_branches": ADVCL_BRANCHES},
        {**TINY_BOTTLENECK, "widths": [2, 8, 4], "block_layers": [2, 1, 3], "stem_width": 5},
        TINY_WIDE,
        {**TINY_WIDE, "bn_branches": ADVCL_BRANCHES, "stem_width": None},
        {"block": "wide_preact", "block_layers": [2, 1], "widths": [16, 16]},  # equal widths: identity shortcuts
        {"block_layers": [1, 1], "widths": [4, 8], "stem_width": 6},
    ],
)
def test_parameter_estimate_is_exactly_what_every_family_allocates(kwargs):
    config = RobustCLResNetConfig(**kwargs)
    model = RobustCLResNetModel(config)
    assert _block_kind(model) == kwargs.get("block", "basic")
    stem = kwargs.get("stem_width") or (16 if kwargs.get("block") == "wide_preact" else kwargs["widths"][0])
    assert model.backbone.conv1.out_channels == stem
    assert config.estimated_parameters() == _state_values(model)


def test_the_recipe_describes_the_families_and_sizes_them_before_building():
    from robustcl.recipe import ModelConfig

    resnet50 = ModelConfig(**{k: v for k, v in RESNET50.items()})
    assert resnet50.estimated_parameters() == _state_values(_meta_model(**RESNET50))
    wrn = ModelConfig(**WRN_34_10)
    assert wrn.estimated_parameters(3) == _state_values(_meta_model(**WRN_34_10, bn_branches=ADVCL_BRANCHES))
    assert ModelConfig().block == "basic"


def test_a_config_json_without_the_new_keys_loads_as_the_basic_resnet_it_was(tmp_path):
    torch.manual_seed(0)
    model = RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1], widths=[4, 8])).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("block", "stem_width"):  # what an export written before this release holds
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RobustCLResNetModel.from_pretrained(tmp_path).eval()
    assert loaded.config.block == "basic" and loaded.config.stem_width is None
    x = _pixels(8)
    with torch.no_grad():
        assert torch.equal(loaded(x).pooler_output, model(x).pooler_output)


# ----------------------------------------------------------------------------------------- layouts and BN


def test_bottleneck_is_torchvision_v1_5_with_the_stride_on_the_3x3():
    model = RobustCLResNetModel(RobustCLResNetConfig(**{**TINY_BOTTLENECK, "stem": "imagenet"}))
    first = model.backbone.layer2[0]
    assert (first.conv1.kernel_size, first.conv1.stride) == ((1, 1), (1, 1))
    assert (first.conv2.kernel_size, first.conv2.stride) == ((3, 3), (2, 2))
    assert first.conv3.out_channels == 4 * 8 and model.config.hidden_size == 32
    out = model.eval()(_pixels(32))
    assert out.last_hidden_state.shape == (4, 32, 4, 4) and out.pooler_output.shape == (4, 32)


def test_wide_block_is_pre_activation_with_a_final_bn_relu():
    """TRADES/AWP's WRN block: BN-ReLU before each conv, a 1×1 conv (no BN) shortcut from the activated input
    when the shape changes, raw input otherwise; the trunk ends with BN-ReLU, so features are non-negative."""
    model = RobustCLResNetModel(RobustCLResNetConfig(**TINY_WIDE)).eval()
    block = model.backbone.layer2[0]
    assert isinstance(block.bn1, nn.BatchNorm2d) and block.bn1.num_features == 4  # BN on the block's input
    assert [type(m) for m in block.shortcut] == [nn.Conv2d]
    assert not hasattr(model.backbone, "bn1") or model.backbone.bn1 is None  # no BN after the stem conv
    out = model(_pixels(8))
    assert out.last_hidden_state.shape == (4, 8, 2, 2) and (out.last_hidden_state >= 0).all()


@pytest.mark.parametrize("kwargs", [TINY_BOTTLENECK, TINY_WIDE], ids=["bottleneck", "wide"])
def test_advcl_three_branch_bn_reaches_every_block_and_export_picks_the_branch(kwargs):
    torch.manual_seed(0)
    model = RobustCLResNetModel(RobustCLResNetConfig(**kwargs, bn_branches=ADVCL_BRANCHES))
    assert _block_kind(model) == kwargs["block"]
    plain = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    multi = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    assert len(plain) == 3 * len(multi) and multi  # every BatchNorm2d sits inside a three-branch MultiBatchNorm
    model.train()
    with torch.no_grad():  # each branch sees other statistics
        for i, branch in enumerate(ADVCL_BRANCHES):
            model(_pixels(8) * (i + 1) / 3, bn_branch=branch)
    model.eval()
    x = _pixels(8)
    outputs = {}
    for branch in ADVCL_BRANCHES:
        single = model.to_single_branch(branch).eval()
        assert not any(isinstance(m, MultiBatchNorm) for m in single.modules())
        with torch.no_grad():
            outputs[branch] = single(x).pooler_output
            assert torch.allclose(outputs[branch], model(x, bn_branch=branch).pooler_output, atol=1e-6)
    assert not torch.allclose(outputs["normal"], outputs["pgd_ce"])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"block": "resnext"}, "block"), ({"stem_width": 0}, "stem_width"), ({"stem_width": 10**6}, "stem_width")],
)
def test_config_refuses_unknown_blocks_and_stem_widths(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustCLResNetConfig(**kwargs)


def test_recipe_takes_the_new_blocks_and_refuses_an_unknown_one_naming_the_key(cli, tmp_path):
    for block in ("bottleneck", "wide_preact"):
        code, out, err = cli("recipe", "validate", "recipes/quickstart.yaml", "--set", f"model.block={block}")
        assert code == 0, err
    code, out, err = cli("recipe", "validate", "recipes/quickstart.yaml", "--set", "model.block=resnext")
    assert code == 2 and "model.block" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------- train, export, load


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny ACL-DS pretraining step per family, through the real CLI (in this process)."""
    import sys

    from helpers import call_main

    root = tmp_path_factory.mktemp("families")
    argv = sys.argv
    try:
        for name, sets in FAMILIES.items():
            args = [f"--set={s}" for s in [*RUN_SETS, *sets]]
            assert call_main(["pretrain", "recipes/quickstart.yaml", "-o", str(root / name), *args]) == 0
    finally:
        sys.argv = argv
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def bare_with_pillow(tmp_path_factory) -> Path:
    """Python with only torch, transformers, safetensors and Pillow (AutoImageProcessor needs Pillow without
    torchvision): a downstream user's environment, without robustcl."""
    return bare_python(tmp_path_factory.mktemp("bare-pil") / "venv", ("torch", "transformers", "safetensors", "pillow"))


def _run_features(run: Path, x: torch.Tensor) -> torch.Tensor:
    from robustcl.encoder_loading import load_run

    encoder, branch = load_run(run).single_branch()
    assert branch == "pgd"
    with torch.no_grad():
        return encoder(x).pooler_output


_REMOTE_SCRIPT = """
import importlib.util
assert all(importlib.util.find_spec(m) is None for m in ("robustcl", "accelerate", "datasets")), "not bare"
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
x = load_file("x.safetensors")["x"]
encoder = AutoModel.from_pretrained({folder!r}, trust_remote_code=True).eval()
with torch.no_grad():
    save_file({{"pooled": encoder(x).pooler_output}}, "out.safetensors")
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bottleneck-imagenet", "wide-cifar", "resnet50", "wrn-34-10"])
def test_families_train_export_and_load_with_remote_code_alone(family, runs, cli, bare, tmp_path):
    out = tmp_path / "export"
    code, _, err = cli("export", str(runs[family]), str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["block"] == BLOCKS[family]
    x = _pixels(RESOLUTIONS[family], n=6)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _run_script(bare, _REMOTE_SCRIPT.format(folder=str(out)), tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))["pooled"]
    assert (got - _run_features(runs[family], x)).abs().max() <= 1e-5


_NATIVE_SCRIPT = """
import importlib.util
assert all(importlib.util.find_spec(m) is None for m in ("robustcl", "accelerate", "datasets")), "not bare"
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel, ResNetModel
x = load_file("x.safetensors")["x"]
model = AutoModel.from_pretrained({folder!r}).eval()  # no trust_remote_code
assert type(model) is ResNetModel, type(model)
processor = AutoImageProcessor.from_pretrained({folder!r})
# The same [0, 1] pixels, normalised by the processor alone (they are already sized and scaled).
pixels = processor(list(x), do_resize=False, do_center_crop=False, do_rescale=False, return_tensors="pt").pixel_values
with torch.no_grad():
    save_file({{"pooled": model(pixels).pooler_output.flatten(1).contiguous()}}, "out.safetensors")
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bottleneck-imagenet", "basic-imagenet"])
def test_native_export_loads_with_plain_transformers_and_gives_the_same_features(
    family, runs, cli, bare_with_pillow, tmp_path
):
    out = tmp_path / "native"
    code, stdout, err = cli("export", str(runs[family]), str(out), "--format", "native")
    assert code == 0, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "recipe.yaml"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "resnet" and "auto_map" not in config
    assert config["layer_type"] == ("bottleneck" if "bottleneck" in family else "basic")
    assert config["hidden_sizes"] == ([16, 32] if "bottleneck" in family else [4, 8])
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["do_normalize"] is True and pre["do_rescale"] is True
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["image_std"] == [0.229, 0.224, 0.225]
    card = (out / "README.md").read_text()
    assert "trust_remote_code" not in card and "AutoImageProcessor" in card
    assert "[0, 1]" in card and "normalise" in card and "attack" in card.lower()

    x = _pixels(16, n=6)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _run_script(bare_with_pillow, _NATIVE_SCRIPT.format(folder=str(out)), tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))["pooled"]
    expected = _run_features(runs[family], x)
    assert (got - expected).abs().max() <= 1e-5
    # robustcl evaluate's loader normalises a native export through its processor: the same encoder again.
    from robustcl.encoder_loading import load_encoder

    with torch.no_grad():
        assert (load_encoder(str(out)).encoder(x) - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_native_and_remote_code_exports_replace_each_other(runs, cli, tmp_path):
    """An export folder in either format is recognised as an export: re-exporting in the other format replaces
    exactly the export's files (the remote code goes when the export becomes native) and keeps the rest."""
    from robustcl.export_layout import export_files

    out = tmp_path / "out"
    run = str(runs["bottleneck-imagenet"])
    assert cli("export", run, str(out))[0] == 0
    (out / "notes.md").write_text("mine")
    code, _, err = cli("export", run, str(out), "--format", "native")
    assert code == 0, err
    assert not list(out.glob("*.py")) and (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    assert "config.json" in export_files(out)  # push-to-hub accepts a native export
    (out / "notes.md").write_text("mine")
    code, _, err = cli("export", run, str(out))
    assert code == 0, err
    assert (out / "resnet.py").is_file() and json.loads((out / "config.json").read_text())["model_type"] != "resnet"


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, extra, reason",
    [
        ("wide-cifar", [], "CIFAR stem"),
        ("basic-imagenet", ["--classifier", "slf"], "encoder"),
        ("basic-imagenet", ["--format", "onnx"], "remote-code"),
    ],
)
def test_native_export_refuses_what_transformers_cannot_express(family, extra, reason, runs, cli, tmp_path):
    out = tmp_path / "native"
    fmt = [] if "--format" in extra else ["--format", "native"]
    code, stdout, err = cli("export", str(runs[family]), str(out), *fmt, *extra)
    assert code == 2 and err.startswith("robustcl: error: ") and err.count("\n") == 1, err
    assert "--format" in err and reason in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"block_layers": [1], "widths": [4]}, "CIFAR stem"),
        ({**TINY_WIDE, "stem": "imagenet"}, "wide_preact"),
        ({"block_layers": [1], "widths": [4], "stem": "imagenet", "stem_padding": 2}, "stem_padding"),
        ({"block_layers": [1], "widths": [4], "stem": "imagenet", "batch_norm_eps": 1e-3}, "eps"),
    ],
)
def test_native_conversion_refuses_in_one_line_naming_the_reason(kwargs, reason):
    from robustcl.native_export import native_resnet

    model = RobustCLResNetModel(RobustCLResNetConfig(**kwargs)).eval()
    message = user_error(native_resnet, model)
    assert "--format" in message and reason in message


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_native_conversion_matches_in_process(block):
    """The renamed weights give transformers' ResNetModel the same features on normalised pixels (fast, no CLI)."""
    from robustcl.native_export import native_resnet

    torch.manual_seed(0)
    config = RobustCLResNetConfig(block=block, block_layers=[2, 1, 1], widths=[4, 8, 4], stem="imagenet", stem_width=6)
    model = RobustCLResNetModel(config)
    model.train()
    with torch.no_grad():
        model(_pixels(32, 8))  # running statistics away from their initial values
    model.eval()
    native = native_resnet(model).eval()
    x = _pixels(32)
    with torch.no_grad():
        got = native(model.normalize(x)).pooler_output.flatten(1)
        assert (got - model(x).pooler_output).abs().max() <= 1e-5


def test_an_evaluation_is_never_written_into_a_native_export(tmp_path):
    from robustcl.evaluation.output import checked_output
    from robustcl.export_layout import EXPORT_MARKER, NATIVE_FORMAT

    export = tmp_path / "native"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "resnet", EXPORT_MARKER: NATIVE_FORMAT}))
    message = user_error(checked_output, export / "evals" / "eval.json")
    assert f"the output would be written into the model folder {export}" in message, message
