"""``robustcl export``: a run's encoder (or a finetuned classifier) as a transformers model folder — safetensors
weights, config with remote code, image processor config, model card, recipe and the evaluations of exactly these
weights. The folder list is in ``export_layout``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .export_layout import (
    CARD_FILE,
    CLASSIFIER_DIR,
    CONFIG_FILE,
    CURVE_FILE,
    EVAL_DIR,
    MODEL_TYPE,
    PREPROCESSOR_FILE,
    PROTOCOLS,
    RECIPE_FILE,
    REPORT_FILE,
    WEIGHTS_FILE,
    export_files,
    read_model_type,
)
from .fingerprint import weights_sha256
from .methods.base import Method
from .model_card import CardFacts, render_model_card
from .models import RobustCLResNetForImageClassification, RobustCLResNetModel, RobustCLResNetPreTrainedModel
from .recipe import Recipe
from .run_dir import TRAIN_STATE, read_run_recipe, require_checkpoint


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


def image_processor_config(resolution: int) -> dict[str, Any]:
    """transformers' ``BitImageProcessor`` settings that match robustcl's own data loading: shorter side resized to
    ``resolution`` (bicubic), centre crop, pixels scaled to [0, 1], no normalisation (the model normalises inside).
    """
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resolution},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": resolution, "width": resolution},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
    }


def _prepare_output(out_dir: Path) -> Path:
    """A temporary sibling of ``out_dir``; refuses to replace a folder that is not an earlier export."""
    if out_dir.exists() and any(out_dir.iterdir()) and read_model_type(out_dir) != MODEL_TYPE:
        raise UserError(
            "output folder exists and is not a robustcl export",
            str(out_dir),
            "choose a new or empty folder (an earlier export is replaced)",
        )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_export(
    model: RobustCLResNetPreTrainedModel,
    out_dir: Path,
    facts: CardFacts,
    eval_dirs: dict[str, Path] | None = None,
    card_template: Path | None = None,
) -> None:
    """Write the export folder. It is assembled in a temporary sibling and renamed into place, so a failure never
    leaves a half-written export (an earlier export at ``out_dir`` stays until the new one is complete).

    ``eval_dirs`` maps a protocol to the folder holding its ``eval.json`` (and curve PNG) to ship.
    """
    out_dir = Path(out_dir)
    model = model.cpu().eval()
    is_classifier = isinstance(model, RobustCLResNetForImageClassification)
    card = render_model_card(facts, card_template)  # before any file is written: a bad template fails first
    tmp = _prepare_output(out_dir)
    try:
        # auto_map + copied modeling files: AutoModel.from_pretrained(..., trust_remote_code=True) works with
        # transformers and torch alone.
        type(model.config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForImageClassification" if is_classifier else "AutoModel")
        model.save_pretrained(tmp, safe_serialization=True)
        if is_classifier:
            # The encoder alone loads from the same folder (weights under `robustcl.`).
            config = json.loads((tmp / CONFIG_FILE).read_text())
            config["auto_map"]["AutoModel"] = f"modeling_robustcl.{RobustCLResNetModel.__name__}"
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / PREPROCESSOR_FILE).write_text(json.dumps(image_processor_config(facts.resolution), indent=2) + "\n")
        if facts.recipe is not None:
            (tmp / RECIPE_FILE).write_text(facts.recipe.to_yaml())
        for protocol, source in (eval_dirs or {}).items():
            target = tmp / EVAL_DIR / protocol
            target.mkdir(parents=True)
            for name in (REPORT_FILE, CURVE_FILE):
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, target / name)
        card.save(tmp / CARD_FILE)
        export_files(tmp)  # the folder is exactly a complete export
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_encoder(
    encoder: RobustCLResNetModel,
    bn_branch: str | None,
    out_dir: Path,
    recipe: Recipe | None = None,
    resolution: int = 32,
) -> RobustCLResNetModel:
    """Export a bare encoder (no run directory: no training record, no evaluations); returns the exported model."""
    model = single_branch_encoder(encoder, bn_branch)
    facts = CardFacts(
        repo_id=Path(out_dir).name,
        license=recipe.export.license if recipe else "apache-2.0",
        model=model,
        resolution=recipe.data.resolution if recipe else resolution,
        bn_branch=bn_branch if encoder.config.bn_branches else None,
        recipe=recipe,
    )
    write_export(model, out_dir, facts)
    return model


def _branch_for(method: Method, recipe: Recipe, bn_branch: str | None) -> str | None:
    """The branch asked for, else the recipe's, else the method's adversarial one."""
    return bn_branch or recipe.export.bn_branch or method.export_branch


def _method_from_run(run_dir: Path) -> tuple[Method, Recipe, dict[str, Any]]:
    """Rebuild a run's method from its recipe, load its newest complete checkpoint (strictly) and return the
    checkpoint's compute record (steps, images seen, wall time, hardware)."""
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
    state = json.loads((checkpoint / TRAIN_STATE).read_text())
    compute = {"steps": int(state["step"]), **state.get("compute", {})}
    if "images_seen" not in compute:  # checkpoints written before the compute record existed
        compute = None
    return method, recipe, compute


def load_run_encoder(run_dir: Path, bn_branch: str | None = None) -> tuple[RobustCLResNetModel, Recipe, str | None]:
    """The newest checkpoint's encoder as a plain-BN model (eval mode), its recipe and the branch kept."""
    method, recipe, _ = _method_from_run(run_dir)
    branch = _branch_for(method, recipe, bn_branch)
    return single_branch_encoder(method.encoder, branch), recipe, branch


@dataclass
class ExportResult:
    out_dir: Path
    evaluations: list[str] = field(default_factory=list)  # protocols whose eval.json ships with the export
    skipped: list[str] = field(default_factory=list)  # why other evaluations were left out


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _matching_evaluations(run_dir: Path, fingerprint: str) -> tuple[dict[str, Path], list[dict], list[str]]:
    """The run's evaluations of exactly the weights with ``fingerprint``; the others, with the reason."""
    dirs, reports, skipped = {}, [], []
    for protocol in PROTOCOLS:
        folder = run_dir / EVAL_DIR / protocol
        report = _read_report(folder / REPORT_FILE)
        if report is None:
            continue
        if report.get("encoder_sha256") != fingerprint:
            skipped.append(
                f"{protocol}: measured other weights (an earlier checkpoint or BN branch); "
                f"re-run robustcl evaluate {run_dir} --protocol {protocol}"
            )
            continue
        dirs[protocol] = folder
        reports.append(report)
    return dirs, reports, skipped


def _load_classifier(run_dir: Path, protocol: str, encoder_fingerprint: str) -> tuple[Any, dict[str, Any]]:
    """The classifier ``robustcl evaluate`` saved for ``protocol``, checked against its report and the run."""
    folder = run_dir / EVAL_DIR / protocol
    report = _read_report(folder / REPORT_FILE)
    if report is None or not (folder / CLASSIFIER_DIR / WEIGHTS_FILE).is_file():
        raise UserError(
            f"no {protocol.upper()} classifier in the run directory",
            str(folder / CLASSIFIER_DIR),
            f"run robustcl evaluate {run_dir} --protocol {protocol} first",
        )
    if report.get("encoder_sha256") != encoder_fingerprint:
        raise UserError(
            f"the {protocol.upper()} classifier was finetuned from other weights than the run's newest checkpoint",
            str(folder / REPORT_FILE),
            f"re-run robustcl evaluate {run_dir} --protocol {protocol}",
        )
    model = RobustCLResNetForImageClassification.from_pretrained(folder / CLASSIFIER_DIR).eval()
    if weights_sha256(model) != report.get("classifier_sha256"):
        raise UserError(
            "the saved classifier's weights are not the ones its eval.json measured",
            str(folder / CLASSIFIER_DIR),
            f"re-run robustcl evaluate {run_dir} --protocol {protocol}",
        )
    return model, report


def export_run(
    run_dir: Path,
    out_dir: Path,
    bn_branch: str | None = None,
    classifier: str | None = None,
    repo_id: str | None = None,
    card_template: Path | None = None,
) -> ExportResult:
    """Export the newest complete checkpoint of a run directory (what ``robustcl export`` does).

    The run's evaluations (``RUN_DIR/eval/<protocol>/eval.json``) of exactly the exported weights go into the folder
    and the card. With ``classifier`` (a protocol), the export is the classifier that evaluation finetuned, loadable
    with ``AutoModelForImageClassification`` (and its encoder with ``AutoModel``).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    method, recipe, compute = _method_from_run(run_dir)
    branch = _branch_for(method, recipe, bn_branch)
    encoder = single_branch_encoder(method.encoder, branch)
    fingerprint = weights_sha256(encoder)
    if classifier is None:
        model = encoder
        eval_dirs, reports, skipped = _matching_evaluations(run_dir, fingerprint)
    else:
        if classifier not in PROTOCOLS:
            raise UserError(f"unknown protocol '{classifier}'", "--classifier", f"choose one of {', '.join(PROTOCOLS)}")
        model, report = _load_classifier(run_dir, classifier, fingerprint)
        eval_dirs, reports, skipped = {classifier: run_dir / EVAL_DIR / classifier}, [report], []
    facts = CardFacts(
        repo_id=repo_id or recipe.export.repo_id or out_dir.name,
        license=recipe.export.license,
        model=model,
        resolution=recipe.data.resolution,
        bn_branch=branch if method.encoder.config.bn_branches else None,
        method=method,
        recipe=recipe,
        compute=compute,
        evaluations=reports,
        classifier_protocol=classifier,
    )
    write_export(model, out_dir, facts, eval_dirs, card_template)
    return ExportResult(out_dir, list(eval_dirs), skipped)
