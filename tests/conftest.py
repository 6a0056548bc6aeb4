"""Fixtures shared by several test files: a local Hub over real HTTP, a trained and evaluated run with its exports,
and a Python environment without robustcl; the reference-parity tests' images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import TINY, bare_python, call_main, robustcl, with_sets
from hub_server import LocalHub

AFF_SETS = ["eval.aff.epochs=1", "eval.aff.batch_size=64", "eval.aff.attack_steps=2"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``robustcl ARGS`` in this process (the console script's entry point): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # call_main changes it

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = call_main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # huggingface_hub reads most env vars at import time, so tests also pass endpoint/token/cache_dir explicitly;
    # the env matters for subprocesses and for anything read lazily.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with LocalHub() as server:
        yield server


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    """A tiny ACL-DS run evaluated with SLF (at the end of pretraining) and AFF (afterwards)."""
    run = tmp_path_factory.mktemp("run") / "digits-acl"
    res = robustcl("pretrain", "recipes/quickstart.yaml", "-o", str(run), *with_sets(*TINY, "training.max_steps=4"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = robustcl("evaluate", str(run), "--protocol", "aff", *with_sets(*TINY, *AFF_SETS))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def exported(run, tmp_path_factory) -> Path:
    """``encoder/``: the run's encoder export (with both evaluations); ``aff/``: its AFF classifier export."""
    out = tmp_path_factory.mktemp("exports")
    res = robustcl("export", str(run), str(out / "encoder"), "--repo-id", "my-org/digits-acl")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluations: slf, aff" in res.stdout
    res = robustcl("export", str(run), str(out / "aff"), "--classifier", "aff", "--repo-id", "my-org/digits-acl-aff")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def bare(tmp_path_factory) -> Path:
    """Python of a virtual environment with only torch, transformers and safetensors (and their dependencies)."""
    return bare_python(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """An export (robustcl export layout) of a seeded two-stage width-8/16 encoder: what evaluation tests load."""
    import torch

    from robustcl.export import export_encoder
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export") / "tiny-encoder"
    export_encoder(RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1], widths=[8, 16])), None, out)
    return out


@pytest.fixture(scope="session")
def parity_data(tmp_path_factory) -> Path:
    """The reference-parity tests' dataset: 16 random colour images (tests/parity.py colour_images)."""
    from parity import colour_images

    return colour_images(tmp_path_factory.mktemp("parity"))
