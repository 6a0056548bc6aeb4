"""Export the encoder as a transformers model folder: safetensors weights + config with remote code."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .methods.base import Method
from .models import RobustCLResNetModel
from .recipe import Recipe
from .run_dir import RECIPE_FILE, read_run_recipe, require_checkpoint

WEIGHTS_FILE = "model.safetensors"


def export_encoder(
    encoder: RobustCLResNetModel, bn_branch: str | None, out_dir: Path, recipe: Recipe | None = None
) -> RobustCLResNetModel:
    """Write ``out_dir`` with one BN branch as a plain-BN model; returns the exported model (eval mode).

    The folder loads with ``AutoModel.from_pretrained(out_dir, trust_remote_code=True)`` where only torch and
    transformers are installed: the config/modeling files are copied in and ``auto_map`` points at them.
    Written to a temporary sibling folder first, so a failure never leaves a half-written export.
    """
    out_dir = Path(out_dir)
    branches = list(encoder.config.bn_branches)
    if branches and bn_branch not in branches:
        raise UserError(
            f"BN branch '{bn_branch}' does not exist in this encoder",
            "export.bn_branch",
            f"choose one of {', '.join(branches)}",
        )
    model = encoder.to_single_branch(bn_branch if branches else None)
    model = model.cpu().eval()
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModel")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if recipe is not None:
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return model


def export_method(method: Method, out_dir: Path, recipe: Recipe, bn_branch: str | None = None) -> RobustCLResNetModel:
    """Export a method's encoder with the branch asked for, else the recipe's, else the method's adversarial one."""
    branch = bn_branch or recipe.export.bn_branch or method.export_branch
    return export_encoder(method.encoder, branch, out_dir, recipe)


def export_run(run_dir: Path, out_dir: Path, bn_branch: str | None = None) -> Path:
    """Export the newest complete checkpoint of a run directory (what ``robustcl export`` does)."""
    from safetensors.torch import load_file

    from .methods import build_method

    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    if recipe is None:
        raise UserError(
            "not a robustcl run directory (no recipe.yaml)",
            str(run_dir),
            "give the --output-dir of a robustcl pretrain run",
        )
    checkpoint = require_checkpoint(run_dir)
    method = build_method(recipe)
    method.load_state_dict(load_file(checkpoint / WEIGHTS_FILE), strict=True)
    export_method(method, out_dir, recipe, bn_branch)
    return Path(out_dir)
