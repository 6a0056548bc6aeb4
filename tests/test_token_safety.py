"""An HF token in the environment is used, never printed, logged or written: a planted token goes through
pretrain (with its evaluation), export and push-to-hub, then every file they wrote is searched for it."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from helpers import TINY, robustcl, with_sets
from hub_server import LocalHub

pytestmark = pytest.mark.slow


def test_a_planted_token_is_never_printed_logged_or_written(tmp_path: Path) -> None:
    planted = "hf_planted" + secrets.token_hex(16)
    run, export = tmp_path / "run", tmp_path / "export"
    with LocalHub(token=planted) as hub:
        env = {
            "HF_TOKEN": planted,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        commands = [
            ("pretrain", "recipes/quickstart.yaml", "-o", str(run), *with_sets(*TINY, "training.max_steps=2")),
            ("export", str(run), str(export), "--repo-id", "my-org/planted"),
            ("push-to-hub", str(export), "my-org/planted"),
        ]
        printed = []
        for args in commands:
            res = robustcl(*args, **env)
            assert res.returncode == 0, res.stderr[-3000:]
            printed.append(res.stdout + res.stderr)
        assert hub.files("my-org/planted", "main")  # the token was used: the push went through
    assert planted not in "".join(printed)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    # The run dir (recipe, metrics, checkpoints, TensorBoard logs, evaluation), the export and its card.
    assert {".safetensors", ".json", ".yaml", ".md"} <= kinds and len(written) > 20
    assert [p for p in written if planted.encode() in p.read_bytes()] == []
