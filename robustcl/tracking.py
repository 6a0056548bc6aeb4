"""Experiment trackers: whichever Accelerate supports (TensorBoard, Weights & Biases, MLflow, …), each an optional
pip extra of the same name. Here: the names a recipe may give, the check that their packages are installed, and the
start of a run's trackers with the resolved recipe as its config. ``metrics.jsonl`` is always written; the trackers
get the same records at the same steps (``accelerator.log`` in the training loop)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import raise_on_every_process
from .errors import UserError, one_line

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .recipe import Recipe

# Trackers that take a run's config as one scalar per key (TensorBoard's hparams refuse lists and dicts; an MLflow
# param is one string of limited length, so Accelerate drops a whole section): they get the recipe under dotted keys.
# The others (W&B, …) take it nested, which is how their runs are filtered (config.method.name).
FLAT_CONFIG = frozenset({"tensorboard", "mlflow"})


def check_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, which Accelerate would drop without a word: the user asked
    for it. Called before anything of a run starts (no run directory, data or step yet)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        # A tracker class registered with Accelerate in Python (not one of its own types) is there by definition.
        if name in LoggerType.list() and name not in installed:
            raise UserError(
                f"logging.trackers names '{name}', whose package is not installed",
                "logging.trackers",
                f'install it with: pip install "robustcl[{name}]", or leave {name} out of logging.trackers',
            )


def start_trackers(accelerator: Accelerator, recipe: Recipe, run_dir: Path, step: int) -> None:
    """Start the recipe's trackers on the main process for a session that begins after ``step``, each given the
    resolved recipe as the run's config (in the form it takes: :func:`run_config`). A tracker that cannot start (no
    W&B login, no MLflow server) ends every process with its reason on one line."""
    if not recipe.logging.trackers:
        return
    error = None
    if accelerator.is_main_process:
        try:
            # W&B reads its git facts from the folder it is given: one that exists.
            Path(accelerator.logging_dir).mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(recipe.logging.project, init_kwargs=_init_kwargs(accelerator, run_dir, step))
            for tracker in accelerator.trackers:
                tracker.store_init_configuration(run_config(recipe, tracker.name))
        except Exception as exc:  # each tracker's own errors, of its own types
            error = UserError(
                f"a tracker could not start: {type(exc).__name__}: {one_line(str(exc))}",
                f"logging.trackers: {', '.join(recipe.logging.trackers)}",
                "set it up as its documentation says (W&B: wandb login, or WANDB_MODE=offline to log without an "
                "account; MLflow: MLFLOW_TRACKING_URI), or leave it out of logging.trackers",
            )
    raise_on_every_process(accelerator, error)


def run_config(recipe: Recipe, tracker: str) -> dict[str, Any]:
    """The resolved recipe as ``tracker`` takes a run's config: nested, or for the trackers of FLAT_CONFIG one value
    per dotted key (``method.name``), lists written as JSON text."""
    tree = recipe.to_dict()
    return _flat(tree) if tracker in FLAT_CONFIG else tree


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value) if isinstance(value, list) else value
    return out


def _init_kwargs(accelerator: Accelerator, run_dir: Path, step: int) -> dict[str, dict[str, Any]]:
    """What the trackers call the run (the run directory's name) and where W&B keeps its files (the run's logs
    folder, beside TensorBoard's). W&B's arguments would override its environment, so WANDB_DIR / WANDB_NAME, when
    set, are left to win; offline mode, project entity and resuming one W&B or MLflow run across sessions stay with
    their own variables (WANDB_MODE, WANDB_ENTITY, WANDB_RUN_ID + WANDB_RESUME, MLFLOW_TRACKING_URI, MLFLOW_RUN_ID)."""
    name = Path(run_dir).resolve().name
    wandb = {"dir": str(accelerator.logging_dir), "name": name}
    for key, variable in (("dir", "WANDB_DIR"), ("name", "WANDB_NAME")):
        if os.environ.get(variable):
            del wandb[key]
    kwargs: dict[str, dict[str, Any]] = {"wandb": wandb, "mlflow": {"run_name": name}}
    if step:
        # A resumed session repeats the steps after its checkpoint: TensorBoard hides what a stopped session had
        # logged from there on, as metrics.jsonl replaces those lines.
        kwargs["tensorboard"] = {"purge_step": step + 1}
    return kwargs
