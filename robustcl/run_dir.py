"""The run directory: its resolved recipe and its checkpoints (written atomically, found again on resume).

Layout::

    RUN_DIR/recipe.yaml                 resolved recipe of the run
    RUN_DIR/checkpoints/step-00000100/  one complete `accelerator.save_state` folder + COMPLETE marker
    RUN_DIR/metrics.jsonl, summary.json, logs/, encoder/
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import save_file

from .deepspeed_support import safe_checkpoint_loading, uses_deepspeed
from .errors import UserError
from .export_layout import WEIGHTS_FILE
from .recipe import Recipe, recipe_from_dict

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
_PREFIX = "step-"


def read_run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run directory was trained with, or None when it holds no run."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    return recipe_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only once its marker is written)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, step: int, keep: int, train_state: dict[str, Any]
) -> Path:
    """Write the full training state for ``step`` into a temporary folder, then rename it into place.

    A run killed at any moment leaves either the previous checkpoints or the new complete one, never a
    half-written folder that resume would pick up. Called on every process (each saves its RNG state).
    ``train_state`` (counters, scheduler state) is stored as JSON: Accelerate's custom-object pickles load
    with ``weights_only=False``, which we never do.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if uses_deepspeed(accelerator):
        # DeepSpeed writes its own engine files (.pt): the full weights go beside them as safetensors, for export
        # and evaluation. Every process takes part in gathering them (ZeRO-3: process 0 receives them).
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state))
        marker = tmp / COMPLETE_MARKER
        with marker.open("w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states (safetensors / ``weights_only`` loads); return the train state."""
    with safe_checkpoint_loading() if uses_deepspeed(accelerator) else nullcontext():
        accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / TRAIN_STATE).read_text())


def require_checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(
            "no complete checkpoint in the run directory",
            str(Path(run_dir) / CHECKPOINTS),
            "train first (robustcl pretrain RECIPE --output-dir RUN_DIR) or give the right RUN_DIR",
        )
    return ckpt
