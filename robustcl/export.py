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


def single_branch_encoder(encoder: RobustCLResNetModel, bn_branch: str | None) -> RobustCLResNetModel:
    """A plain-BN copy of ``encoder`` keeping ``bn_branch`` (ignored for single-branch encoders), in eval mode."""
    branches = list(encoder.config.bn_branches)
    if branches and bn_branch not in branches:
        raise UserError(
            f"BN branch '{bn_branch}' does not exist in this encoder",
            "export.bn_branch",
            f"choose one of {', '.join(branches)}",
        )
    return encoder.to_single_branch(bn_branch if branches else None).eval()


def export_encoder(
    encoder: RobustCLResNetModel, bn_branch: str | None, out_dir: Path, recipe: Recipe | None = None
) -> RobustCLResNetModel:
    """Write ``out_dir`` with one BN branch as a plain-BN model; returns the exported model (eval mode).

    The folder loads with ``AutoModel.from_pretrained(out_dir, trust_remote_code=True)`` where only torch and
    transformers are installed: the config/modeling files are copied in and ``auto_map`` points at them.
    Written to a temporary sibling folder first, so a failure never leaves a half-written export.
    """
    out_dir = Path(out_dir)
    model = single_branch_encoder(encoder, bn_branch).cpu()
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


def _branch_for(method: Method, recipe: Recipe, bn_branch: str | None) -> str | None:
    """The branch asked for, else the recipe's, else the method's adversarial one."""
    return bn_branch or recipe.export.bn_branch or method.export_branch


def export_method(method: Method, out_dir: Path, recipe: Recipe, bn_branch: str | None = None) -> RobustCLResNetModel:
    """Export a method's encoder (branch: ``bn_branch``, else the recipe's, else the method's adversarial one)."""
    return export_encoder(method.encoder, _branch_for(method, recipe, bn_branch), out_dir, recipe)


def _method_from_run(run_dir: Path) -> tuple[Method, Recipe]:
    """Rebuild a run's method from its recipe and load its newest complete checkpoint (strictly)."""
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
    return method, recipe


def load_run_encoder(run_dir: Path, bn_branch: str | None = None) -> tuple[RobustCLResNetModel, Recipe, str | None]:
    """The newest checkpoint's encoder as a plain-BN model (eval mode), its recipe and the branch kept."""
    method, recipe = _method_from_run(run_dir)
    branch = _branch_for(method, recipe, bn_branch)
    return single_branch_encoder(method.encoder, branch), recipe, branch


def export_run(run_dir: Path, out_dir: Path, bn_branch: str | None = None) -> Path:
    """Export the newest complete checkpoint of a run directory (what ``robustcl export`` does)."""
    method, recipe = _method_from_run(run_dir)
    export_method(method, out_dir, recipe, bn_branch)
    return Path(out_dir)
