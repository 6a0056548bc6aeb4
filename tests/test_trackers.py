"""Experiment tracking: ``logging.trackers`` takes any tracker Accelerate supports, each an optional pip extra; a
run's tracker holds the resolved recipe as its config and the very records of ``metrics.jsonl`` at their steps,
across a resume; a tracker asked for and not installed stops ``pretrain`` in one line before anything starts.

W&B is the tracker run for real (offline, no account; its package is in the dev extra): the field's users live in it.
Its offline run is read back from the ``.wandb`` transaction log W&B writes (LevelDB log framing around the
``Record`` protobufs of ``wandb.proto``), which is what ``wandb sync`` uploads."""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from helpers import REPO, TINY, user_error, with_sets
from packaging.requirements import Requirement

from robustcl.recipe import load_recipe
from robustcl.run_dir import read_run_recipe

QUICK = str(REPO / "recipes" / "quickstart.yaml")
RUN_SETS = [*TINY, "eval.after_pretrain=false", "logging.progress_bar=false"]


def test_logging_trackers_takes_every_tracker_accelerate_supports_and_lists_them_when_refusing_one() -> None:
    for name in LOGGER_TYPE_TO_CLASS:
        assert load_recipe(QUICK, [f"logging.trackers=[{name}]"]).logging.trackers == [name]
    message = user_error(load_recipe, QUICK, ["logging.trackers=[tensorboard,wandbb]"])
    assert "logging.trackers" in message and "'wandbb'" in message and "did you mean 'wandb'" in message
    assert all(name in message for name in LOGGER_TYPE_TO_CLASS), message


def test_every_tracker_is_a_pip_extra_and_the_tested_one_is_in_the_dev_extra() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(LOGGER_TYPE_TO_CLASS) <= set(extras), "add an extra for each tracker Accelerate supports"
    assert "wandb" in {Requirement(r).name for r in extras["dev"]}


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_whose_package_is_missing_stops_pretrain_in_one_line_before_it_starts(
    tracker: str, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate.tracking

    # Accelerate's list of the trackers whose package it found installed: none.
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    run = tmp_path / "run"
    code, out, err = cli("pretrain", QUICK, "-o", str(run), *with_sets(*RUN_SETS, f"logging.trackers=[{tracker}]"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("robustcl: error: "), err
    assert f"'{tracker}'" in err and f'pip install "robustcl[{tracker}]"' in err, err
    assert not run.exists()  # refused before the run directory, the data or a step


def test_tracker_config_is_the_nested_recipe_or_flat_scalars_where_the_tracker_takes_only_those() -> None:
    from robustcl.tracking import run_config

    recipe = load_recipe(QUICK, ["logging.trackers=[wandb,tensorboard,mlflow]"])
    assert run_config(recipe, "wandb") == recipe.to_dict()  # nested: W&B filters runs by config.method.name
    for flat_only in ("tensorboard", "mlflow"):  # hparams / params: one scalar per key
        flat = run_config(recipe, flat_only)
        assert flat["method.name"] == "acl" and flat["training.max_steps"] == 200
        assert json.loads(flat["augment.crop_scale"]) == [0.2, 1.0]
        assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())
        assert len(flat) == _leaves(recipe.to_dict())


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B as in a fresh process on a machine never logged in, writing nothing outside ``tmp_path`` (the working
    directory). W&B reads its environment once per process, at its first run: torn down around the test."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_NAME", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "wandb-home" / "cache"))  # wandb-core's own debug logs
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.chdir(tmp_path)
    wandb.teardown()
    yield
    wandb.teardown()


def test_an_offline_wandb_run_holds_the_resolved_recipe_and_the_records_of_metrics_jsonl_across_a_resume(
    cli, wandb_home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = "hf_planted" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", planted)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "digits-acl"
    sets = [*RUN_SETS, "logging.trackers=[wandb]", "logging.project=robustcl-test"]
    for steps in (2, 3):  # the second command resumes the first's run for one more step
        code, out, err = cli("pretrain", QUICK, "-o", str(run), *with_sets(*sets, f"training.max_steps={steps}"))
        assert code == 0, err[-3000:]

    # In session order: two sessions started within one second have folder names that sort by their random id.
    logs = sorted((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns)
    assert len(logs) == 2  # one W&B run per session (WANDB_RUN_ID with WANDB_RESUME=allow would continue one)
    sessions = [_wandb_run(path) for path in logs]
    assert [s["name"] for s in sessions] == [run.name, run.name]
    assert {s["project"] for s in sessions} == {"robustcl-test"}
    assert sessions[-1]["config"] == read_run_recipe(run).to_dict()
    assert sessions[0]["config"]["training"]["max_steps"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert [h for s in sessions for h in s["history"]] == [(r["step"], r) for r in metrics]
    assert [p for p in tmp_path.rglob("*") if p.is_file() and planted.encode() in p.read_bytes()] == []


def test_a_tracker_that_cannot_start_ends_pretrain_in_one_line(cli, wandb_home, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")  # and never logged in
    run = tmp_path / "run"
    sets = [*RUN_SETS, "logging.trackers=[wandb]", "training.max_steps=1"]
    code, out, err = cli("pretrain", QUICK, "-o", str(run), *with_sets(*sets))
    assert code == 2 and err.count("\n") == 1 and err.startswith("robustcl: error: a tracker could not start"), err
    assert "wandb login" in err and "WANDB_MODE=offline" in err, err


def _leaves(tree: Any) -> int:
    return sum(_leaves(v) for v in tree.values()) if isinstance(tree, dict) else 1


def _wandb_run(path: Path) -> dict[str, Any]:
    """The name, project, config (W&B's own ``_wandb`` key left out) and history ``(step, values)`` of one W&B
    offline run (its own ``_step`` / ``_runtime`` / ``_timestamp`` values left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    found: dict[str, Any] = {"config": {}, "history": []}
    for data in _leveldb_log(path.read_bytes()):
        record = pb.Record.FromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["name"], found["project"] = record.run.display_name, record.run.project
        elif kind == "config":
            for item in record.config.update:
                keys = _keys(item)
                node = found["config"]
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
        elif kind == "history":
            values = {"/".join(_keys(item)): json.loads(item.value_json) for item in record.history.item}
            step = record.history.step.num if record.history.HasField("step") else values["_step"]
            found["history"].append((step, {k: v for k, v in values.items() if not k.startswith("_")}))
    found["config"].pop("_wandb", None)
    return found


def _keys(item: Any) -> list[str]:
    return list(item.nested_key) or [item.key]


def _leveldb_log(data: bytes, block: int = 32768) -> list[bytes]:
    """The records of a LevelDB-style log after W&B's 7-byte header: 32 KiB blocks of chunks, each a 7-byte header
    (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a block's tail under 7 bytes is padding."""
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records
