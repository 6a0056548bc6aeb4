"""How a run hands over its encoder, at the end of ``robustcl pretrain`` and again after ``robustcl lpaft``:
``RUN_DIR/encoder`` exported from the run's newest weights (the DynACL++ stage's once it ran), evaluated when the
recipe's ``eval.after_pretrain``, then exported again so that its model card states the measured figures."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from .eval_report import EvalReport
from .export import export_run
from .recipe import Recipe
from .run_layout import ENCODER_DIR


def export_and_evaluate(run_dir: Path, recipe: Recipe, accelerator: Accelerator, progress: bool) -> EvalReport | None:
    """Every process calls it (the evaluation takes a shard on each); the export is the main process's. Returns the
    evaluation's report, or None when the recipe does not evaluate after pretraining."""
    from .evaluation import evaluate, run_dir_output

    export_dir = run_dir / ENCODER_DIR
    _export(run_dir, export_dir, recipe, accelerator)
    if not recipe.eval.after_pretrain:
        return None
    # The exported folder is what users get, so that is what gets measured.
    output = run_dir_output(run_dir, recipe.eval.protocol)
    report = evaluate(export_dir, recipe=recipe, output=output, accelerator=accelerator, progress=progress)
    _export(run_dir, export_dir, recipe, accelerator)
    return report


def _export(run_dir: Path, export_dir: Path, recipe: Recipe, accelerator: Accelerator) -> None:
    # The card's loading example names the run, not the folder called "encoder".
    repo_id = recipe.export.repo_id or run_dir.resolve().name
    if accelerator.is_main_process:
        export_run(run_dir, export_dir, repo_id=repo_id)
    accelerator.wait_for_everyone()
