"""The model card of an export: ``README.md`` rendered from the jinja template in ``hub_cards/`` through
``huggingface_hub.ModelCard``, with ``model-index`` metadata built from the evaluation reports it ships.

Every number in the card comes from the facts passed in (the run's checkpoint record and its ``eval.json``
files); nothing is filled in when a fact is missing.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .encoder_record import MethodCard
from .errors import UserError, one_line, shown
from .eval_report import EvalReport
from .hub import REPO_ID_RULE, invalid_repo_id
from .models import RobustCLResNetPreTrainedModel
from .recipe import Recipe

if TYPE_CHECKING:
    from .evaluation.ensemble import EnsembleFigures

    Figures = EvalReport | EnsembleFigures  # SA, RA, AA and epsilon of a row

TEMPLATE_NAME = "robustcl_model_card.md"
REPO_ID_WHERE = "--repo-id / export.repo_id"
DEFAULT_REPO_NAME = "model"  # the card's repo id when a folder name has nothing usable
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PROTOCOL_TEXT = {
    "slf": "frozen encoder, linear head trained on clean images",
    "alf": "frozen encoder, linear head trained on PGD examples",
    "aff": "whole network finetuned with TRADES",
}


@dataclass
class CardFacts:
    """What the card states, all measured or recorded by robustcl.

    ``repo_id``: given (``--repo-id``, ``export.repo_id``) or the default, a folder's name; see :func:`card_repo_id`.
    """

    repo_id: str
    license: str
    model: RobustCLResNetPreTrainedModel
    resolution: int
    bn_branch: str | None = None
    method: MethodCard | None = None  # the checkpoint's record of the training method
    recipe: Recipe | None = None
    compute: dict[str, Any] | None = None  # the checkpoint's record: steps, images_seen, wall_time_s, hardware
    evaluations: list[EvalReport] = field(default_factory=list)  # eval.json reports
    classifier_protocol: str | None = None  # set when the export is a finetuned classifier
    export_format: str = "remote-code"  # "native": transformers' own ResNet, normalisation in the image processor


def default_template() -> Path:
    """``hub_cards/robustcl_model_card.md`` (packaged as ``robustcl.hub_cards``; the repo folder in a checkout)."""
    try:
        path = Path(str(importlib.resources.files("robustcl.hub_cards") / TEMPLATE_NAME))
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[1] / "hub_cards" / TEMPLATE_NAME
    return path


def repo_name_from_folder(name: str) -> str:
    """A valid repo name made from a folder's name: its letters, digits, '.', '_' and '-', the rest joined by '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", name))
    while (trimmed := name[:96].strip("-.").removesuffix(".git")) != name:  # each cut may expose another end
        name = trimmed
    return name if name and not invalid_repo_id(name) else DEFAULT_REPO_NAME


def given_repo_id(repo_id: str) -> str:
    """A repo id the user gave (``--repo-id``, ``export.repo_id``), refused unless it is a Hub repo id."""
    if invalid_repo_id(repo_id):
        raise UserError(f"not a Hub repo id: {shown(repo_id)}", REPO_ID_WHERE, f"use {REPO_ID_RULE}")
    return repo_id


def card_repo_id(repo_id: str) -> str:
    """The repo id the card names, safe to put into its YAML metadata and its Python example.

    A repo id with a '/' was given (``--repo-id``, ``export.repo_id``): folder names, the defaults, never hold one.
    It must be a Hub repo id, else it is refused. A bare name may be the default, the export folder's (or the run's)
    name: whatever that folder is called, the export (or the end of a pretraining run) must not fail over a name the
    user never chose as a repo id, so an invalid one is turned into a valid one instead of being refused.
    """
    if "/" in repo_id or not invalid_repo_id(repo_id):
        return given_repo_id(repo_id)
    return repo_name_from_folder(repo_id)


def _md(text: str) -> str:
    """User text (folder, split, configuration names) as a markdown table cell or code span can hold it: on one
    line (control characters escaped), backticks (they would end the span) replaced, pipes (cell ends) escaped."""
    return one_line(text).replace("`", "'").replace("|", "\\|")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _eps(value: float) -> str:
    return f"{value * 255:g}/255"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def dataset_display(path: str) -> str:
    """A Hub dataset id as is; a local path by its folder name (cards are public, local paths are not). On one
    line: it goes into the card's metadata."""
    if _HUB_ID.fullmatch(path) or path.startswith("builtin:"):
        return one_line(path)
    return one_line(f"{Path(path).name or path} (local files)")


def _family(config: Any) -> str:
    """The network's name as papers give it: ResNet-50, WRN-34-10 (widths 16k/32k/64k), …"""
    block = config.block
    if block == "wide_preact":
        # Zagoruyko & Komodakis count 6n + 4 layers for three stages of n blocks.
        depth, k = 4 + 2 * sum(config.block_layers), config.widths[0] // 16
        if k and config.widths == [16 * k, 32 * k, 64 * k] and len(set(config.block_layers)) == 1:
            return f"WRN-{depth}-{k}"
        return f"wide pre-activation ResNet ({depth} layers)"
    # Counted as ResNet names count: the stem conv, the convs of every block and the final linear layer.
    depth = 2 + (3 if block == "bottleneck" else 2) * sum(config.block_layers)
    return f"ResNet-{depth}" + (" (bottleneck blocks)" if block == "bottleneck" else "")


def _architecture(facts: CardFacts) -> dict[str, Any]:
    config = facts.model.config
    return {
        "description": f"{_family(config)}, {config.stem} stem, widths {'/'.join(map(str, config.widths))}, "
        f"blocks {'/'.join(map(str, config.block_layers))}",
        "parameters": f"{sum(p.numel() for p in facts.model.parameters()):,}",
        "feature_dim": config.hidden_size,
        "resolution": facts.resolution,
        "mean": [round(m, 4) for m in config.image_mean],
        "std": [round(s, 4) for s in config.image_std],
        "bn_branch": _md(facts.bn_branch) if facts.bn_branch else None,
    }


def _pretraining(facts: CardFacts) -> dict[str, Any] | None:
    recipe = facts.recipe
    if recipe is None:
        return None
    a, o, s = recipe.attack, recipe.optimizer, recipe.schedule
    attack = (
        f"PGD-{a.steps}, ε {_eps(a.epsilon)}, step {_eps(a.step_size)}, "
        f"{'random' if a.random_start else 'no random'} start, BN in {a.bn_mode} mode, {a.precision}, "
        f"{a.negatives} negatives"
        if a.steps > 0 and a.epsilon > 0 and (facts.method is None or facts.method.adversarial)
        else "none"
    )
    return {
        "data": _md(dataset_display(recipe.data.path) + (f" [{recipe.data.name}]" if recipe.data.name else "")),
        "split": _md(recipe.data.split),
        "max_samples": recipe.data.max_samples,
        "resolution": recipe.data.resolution,
        "objective": facts.method.objective if facts.method is not None else recipe.method.name,
        "attack": attack,
        "optimizer": f"{o.name.upper()}, lr {o.peak_lr(recipe.training.batch_size):g}, weight decay "
        f"{o.weight_decay:g}, momentum {o.momentum:g}; "
        f"{s.name} schedule set every {s.unit}, {s.warmup_epochs:g} warm-up epochs"
        + (f" from lr {s.warmup_start_lr:g}" if s.warmup_start_lr is not None else ""),
        "batch_size": recipe.training.batch_size,
    }


def _compute(facts: CardFacts) -> dict[str, Any] | None:
    c = facts.compute
    if not c:
        return None
    size = c.get("dataset_images")
    return {
        "steps": f"{c['steps']:,}",
        "images_seen": f"{c['images_seen']:,}",
        "epochs": f"{c['images_seen'] / size:.1f}" if size else "–",
        "wall_time": _duration(c["wall_time_s"]),
        "hardware": _md("; ".join(c["hardware"])) or "–",
    }


def _evaluation_rows(evaluations: list[EvalReport]) -> list[dict[str, Any]]:
    rows = []
    for e in evaluations:
        protocol = e.protocol.upper() + (f" ({_md(e.preset)} preset)" if e.preset else "")
        rows.append(_row(protocol, e, e.dataset.test_split, e, (e.finetune.selected_epoch, e.finetune.epochs)))
    return rows + _ensemble_row(evaluations)


def _row(
    protocol: str, report: EvalReport, test_split: str, figures: Figures, epochs: tuple[Any, Any]
) -> dict[str, Any]:
    """One row of the evaluation table: ``figures`` (SA, RA, AA, epsilon) measured on ``report``'s test data."""
    return {
        "protocol": protocol,
        "dataset": _md(dataset_display(report.dataset.path) + f" ({test_split})"),
        "epsilon": _eps(figures.epsilon),
        "SA": _pct(figures.SA),
        "RA": _pct(figures.RA),
        "AA": _pct(figures.AA),
        "test_images": report.split_sizes.test,
        "attacked": report.split_sizes.attacked,
        "selected_epoch": epochs[0],
        "epochs": epochs[1],
    }


def _ensemble_row(evaluations: list[EvalReport]) -> list[dict[str, Any]]:
    """The RobustSSL leaderboard's ensemble (mean of SLF, ALF and AFF) when the card has one evaluation of each."""
    from .evaluation.ensemble import card_ensemble

    figures = card_ensemble(evaluations)
    if figures is None:
        return []
    protocol = "Ensemble (mean of SLF, ALF, AFF)"
    return [_row(protocol, evaluations[0], figures.test_split, figures, ("–", "–"))]


def _threat(evaluations: list[EvalReport]) -> dict[str, str]:
    pgd = {
        f"PGD-{p.steps} (cross-entropy, step {_eps(p.step_size)}, {'random' if p.random_start else 'no random'} start)"
        for p in (e.attack.pgd for e in evaluations if e.RA is not None)
    }
    aa = {
        f"version '{e.attack.autoattack.version}'"
        for e in evaluations
        if e.AA is not None and e.attack.autoattack is not None
    }
    return {"pgd": "; ".join(sorted(pgd)) or "not measured", "autoattack": "; ".join(sorted(aa)) or "not measured"}


def _eval_result(e: EvalReport, name: str, attack: str, value: float) -> EvalResult:
    """The ``model-index`` entry of one metric of one evaluation, in percent."""
    data, protocol = e.dataset, e.protocol
    return EvalResult(
        task_type="image-classification",
        task_name="Image classification",
        dataset_type=dataset_display(data.path),
        dataset_name=dataset_display(data.path),
        dataset_config=one_line(data.name) if data.name else None,
        dataset_split=one_line(data.test_split),
        metric_type="accuracy",
        metric_name=f"{name}, {protocol.upper()}",
        metric_config=protocol,
        metric_value=round(100 * value, 2),
        metric_args={
            "protocol": protocol,
            "attack": attack,
            "norm": "Linf",
            "epsilon": _eps(e.epsilon),
            "test_images": e.split_sizes.test if attack == "clean" else e.split_sizes.attacked,
        },
    )


def eval_results(evaluations: list[EvalReport]) -> list[EvalResult]:
    """``model-index`` entries: SA, RA and AA (when measured) of every evaluation, in percent."""
    results = []
    for e in evaluations:
        steps = e.attack.pgd.steps
        measured = [
            ("SA", "clean", e.SA),
            (f"RA (PGD-{steps})", f"pgd{steps}", e.RA),
            ("AA (AutoAttack)", "autoattack", e.AA),
        ]
        results += [_eval_result(e, name, attack, value) for name, attack, value in measured if value is not None]
    return results


_NATIVE_LOADING = """## How to load

```python
import torch
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{repo_id}")
encoder = AutoModel.from_pretrained("{repo_id}").eval()  # transformers' own ResNetModel, no remote code
features = encoder(**processor(images, return_tensors="pt")).pooler_output.flatten(1)  # N×{dim}
```

This is a plain transformers ResNet (`model_type: resnet`). Unlike robustcl's own exports, it does **not** normalise
its input: `AutoImageProcessor` resizes (shorter side, bicubic), centre-crops, scales pixels to [0, 1] and then
normalises them (mean {mean} / std {std}). `last_hidden_state` is the final feature map, `pooler_output` its global
average (N×{dim}×1×1).

### Attacking it in pixel space

The threat model of every robustness figure here is an L∞ ball of radius ε around pixels in [0, 1]. To attack (or
adversarially finetune) this model in that space, normalise inside the attacked function and let the attack
perturb the [0, 1] pixels:

```python
mean = torch.tensor(processor.image_mean).view(1, -1, 1, 1)
std = torch.tensor(processor.image_std).view(1, -1, 1, 1)

class PixelSpace(torch.nn.Module):  # what the attack sees: [0, 1] pixels in, features out
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels):  # N×3×{resolution}×{resolution} in [0, 1]
        return self.encoder((pixels - mean) / std).pooler_output.flatten(1)
```

Perturbing the normalised tensor instead scales ε by 1/std per channel (about 4×): not the threat model measured
here.

"""
_LOADING_HEADING = "## How to load"


def _native_text(text: str, facts: CardFacts, repo_id: str) -> str:
    """The card's text for a native export: its loading section replaced (or added) by one that needs no remote
    code, normalises through the image processor and says how to attack the model in pixel space."""
    arch = _architecture(facts)
    section = _NATIVE_LOADING.format(
        repo_id=repo_id, dim=arch["feature_dim"], mean=arch["mean"], std=arch["std"], resolution=facts.resolution
    )
    text = text.replace("happens inside the model", "is the image processor's: this model does not normalise")
    start = text.find(_LOADING_HEADING)
    if start < 0:  # a custom template without the section
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(_LOADING_HEADING))
    return text[:start] + section + (text[end + 1 :] if end >= 0 else "")


def _card_data(facts: CardFacts, repo_id: str) -> ModelCardData:
    """The card's YAML metadata, ``model-index`` included."""
    method_name = facts.recipe.method.name if facts.recipe else None
    datasets = [facts.recipe.data.path] if facts.recipe and _HUB_ID.fullmatch(facts.recipe.data.path) else None
    results = eval_results(facts.evaluations)
    return ModelCardData(
        model_name=repo_id.split("/")[-1],
        license=facts.license,
        library_name="transformers",
        pipeline_tag="image-classification" if facts.classifier_protocol else "image-feature-extraction",
        tags=[t for t in ("robustcl", "adversarial-robustness", "self-supervised-learning", method_name) if t],
        datasets=datasets,
        metrics=["accuracy"] if results else None,
        eval_results=results or None,
    )


def _headline(facts: CardFacts, repo_id: str) -> dict[str, Any]:
    """The card's title, summary, training method and (for a classifier export) classifier."""
    method_name = facts.recipe.method.name if facts.recipe else None
    display = facts.method.display_name if facts.method is not None else (method_name or "unknown").upper()
    adversarial = facts.method is None or facts.method.adversarial
    kind, protocol = "robust " if adversarial else "", facts.classifier_protocol
    title = f"{repo_id.split('/')[-1]}: " + (
        f"{kind}classifier ({protocol.upper()})" if protocol else f"{kind}image encoder"
    )
    summary = (
        f"An image encoder pretrained with {display if method_name else 'robustcl'}"
        + (f" with a linear head finetuned by {protocol.upper()}" if protocol else "")
        + (
            ", trained self-supervised (without labels) to keep its features stable under adversarial perturbations."
            if adversarial
            else ", trained self-supervised (without labels) and without an adversary: a non-robust baseline."
        )
    )
    classifier = None
    if protocol:
        classifier = {
            "protocol": protocol,
            "num_labels": facts.model.config.num_labels,
            "description": _PROTOCOL_TEXT[protocol],
        }
    method = {"name": display, "paper": facts.method.paper if facts.method is not None else None}
    return {"title": title, "summary": summary, "method": method, "classifier": classifier}


def render_model_card(facts: CardFacts, template: Path | None = None) -> ModelCard:
    """The card as a ``ModelCard`` (YAML metadata + markdown)."""
    template = Path(template) if template is not None else default_template()
    if not template.is_file():
        raise UserError("model card template not found", str(template), "give an existing jinja markdown file")
    repo_id = card_repo_id(facts.repo_id)
    import jinja2

    from . import __version__

    try:
        card = ModelCard.from_template(
            _card_data(facts, repo_id),
            template_path=str(template),
            **_headline(facts, repo_id),
            repo_id=repo_id,
            arch=_architecture(facts),
            versions={"robustcl": __version__},
            pretraining=_pretraining(facts),
            compute=_compute(facts),
            evaluations=_evaluation_rows(facts.evaluations),
            threat=_threat(facts.evaluations),
            license=facts.license,
            native=facts.export_format == "native",
        )
    except jinja2.TemplateError as err:
        raise UserError(
            f"the model card template does not render: {err}", str(template), "fix the jinja template"
        ) from None
    if facts.export_format == "native":
        card.text = _native_text(card.text, facts, repo_id)
    return card
