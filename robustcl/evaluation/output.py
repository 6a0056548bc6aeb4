"""Where an evaluation writes: ``eval.json``, with ``robustness_curve.png`` and the finetuned ``classifier/`` beside
it. The defaults are a run directory's ``eval/PROTOCOL/`` and ``eval/MODEL/PROTOCOL/`` for other models; a chosen
``--output`` may never overwrite what is not an evaluation (a run's recipe, an export's config, any other file)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from ..eval_report import read_report
from ..export_layout import CONFIG_FILE, MODEL_TYPE, is_export_config, read_model_type
from ..run_dir import is_run_dir
from ..run_layout import CLASSIFIER_DIR, EVAL_DIR, REPORT_FILE

# Folders above an output that are checked for being a run directory or an export: enough for the layouts robustcl
# writes (RUN/eval/PROTOCOL, EXPORT/eval/PROTOCOL), without walking to the filesystem's root.
_ANCESTORS_CHECKED = 4


def run_dir_output(run_dir: Path, protocol: str) -> Path:
    """Where a run directory keeps its evaluations (also the end-of-pretraining one)."""
    return Path(run_dir) / EVAL_DIR / protocol / REPORT_FILE


def default_output(reference: str, is_run_dir: bool, protocol: str) -> Path:
    """Run directories keep their evaluations inside; other models get ``eval/<name>/<protocol>/``."""
    if is_run_dir:
        return run_dir_output(Path(reference), protocol)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", reference.strip("/")).strip("_") or "model"
    return Path(EVAL_DIR) / name / protocol / REPORT_FILE


def _refuse(what: str, output: Path, fix: str) -> UserError:
    return UserError(what, f"--output {output}", fix)


def _check_place(folder: Path, output: Path) -> None:
    """Refuse a folder inside an export, and a folder of a run directory outside its ``eval/``."""
    folder = Path(os.path.abspath(folder))
    for ancestor in [folder, *folder.parents][:_ANCESTORS_CHECKED]:
        # A robustcl export at any level; any model folder (config.json) as the folder itself.
        if is_export_config(ancestor) or (ancestor == folder and (ancestor / CONFIG_FILE).is_file()):
            raise _refuse(
                f"the output would be written into the model folder {ancestor}, among its own files",
                output,
                "write evaluations outside model folders (robustcl export copies a run's evaluations into its export)",
            )
        if is_run_dir(ancestor) and not folder.is_relative_to(ancestor / EVAL_DIR):
            raise _refuse(
                f"the output would be written among the run directory's own files ({ancestor})",
                output,
                f"leave --output out (the run keeps it in {run_dir_output(ancestor, 'PROTOCOL')}) or choose a "
                "folder of its own",
            )


def checked_output(output: Path) -> Path:
    """The ``eval.json`` path a chosen ``--output`` means (a folder, or a name without a suffix, means
    ``FOLDER/eval.json``), refused when writing it, the curve PNG and ``classifier/`` would overwrite something
    that is not an earlier evaluation."""
    output = Path(output)
    if output.is_dir() or not output.suffix:
        output = output / REPORT_FILE
    if output.suffix.lower() != ".json":
        raise _refuse(
            "the evaluation report is JSON: the output must be a .json file or a folder",
            output,
            f"give e.g. {output.with_suffix('.json')}, or a folder to hold eval.json",
        )
    _check_place(output.parent, output)
    if output.exists() and read_report(output) is None:  # not an eval.json robustcl wrote
        raise _refuse(
            "the output file exists and is not an evaluation report robustcl wrote; it would be overwritten",
            output,
            "choose a new file or folder",
        )
    classifier = output.with_name(CLASSIFIER_DIR)
    if classifier.exists() and read_model_type(classifier) != MODEL_TYPE:
        raise _refuse(
            f"{classifier} exists and is not a classifier robustcl saved; the evaluation would replace it",
            output,
            "choose a folder of its own for the evaluation",
        )
    return output
