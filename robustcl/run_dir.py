"""The run directory: its resolved recipe and its checkpoints (written atomically, found again on resume). Its
files' names, and the layout, are in ``run_layout``.

A checkpoint is complete once its COMPLETE marker is written, listing every file's size and SHA-256 (checked before
a checkpoint is used).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .atomic_write import TEMP_PREFIX, atomic_folder
from .deepspeed_support import safe_checkpoint_loading, uses_deepspeed
from .errors import StorageError, UserError, describe_write_failure, is_write_failure
from .export_layout import WEIGHTS_FILE
from .json_files import to_json
from .recipe import Recipe, read_yaml, recipe_from_dict
from .run_layout import CHECKPOINT_PREFIX, CHECKPOINTS, COMPLETE_MARKER, RECIPE_FILE, TRAIN_STATE


def read_run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run directory was trained with, or None when it holds no run."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    return recipe_from_dict(read_yaml(path.read_text()) or {}, str(path))


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory: its recipe and a checkpoints folder."""
    return (Path(path) / RECIPE_FILE).is_file() and (Path(path) / CHECKPOINTS).is_dir()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only once its marker is written)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint folder was written after."""
    return int(Path(checkpoint).name.removeprefix(CHECKPOINT_PREFIX))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in a checkpoint folder (the marker aside), each flushed to the disk first."""
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        records[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return records


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted (a file missing, truncated or changed since it was written), or None."""
    try:
        files = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return f"its {COMPLETE_MARKER} marker is unreadable"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match the checksum it was written with"
    return None


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; damaged newer ones are skipped (and
    reported on stderr when ``warn``)."""
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        if warn:
            print(f"robustcl: warning: skipping damaged checkpoint {checkpoint}: {problem}", file=sys.stderr)
    return None


def _remove_stale(root: Path) -> None:
    """What a run killed while writing a checkpoint, or while deleting an old one, left behind."""
    unmarked = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if not (p / COMPLETE_MARKER).is_file()]
    for stale in [*root.glob(f"{TEMP_PREFIX}{CHECKPOINT_PREFIX}*"), *unmarked]:
        shutil.rmtree(stale, ignore_errors=True)


def _write_state(
    accelerator: Accelerator, model: torch.nn.Module, folder: Path, step: int, train_state: dict[str, Any]
) -> None:
    """Every process's part of the checkpoint into ``folder``; then, on the main process, the train state and the
    marker, written last: it lists every other file, each flushed to the disk first."""
    accelerator.save_state(str(folder), safe_serialization=True)
    if uses_deepspeed(accelerator):
        # DeepSpeed writes its own engine files (.pt): the full weights go beside them as safetensors, for
        # export and evaluation. Every process takes part in gathering them (ZeRO-3: process 0 receives them).
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / TRAIN_STATE).write_text(to_json(train_state))
        with (folder / COMPLETE_MARKER).open("w") as f:
            json.dump({"step": step, "files": _file_records(folder)}, f)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def _storage_errors(run_dir: Path, step: int, final: Path) -> Iterator[None]:
    """A failed write (disk full) as a :class:`StorageError` that says which checkpoint is left to resume from."""
    try:
        yield
    except Exception as err:
        if not is_write_failure(err):
            raise
        previous = latest_checkpoint(run_dir, warn=False)
        kept = f"the last checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint existed"
        raise StorageError(
            f"could not write the checkpoint of step {step}: {describe_write_failure(err)}; {kept}",
            str(final),
            "free some space and run the same command again: it resumes from the last checkpoint",
        ) from err


def _drop_old_checkpoints(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        # Marker first: a kill during the deletion leaves a folder that no longer counts as a checkpoint.
        (old / COMPLETE_MARKER).unlink()
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, step: int, keep: int, train_state: dict[str, Any]
) -> Path:
    """Write the full training state for ``step`` into a temporary folder, then rename it into place.

    A run killed at any moment leaves either the previous checkpoints or the new complete one, never a
    half-written folder that resume would pick up. Every file is flushed to the disk and recorded with its size and
    SHA-256 in the marker, so later damage is detected. Older checkpoints beyond ``keep`` are deleted only once the
    new one is in place. A failed write (disk full) removes the partial folder, leaves every earlier checkpoint as
    it was and raises :class:`StorageError`. Called on every process (each saves its RNG state).
    ``train_state`` (counters, scheduler state) is stored as JSON: Accelerate's custom-object pickles load
    with ``weights_only=False``, which we never do.
    """
    final = Path(run_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:08d}"
    main = accelerator.is_main_process
    if main:
        _remove_stale(final.parent)
    # The main process creates the temporary folder and renames it into place; every process writes into it.
    with _storage_errors(run_dir, step, final), atomic_folder(final, durable=True, owner=main) as tmp:
        accelerator.wait_for_everyone()  # the folder exists before any process writes into it
        _write_state(accelerator, model, tmp, step, train_state)
    if main:
        _drop_old_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states (safetensors / ``weights_only`` loads); return the train state."""
    try:
        with safe_checkpoint_loading() if uses_deepspeed(accelerator) else nullcontext():
            accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as err:
        # torch.load(weights_only=True) met a pickled object that is not tensors and plain containers: loading it
        # would run code from the file.
        raise UserError(
            f"checkpoint refused: a file holds objects other than tensors ({str(err).splitlines()[-1][:200]})",
            str(checkpoint),
            "resume only from checkpoints robustcl wrote; delete this folder to resume from an earlier one",
        ) from None
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
