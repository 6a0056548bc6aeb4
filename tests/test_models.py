"""Tests for robustcl.models: config, ResNet encoder, multi-branch BN, heads and HF export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from robustcl.models import (
    MultiBatchNorm,
    ProjectionHead,
    RobustCLResNetConfig,
    RobustCLResNetModel,
    make_batch_norm,
    set_bn_branch,
)

SMALL = {"widths": [8, 16, 32, 64]}
BRANCHES = ["normal", "pgd"]


def small_model(**kwargs) -> RobustCLResNetModel:
    torch.manual_seed(0)
    return RobustCLResNetModel(RobustCLResNetConfig(**{**SMALL, **kwargs}))


def pixels(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def train_step_stats(model: nn.Module, **forward_kwargs) -> None:
    """One train-mode forward so that running statistics move away from their initial values."""
    model.train()
    with torch.no_grad():
        model(pixels(8, seed=7), **forward_kwargs)
    model.eval()


# --------------------------------------------------------------------------- config


def test_config_defaults_and_hidden_size():
    cfg = RobustCLResNetConfig()
    assert cfg.model_type == "robustcl-resnet"
    assert cfg.block_layers == [2, 2, 2, 2]
    assert cfg.widths == [64, 128, 256, 512]
    assert cfg.stem == "cifar" and cfg.stem_padding is None and cfg.resolved_stem_padding == 1
    assert RobustCLResNetConfig(stem="imagenet").resolved_stem_padding == 3
    assert cfg.bn_branches == []
    assert cfg.hidden_size == 512
    assert RobustCLResNetConfig(**SMALL).hidden_size == 64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stem": "vit"},
        {"widths": [8, 16], "block_layers": [2, 2, 2]},
        {"bn_branches": ["normal", "normal"]},
        {"bn_branches": ["a.b"]},
        {"bn_branches": [""]},
        {"block_layers": [2, 0, 2, 2]},
        {"image_mean": [0.5, 0.5]},
        {"image_std": [0.2, 0.0, 0.2]},
        {"stem_padding": -1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        RobustCLResNetConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = RobustCLResNetConfig(**SMALL, stem_padding=2, bn_branches=BRANCHES, image_mean=[0.5] * 3)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "robustcl-resnet"
    loaded = RobustCLResNetConfig.from_pretrained(tmp_path)
    for key in ("block_layers", "widths", "stem", "stem_padding", "bn_branches", "image_mean", "image_std"):
        assert getattr(loaded, key) == getattr(cfg, key), key


# --------------------------------------------------------------------------- shapes / params


def test_default_param_count_is_cifar_resnet18():
    # kuangliu ResNet18 has 11,173,962 parameters; minus the 512x10 fc layer that is 11,168,832.
    model = RobustCLResNetModel(RobustCLResNetConfig())
    assert sum(p.numel() for p in model.parameters()) == 11_168_832


def test_cifar_stem_output_shapes():
    model = small_model().eval()
    out = model(pixels(2), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 64, 4, 4)
    assert out.pooler_output.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))
    # stem output, then one entry per stage
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [
        (8, 32, 32),
        (8, 32, 32),
        (16, 16, 16),
        (32, 8, 8),
        (64, 4, 4),
    ]
    assert model(pixels(2)).hidden_states is None


def test_imagenet_stem_output_shapes():
    model = small_model(stem="imagenet").eval()
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.stride == (2, 2)
    out = model(pixels(2, size=64))
    assert out.last_hidden_state.shape == (2, 64, 2, 2)
    assert out.pooler_output.shape == (2, 64)


def test_stem_padding_override():
    model = small_model(stem_padding=2).eval()
    assert model.backbone.conv1.padding == (2, 2)
    assert model(pixels(2)).last_hidden_state.shape == (2, 64, 5, 5)


def test_return_dict_false_gives_tuple():
    model = small_model().eval()
    x = pixels(2)
    feature_map, pooled = model(x, return_dict=False)
    out = model(x)
    assert torch.equal(feature_map, out.last_hidden_state) and torch.equal(pooled, out.pooler_output)


def test_state_dict_names_follow_acl_layout():
    keys = set(small_model().state_dict())
    for key in (
        "backbone.conv1.weight",
        "backbone.bn1.running_mean",
        "backbone.layer1.0.conv1.weight",
        "backbone.layer2.0.shortcut.0.weight",
        "backbone.layer2.0.shortcut.1.running_var",
        "backbone.layer4.1.bn2.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("backbone.layer1.0.shortcut") for k in keys)
    assert all(m.bias is None for m in small_model().modules() if isinstance(m, nn.Conv2d))


def test_init_weights():
    model = small_model(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert m.num_batches_tracked.item() == 0
    w = model.backbone.layer4[0].conv1.weight
    expected_std = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3]))  # kaiming fan_out, relu
    assert abs(w.std().item() / expected_std - 1) < 0.15
    assert model.image_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert model.image_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


# --------------------------------------------------------------------------- normalisation


def test_normalisation_happens_inside_model():
    model = small_model().eval()
    x = pixels(2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = model.backbone((x - mean) / std)
    torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=0, atol=1e-6)

    state = model.state_dict()
    assert "image_mean" in state and "image_std" in state
    assert state["image_mean"].shape == (1, 3, 1, 1)
    assert "image_mean" not in model._non_persistent_buffers_set


# --------------------------------------------------------------------------- multi-branch BN


def test_make_batch_norm_kinds():
    assert type(make_batch_norm(4, [], dim=2)) is nn.BatchNorm2d
    assert type(make_batch_norm(4, [], dim=1)) is nn.BatchNorm1d
    mbn = make_batch_norm(4, BRANCHES, dim=1, eps=1e-3, momentum=0.2)
    assert isinstance(mbn, MultiBatchNorm)
    assert list(mbn.branches) == BRANCHES
    for bn in mbn.branches.values():
        assert type(bn) is nn.BatchNorm1d and bn.eps == 1e-3 and bn.momentum == 0.2


def test_multi_batch_norm_needs_active_branch():
    mbn = MultiBatchNorm(4, BRANCHES, dim=2)
    with pytest.raises(RuntimeError, match="no active branch"):
        mbn(torch.randn(2, 4, 3, 3))
    mbn.active_branch = "pgd"
    assert mbn(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


def test_every_bn_is_multi_branch():
    model = small_model(bn_branches=BRANCHES)
    inside = {id(bn) for m in model.modules() if isinstance(m, MultiBatchNorm) for bn in m.branches.values()}
    plain = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert plain and all(id(m) in inside for m in plain)
    # stem + two per block (4 stages x 2 blocks) + one per projection shortcut (stages 2-4)
    assert sum(isinstance(m, MultiBatchNorm) for m in model.modules()) == 1 + 4 * 2 * 2 + 3


def test_train_forward_updates_only_selected_branch():
    model = small_model(bn_branches=BRANCHES)
    train_step_stats(model, bn_branch="pgd")
    for m in model.modules():
        if isinstance(m, MultiBatchNorm):
            normal, pgd = m.branches["normal"], m.branches["pgd"]
            assert torch.all(normal.running_mean == 0) and torch.all(normal.running_var == 1)
            assert normal.num_batches_tracked.item() == 0
            assert pgd.num_batches_tracked.item() == 1
            assert not torch.all(pgd.running_mean == 0)
            # routing is per call: nothing stays active afterwards
            assert m.active_branch is None
    x = pixels(2)
    pgd, normal = model(x, bn_branch="pgd").pooler_output, model(x, bn_branch="normal").pooler_output
    assert not torch.allclose(pgd, normal)


def test_gradients_reach_only_selected_branch():
    model = small_model(bn_branches=BRANCHES).train()
    model(pixels(4), bn_branch="normal").pooler_output.sum().backward()
    bn = model.backbone.bn1
    assert bn.branches["normal"].weight.grad is not None
    assert bn.branches["pgd"].weight.grad is None


def test_branch_argument_validation():
    dual = small_model(bn_branches=BRANCHES).eval()
    with pytest.raises(ValueError, match="valid branches"):
        dual(pixels(2), bn_branch="fgsm")
    with pytest.raises(ValueError, match="bn_branch"):
        dual(pixels(2))
    single = small_model(bn_branches=["adv"]).eval()
    x = pixels(2)
    torch.testing.assert_close(single(x).pooler_output, single(x, bn_branch="adv").pooler_output)
    plain = small_model().eval()
    with pytest.raises(ValueError):
        plain(pixels(2), bn_branch="normal")


def test_set_bn_branch_function_and_context_manager():
    model = small_model(bn_branches=BRANCHES)
    mbns = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    set_bn_branch(model, "normal")
    assert all(m.active_branch == "normal" for m in mbns)
    with set_bn_branch(model, "pgd"):
        assert all(m.active_branch == "pgd" for m in mbns)
    assert all(m.active_branch == "normal" for m in mbns)
    with pytest.raises(ValueError, match=r"valid branches: \['normal', 'pgd'\]"):
        set_bn_branch(model, "fgsm")
    with pytest.raises(ValueError):
        set_bn_branch(small_model(), "normal")
    set_bn_branch(model, None)
    assert all(m.active_branch is None for m in mbns)


def test_to_single_branch_matches_branch_outputs():
    model = small_model(bn_branches=BRANCHES)
    train_step_stats(model, bn_branch="pgd")
    train_step_stats(model, bn_branch="normal")
    x = pixels(3)
    for branch in BRANCHES:
        single = model.to_single_branch(branch).eval()
        assert single.config.bn_branches == [] and model.config.bn_branches == BRANCHES
        assert not any(isinstance(m, MultiBatchNorm) for m in single.modules())
        expected = model(x, bn_branch=branch)
        got = single(x)
        assert (got.last_hidden_state - expected.last_hidden_state).abs().max().item() <= 1e-6
        assert (got.pooler_output - expected.pooler_output).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="valid branches"):
        model.to_single_branch("fgsm")
    with pytest.raises(ValueError, match="valid branches"):
        model.to_single_branch()
    only = small_model(bn_branches=["adv"]).eval()
    torch.testing.assert_close(only.to_single_branch().eval()(x).pooler_output, only(x).pooler_output)


def test_to_single_branch_of_plain_model_is_a_copy():
    model = small_model().eval()
    assert model.to_single_branch() is not model
    copy = model.to_single_branch("normal")
    assert copy is not model
    assert copy.backbone.conv1.weight.data_ptr() != model.backbone.conv1.weight.data_ptr()
    assert torch.equal(copy(pixels(2)).pooler_output, model(pixels(2)).pooler_output)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_same_process(tmp_path):
    model = small_model(bn_branches=BRANCHES, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    train_step_stats(model, bn_branch="pgd")
    model.save_pretrained(tmp_path)
    loaded = RobustCLResNetModel.from_pretrained(tmp_path).eval()
    x = pixels(2)
    for branch in BRANCHES:
        got, expected = loaded(x, bn_branch=branch), model(x, bn_branch=branch)
        assert torch.equal(got.pooler_output, expected.pooler_output)
    ref_state, got_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == got_state.keys()
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)


def test_remote_code_round_trip_in_fresh_process(tmp_path):
    RobustCLResNetConfig.register_for_auto_class()
    RobustCLResNetModel.register_for_auto_class("AutoModel")

    dual = small_model(bn_branches=BRANCHES, stem_padding=2)
    train_step_stats(dual, bn_branch="pgd")
    single = dual.to_single_branch("pgd").eval()
    dual.save_pretrained(tmp_path / "dual")
    single.save_pretrained(tmp_path / "single")
    for folder in ("dual", "single"):
        files = {p.name for p in (tmp_path / folder).iterdir()}
        assert {"configuration_robustcl.py", "modeling_robustcl.py", "resnet.py", "config.json"} <= files
        auto_map = json.loads((tmp_path / folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModel"] == "modeling_robustcl.RobustCLResNetModel"

    x = pixels(2)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = dual(x, bn_branch="pgd").pooler_output

    script = textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoModel

        x = torch.load("x.pt", weights_only=True)
        dual = AutoModel.from_pretrained("dual", trust_remote_code=True).eval()
        single = AutoModel.from_pretrained("single", trust_remote_code=True).eval()
        assert type(dual).__module__.startswith("transformers_modules"), type(dual).__module__
        with torch.no_grad():
            out = {
                "dual": dual(x, bn_branch="pgd").pooler_output,
                "single": single(x).pooler_output,
            }
        assert not any(m == "robustcl" or m.startswith("robustcl.") for m in sys.modules), "robustcl imported"
        torch.save(out, "out.pt")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(Path(tmp_path) / "out.pt", weights_only=True)
    torch.testing.assert_close(out["dual"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["single"], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- heads


def test_projection_head_three_layers_matches_acl():
    head = ProjectionHead(64, 32, 16)
    assert head.fc1.bias is not None and head.fc2.bias is None and head.fc3.bias is None
    assert (head.fc1.in_features, head.fc1.out_features) == (64, 32)
    assert (head.fc3.in_features, head.fc3.out_features) == (32, 16)
    assert all(type(getattr(head, f"bn{i}")) is nn.BatchNorm1d for i in (1, 2, 3))
    assert head(torch.randn(5, 64)).shape == (5, 16)


def test_projection_head_two_layers_and_last_bn():
    head = ProjectionHead(64, 32, 16, num_layers=2)
    assert not hasattr(head, "fc3") and hasattr(head, "bn2") and head.fc2.bias is None
    assert head(torch.randn(5, 64)).shape == (5, 16)
    no_last = ProjectionHead(64, 32, 16, num_layers=2, last_bn=False)
    assert hasattr(no_last, "bn1") and not hasattr(no_last, "bn2")
    assert no_last(torch.randn(5, 64)).shape == (5, 16)


def test_projection_head_branch_routing():
    head = ProjectionHead(16, 8, 4, bn_branches=BRANCHES).train()
    assert isinstance(head.bn1, MultiBatchNorm) and head.bn1.dim == 1
    head(torch.randn(6, 16), bn_branch="pgd")
    for i in (1, 2, 3):
        bn = getattr(head, f"bn{i}")
        assert bn.branches["pgd"].num_batches_tracked.item() == 1
        assert bn.branches["normal"].num_batches_tracked.item() == 0
        assert torch.all(bn.branches["normal"].running_mean == 0)
        assert bn.active_branch is None
    with pytest.raises(ValueError, match="valid branches"):
        head(torch.randn(6, 16), bn_branch="fgsm")
    with pytest.raises(ValueError):
        head(torch.randn(6, 16))
    with pytest.raises(ValueError):
        ProjectionHead(16, 8, 4)(torch.randn(6, 16), bn_branch="pgd")
