"""What `robustcl evaluate` evaluates: a run directory, an export directory or a Hub repo id, as one module that maps
pixels in [0, 1] to pooled features.

Export directories and Hub ids load through ``AutoModel.from_pretrained`` only (no training code is imported), so
any exported robustcl encoder and any transformers vision backbone that returns pooled (or poolable) features can
be evaluated. Remote code is not executed unless asked for: robustcl's own model class is registered locally.
Loading is strict (``model_loading``): weights that do not match the config exactly are refused, never scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..export_layout import MODEL_TYPE
from ..model_loading import first_line, load_pretrained
from ..recipe import Recipe, load_recipe
from ..run_dir import RECIPE_FILE, is_run_dir


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


@dataclass
class LoadedModel:
    encoder: FeatureEncoder
    kind: str  # "run_dir" | "export_dir" | "hub"
    reference: str
    recipe: Recipe | None  # the recipe stored with the model, when there is one
    bn_branch: str | None  # the BN branch a multi-branch run was evaluated with


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


def load_model(
    reference: str | Path,
    *,
    bn_branch: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``reference`` (run directory, export directory or Hub repo id) for evaluation, in eval mode."""
    import robustcl.models  # noqa: F401  (registers the robustcl-resnet model type with AutoModel)

    path = Path(reference)
    if path.is_dir() and is_run_dir(path):
        from ..export import load_run_encoder  # run directories need the method to read their checkpoint

        encoder, recipe, branch = load_run_encoder(path, bn_branch)
        return LoadedModel(FeatureEncoder(encoder).eval(), "run_dir", str(path), recipe, branch)

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
    return LoadedModel(encoder, kind, str(reference), _stored_recipe(str(reference), **hub_kwargs), None)


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
        from ..hub import check_token_sendable

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
