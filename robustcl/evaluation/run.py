"""`robustcl evaluate`: load a model, finetune with a protocol, measure SA / RA / AA, write the report."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ..atomic_write import atomic_folder
from ..data.streamed import default_workers
from ..distributed import check_world_size, on_main_process, processes_on_node
from ..encoder_loading import FeatureEncoder, LoadedEncoder, load_encoder
from ..errors import UserError, one_line
from ..eval_report import (
    AttackRecord,
    AutoAttackRecord,
    CorruptionFigures,
    CurvePoint,
    EvalReport,
    FinetuneRecord,
    PgdRecord,
    SplitSizes,
)
from ..export_layout import PROTOCOLS
from ..fingerprint import weights_sha256
from ..json_files import write_json
from ..locking import folder_lock
from ..recipe import EvalAttackConfig, FinetuneConfig, Recipe, override_recipe, parse_override, recipe_from_dict
from ..run_layout import CLASSIFIER_DIR, CURVE_FILE
from .corruptions import CorruptedSet, measure_corruptions, open_corruptions
from .finetune import CLEAN_BRANCH, Classifier, FinetuneResult, finetune
from .measure import Measurement, measure, pgd_curve_step, require_autoattack
from .output import checked_output, default_output, run_dir_output
from .presets import PRESETS, SOURCES, preset_values
from .report import format_table, plot_curve, software_versions
from .splits import EvalData, eval_pixels, open_eval_splits

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
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def _accuracy(flags: torch.Tensor | None) -> float | None:
    return None if flags is None else Measurement.accuracy(flags)


@dataclass
class _Plan:
    """What one evaluation does: its settings resolved from the arguments, the recipe and the preset."""

    recipe: Recipe
    protocol: str
    attacks: list[str]
    attack_subset: int | None
    output: Path  # the eval.json to write

    @property
    def finetune(self) -> FinetuneConfig:
        return getattr(self.recipe.eval, self.protocol)


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
) -> EvalReport:
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
    settings = evaluation_recipe(
        recipe or loaded.recipe or Recipe(), overrides, preset, f"evaluation settings of {reference}"
    )
    plan = _plan(loaded, settings, protocol, attacks, attack_subset, output)
    fix = "wait until it ends, or choose another --output"
    with on_main_process(accelerator, lambda: folder_lock(plan.output.parent, "evaluate", fix)):
        return _evaluate(loaded, plan, accelerator, progress, started)


def _plan(
    loaded: LoadedEncoder,
    recipe: Recipe,
    protocol: str | None,
    attacks: list[str] | None,
    attack_subset: int | None,
    output: Path | None,
) -> _Plan:
    """The arguments over the recipe's ``eval`` keys, checked; the output path checked or chosen."""
    ev = recipe.eval
    protocol = protocol or ev.protocol
    attacks = list(dict.fromkeys(attacks if attacks is not None else ev.attacks))
    _check_choices(protocol, attacks)
    if "autoattack" in attacks:
        require_autoattack()  # fail before minutes of finetuning, not after
    if output is None:
        output = default_output(loaded.reference, loaded.kind == "run_dir", protocol)
    else:
        output = checked_output(output)
    return _Plan(recipe, protocol, attacks, attack_subset or ev.attack_subset, output)


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


@dataclass
class _Results:
    """What one evaluation measured, for its report."""

    data: EvalData
    encoder_sha256: str  # the weights measured: exports ship only the evaluations of their own weights
    finetuned: FinetuneResult
    clean_start: str | None  # where dual-BN AFF's clean branch started
    classifier: torch.nn.Module | None  # the transformers classifier to save (eval.save_classifier)
    measured: Measurement
    wall_time_s: float  # up to the end of the attacks
    corruptions: CorruptionFigures | None


def _evaluate(
    loaded: LoadedEncoder, plan: _Plan, accelerator: Accelerator, progress: bool, started: float
) -> EvalReport:
    """Finetune, measure and write the report (``evaluate`` after its checks, with the output folder locked)."""
    results = _run(loaded, plan, accelerator, progress, started)
    report = _report(loaded, plan, results, accelerator)
    if accelerator.is_main_process:
        _write_outputs(report, results.classifier)
    accelerator.wait_for_everyone()
    return report


def _open_data(plan: _Plan, show: bool) -> tuple[EvalData, CorruptedSet | None]:
    """The evaluation splits, decoded, and the corrupted set (None without ``eval.corruptions``), opened and checked
    once (labels, the corrupted set's columns and severities) before anything is decoded or finetuned."""
    cfg = plan.finetune
    # Images every epoch (augmentation, attacks, BatchNorm in train mode): worth decoding once, when they fit; SLF
    # reads each row once.
    per_epoch = cfg.train_encoder or cfg.augment or cfg.train_attack != "none" or cfg.encoder_bn_train()
    opened = open_eval_splits(plan.recipe, show)
    corrupted = open_corruptions(plan.recipe, opened.source, show)
    validation = cfg.select_by != "final"
    data = eval_pixels(opened, plan.recipe, progress=show, shard_train=not per_epoch, validation=validation)
    return data, corrupted


def _run(loaded: LoadedEncoder, plan: _Plan, accelerator: Accelerator, progress: bool, started: float) -> _Results:
    """Open the data, finetune, attack, and measure the corrupted set."""
    ev, bars = plan.recipe.eval, progress and accelerator.is_main_process
    data, corrupted = _open_data(plan, progress and accelerator.is_local_main_process)
    encoder_sha256 = weights_sha256(loaded.encoder.backbone)  # before AFF trains the encoder
    finetuned, clean_start = _finetune(loaded, data, plan, accelerator, bars)
    classifier = finetuned.classifier
    _share_weights(classifier, accelerator)
    saved = _transformers_classifier(classifier, data.source["class_names"]) if ev.save_classifier else None
    measured = measure(
        classifier,
        data.test.images,
        data.test.labels,
        ev.attack,
        plan.attacks,
        accelerator,
        num_classes=data.num_classes,
        seed=ev.seed,
        attack_subset=plan.attack_subset,
        progress=bars,
    )
    wall_time_s = time.perf_counter() - started
    corruptions = measure_corruptions(classifier, corrupted, plan.recipe, accelerator, bars)
    return _Results(data, encoder_sha256, finetuned, clean_start, saved, measured, wall_time_s, corruptions)


def _finetune(
    loaded: LoadedEncoder, data: EvalData, plan: _Plan, accelerator: Accelerator, progress: bool
) -> tuple[FinetuneResult, str | None]:
    """The protocol's finetuning; also says where dual-BN AFF's clean branch started (None without dual BN)."""
    cfg, recipe = plan.finetune, plan.recipe
    workers = recipe.data.workers
    if workers is None:
        workers = default_workers(processes_on_node(accelerator))
    clean_bn = _clean_branch(loaded) if cfg.dual_bn else None
    result = finetune(
        loaded.encoder,
        data.train,
        data.val,
        data.num_classes,
        cfg,
        device=accelerator.device,
        seed=recipe.eval.seed,
        desc=f"{plan.protocol} finetune",
        progress=progress,
        workers=workers,
        key=f"eval.{plan.protocol}",
        clean_bn=clean_bn,
    )
    clean_start = None if not cfg.dual_bn else "the run's 'normal' branch" if clean_bn else "the evaluated branch"
    return result, clean_start


def _finetune_record(plan: _Plan, results: _Results) -> FinetuneRecord:
    """The protocol's settings, which of them differ from the preset (set in the recipe or with --set), and what
    finetuning chose."""
    cfg, preset, finetuned = plan.finetune, plan.recipe.eval.preset, results.finetuned
    settings = cfg.model_dump(mode="json")
    from_preset = preset_values(preset, plan.protocol)
    return FinetuneRecord(
        settings=settings,
        preset_overrides={k: v for k, v in settings.items() if v != from_preset.get(k)},
        selection=_selection(cfg, len(results.data.val)),
        dual_bn_clean_start=results.clean_start,
        selected_epoch=finetuned.selected_epoch,
        val_accuracy=finetuned.val_accuracy,
        history=finetuned.history,
    )


def _attack_record(a: EvalAttackConfig, attacks: list[str]) -> AttackRecord:
    pgd = PgdRecord(loss="ce", epsilon=a.epsilon, step_size=a.step_size, steps=a.steps, random_start=a.random_start)
    autoattack = AutoAttackRecord(version=a.autoattack_version, norm="Linf", epsilon=a.epsilon)
    return AttackRecord(pgd=pgd, autoattack=autoattack if "autoattack" in attacks else None)


def _curve(a: EvalAttackConfig, measured: Measurement) -> list[CurvePoint]:
    return [
        CurvePoint(epsilon=eps, step_size=pgd_curve_step(a, eps), accuracy=Measurement.accuracy(flags))
        for eps, flags in measured.curve.items()
    ]


def _report(loaded: LoadedEncoder, plan: _Plan, results: _Results, accelerator: Accelerator) -> EvalReport:
    ev, data, measured, output = plan.recipe.eval, results.data, results.measured, plan.output
    curve = _curve(ev.attack, measured)
    return EvalReport(
        model=str(loaded.reference),
        model_kind=loaded.kind,
        bn_branch=loaded.bn_branch,
        protocol=plan.protocol,
        preset=ev.preset,
        preset_source=SOURCES[ev.preset],
        dataset=data.source,
        split_sizes=SplitSizes(
            train=len(data.train), val=len(data.val), test=len(data.test), attacked=measured.attacked
        ),
        epsilon=ev.attack.epsilon,
        SA=Measurement.accuracy(measured.clean),
        SA_attacked_subset=Measurement.accuracy(measured.clean[: measured.attacked]),
        RA=_accuracy(measured.pgd),
        AA=_accuracy(measured.autoattack),
        attack=_attack_record(ev.attack, plan.attacks),
        curve=curve,
        finetune=_finetune_record(plan, results),
        encoder_sha256=results.encoder_sha256,
        classifier_sha256=weights_sha256(results.classifier) if results.classifier is not None else None,
        seed=ev.seed,
        num_processes=accelerator.num_processes,
        device=str(accelerator.device),
        versions=software_versions(),
        wall_time_s=results.wall_time_s,
        output=str(output),
        curve_png=str(output.with_name(CURVE_FILE)) if curve else None,
        classifier_dir=str(output.with_name(CLASSIFIER_DIR)) if results.classifier is not None else None,
        corruptions=results.corruptions,
    )


def _write_outputs(report: EvalReport, classifier: torch.nn.Module | None) -> None:
    """The classifier folder and the curve PNG, then ``eval.json`` (the main process)."""
    if classifier is not None and report.classifier_dir is not None:
        _save_classifier(classifier, Path(report.classifier_dir))
    if report.curve_png is not None:
        plot_curve(report, Path(report.curve_png))
    write_json(Path(report.output), report)


__all__ = ["ATTACKS", "PROTOCOLS", "evaluate", "format_table", "run_dir_output"]
