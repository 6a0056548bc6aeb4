"""Strict loading of model weights, for evaluation, export, DeACL teachers and AdvCL clustering.

transformers fills a tensor that the checkpoint lacks (or holds in another shape) with random values and only logs a
table on stderr, so a model with renamed or missing weights would be scored as if it were trained. Here every
missing, unexpected or mis-shaped tensor, every NaN/inf value, every file that cannot be read (a damaged
safetensors file, pickled objects in a ``.bin``) and a model too large for this machine's memory is one
:class:`UserError` naming the file and the first few tensors. Light on imports: transformers and safetensors load
only when a model does.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, one_line
from .memory import check_fits_in_memory
from .models.configuration_robustcl import RobustCLResNetConfig

SHOWN_KEYS = 3  # tensors named in a message; the count says how many there are in all
_FLOAT32_BYTES = 4  # models are built in float32 before any dtype conversion
_FETCH_AGAIN = "copy, download or export the model again"


def _key(name: str, limit: int = 120) -> str:
    """A tensor name as a message shows it: names come from the file, so on one line and shortened."""
    name = one_line(str(name))
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _some(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(_key(k) for k in keys[:SHOWN_KEYS])
    return shown if len(keys) <= SHOWN_KEYS else f"{shown} and {len(keys) - SHOWN_KEYS} more"


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def weight_problems(
    missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[tuple[str, Any, Any]]
) -> str | None:
    """The keys that keep weights from loading exactly, in a few words (None when there are none).
    ``mismatched`` holds (key, shape in the file, shape in the model)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted(mismatched, key=lambda item: item[0])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the file ({_some(missing)})")
    if mismatched:
        key, in_file, in_model = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        parts.append(
            f"{len(mismatched)} of another shape ({_key(key)}: {_shape(in_file)} in the file, "
            f"{_shape(in_model)} in the model{more})"
        )
    if unexpected:
        parts.append(f"{len(unexpected)} the model does not have ({_some(unexpected)})")
    return "; ".join(parts) or None


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Refuse ``state`` unless it has exactly ``module``'s keys with the same shapes, then any NaN/inf in it."""
    own = module.state_dict()
    problems = weight_problems(
        own.keys() - state.keys(),
        state.keys() - own.keys(),
        [(k, state[k].shape, own[k].shape) for k in own.keys() & state.keys() if state[k].shape != own[k].shape],
    )
    if problems:
        raise UserError(f"the weights do not fit the model: {problems}", where, fix)
    check_finite(state.items(), where)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse NaN or infinite values in any floating-point tensor, naming the first one."""
    bad = [name for name, t in tensors if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all()]
    if bad:
        more = f", and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise UserError(
            f"the weights hold NaN or infinite values ({_key(bad[0])}{more})",
            where,
            "these weights come from a diverged or damaged model: use an earlier checkpoint or export it again",
        )


def _inside_base_model(key: str, model: Any) -> bool:
    """Whether a checkpoint key names a part of ``model`` itself rather than a task head beside it."""
    prefix = getattr(model, "base_model_prefix", "")
    key = key.removeprefix(f"{prefix}.") if prefix else key
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    return key.split(".")[0] in {name.split(".")[0] for name in names}


def check_loading_info(model: Any, info: dict[str, Any], where: str, fix: str) -> None:
    """Refuse what ``from_pretrained(..., output_loading_info=True)`` reports: missing and mis-shaped tensors
    always (transformers gave them random values); unexpected ones for robustcl models (export writes exactly the
    model's tensors; a classifier's head is declared in ``_keys_to_ignore_on_load_unexpected``) and, for other
    architectures, those inside the model (a config with fewer layers than the weights) but not a task head that
    a Hub checkpoint of e.g. ``...ForImageClassification`` carries beside the backbone."""
    unexpected = set(info.get("unexpected_keys", ()))
    if getattr(model.config, "model_type", None) != RobustCLResNetConfig.model_type:
        unexpected = {key for key in unexpected if _inside_base_model(key, model)}
    problems = weight_problems(info.get("missing_keys", ()), unexpected, info.get("mismatched_keys", ()))
    if problems:
        raise UserError(f"the weights do not fit the model's config: {problems}", where, fix)
    if info.get("error_msgs"):
        raise UserError(f"the weights cannot be loaded: {first_line(info['error_msgs'][0])}", where, fix)


def check_model_size(config: Any, where: str, fix: str) -> None:
    """Refuse a robustcl model whose weights alone would not fit in the available memory, before building it.
    (Other architectures have no size estimate; their configs are their library's business.)"""
    estimate = getattr(config, "estimated_parameters", None)
    if callable(estimate):
        parameters = estimate()
        check_fits_in_memory(parameters * _FLOAT32_BYTES, f"holding the model's {parameters:,} parameters", where, fix)


def first_line(text: object, limit: int = 200) -> str:
    """The first non-empty line of an error's text, printable and shortened: what a one-line message quotes."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__  # an exception without a message: its kind
    line = "".join(c if c.isprintable() else " " for c in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _quiet_load_report(local: bool) -> Iterator[None]:
    """transformers logs its loading table (colour codes, many lines) as a warning, and for a local folder draws a
    progress bar over a load that takes a moment: what matters in the table becomes the one-line error here.
    Download bars (Hub ids) stay. A filter, not a higher level: transformers 5 runs an extra check that warns when
    that logger's level is raised."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers.modeling_utils")
    bars = local and hf_logging.is_progress_bar_enabled()
    logger.addFilter(_drop_load_report)
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)
        if bars:
            hf_logging.enable_progress_bar()


def unreadable_weights(err: BaseException, where: str, fix: str = _FETCH_AGAIN) -> UserError | None:
    """The one-line error for a weights file that cannot be read, or None when ``err`` is not about the file."""
    from safetensors import SafetensorError

    if isinstance(err, pickle.UnpicklingError):
        return UserError(
            "the weights file holds pickled Python objects, not only tensors, and is refused (loading it could run "
            "code from the file)",
            where,
            "use weights saved as model.safetensors (save_pretrained(..., safe_serialization=True)) from a source "
            "you trust",
        )
    if isinstance(err, SafetensorError):
        return UserError(
            f"the weights file is damaged or not a safetensors file ({first_line(err)})",
            where,
            fix,
        )
    if isinstance(err, MemoryError):
        return UserError("not enough memory to load the model", where, "use a machine with more memory")
    if isinstance(err, RuntimeError):  # torch's reader on a damaged .bin, allocation failures, weight conversion
        return UserError(f"the weights cannot be loaded: {first_line(err)}", where, fix)
    return None


def load_pretrained(
    loader: Any,
    reference: str | Path,
    config: Any,
    *,
    where: str,
    fix: str,
    damaged_fix: str = _FETCH_AGAIN,
    **kwargs: Any,
) -> Any:
    """``loader.from_pretrained(reference, config=config, **kwargs)`` (an Auto class or a model class), strictly:
    see :func:`check_loading_info`, :func:`check_finite` and :func:`check_model_size`. ``fix`` tells how to get
    weights that match. OSError/ValueError (a file or repo not found, a bad config) are left to the caller, which
    knows whether a folder or a Hub repo was meant."""
    check_model_size(
        config, where, "use a machine with more memory (config.json's widths and block_layers set the size)"
    )
    try:
        with _quiet_load_report(local=Path(reference).is_dir()):
            # ignore_mismatched_sizes: mis-shaped tensors come back in the loading info (refused below) instead of
            # a RuntimeError after a multi-line table.
            model, info = loader.from_pretrained(
                str(reference), config=config, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except Exception as err:  # only errors about the file become a UserError; the rest keep their traceback
        error = unreadable_weights(err, where, damaged_fix)
        if error is None:
            raise
        raise error from None
    check_loading_info(model, info, where, fix)
    check_finite(model.state_dict().items(), where)
    return model


def read_safetensors(path: Path, fix: str = _FETCH_AGAIN) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (on the CPU); a damaged file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"the weights file is damaged or unreadable ({first_line(err)})",
            str(path),
            fix,
        ) from None


def load_model_folder(model_class: Any, folder: Path, fix: str) -> Any:
    """A robustcl model class's ``save_pretrained`` folder, strictly (:func:`load_pretrained`); a config the class
    refuses or a folder without its files is a UserError too."""
    try:
        config = model_class.config_class.from_pretrained(str(folder))
        return load_pretrained(model_class, folder, config, where=str(folder), fix=fix, damaged_fix=fix)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the model: {first_line(err)}", str(folder), fix) from None
