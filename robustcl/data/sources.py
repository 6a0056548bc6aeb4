"""Open (not decode) one split of any dataset the user points at.

Accepted ``path`` kinds: a Hub id, a local folder in Hub layout (parquet / arrow / csv / json files),
a single data file, a ``save_to_disk`` folder (Dataset or DatasetDict), an image folder with class
sub-folders, and :data:`~robustcl.data.builtin.BUILTIN_DIGITS`.  The kind is told from the path itself
and a shallow scan of the folder; every load failure is wrapped into a one-line
:class:`~robustcl.errors.UserError` naming the recipe key to fix.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from robustcl.data.builtin import _BUILTINS, BUILTIN_DIGITS, _digits_dataset_dict
from robustcl.errors import UserError

__all__ = ["BUILTIN_DIGITS", "open_split"]

_DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".tar"}
_IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
}
# imagefolder's side-car files, which are not a sign of a Hub-layout folder.
_METADATA_STEMS = {"metadata"}
# Enough of a directory tree to tell an image folder from a data-file folder without walking a 1M-file tree.
_SCAN_MAX_ENTRIES = 5000
_SCAN_MAX_DEPTH = 3


# --------------------------------------------------------------------------------------------- opening


def _source(path: str, split: str, name: str | None) -> str:
    return f"{path}[{name}]:{split}" if name else f"{path}:{split}"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The user sees a single line, so a multi-line library error is squeezed and shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id (``owner/name`` or a bare ``name``) was meant as a local path."""
    if path.startswith((".", "/", "~")) or path.endswith("/"):
        return True
    if os.sep != "/" and os.sep in path:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in path:
        return True
    return path.count("/") > 1


def _scan_folder(root: Path) -> tuple[bool, bool]:
    """Return (has data files, has image files), looking only at the top of the tree."""
    has_data = has_images = False
    seen = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack and seen < _SCAN_MAX_ENTRIES and not has_data:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                if depth + 1 <= _SCAN_MAX_DEPTH:
                    stack.append((Path(entry.path), depth + 1))
                continue
            stem, suffix = os.path.splitext(entry.name.lower())
            if suffix in _IMAGE_SUFFIXES:
                has_images = True
            elif suffix in _DATA_FILE_SUFFIXES and stem not in _METADATA_STEMS:
                has_data = True
    return has_data, has_images


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Silence datasets' own bars ("Generating train split") when the caller asked for no progress."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            datasets.enable_progress_bars()


def _pick_split(splits: datasets.DatasetDict, split: str, source_path: str, key_prefix: str) -> datasets.Dataset:
    if split in splits:
        return splits[split]
    available = ", ".join(repr(s) for s in splits) or "none"
    raise UserError(
        f"split '{split}' not found in {source_path}; available splits: {available}",
        f"{key_prefix}.split",
        f"set {key_prefix}.split to one of: {', '.join(splits) or '(none)'}",
    )


def _load_dataset_dict(
    path: str,
    split: str,
    name: str | None,
    *,
    hub: bool,
    key_prefix: str,
    display: str | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """load_dataset for Hub ids and Hub-layout / image folders, with every failure turned into a UserError.

    ``path`` goes to load_dataset (a builder name such as "imagefolder" for some kinds); ``display`` is
    what the user wrote, for the messages.
    """
    where = f"{key_prefix}.path"
    display = display or path
    try:
        loaded = datasets.load_dataset(path, name, **kwargs)
    except UserError:
        raise
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # datasets cannot build an empty split
            raise UserError(
                f"a split of {display} has no rows: {_one_line(exc)}",
                f"{key_prefix}.path / {key_prefix}.split",
                "point it to a split that contains images",
            ) from None
        if name is not None and "BuilderConfig" in str(exc):
            raise UserError(
                f"configuration '{name}' not found for dataset '{display}': {_one_line(exc)}",
                f"{key_prefix}.name",
                f"set {key_prefix}.name to one of the available configurations, or remove it",
            ) from None
        raise _load_error(display, exc, hub=hub, where=where) from None
    except Exception as exc:  # noqa: BLE001 - any library failure here is about the user's path/id/network
        raise _load_error(display, exc, hub=hub, where=where) from None
    if isinstance(loaded, datasets.Dataset):  # a loader that ignores splits; treat it as the only one
        return loaded
    if split in loaded or not any(c in split for c in "[+"):
        return _pick_split(loaded, split, display, key_prefix)
    # Split expressions such as "train[:10%]" are understood by load_dataset itself (served from its cache).
    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"cannot select split '{split}' of {display}: {_one_line(exc)}",
            f"{key_prefix}.split",
            f"set {key_prefix}.split to one of: {', '.join(loaded)} (optionally sliced, e.g. train[:10%])",
        ) from None


def _load_error(path: str, exc: BaseException, *, hub: bool, where: str) -> UserError:
    if hub:
        return UserError(
            f"cannot load dataset '{path}' from the Hugging Face Hub: {_one_line(exc)}",
            where,
            f"check the id and your network, or point {where} to a local copy",
        )
    return UserError(
        f"cannot load the dataset in '{path}': {_one_line(exc)}",
        where,
        "point it to a folder of parquet/arrow/csv/json files, a save_to_disk folder, "
        "or a folder of class sub-folders of images",
    )


def _refuse_config_name(name: str | None, what: str, key_prefix: str) -> None:
    """Only Hub-layout datasets have named configurations; naming one elsewhere is a mistake worth reporting."""
    if name is not None:
        raise UserError(f"{what} has no named configurations", f"{key_prefix}.name", f"remove {key_prefix}.name")


def _saved_without_rows(root: Path) -> bool:
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _open_saved(root: Path, path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    _refuse_config_name(name, f"'{path}' is a save_to_disk folder, which", key_prefix)
    if _saved_without_rows(root):
        # datasets writes such a folder but cannot read it back (it indexes the first of zero shards).
        raise UserError(
            f"dataset split {_source(path, split, name)} has no rows",
            f"{key_prefix}.path / {key_prefix}.split",
            "point it to a split that contains images",
        )
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:  # noqa: BLE001 - a damaged or incompatible folder is the user's to fix
        raise UserError(
            f"cannot read the save_to_disk folder '{path}': {_one_line(exc)}",
            f"{key_prefix}.path",
            "re-create it with Dataset.save_to_disk / DatasetDict.save_to_disk",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, path, key_prefix)
    # A single saved Dataset is one split. If it remembers which one, refuse a different name so that
    # evaluating on "test" never silently reads a saved train split; an anonymous one serves any name.
    stored = loaded.split
    if stored is not None and str(stored) != split:
        raise UserError(
            f"'{path}' holds a single saved split '{stored}', not '{split}'",
            f"{key_prefix}.split",
            f"set {key_prefix}.split: {stored}, or point {key_prefix}.path to the folder of the '{split}' split",
        )
    return loaded


def open_split(path: str, split: str, name: str | None = None, *, key_prefix: str = "data") -> datasets.Dataset:
    """Open (not decode) one split of a dataset.

    ``path`` may be a Hub id ("uoft-cs/cifar10"), a local folder in Hub layout (data files such as
    parquet), a ``save_to_disk`` folder (Dataset or DatasetDict), an image folder (class sub-folders of
    image files) or :data:`BUILTIN_DIGITS`. ``key_prefix`` names the recipe section in error messages
    ("data", "eval.data", ...).
    """
    if path.startswith("builtin:"):
        return _open_builtin(path, split, name, key_prefix)
    local = Path(path).expanduser()
    if not local.exists():
        return _open_hub(path, split, name, key_prefix)
    if local.is_file():
        return _open_data_file(local, path, split, name, key_prefix)
    return _open_folder(local, path, split, name, key_prefix)


def _open_builtin(path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    """A split of one of robustcl's built-in datasets (:data:`BUILTIN_DIGITS`)."""
    if path not in _BUILTINS:
        raise UserError(
            f"unknown built-in dataset '{path}'",
            f"{key_prefix}.path",
            f"use one of: {', '.join(_BUILTINS)}, or a Hub id / local folder",
        )
    _refuse_config_name(name, f"built-in dataset '{path}'", key_prefix)
    return _pick_split(_digits_dataset_dict(), split, path, key_prefix)


def _open_hub(path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    """A path that does not exist here: a Hub id, unless it can only have been meant as a local path."""
    if _looks_local(path):
        raise UserError(
            "dataset path not found",
            f"{key_prefix}.path: {path}",
            "check the path, or give a Hub dataset id like uoft-cs/cifar10",
        )
    from robustcl.hub import check_token_sendable

    check_token_sendable()  # a token the HTTP client cannot send would fail deep inside datasets
    return _load_dataset_dict(path, split, name, hub=True, key_prefix=key_prefix)


def _open_data_file(local: Path, path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    """A single parquet / arrow / csv / json file."""
    builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
    kind = builder.get(local.suffix.lower())
    if kind is None:
        raise UserError(
            f"'{path}' is a file, not a dataset",
            f"{key_prefix}.path",
            "point it to a dataset folder, a parquet/arrow/csv/json file, or a Hub id",
        )
    # A lone data file has no split names; expose it under the requested one.
    return _load_dataset_dict(
        kind, split, name, hub=False, key_prefix=key_prefix, display=path, data_files={split: str(local)}
    )


def _open_folder(local: Path, path: str, split: str, name: str | None, key_prefix: str) -> datasets.Dataset:
    """A save_to_disk folder, an image folder or a folder of data files (Hub layout), told apart by its files."""
    if (local / "dataset_dict.json").is_file() or (
        (local / "state.json").is_file() and (local / "dataset_info.json").is_file()
    ):
        return _open_saved(local, path, split, name, key_prefix)
    has_data, has_images = _scan_folder(local)
    if has_images and not has_data:
        _refuse_config_name(name, f"'{path}' is an image folder, which", key_prefix)
        return _load_dataset_dict(
            "imagefolder", split, None, hub=False, key_prefix=key_prefix, display=path, data_dir=str(local)
        )
    if not has_data:
        raise UserError(
            f"no data files or images found in '{path}'",
            f"{key_prefix}.path",
            "point it to a folder of parquet/arrow/csv/json files, a save_to_disk folder, "
            "or a folder of class sub-folders of images",
        )
    return _load_dataset_dict(str(local), split, name, hub=False, key_prefix=key_prefix, display=path)
