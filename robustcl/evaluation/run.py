"""`robustcl evaluate`: load a model, finetune with a protocol, measure SA / RA / AA, write the report."""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ..data.loading import load_images
from ..distributed import check_world_size, on_main_process
from ..errors import UserError
from ..export_layout import CLASSIFIER_DIR, CURVE_FILE, PROTOCOLS
from ..fingerprint import weights_sha256
from ..json_files import write_json
from ..locking import folder_lock
from ..recipe import Recipe, override_recipe
from .backbone import LoadedModel, load_model
from .finetune import Classifier, LabelledImages, finetune, split_validation
from .measure import Measurement, measure, pgd_curve_step, require_autoattack
from .output import checked_output, default_output, run_dir_output
from .report import format_table, plot_curve, software_versions

ATTACKS = ("pgd20", "autoattack")


@dataclass
class EvalData:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    num_classes: int
    source: dict[str, Any]


def load_eval_data(recipe: Recipe, progress: bool = True) -> EvalData:
    """The downstream train/validation/test splits: ``eval.data``, or the pretraining dataset when its path is unset."""
    e, d = recipe.eval.data, recipe.data
    inherited = e.path is None
    path = d.path if inherited else e.path
    common = dict(
        resolution=e.resolution or d.resolution,
        name=d.name if inherited else e.name,
        image_column=d.image_column if inherited else e.image_column,
        label_column=d.label_column if inherited else e.label_column,
        progress=progress,
        key_prefix="eval.data",
    )

    def require_labels(part) -> None:  # part: an ImageData
        if part.labels is None:
            raise UserError(
                f"evaluation needs class labels, but {part.source} has no label column",
                "eval.data.label_column",
                "name the label column with --set eval.data.label_column=NAME",
            )

    train = load_images(path, e.train_split, max_samples=e.max_train, max_samples_key="eval.data.max_train", **common)
    require_labels(train)
    num_classes = int(train.num_classes or 0)
    if num_classes < 2:
        raise UserError(
            f"evaluation needs at least 2 classes, {train.source} has {num_classes}",
            "eval.data.label_column",
            "point eval.data at a labelled classification dataset",
        )
    # Numbered by the training split's class names: the head predicts the training split's ids.
    test = load_images(
        path, e.test_split, max_samples=e.max_test, max_samples_key="eval.data.max_test", classes_from=train, **common
    )
    require_labels(test)
    # Bare integer labels are matched by value: a test id beyond the training split's classes has no output.
    if int(test.labels.max()) >= num_classes:
        raise UserError(
            f"{test.source} has labels the training split does not ({int(test.labels.max())} ≥ {num_classes})",
            "eval.data.test_split",
            "use train and test splits of the same dataset",
        )
    fit, val = split_validation(LabelledImages(train.images, train.labels), e.val_fraction, recipe.eval.seed)
    source = {
        "source": f"{path}" + (f"[{common['name']}]" if common["name"] else ""),
        "path": path,
        "name": common["name"],
        "train_split": e.train_split,
        "test_split": e.test_split,
        "resolution": common["resolution"],
        "num_classes": num_classes,
        "class_names": train.class_names,
    }
    return EvalData(fit, val, LabelledImages(test.images, test.labels), num_classes, source)


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
) -> dict[str, Any]:
    """Evaluate a model with a finetuning protocol; returns the report (also written to ``output`` as JSON, with
    the ε-curve PNG beside it, by the main process).

    Settings come from ``recipe``, else the recipe stored with the model, else the defaults, then ``overrides``
    (``--set``); ``protocol``, ``attacks`` and ``attack_subset`` override their ``eval.*`` keys.
    """
    started = time.perf_counter()
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_world_size(accelerator)
    _check_choices(protocol, attacks)  # what was asked for explicitly fails before a model (download) loads
    loaded = load_model(reference, bn_branch=bn_branch, trust_remote_code=trust_remote_code)
    base = recipe or loaded.recipe or Recipe()
    recipe = override_recipe(base, overrides, f"evaluation settings of {reference}")
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


def _evaluate(
    loaded: LoadedModel,
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
    data = load_eval_data(recipe, progress=progress and accelerator.is_local_main_process)
    # Ties the report to the exact weights measured: exports ship only the evaluations of their own weights.
    encoder_sha256 = weights_sha256(loaded.encoder.backbone)
    cfg = getattr(ev, protocol)
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
            **cfg.model_dump(mode="json"),
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
    if main:
        if hf_classifier is not None:
            _save_classifier(hf_classifier, output.with_name(CLASSIFIER_DIR))
        if report["curve"]:
            report["curve_png"] = str(output.with_name(CURVE_FILE))
            plot_curve(report, Path(report["curve_png"]))
        write_json(output, report)
    accelerator.wait_for_everyone()
    return report


__all__ = ["ATTACKS", "PROTOCOLS", "evaluate", "format_table", "load_eval_data", "run_dir_output"]
