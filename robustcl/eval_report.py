"""The evaluation report, ``eval.json``: what ``robustcl evaluate`` writes and the model card, export and ensemble
read, as a typed model. Light on imports (pydantic only), so readers load it without evaluation's machinery.

The JSON keeps the keys and order it has always had. Reports of earlier versions load: the keys added since the
first version (``preset``, ``encoder_sha256``, ``corruptions``, …) default to null when missing, and keys this
version does not know are kept as they were (a model of each part allows extra keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer, model_validator


class _Part(BaseModel):
    # protected_namespaces: the report has a field called model_kind.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class DatasetRecord(_Part):
    """What was measured on: the evaluation splits of a dataset (``eval.data``)."""

    source: str  # the dataset as shown: path and configuration name
    path: str
    name: str | None
    train_split: str
    test_split: str  # the split measured (the fallback when the requested one has no labels)
    requested_test_split: str | None = None
    test_split_note: str | None = None  # why another split than the requested one was measured
    resolution: int
    center_crop: float | None = None  # the fraction of the resized image kept
    num_classes: int
    class_names: list[str] | None


class SplitSizes(_Part):
    train: int
    val: int
    test: int
    attacked: int  # test images attacked (RA, AA): eval.attack_subset or all


class PgdRecord(_Part):
    loss: str
    epsilon: float
    step_size: float
    steps: int
    random_start: bool


class AutoAttackRecord(_Part):
    version: str
    norm: str
    epsilon: float


class AttackRecord(_Part):
    pgd: PgdRecord
    autoattack: AutoAttackRecord | None  # None: AutoAttack not run


class CurvePoint(_Part):
    """Accuracy under PGD at one radius of ``eval.attack.curve_epsilons``."""

    epsilon: float
    step_size: float
    accuracy: float


class EpochRecord(_Part):
    epoch: int
    train_loss: float | None  # null when not finite
    val_accuracy: float | None  # None without a validation split


class FinetuneRecord(_Part):
    """``finetune``: the protocol's settings (every ``eval.<protocol>`` key, in the JSON at the top of this object),
    then what finetuning chose. The settings stay a mapping: which keys there are changes with robustcl's version."""

    settings: dict[str, Any]
    preset_overrides: dict[str, Any] | None = None  # the settings that differ from the preset
    selection: str | None = None  # how the kept epoch was chosen, in words
    dual_bn_clean_start: str | None = None
    selected_epoch: int
    val_accuracy: float | None
    history: list[EpochRecord]

    @model_validator(mode="before")
    @classmethod
    def _settings_from_flat_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "settings" not in data:
            own = cls.model_fields.keys() - {"settings"}
            settings = {key: value for key, value in data.items() if key not in own}
            return {"settings": settings, **{key: value for key, value in data.items() if key in own}}
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        dumped = handler(self)
        return {**dumped.pop("settings"), **dumped}

    @property
    def epochs(self) -> int:
        return self.settings["epochs"]

    @property
    def select_by(self) -> str:
        return self.settings["select_by"]


class CorruptionFigures(_Part):
    """Accuracy on a common-corruptions set (``eval.corruptions``): per corruption × severity ("1".."5"), the mean
    per severity and per corruption, and ``mean``, the benchmark's headline (the mean of the per-severity means)."""

    source: str
    columns: dict[str, str | None]
    images: int
    accuracy: dict[str, dict[str, float]]
    images_per_cell: dict[str, dict[str, int]]
    severity_mean: dict[str, float]
    corruption_mean: dict[str, float]
    mean: float | None
    reference: str


class EvalReport(_Part):
    """One evaluation: a model finetuned with one protocol, measured clean (SA), under PGD (RA) and AutoAttack (AA).
    Accuracies are fractions; a metric not measured is None."""

    model: str  # the reference evaluated: run directory, export folder or Hub id
    model_kind: str
    bn_branch: str | None
    protocol: str
    preset: str | None = None
    preset_source: str | None = None
    dataset: DatasetRecord
    split_sizes: SplitSizes
    epsilon: float
    SA: float
    SA_attacked_subset: float | None
    RA: float | None
    AA: float | None
    attack: AttackRecord
    curve: list[CurvePoint]
    finetune: FinetuneRecord
    encoder_sha256: str | None = None  # ties the report to the exact weights measured
    classifier_sha256: str | None = None
    seed: int
    num_processes: int
    device: str
    versions: dict[str, str]
    wall_time_s: float
    output: str
    curve_png: str | None
    classifier_dir: str | None = None
    corruptions: CorruptionFigures | None = None


def read_report(path: Path) -> EvalReport | None:
    """The report in ``path``, or None when there is none (no file, not JSON, not an evaluation report)."""
    try:
        return EvalReport.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError, ValidationError):
        return None
