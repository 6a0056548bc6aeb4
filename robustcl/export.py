"""``robustcl export``: a run's encoder (or a finetuned classifier) as a transformers model folder — safetensors
weights, config with remote code, image processor config, model card, recipe and the evaluations of exactly these
weights. The folder list is in ``export_layout``. ``--format native`` writes an ImageNet-stem basic/bottleneck encoder
as transformers' own ResNet instead (no remote code; the image processor normalises).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_write import move_file, staging_folder
from .encoder_loading import load_run, single_branch_encoder
from .errors import StorageError, UserError, describe_write_failure, is_write_failure
from .eval_report import EvalReport, read_report
from .export_layout import (
    CARD_FILE,
    CONFIG_FILE,
    NATIVE_FORMAT,
    PREPROCESSOR_FILE,
    PROTOCOLS,
    WEIGHTS_FILE,
    export_file_set,
    export_files,
    is_export_config,
)
from .fingerprint import weights_sha256
from .locking import folder_lock
from .model_card import CardFacts, render_model_card
from .model_loading import load_model_folder
from .models import RobustCLResNetForImageClassification, RobustCLResNetModel, RobustCLResNetPreTrainedModel
from .native_export import REMOTE_CODE_FORMAT, check_native, checked_format, native_resnet
from .recipe import Recipe
from .run_layout import CLASSIFIER_DIR, CURVE_FILE, EVAL_DIR, RECIPE_FILE, REPORT_FILE


def image_processor_config(
    resolution: int, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> dict[str, Any]:
    """transformers' ``BitImageProcessor`` settings that match robustcl's own data loading: shorter side resized to
    ``resolution`` (bicubic), centre crop, pixels scaled to [0, 1]; no normalisation (the model normalises inside)
    unless ``image_mean``/``image_std`` are given (a native export, whose model does not).
    """
    if image_mean is not None and image_std is not None:
        return {
            **image_processor_config(resolution),
            "do_normalize": True,
            "image_mean": list(image_mean),
            "image_std": list(image_std),
        }
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


def _export_target(out_dir: Path) -> Path:
    """The folder to write: ``out_dir`` itself, or the folder a symbolic link there points to. Refuses a file, a
    link to nothing or to a file, and a folder that is neither empty nor a robustcl export (its other files would
    be mixed with the export's)."""
    if out_dir.is_symlink() and not out_dir.is_dir():
        raise UserError(
            "the output folder is a symbolic link to no folder",
            f"{out_dir} → {os.readlink(out_dir)}",
            "give a folder, or make the link point to one",
        )
    target = out_dir.resolve() if out_dir.is_symlink() else out_dir
    if target.exists() and not target.is_dir():
        raise UserError("the output path is a file, not a folder", str(out_dir), "give a folder path for the export")
    if target.is_dir() and any(target.iterdir()) and not is_export_config(target):
        raise UserError(
            "output folder exists and is not a robustcl export",
            str(out_dir),
            "choose a new or empty folder (in an earlier export, only the export's own files are replaced)",
        )
    return target


def _readable_files(folder: Path) -> None:
    """Every written file readable by all, as the umask allows (safetensors creates its file private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _write_native_model(folder: Path, model: RobustCLResNetModel, resolution: int) -> None:
    """transformers' ResNetModel with ``model``'s weights, and an image processor that normalises."""
    native_resnet(model).save_pretrained(folder, safe_serialization=True)
    processor = image_processor_config(resolution, model.config.image_mean, model.config.image_std)
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")


def _write_model(folder: Path, model: RobustCLResNetPreTrainedModel, resolution: int) -> None:
    """The model with its remote code, and an image processor that does not normalise (the model does)."""
    is_classifier = isinstance(model, RobustCLResNetForImageClassification)
    # auto_map + copied modeling files: AutoModel.from_pretrained(..., trust_remote_code=True) works with
    # transformers and torch alone.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForImageClassification" if is_classifier else "AutoModel")
    model.save_pretrained(folder, safe_serialization=True)
    if is_classifier:
        # The encoder alone loads from the same folder (weights under `robustcl.`).
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["auto_map"]["AutoModel"] = f"modeling_robustcl.{RobustCLResNetModel.__name__}"
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(image_processor_config(resolution), indent=2) + "\n")


def _write_files(
    folder: Path, model: RobustCLResNetPreTrainedModel, facts: CardFacts, eval_dirs: dict[str, Path], card: Any
) -> None:
    """Every file of the export into ``folder``, checked to be exactly a complete export."""
    if facts.export_format == NATIVE_FORMAT:
        _write_native_model(folder, model, facts.resolution)
    else:
        _write_model(folder, model, facts.resolution)
    if facts.recipe is not None:
        (folder / RECIPE_FILE).write_text(facts.recipe.to_yaml())
    for protocol, source in eval_dirs.items():
        target = folder / EVAL_DIR / protocol
        target.mkdir(parents=True)
        for name in (REPORT_FILE, CURVE_FILE):
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, target / name)
    card.save(folder / CARD_FILE)
    _readable_files(folder)
    export_files(folder)  # the folder is exactly a complete export


def _install(new: Path, target: Path) -> None:
    """Move the export files of ``new`` into ``target``, each replaced atomically, and delete the export files of
    an earlier export there that this one lacks (an evaluation it no longer ships). Nothing else in ``target`` —
    a git checkout's ``.git``, notes — is touched. config.json goes last: until then ``target`` loads as before."""
    files = sorted(export_files(new), key=lambda rel: rel == CONFIG_FILE)
    stale = {rel for rel in export_file_set() if (target / rel).is_file()} - set(files)
    target.mkdir(parents=True, exist_ok=True)
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        move_file(new / rel, target / rel)
    for rel in sorted(stale):
        (target / rel).unlink()
    for protocol in PROTOCOLS:  # evaluation folders left empty
        for folder in (target / EVAL_DIR / protocol, target / EVAL_DIR):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def write_export(
    model: RobustCLResNetPreTrainedModel,
    out_dir: Path,
    facts: CardFacts,
    eval_dirs: dict[str, Path] | None = None,
    card_template: Path | None = None,
) -> None:
    """Write the export folder: assembled in a temporary sibling, then its files are moved into ``out_dir``. A
    failure while writing leaves ``out_dir`` as it was; other files in ``out_dir`` are never touched. Another
    process exporting into the same folder is refused (:class:`~robustcl.errors.FolderBusy`).

    ``eval_dirs`` maps a protocol to the folder holding its ``eval.json`` (and curve PNG) to ship.
    """
    out_dir = Path(out_dir)
    model = model.cpu().eval()
    card = render_model_card(facts, card_template)  # before any file is written: a bad template fails first
    with folder_lock(out_dir, "export", "wait until it ends, or export into another folder"):
        target = _export_target(out_dir)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with staging_folder(target) as tmp:
                _write_files(tmp, model, facts, eval_dirs or {}, card)
                _install(tmp, target)
        except Exception as err:
            if not is_write_failure(err):
                raise
            raise StorageError(
                f"could not write the export: {describe_write_failure(err)}",
                str(out_dir),
                "free some space or choose a folder you can write to, and export again",
            ) from None


def export_encoder(
    encoder: RobustCLResNetModel,
    bn_branch: str | None,
    out_dir: Path,
    recipe: Recipe | None = None,
    resolution: int = 32,
    export_format: str = REMOTE_CODE_FORMAT,
) -> RobustCLResNetModel:
    """Export a bare encoder (no run directory: no training record, no evaluations); returns the exported model."""
    checked_format(export_format)
    model = single_branch_encoder(encoder, bn_branch)
    if export_format == NATIVE_FORMAT:
        check_native(model.config)
    facts = CardFacts(
        repo_id=Path(out_dir).name,
        license=recipe.export.license if recipe else "apache-2.0",
        model=model,
        resolution=recipe.data.resolution if recipe else resolution,
        bn_branch=bn_branch if encoder.config.bn_branches else None,
        recipe=recipe,
        export_format=export_format,
    )
    write_export(model, out_dir, facts)
    return model


@dataclass
class ExportResult:
    out_dir: Path
    evaluations: list[str] = field(default_factory=list)  # protocols whose eval.json ships with the export
    skipped: list[str] = field(default_factory=list)  # why other evaluations were left out


def _matching_evaluations(run_dir: Path, fingerprint: str) -> tuple[dict[str, Path], list[EvalReport], list[str]]:
    """The run's evaluations of exactly the weights with ``fingerprint``; the others, with the reason."""
    dirs, reports, skipped = {}, [], []
    for protocol in PROTOCOLS:
        folder = run_dir / EVAL_DIR / protocol
        report = read_report(folder / REPORT_FILE)
        if report is None:
            continue
        if report.encoder_sha256 != fingerprint:
            skipped.append(
                f"{protocol}: measured other weights (an earlier checkpoint or BN branch); "
                f"re-run robustcl evaluate {run_dir} --protocol {protocol}"
            )
            continue
        dirs[protocol] = folder
        reports.append(report)
    return dirs, reports, skipped


def _load_classifier(run_dir: Path, protocol: str, encoder_fingerprint: str) -> tuple[Any, EvalReport]:
    """The classifier ``robustcl evaluate`` saved for ``protocol``, checked against its report and the run."""
    folder = run_dir / EVAL_DIR / protocol
    report = read_report(folder / REPORT_FILE)
    if report is None or not (folder / CLASSIFIER_DIR / WEIGHTS_FILE).is_file():
        raise UserError(
            f"no {protocol.upper()} classifier in the run directory",
            str(folder / CLASSIFIER_DIR),
            f"run robustcl evaluate {run_dir} --protocol {protocol} first",
        )
    if report.encoder_sha256 != encoder_fingerprint:
        raise UserError(
            f"the {protocol.upper()} classifier was finetuned from other weights than the run's newest checkpoint",
            str(folder / REPORT_FILE),
            f"re-run robustcl evaluate {run_dir} --protocol {protocol}",
        )
    model = load_model_folder(
        RobustCLResNetForImageClassification,
        folder / CLASSIFIER_DIR,
        f"re-run robustcl evaluate {run_dir} --protocol {protocol}",
    ).eval()
    if weights_sha256(model) != report.classifier_sha256:
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
    export_format: str = REMOTE_CODE_FORMAT,
) -> ExportResult:
    """Export the newest complete checkpoint of a run directory (what ``robustcl export`` does).

    The run's evaluations (``RUN_DIR/eval/<protocol>/eval.json``) of exactly the exported weights go into the folder
    and the card. With ``classifier`` (a protocol), the export is the classifier that evaluation finetuned, loadable
    with ``AutoModelForImageClassification`` (and its encoder with ``AutoModel``). ``export_format`` ``native``
    writes the encoder as transformers' own ResNet (see :func:`native_resnet`).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checked_format(export_format, classifier)
    run = load_run(run_dir)
    recipe = run.recipe
    encoder, branch = run.single_branch(bn_branch)
    if export_format == NATIVE_FORMAT:
        check_native(encoder.config)
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
        bn_branch=branch if run.encoder.config.bn_branches else None,
        method=run.record.method,
        recipe=recipe,
        compute=run.compute,
        evaluations=reports,
        classifier_protocol=classifier,
        export_format=export_format,
    )
    write_export(model, out_dir, facts, eval_dirs, card_template)
    return ExportResult(out_dir, list(eval_dirs), skipped)
