"""`robustcl evaluate`: load a model, finetune with a protocol, measure SA / RA / AA, write the report."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ..data.labels import read_labels
from ..data.loading import ImageData, OpenedSplit, choose_loading, open_images
from ..data.streamed import default_workers
from ..distributed import check_world_size, on_main_process, processes_on_node
from ..errors import UserError, one_line
from ..export_layout import CLASSIFIER_DIR, CURVE_FILE, PROTOCOLS
from ..fingerprint import weights_sha256
from ..json_files import write_json
from ..locking import folder_lock
from ..recipe import DataConfig, FinetuneConfig, Recipe, override_recipe, parse_override, recipe_from_dict
from .backbone import FeatureEncoder, LoadedModel, load_model
from .corruptions import measure_corruptions
from .finetune import CLEAN_BRANCH, Classifier, LabelledImages, finetune, split_validation
from .measure import Measurement, measure, pgd_curve_step, require_autoattack
from .output import checked_output, default_output, run_dir_output
from .presets import PRESETS, SOURCES, preset_values
from .report import format_table, plot_curve, software_versions
from .rows import HeldRows
from .sharding import owned_rows

ATTACKS = ("pgd20", "autoattack")


@dataclass
class EvalData:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    num_classes: int
    source: dict[str, Any]


# Measured instead of a test split without labels (ImageNet-1k's on the Hub: every label -1).
FALLBACK_TEST_SPLIT = "validation"


@dataclass
class _Split:
    opened: OpenedSplit
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] | None


def _has_labels(opened: OpenedSplit) -> bool:
    """Whether the split has a label column with a value in some row (null, or -1 in every row, means none)."""
    if opened.label_column is None:
        return False
    column = opened.ds.select_columns([opened.label_column]).with_format("arrow")[:].column(opened.label_column)
    if column.null_count == len(column):
        return False
    if pa.types.is_integer(column.type):
        return bool(pc.max(pc.greater_equal(column, 0)).as_py())
    return True


def _labelled(opened: OpenedSplit, classes_from: ImageData | None = None) -> _Split:
    """The split's labels read (numbered as ``classes_from`` numbers its classes), no pixel decoded."""
    if opened.label_column is None:
        raise UserError(
            f"evaluation needs class labels, but {opened.source} has no label column",
            "eval.data.label_column",
            "name the label column with --set eval.data.label_column=NAME",
        )
    labels, num_classes, names = read_labels(opened.ds, opened.label_column, opened.source, "eval.data", classes_from)
    return _Split(opened, labels, num_classes, names)


def _as_reference(split: _Split) -> ImageData:
    """What label numbering (``classes_from``) needs of a split: its class names and where it comes from."""
    o = split.opened
    return ImageData(
        torch.empty(0, dtype=torch.uint8), split.labels, split.num_classes, split.class_names, o.image_column,
        o.label_column, o.source, o.fingerprint,
    )  # fmt: skip


def _open_test(
    open_split: Callable[[str, str], OpenedSplit], test_split: str, train_split: str, dataset: str
) -> tuple[OpenedSplit, str | None]:
    """The split to measure on: ``test_split``, or the validation split when the test split has no labels; with
    the note the report carries when it was replaced."""
    test = open_split(test_split, "eval.data.max_test")
    if _has_labels(test):
        return test, None
    what = f"the '{test_split}' split of {dataset} has no labels"
    fix = "set eval.data.test_split to a labelled split (--set eval.data.test_split=NAME)"
    if FALLBACK_TEST_SPLIT in (test_split, train_split):
        raise UserError(f"{what} to measure on", "eval.data.test_split", fix)
    try:
        fallback = open_split(FALLBACK_TEST_SPLIT, "eval.data.max_test")
    except UserError as err:
        what = f"{what}, and its '{FALLBACK_TEST_SPLIT}' split cannot stand in: {err.what}"
        raise UserError(what, "eval.data.test_split", fix) from None
    if not _has_labels(fallback):
        raise UserError(f"{what}, nor has its '{FALLBACK_TEST_SPLIT}' split", "eval.data.test_split", fix)
    return fallback, f"measured on the '{FALLBACK_TEST_SPLIT}' split: the '{test_split}' split has no labels"


def _loading(data: DataConfig, decoded_bytes: int) -> str:
    """``data.loading`` for an evaluation split: ``auto`` decodes up to ``data.decoded_max_gb`` (the decoding then
    refuses, in one line, what does not fit in memory), and streams beyond."""
    return choose_loading(data, decoded_bytes, processes_on_node=None)


def _train_pixels(train: _Split, data: DataConfig, fraction: float, seed: int, shard: bool, progress: bool):
    """The training split's finetuning and validation parts: decoded (all rows, or with ``shard`` only the rows this
    process owns, see :func:`owned_rows`) when ``data.loading`` allows, else left encoded."""
    encoded = LabelledImages(train.opened.encoded(), train.labels)
    fit, val = split_validation(encoded, fraction, seed)
    if _loading(data, train.opened.decoded_bytes()) == "streamed":
        return fit, val
    if not shard:
        return split_validation(LabelledImages(train.opened.decode(progress), train.labels), fraction, seed)
    held = torch.cat([fit.images.rows[owned_rows(len(fit))], val.images.rows[owned_rows(len(val))]]).sort().values
    part = replace(train.opened, ds=train.opened.ds.select(held.tolist())).decode(progress)
    return split_validation(LabelledImages(HeldRows(part, held), train.labels), fraction, seed)


@dataclass
class OpenedEval:
    """The downstream splits opened and their labels read and checked, no pixel decoded."""

    train: _Split
    test: _Split  # the split measured on: eval.data.test_split, or the validation split standing in for it
    source: dict[str, Any]  # what the report records of the dataset


def _split_key(err: UserError, key: str) -> UserError:
    """``open_images`` names a split ``eval.data.split``; an evaluation reads two: ``train_split``, ``test_split``."""
    generic = "eval.data.split"
    if err.where != generic:
        return err
    return type(err)(err.what, key, (err.fix or "").replace(generic, key))


def open_eval_splits(recipe: Recipe, progress: bool = True) -> OpenedEval:
    """The downstream train and test splits (``eval.data``, or the pretraining dataset when its path is unset)
    opened, their labels read and refused in one line when they cannot be evaluated on: what
    :func:`load_eval_data` decodes, and what pretraining checks before its first step (:mod:`.preflight`)."""
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
        center_crop=e.center_crop,
    )

    def open_split(split: str, max_key: str) -> OpenedSplit:
        train = max_key == "eval.data.max_train"
        limit = e.max_train if train else e.max_test
        try:
            return open_images(path, split, max_samples=limit, max_samples_key=max_key, **common)
        except UserError as err:
            raise _split_key(err, "eval.data.train_split" if train else "eval.data.test_split") from None

    train = _labelled(open_split(e.train_split, "eval.data.max_train"))
    num_classes = train.num_classes
    if num_classes < 2:
        raise UserError(
            f"evaluation needs at least 2 classes, {train.opened.source} has {num_classes}",
            "eval.data.label_column",
            "point eval.data at a labelled classification dataset",
        )
    dataset = f"{path}" + (f"[{common['name']}]" if common["name"] else "")
    opened_test, note = _open_test(open_split, e.test_split, e.train_split, dataset)
    # Numbered by the training split's class names: the head predicts the training split's ids.
    test = _labelled(opened_test, classes_from=_as_reference(train))
    # Bare integer labels are matched by value: a test id beyond the training split's classes has no output.
    if int(test.labels.max()) >= num_classes:
        raise UserError(
            f"{test.opened.source} has labels the training split does not ({int(test.labels.max())} ≥ {num_classes})",
            "eval.data.test_split",
            "use train and test splits of the same dataset",
        )
    source = {
        "source": dataset,
        "path": path,
        "name": common["name"],
        "train_split": e.train_split,
        "test_split": FALLBACK_TEST_SPLIT if note else e.test_split,
        "requested_test_split": e.test_split,
        "test_split_note": note,
        "resolution": common["resolution"],
        "center_crop": e.center_crop,
        "num_classes": num_classes,
        "class_names": train.class_names,
    }
    return OpenedEval(train, test, source)


def load_eval_data(
    recipe: Recipe, progress: bool = True, shard_train: bool = False, validation: bool = True
) -> EvalData:
    """The downstream train/validation/test splits (:func:`open_eval_splits`), with their pixels.

    Labels are read at once. Pixels are decoded once (uint8 tensors) when ``data.loading`` allows it for the split's
    size (:func:`_loading`), else left encoded and decoded by the process that reads a row, when it does. With
    ``shard_train`` (SLF, which reads each training image once) a process decodes only the rows it owns. Without
    ``validation`` (the last epoch is kept) no validation split is carved out: every training image trains.
    """
    e, d = recipe.eval.data, recipe.data
    opened = open_eval_splits(recipe, progress)
    fraction = e.val_fraction if validation else 0.0  # none: every training image trains, the last epoch is kept
    fit, val = _train_pixels(opened.train, d, fraction, recipe.eval.seed, shard_train, progress)
    test = opened.test.opened
    streamed = _loading(d, test.decoded_bytes()) == "streamed"
    test_pixels = test.encoded() if streamed else test.decode(progress)
    test_data = LabelledImages(test_pixels, opened.test.labels)
    return EvalData(fit, val, test_data, opened.source["num_classes"], opened.source)


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
    loaded = load_model(reference, bn_branch=bn_branch, trust_remote_code=trust_remote_code)
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


def _clean_branch(loaded: LoadedModel) -> FeatureEncoder | None:
    """A run directory's clean ('normal') BatchNorm branch, to start dual-BN AFF's clean branch as the reference
    scripts do (they load both pretrained branches); None when the model has no other branch (an export holds one)."""
    if loaded.kind != "run_dir" or loaded.bn_branch in (None, CLEAN_BRANCH):
        return None
    from ..export import load_run_encoder

    try:
        encoder, _, _ = load_run_encoder(Path(loaded.reference), CLEAN_BRANCH)
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
    cfg = getattr(ev, protocol)
    # Images every epoch (augmentation, attacks, BatchNorm in train mode): worth decoding once, when they fit; SLF
    # reads each row once.
    per_epoch = cfg.train_encoder or cfg.augment or cfg.train_attack != "none" or cfg.encoder_bn_train()
    local = processes_on_node(accelerator)
    show = progress and accelerator.is_local_main_process
    from .preflight import check_eval_settings  # (it imports this module)

    check_eval_settings(recipe)  # what would stop the evaluation (corrupted set too), before decoding or finetuning
    final = cfg.select_by == "final"
    data = load_eval_data(recipe, progress=show, shard_train=not per_epoch, validation=not final)
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
    report["corruptions"] = measure_corruptions(result.classifier, recipe, data.source, accelerator, progress and main)
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
