"""An encoder from a run directory, an export folder or a Hub repo id, as a module that maps pixels in [0, 1] to
pooled features: what evaluation measures, export writes, DeACL distils from and AdvCL clusters with.

A run directory's encoder is read from its newest complete checkpoint: the record in its ``train_state.json``
(``encoder_record``) gives the encoder's config and where its tensors sit in the checkpoint's weights file, so no
training method is built and nothing of ``methods/`` is imported. Export folders and Hub ids load through
``AutoModel.from_pretrained`` only, so any exported robustcl encoder and any transformers vision backbone that returns
pooled (or poolable) features can be used. Remote code is not executed unless asked for: robustcl's own model class
is registered locally. Loading is strict (``model_loading``): weights that do not match the config exactly are
refused, never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .encoder_record import TRAIN_STATE_KEY, EncoderRecord
from .errors import UserError
from .export_layout import MODEL_TYPE, WEIGHTS_FILE
from .lpaft_output import read_lpaft
from .model_loading import check_model_size, check_state_dict, first_line, load_pretrained, read_safetensors
from .models import RobustCLResNetConfig, RobustCLResNetModel
from .recipe import Recipe, load_recipe
from .run_dir import is_run_dir, read_run_recipe, require_checkpoint
from .run_layout import ENCODER_DIR, RECIPE_FILE, TRAIN_STATE


class FeatureEncoder(nn.Module):
    """A transformers backbone as ``pixels in [0, 1] → features [N, D]``.

    ``mean``/``std`` normalise the pixels first, for backbones that expect normalised inputs (robustcl encoders
    normalise inside the model and get none). Features are ``pooler_output`` flattened, or the spatial/token mean of
    ``last_hidden_state`` when the model has no pooler.
    """

    def __init__(self, backbone: nn.Module, mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.normalise = mean is not None and std is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            pixels = (pixels - self.mean) / self.std
        out = self.backbone(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)
        return pooled.flatten(1)


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


@dataclass
class RunEncoder:
    """The encoder of a run's newest complete checkpoint, with every BN branch it was trained with (eval mode)."""

    encoder: RobustCLResNetModel
    record: EncoderRecord
    recipe: Recipe
    checkpoint: Path
    compute: dict[str, Any] | None  # the checkpoint's record: steps, images seen, wall time, hardware

    def branch(self, bn_branch: str | None = None) -> str | None:
        """The branch asked for, else the recipe's (export.bn_branch), else the method's (its adversarial one)."""
        return bn_branch or self.recipe.export.bn_branch or self.record.export_branch

    def single_branch(self, bn_branch: str | None = None) -> tuple[RobustCLResNetModel, str | None]:
        """A plain-BN copy keeping :meth:`branch` (eval mode; a plain-BN encoder ignores it), and that branch."""
        branch = self.branch(bn_branch)
        return single_branch_encoder(self.encoder, branch), branch


def load_run(run_dir: Path, post_pretraining: bool = True) -> RunEncoder:
    """The newest complete checkpoint's encoder, read from its record and its weights, strictly; with
    ``post_pretraining``, DynACL++'s finetuned encoder in its place when the stage was run on that checkpoint
    (:mod:`.lpaft_output`: its record, and the run's recipe with the stage's settings)."""
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    if recipe is None:
        raise UserError(
            "not a robustcl run directory (no recipe.yaml)",
            str(run_dir),
            "give the --output-dir of a robustcl pretrain run",
        )
    checkpoint = require_checkpoint(run_dir)
    state = json.loads((checkpoint / TRAIN_STATE).read_text())
    record = _encoder_record(state, checkpoint, run_dir)
    encoder = _encoder_weights(checkpoint, record)
    compute = {"steps": int(state["step"]), **state.get("compute", {})}
    if "images_seen" not in compute:  # checkpoints written before the compute record existed
        compute = None
    stage = read_lpaft(run_dir, int(state["step"])) if post_pretraining else None
    if stage is not None:
        encoder, record, recipe = stage.encoder, stage.record.encoder, stage.recipe(recipe)
    return RunEncoder(encoder, record, recipe, checkpoint, compute)


def _encoder_record(state: dict[str, Any], checkpoint: Path, run_dir: Path) -> EncoderRecord:
    where = str(checkpoint / TRAIN_STATE)
    if TRAIN_STATE_KEY not in state:
        # Reading it without the record would mean building the training method again: the export that pretrain
        # wrote at the end of the run holds the same encoder, and the run's next checkpoint has the record.
        raise UserError(
            "this checkpoint was written by an earlier robustcl and does not record its encoder",
            where,
            f"use the run's export, {run_dir / ENCODER_DIR}, in place of the run directory, or train the run on "
            "with this version (robustcl pretrain with a higher training.max_steps) so that its next checkpoint "
            "records the encoder",
        )
    try:
        return EncoderRecord.model_validate(state[TRAIN_STATE_KEY])
    except ValidationError as err:
        raise UserError(
            f"the checkpoint's encoder record is invalid: {first_line(err)}",
            where,
            "move this checkpoint folder away to use an earlier one",
        ) from None


def _encoder_weights(checkpoint: Path, record: EncoderRecord) -> RobustCLResNetModel:
    """The recorded encoder with its tensors from the checkpoint's weights file: exactly the keys under the record's
    prefix (named with it in a refusal) and finite values."""
    path, fix = checkpoint / WEIGHTS_FILE, "move this checkpoint folder away to use an earlier one"
    try:
        config = RobustCLResNetConfig.from_dict(record.config)
    except ValueError as err:
        raise UserError(f"the checkpoint's encoder config is invalid: {first_line(err)}", str(path), fix) from None
    check_model_size(
        config, str(path), "use a machine with more memory (model.widths and model.block_layers set the size)"
    )
    encoder = RobustCLResNetModel(config)
    # Held under its path in the method, so the key names checked (and quoted in a refusal) are the file's own.
    holder = nn.Module()
    *parents, name = record.weights_prefix.removesuffix(".").split(".")
    parent = holder
    for part in parents:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(name, encoder)
    state = {k: v for k, v in read_safetensors(path, fix).items() if k.startswith(record.weights_prefix)}
    check_state_dict(holder, state, str(path), f"the weights do not fit the encoder the checkpoint records: {fix}")
    holder.load_state_dict(state, strict=True)
    return encoder.eval()


@dataclass
class LoadedEncoder:
    encoder: FeatureEncoder
    kind: str  # "run_dir" | "export_dir" | "hub"
    reference: str
    recipe: Recipe | None  # the recipe stored with the model, when there is one
    bn_branch: str | None  # the BN branch a multi-branch run was read with
    run: RunEncoder | None = None  # a run directory's encoder with all its branches


def _read_json(path: Path | str | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _optional_file(reference: str, filename: str, **hub_kwargs) -> str | None:
    """Local path of ``filename`` in a model folder or Hub repo, or None when the model has no such file."""
    from transformers.utils import cached_file

    return cached_file(
        reference,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


def _normalisation(reference: str, model_type: str, **hub_kwargs) -> tuple[list[float] | None, list[float] | None]:
    """Mean/std the backbone expects, from its preprocessor config (robustcl encoders normalise internally)."""
    if model_type == MODEL_TYPE:
        return None, None
    config = _read_json(_optional_file(reference, "preprocessor_config.json", **hub_kwargs))
    if config.get("do_normalize", False) and "image_mean" in config and "image_std" in config:
        return list(config["image_mean"]), list(config["image_std"])
    return None, None


def _stored_recipe(reference: str, **hub_kwargs) -> Recipe | None:
    path = _optional_file(reference, RECIPE_FILE, **hub_kwargs)
    return load_recipe(path) if path else None


def _names_a_local_path(reference: str) -> bool:
    """True when ``reference`` cannot be a Hub id (``name`` or ``namespace/name``), so it was meant as a folder."""
    return (
        reference.startswith((".", "/", "~"))
        or reference.endswith("/")
        or reference.count("/") > 1
        or "\\" in reference
    )


def load_encoder(
    reference: str | Path,
    *,
    bn_branch: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedEncoder:
    """Load ``reference`` (run directory, export directory or Hub repo id) as a feature encoder, in eval mode."""
    path = Path(reference)
    if path.is_dir() and is_run_dir(path):
        run = load_run(path)
        encoder, branch = run.single_branch(bn_branch)
        return LoadedEncoder(FeatureEncoder(encoder).eval(), "run_dir", str(path), run.recipe, branch, run)

    if bn_branch is not None:
        raise UserError(
            "--bn-branch only applies to run directories",
            str(reference),
            "an export holds one BN branch already; choose it at export time (robustcl export --bn-branch)",
        )
    if not path.exists() and _names_a_local_path(str(reference)):
        # transformers would report it as a malformed Hub repo id, which hides the real mistake.
        raise UserError(
            "model folder not found",
            str(reference),
            "give a run directory (robustcl pretrain -o DIR), an export folder (robustcl export) or a Hub repo id "
            "such as my-org/acl-r18",
        )
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(
            "not a run directory or a model export (no config.json)",
            str(path),
            "give a robustcl run directory, a folder written by robustcl export / save_pretrained, or a Hub id",
        )
    kind = "export_dir" if path.exists() else "hub"
    hub_kwargs = {"revision": revision} if revision else {}
    config, backbone = _load_backbone(str(reference), kind, trust_remote_code, hub_kwargs)
    mean, std = _normalisation(str(reference), config.model_type, **hub_kwargs)
    encoder = FeatureEncoder(backbone, mean, std).eval()
    return LoadedEncoder(encoder, kind, str(reference), _stored_recipe(str(reference), **hub_kwargs), None)


def _load_backbone(reference: str, kind: str, trust_remote_code: bool, hub_kwargs: dict) -> tuple[Any, nn.Module]:
    """Config and weights of an export folder or Hub repo, loaded strictly (``model_loading``): a model whose
    weights do not match its config, hold NaN/inf, cannot be read or would not fit in memory is a UserError."""
    from transformers import AutoConfig, AutoModel

    where = reference if kind == "hub" else str(Path(reference) / "config.json")
    fix = (
        "correct config.json or export the model again (custom architectures need --trust-remote-code)"
        if kind == "export_dir"
        else "use a repo (or --revision) with a valid config.json; custom architectures need --trust-remote-code"
    )
    if kind == "hub":
        from .hub import check_token_sendable

        check_token_sendable()  # else the HTTP client fails on the header with a traceback
    try:
        config = AutoConfig.from_pretrained(reference, trust_remote_code=trust_remote_code, **hub_kwargs)
    except ValueError as err:  # a value the config class refuses (robustcl's: sizes it cannot build)
        raise UserError(f"invalid model config: {first_line(err)}", where, fix) from None
    except OSError as err:
        raise _cannot_load(err, reference, kind) from None
    weights_fix = (
        "config.json and the weights must come from the same model: export it again"
        if kind == "export_dir"
        else "use a repo (or --revision) whose weights match its config.json"
    )
    try:
        backbone = load_pretrained(
            AutoModel,
            reference,
            config,
            where=reference,
            fix=weights_fix,
            trust_remote_code=trust_remote_code,
            **hub_kwargs,
        )
    except (OSError, ValueError) as err:
        raise _cannot_load(err, reference, kind) from None
    return config, backbone


def _cannot_load(err: BaseException, reference: str, kind: str) -> UserError:
    fix = (
        "the folder needs config.json and the weights (model.safetensors) as robustcl export / save_pretrained "
        "writes them: export it again"
        if kind == "export_dir"
        else "check the repo id (and HF_TOKEN for private repos); custom architectures need --trust-remote-code"
    )
    return UserError(f"cannot load the model: {first_line(err)}", reference, fix)
