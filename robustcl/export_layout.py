"""What an export folder holds, by name: the single list that ``robustcl export`` writes and ``robustcl
push-to-hub`` accepts. Light on imports, so evaluation and publishing can use it without training code.

Layout (``--format remote-code``, the default)::

    model.safetensors            weights (safetensors only)
    config.json                  transformers config with auto_map → the copied *.py files
    configuration_robustcl.py, modeling_robustcl.py, resnet.py    remote code (torch + transformers only)
    preprocessor_config.json     image processor: resize, centre crop, scale to [0, 1], no normalisation
    README.md                    model card
    recipe.yaml                  resolved training recipe (when exported from a run)
    eval/<protocol>/eval.json, eval/<protocol>/robustness_curve.png   evaluations of exactly these weights

The recipe and the evaluations are copies of a run directory's files, under the names ``run_layout`` gives them.

``--format native`` writes the same files without the remote code: config.json is transformers' own ResNet
(model_type ``resnet``, marked ``"robustcl_export": "native"`` so that robustcl knows the folder as its export) and
the image processor normalises, since transformers' ResNet does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .run_layout import CURVE_FILE, EVAL_DIR, RECIPE_FILE, REPORT_FILE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
PROTOCOLS = ("slf", "alf", "aff")
MODEL_TYPE = "robustcl-resnet"
NATIVE_MODEL_TYPE = "resnet"  # transformers' own ResNetModel (export --format native)
EXPORT_MARKER = "robustcl_export"  # config.json key of a native export: only robustcl exports are replaced
NATIVE_FORMAT = "native"

REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, PREPROCESSOR_FILE, CARD_FILE)


def remote_code_files() -> set[str]:
    """The model package's modules: ``save_pretrained`` copies those the model class needs."""
    models = Path(__file__).with_name("models")
    return {p.name for p in models.glob("*.py") if p.name != "__init__.py"}


def export_file_set() -> set[str]:
    """Every relative path (POSIX) an export may contain."""
    evals = {f"{EVAL_DIR}/{p}/{name}" for p in PROTOCOLS for name in (REPORT_FILE, CURVE_FILE)}
    return {*REQUIRED_FILES, RECIPE_FILE, *remote_code_files(), *evals}


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_model_type(folder: Path) -> str | None:
    """``model_type`` of the folder's config.json, or None when there is no readable one."""
    return _read_config(folder).get("model_type")


def is_export_config(folder: Path) -> bool:
    """The folder's config.json is a robustcl export's, in either format (a native export is a transformers ResNet
    carrying robustcl's marker; any other ResNet folder is not robustcl's to replace or publish)."""
    config = _read_config(folder)
    if config.get("model_type") == MODEL_TYPE:
        return True
    return config.get("model_type") == NATIVE_MODEL_TYPE and config.get(EXPORT_MARKER) == NATIVE_FORMAT


def export_files(folder: Path) -> list[str]:
    """The relative paths of a complete robustcl export, checked: refuses missing required files, anything outside
    the export set, dotfiles and symlinks (nothing outside the folder can be published through a link)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("export folder not found", str(folder), "give a folder written by robustcl export")
    allowed, found, strays = export_file_set(), [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            strays.append(f"{rel} (symlink)")
        elif path.is_dir():
            continue
        elif rel in allowed:
            found.append(rel)
        else:
            strays.append(rel)
    if strays:
        raise UserError(
            f"the folder holds files that are not part of a robustcl export: {', '.join(strays[:5])}"
            + (f" and {len(strays) - 5} more" if len(strays) > 5 else ""),
            str(folder),
            "publish the folder exactly as robustcl export wrote it (re-export into a new folder)",
        )
    missing = [name for name in REQUIRED_FILES if name not in found]
    if missing:
        raise UserError(
            f"incomplete export, missing {', '.join(missing)}",
            str(folder),
            "re-run robustcl export RUN_DIR OUT_DIR to write a complete folder",
        )
    if not is_export_config(folder):
        model_type = read_model_type(folder)
        raise UserError(
            f"config.json does not describe a robustcl model (model_type {model_type!r})",
            str(folder / CONFIG_FILE),
            "re-run robustcl export RUN_DIR OUT_DIR",
        )
    return found
