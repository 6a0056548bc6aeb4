"""The RobustSSL leaderboard's "ensemble" figure: the mean of each metric over one SLF, one ALF and one AFF evaluation
of the same encoder.

GodXuxilie/RobustSSL_Benchmark, Finetuning_Methods/Vanilla_Finetuning/vanilla_finetuning.py (``--mode ALL``) runs the
three protocols and logs the mean over them of the standard accuracy (SA), the AutoAttack accuracy (AA) and the mean
corruption accuracy; it does not average PGD-20. Here every metric the three reports share is averaged: SA, RA
(PGD-20, an addition) and AA, and the mean corruption accuracy (``eval.corruptions``); a metric that one of them did
not measure has no mean (null). ``robustcl evaluate --protocol all`` writes it as ``ensemble.json`` beside the three
protocol folders; the model card shows it as a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import UserError, one_line, shown
from ..eval_report import EvalReport
from ..export_layout import PROTOCOLS
from ..json_files import write_json
from ..run_layout import ENSEMBLE_FILE

ALL = "all"  # --protocol all: the three protocols in turn, then their ensemble
METRICS = ("SA", "RA", "AA", "corruptions_mean")
REFERENCE = "GodXuxilie/RobustSSL_Benchmark Finetuning_Methods/Vanilla_Finetuning/vanilla_finetuning.py (--mode ALL)"
_FIX = "evaluate one model with one set of settings: robustcl evaluate MODEL --protocol all"


class EnsembleFigures(BaseModel):
    """``ensemble.json``: the mean of each metric over the three protocols' reports (None where one lacks it)."""

    protocols: list[str]
    encoder_sha256: str | None
    preset: str | None
    model: str
    dataset: str
    test_split: str
    epsilon: float
    SA: float | None
    RA: float | None
    AA: float | None
    corruptions_mean: float | None
    per_protocol: dict[str, dict[str, float | None]]  # protocol → metric → its report's figure
    reports: dict[str, str]  # protocol → its eval.json
    reference: str


def _metric(report: EvalReport, metric: str) -> float | None:
    if metric == "corruptions_mean":
        return report.corruptions.mean if report.corruptions else None
    return getattr(report, metric)


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def _agree(reports: list[EvalReport], what: str, value: Callable[[EvalReport], Any]) -> None:
    """Refuse reports whose ``value`` differs: their mean would be no one model's (or setting's) figure."""
    first = reports[0]
    for other in reports[1:]:
        if value(other) != value(first):
            raise UserError(
                f"the {first.protocol} and {other.protocol} reports are of different {what}: "
                f"{shown(value(first), 24)} vs {shown(value(other), 24)}",
                one_line(f"{first.output}, {other.output}"),
                _FIX,
            )


def _one_of_each(reports: list[EvalReport]) -> list[EvalReport]:
    """The reports in protocol order, refused unless they are one each of slf, alf and aff."""
    protocols = [r.protocol for r in reports]
    if sorted(protocols) != sorted(PROTOCOLS):
        raise UserError(
            f"the ensemble is the mean over one each of {', '.join(PROTOCOLS)}, got: "
            f"{one_line(', '.join(protocols)) or 'none'}",
            "--protocol all",
            _FIX,
        )
    return sorted(reports, key=lambda r: PROTOCOLS.index(r.protocol))


def ensemble(reports: list[EvalReport]) -> EnsembleFigures:
    """The mean of each metric (:data:`METRICS`) over one report of each protocol, refused in one line when they are
    not one each of slf, alf and aff, or not of the same encoder (``encoder_sha256``), preset, test data and ε."""
    ordered = _one_of_each(reports)
    _agree(ordered, "encoders (encoder_sha256)", lambda r: r.encoder_sha256)
    _agree(ordered, "presets (preset)", lambda r: r.preset)
    _agree(ordered, "test data", lambda r: (r.dataset.source, r.dataset.test_split))
    _agree(ordered, "attack radii (epsilon)", lambda r: r.epsilon)
    first = ordered[0]
    return EnsembleFigures(
        protocols=list(PROTOCOLS),
        encoder_sha256=first.encoder_sha256,
        preset=first.preset,
        model=first.model,
        dataset=first.dataset.source,
        test_split=first.dataset.test_split,
        epsilon=first.epsilon,
        **{m: _mean([_metric(r, m) for r in ordered]) for m in METRICS},
        per_protocol={r.protocol: {m: _metric(r, m) for m in METRICS} for r in ordered},
        reports={r.protocol: r.output for r in ordered},
        reference=REFERENCE,
    )


def card_ensemble(evaluations: list[EvalReport]) -> EnsembleFigures | None:
    """The ensemble of a model card's evaluations, or None when they are not one each of the three protocols of one
    encoder (the card then simply has no ensemble row)."""
    try:
        return ensemble(evaluations)
    except UserError:
        return None


def _is_ensemble(path: Path) -> bool:
    try:
        EnsembleFigures.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError):
        return False
    return True


def check_ensemble_output(path: Path) -> None:
    """Refuse to write ``ensemble.json`` over a file that is not one robustcl wrote."""
    if path.exists() and not _is_ensemble(path):
        raise UserError(
            f"{one_line(str(path))} exists and is not an ensemble robustcl wrote; it would be overwritten",
            f"--output {one_line(str(path.parent))}",
            "choose a folder of its own for the evaluations",
        )


def planned_outputs(protocol: str | None, output: Path | None) -> list[tuple[str | None, Path | None]]:
    """(protocol, --output) of each evaluation a command runs: itself, or with ``--protocol all`` one per protocol,
    each into ``OUTPUT/PROTOCOL/`` (the default folders when ``output`` is None)."""
    if protocol != ALL:
        return [(protocol, output)]
    if output is not None:
        if output.suffix:
            raise UserError(
                "--protocol all writes three reports and their ensemble: the output must be a folder",
                f"--output {one_line(str(output))}",
                f"give a folder, e.g. {one_line(str(output.with_suffix('')))}",
            )
        check_ensemble_output(output / ENSEMBLE_FILE)
    return [(p, None if output is None else output / p) for p in PROTOCOLS]


def write_ensemble(reports: list[EvalReport]) -> tuple[EnsembleFigures, Path]:
    """The ensemble of the three reports, written as ``ensemble.json`` in the folder that holds their folders."""
    figures = ensemble(reports)
    path = Path(reports[0].output).parent.parent / ENSEMBLE_FILE
    check_ensemble_output(path)
    write_json(path, figures)
    return figures, path


def format_ensemble(figures: EnsembleFigures) -> str:
    """The ensemble's figures as a line of text, after the three protocols' tables."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    metrics = "  ".join(f"{m.replace('corruptions_mean', 'corruptions')} {pct(getattr(figures, m))}" for m in METRICS)
    return f"ENSEMBLE (mean of {', '.join(p.upper() for p in PROTOCOLS)})\n  {metrics}"
