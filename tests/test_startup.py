"""Start-up cost of the command line and the lazy registration with transformers' Auto classes that pays for it.

``import robustcl`` imports neither torch nor transformers, yet any process that imported it loads robustcl exports
with ``AutoConfig`` / ``AutoModel`` without remote code, whichever of robustcl and transformers it imports first. Each
property needs a fresh process: the test process has long imported everything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, REPO, cli_env
from safetensors.torch import load_file, save_file

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def test_help_starts_in_under_a_second():
    """`robustcl --help`, the installed console script in a fresh process, answers in under a second. Best of three,
    so a busy machine does not fail it; the transformers stack it used to import took several seconds."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([str(BIN / "robustcl"), "--help"], env=cli_env(), capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0 and "Usage: robustcl" in done.stdout, done.stderr[-3000:]
    assert min(times) < 1.0, times


def test_no_help_imports_torch_transformers_datasets_or_accelerate():
    """Every command's --help (and the bare command) in one fresh process through the console script's entry point:
    none imports the heavy stack, so none pays its seconds. Commands are listed from the app, new ones included."""
    script = f"""
import sys
import typer
from robustcl.cli import app, main

def paths(command, prefix):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {{}}).items()):
        yield from paths(sub, [*prefix, name])

for argv in paths(typer.main.get_command(app), []):
    sys.argv = ["robustcl", *argv, "--help"]
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, (argv, exit.code)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Usage: robustcl") >= 8
    assert done.stdout.strip().splitlines()[-1] == "[]"


# How a user's script may begin: robustcl first, the transformers package first (its attributes load lazily), or
# transformers' Auto classes already loaded when robustcl is imported.
IMPORT_ORDERS = {
    "robustcl-first": "import robustcl\nfrom transformers import AutoConfig\n",
    "transformers-first": "import transformers\nimport robustcl\nAutoConfig = transformers.AutoConfig\n",
    "auto-classes-first": "from transformers import AutoConfig, AutoModel\nimport robustcl\n",
}


@pytest.mark.parametrize("order", sorted(IMPORT_ORDERS))
def test_import_robustcl_alone_lets_auto_classes_load_an_export(order, tiny_export, tmp_path):
    """A fresh process that only imports robustcl (no robustcl.models, no trust_remote_code) loads an export whose
    model code was removed with AutoConfig and AutoModel, and computes the exported weights' features."""
    shutil.copytree(tiny_export, tmp_path / "export", ignore=shutil.ignore_patterns("*.py"))
    torch.manual_seed(1)
    save_file({"x": torch.rand(2, 3, 16, 16)}, str(tmp_path / "x.safetensors"))
    script = IMPORT_ORDERS[order] + (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "config = AutoConfig.from_pretrained('export')\n"
        "assert type(config).__module__ == 'robustcl.models.configuration_robustcl', type(config)\n"
        "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained('export').eval()\n"
        "assert type(model).__module__ == 'robustcl.models.modeling_robustcl', type(model)\n"
        "with torch.no_grad():\n"
        "    out = model(load_file('x.safetensors')['x'])\n"
        "save_file({'pooled': out.pooler_output, 'map': out.last_hidden_state.contiguous()}, 'out.safetensors')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    expected = _features(tiny_export, load_file(str(tmp_path / "x.safetensors"))["x"])
    torch.testing.assert_close(got["pooled"], expected.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["map"], expected.last_hidden_state, rtol=0, atol=1e-6)


def test_import_robustcl_registers_no_sooner_than_transformers_is_used():
    """The registration waits for transformers: a bare `import robustcl` leaves torch and transformers unloaded, and
    still offers `robustcl.models` as an attribute, as when it imported the models eagerly."""
    script = f"""
import sys
import robustcl
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
print(robustcl.models.RobustCLResNetModel.__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "RobustCLResNetModel"]


def test_registering_twice_changes_nothing():
    """Registration may run again (the models package and the import hook both reach it): the Auto classes keep
    resolving to robustcl's classes and nothing raises."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from robustcl.models import (
        RobustCLResNetConfig,
        RobustCLResNetForImageClassification,
        RobustCLResNetModel,
        register_auto_classes,
    )

    register_auto_classes()
    register_auto_classes()
    config = RobustCLResNetConfig(block_layers=[1, 1], widths=[8, 16])
    assert type(AutoConfig.for_model(RobustCLResNetConfig.model_type)) is RobustCLResNetConfig
    assert type(AutoModel.from_config(config)) is RobustCLResNetModel
    assert type(AutoModelForImageClassification.from_config(config)) is RobustCLResNetForImageClassification


def _features(export: Path, pixels: torch.Tensor):
    from robustcl.models import RobustCLResNetModel

    with torch.no_grad():
        return RobustCLResNetModel.from_pretrained(export).eval()(pixels)
