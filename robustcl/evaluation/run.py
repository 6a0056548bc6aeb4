"""`robustcl evaluate`: load a model, finetune with a protocol, measure SA / RA / AA, write the report."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ..data.streamed import default_workers
from ..distributed import check_world_size, on_main_process, processes_on_node
from ..encoder_loading import FeatureEncoder, LoadedEncoder, load_encoder
from ..errors import UserError, one_line
from ..export_layout import CLASSIFIER_DIR, CURVE_FILE, PROTOCOLS
from ..fingerprint import weights_sha256
from ..json_files import write_json
from ..locking import folder_lock
from ..recipe import FinetuneConfig, Recipe, override_recipe, parse_override, recipe_from_dict
from .corruptions import measure_corruptions, open_corruptions
from .finetune import CLEAN_BRANCH, Classifier, finetune
from .measure import Measurement, measure, pgd_curve_step, require_autoattack
from .output import checked_output, default_output, run_dir_output
from .presets import PRESETS, SOURCES, preset_values
from .report import format_table, plot_curve, software_versions
from .splits import eval_pixels, open_eval_splits

ATTACKS = ("pgd20", "autoattack")


def _check_choices(protocol: str | None, attacks: list[str] | None) -> None:
    if protocol is not None and protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'", "--protocol", f"choose one of {', '.join(PROTOCOLS)}")
    for name in attacks or []:
        if name not in ATTACKS:
            raise UserError(
                f"unknown attack '{name}'", "--attack", f"give a comma-separated list of {', '.join(ATTACKS)}"
            )


def _share_weights(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Every process finetunes the same way; broadcasting the main process's weights rules out device noise."""
    if accelerator.num_processes > 1:
        for tensor in model.state_dict().values():
            tensor.copy_(broadcast(tensor.clone(), from_process=0))


def _transformers_classifier(classifier: Classifier, class_names: list[str] | None) -> torch.nn.Module | None:
    """The finetuned classifier as ``RobustCLResNetForImageClassification`` (None for other backbones)."""
    from ..models import RobustCLResNetForImageClassification, RobustCLResNetModel

    backbone = classifier.encoder.backbone
    if not isinstance(backbone, RobustCLResNetModel) or classifier.encoder.normalise:
        return None
    config = copy.deepcopy(backbone.config)
    num_labels = classifier.head.out_features
    names = class_names if class_names and len(class_names) == num_labels else [str(i) for i in range(num_labels)]
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    model = RobustCLResNetForImageClassification(config)
    model.robustcl.load_state_dict(backbone.state_dict())
    model.classifier.load_state_dict(classifier.head.state_dict())
    return model.to(next(backbone.parameters()).device).eval()


def _save_classifier(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then renamed: never a half-written classifier folder."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _accuracy(flags: torch.Tensor | None) -> float | None:
    return None if flags is None else Measurement.accuracy(flags)


def evaluate(
    reference: str | Path,
    *,
    protocol: str | None = None,
    attacks: list[str] | None = None,
    overrides: list[str] | None = None,
    recipe: Recipe | None = None,
    output: Path | None = None,
    attack_subset: int | None = None,
    bn_branch: str | None = None,
    trust_remote_code: bool = False,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    preset: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model with a finetuning protocol; returns the report (also written to ``output`` as JSON, with
    the ε-curve PNG beside it, by the main process).

    Settings come from ``recipe``, else the recipe stored with the model, else the defaults, then ``overrides``
    (``--set``); ``protocol``, ``attacks``, ``attack_subset`` and ``preset`` override their ``eval.*`` keys (the
    preset fills the eval.slf / alf / aff keys that neither the recipe nor ``overrides`` set).
    """
    started = time.perf_counter()
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_world_size(accelerator)
    _check_choices(protocol, attacks)  # what was asked for explicitly fails before a model (download) loads
    _check_preset(preset)
    loaded = load_encoder(reference, bn_branch=bn_branch, trust_remote_code=trust_remote_code)
    base = recipe or loaded.recipe or Recipe()
    recipe = evaluation_recipe(base, overrides, preset, f"evaluation settings of {reference}")
    ev = recipe.eval
    protocol = protocol or ev.protocol
    attacks = list(dict.fromkeys(attacks if attacks is not None else ev.attacks))
    attack_subset = attack_subset or ev.attack_subset
    _check_choices(protocol, attacks)
    if "autoattack" in attacks:
        require_autoattack()  # fail before minutes of finetuning, not after
    if output is None:
        output = default_output(loaded.reference, loaded.kind == "run_dir", protocol)
    else:
        output = checked_output(output)
    lock = on_main_process(
        accelerator, lambda: folder_lock(output.parent, "evaluate", "wait until it ends, or choose another --output")
    )
    with lock:
        return _evaluate(loaded, recipe, protocol, attacks, attack_subset, output, accelerator, progress, started)


def _check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset '{one_line(preset)}'", "--preset", f"choose one of {', '.join(PRESETS)}")


def evaluation_recipe(base: Recipe, overrides: list[str] | None, preset: str | None, source: str) -> Recipe:
    """``base`` with ``overrides`` (--set) and ``preset`` (--preset): the preset fills every eval.slf / alf / aff key
    that neither ``base`` (where it differs from its own preset) nor ``overrides`` sets."""
    if preset is not None:  # --preset wins over a --set eval.preset
        overrides = [text for text in overrides or [] if parse_override(text)[0] != ["eval", "preset"]]
    # The preset first, so that a --set value equal to the old preset's still counts as chosen.
    return override_recipe(_with_preset(base, preset, source), overrides, source)


def _with_preset(recipe: Recipe, preset: str | None, source: str) -> Recipe:
    """``recipe`` with eval.preset ``preset``: its eval.slf / alf / aff keys that differ from its own preset stay,
    the others come from ``preset``."""
    if preset is None or recipe.eval.preset == preset:
        return recipe
    tree = recipe.to_dict()  # eval.slf / alf / aff as their differences from the recipe's preset
    tree["eval"]["preset"] = preset
    return recipe_from_dict(tree, f"{source} with --preset {preset}")


def _clean_branch(loaded: LoadedEncoder) -> FeatureEncoder | None:
    """A run directory's clean ('normal') BatchNorm branch, to start dual-BN AFF's clean branch as the reference
    scripts do (they load both pretrained branches); None when the model has no other branch (an export holds one)."""
    if loaded.run is None or loaded.bn_branch in (None, CLEAN_BRANCH):
        return None
    try:
        encoder, _ = loaded.run.single_branch(CLEAN_BRANCH)
    except UserError:  # the run has no 'normal' branch
        return None
    return FeatureEncoder(encoder)


def _selection(cfg: FinetuneConfig, val_images: int) -> str:
    if cfg.select_by == "final":
        return "last epoch; no validation split (the whole training split trains)"
    how = "clean" if cfg.select_by == "clean" else f"PGD-{cfg.select_attack_steps or cfg.attack_steps}"
    return f"best {how} accuracy on {val_images} validation images held out of the training split"


def _finetune_record(cfg: FinetuneConfig, preset: str, protocol: str) -> dict[str, Any]:
    """The protocol's settings, and which of them differ from the preset (set in the recipe or with --set)."""
    settings = cfg.model_dump(mode="json")
    from_preset = preset_values(preset, protocol)
    changed = {k: v for k, v in settings.items() if v != from_preset.get(k)}
    return {**settings, "preset_overrides": changed}


def _evaluate(
    loaded: LoadedEncoder,
    recipe: Recipe,
    protocol: str,
    attacks: list[str],
    attack_subset: int | None,
    output: Path,
    accelerator: Accelerator,
    progress: bool,
    started: float,
) -> dict[str, Any]:
    """Finetune, measure and write the report (``evaluate`` after its checks, with the output folder locked)."""
    main, ev, reference = accelerator.is_main_process, recipe.eval, loaded.reference
    cfg = getattr(ev, protocol)
    # Images every epoch (augmentation, attacks, BatchNorm in train mode): worth decoding once, when they fit; SLF
    # reads each row once.
    per_epoch = cfg.train_encoder or cfg.augment or cfg.train_attack != "none" or cfg.encoder_bn_train()
    local = processes_on_node(accelerator)
    show = progress and accelerator.is_local_main_process
    # Opened and checked once (labels, the corrupted set's columns and severities) before decoding or finetuning.
    opened = open_eval_splits(recipe, show)
    corrupted = open_corruptions(recipe, opened.source, show)
    final = cfg.select_by == "final"
    data = eval_pixels(opened, recipe, progress=show, shard_train=not per_epoch, validation=not final)
    workers = recipe.data.workers if recipe.data.workers is not None else default_workers(local)
    # Ties the report to the exact weights measured: exports ship only the evaluations of their own weights.
    encoder_sha256 = weights_sha256(loaded.encoder.backbone)
    clean_bn = _clean_branch(loaded) if cfg.dual_bn else None
    result = finetune(
        loaded.encoder,
        data.train,
        data.val,
        data.num_classes,
        cfg,
        device=accelerator.device,
        seed=ev.seed,
        desc=f"{protocol} finetune",
        progress=progress and main,
        workers=workers,
        key=f"eval.{protocol}",
        clean_bn=clean_bn,
    )
    _share_weights(result.classifier, accelerator)
    hf_classifier = None
    if ev.save_classifier:
        hf_classifier = _transformers_classifier(result.classifier, data.source["class_names"])
    measured = measure(
        result.classifier,
        data.test.images,
        data.test.labels,
        ev.attack,
        attacks,
        accelerator,
        num_classes=data.num_classes,
        seed=ev.seed,
        attack_subset=attack_subset,
        progress=progress and main,
    )
    a = ev.attack
    report: dict[str, Any] = {
        "model": str(reference),
        "model_kind": loaded.kind,
        "bn_branch": loaded.bn_branch,
        "protocol": protocol,
        "preset": ev.preset,
        "preset_source": SOURCES[ev.preset],
        "dataset": data.source,
        "split_sizes": {
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
            "attacked": measured.attacked,
        },
        "epsilon": a.epsilon,
        "SA": Measurement.accuracy(measured.clean),
        "SA_attacked_subset": Measurement.accuracy(measured.clean[: measured.attacked]),
        "RA": _accuracy(measured.pgd),
        "AA": _accuracy(measured.autoattack),
        "attack": {
            "pgd": {
                "loss": "ce",
                "epsilon": a.epsilon,
                "step_size": a.step_size,
                "steps": a.steps,
                "random_start": a.random_start,
            },
            "autoattack": (
                {"version": a.autoattack_version, "norm": "Linf", "epsilon": a.epsilon}
                if "autoattack" in attacks
                else None
            ),
        },
        "curve": [
            {"epsilon": eps, "step_size": pgd_curve_step(a, eps), "accuracy": Measurement.accuracy(flags)}
            for eps, flags in measured.curve.items()
        ],
        "finetune": {
            **_finetune_record(cfg, ev.preset, protocol),
            "selection": _selection(cfg, len(data.val)),
            "dual_bn_clean_start": (
                None if not cfg.dual_bn else "the run's 'normal' branch" if clean_bn else "the evaluated branch"
            ),
            "selected_epoch": result.selected_epoch,
            "val_accuracy": result.val_accuracy,
            "history": result.history,
        },
        "encoder_sha256": encoder_sha256,
        "classifier_sha256": weights_sha256(hf_classifier) if hf_classifier is not None else None,
        "seed": ev.seed,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "versions": software_versions(),
        "wall_time_s": time.perf_counter() - started,
        "output": str(output),
        "curve_png": None,
        "classifier_dir": str(output.with_name(CLASSIFIER_DIR)) if hf_classifier is not None else None,
    }
    report["corruptions"] = measure_corruptions(result.classifier, corrupted, recipe, accelerator, progress and main)
    if main:
        if hf_classifier is not None:
            _save_classifier(hf_classifier, output.with_name(CLASSIFIER_DIR))
        if report["curve"]:
            report["curve_png"] = str(output.with_name(CURVE_FILE))
            plot_curve(report, Path(report["curve_png"]))
        write_json(output, report)
    accelerator.wait_for_everyone()
    return report


__all__ = ["ATTACKS", "PROTOCOLS", "evaluate", "format_table", "run_dir_output"]
