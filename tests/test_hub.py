"""`robustcl push-to-hub` over real HTTP against the local Hub stand-in, and loading back what was pushed."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import cli_env, read_tree, robustcl
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file, save_file

from robustcl.errors import UserError
from robustcl.export_layout import export_files

pytestmark = pytest.mark.slow

REPO_ID = "my-org/digits-acl"


def hub_env(hub, tmp_path, token: str | None) -> dict[str, str]:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push(hub, tmp_path, *args: str, token: str | None = "default") -> subprocess.CompletedProcess:
    token = hub.token if token == "default" else token
    res = robustcl("push-to-hub", *args, **hub_env(hub, tmp_path, token))
    assert hub.token not in res.stdout + res.stderr  # the token is never echoed, whatever happened
    return res


def repo_files(hub, revision: str = "main") -> dict[str, bytes]:
    return {k: v for k, v in hub.files(REPO_ID, revision).items() if k != ".gitattributes"}


def test_push_creates_the_repo_in_one_commit_and_downloads_byte_identical(hub, exported, run, tmp_path):
    res = push(hub, tmp_path, str(exported / "encoder"), REPO_ID)
    assert res.returncode == 0, res.stderr[-3000:]
    commits = hub.commits(REPO_ID)
    assert [c["message"] for c in commits] == ["initial commit", "Upload digits-acl (robustcl 0.1.0 export)"]
    assert f"robustcl: commit {hub.url}/{REPO_ID}/commit/{commits[-1]['oid']}" in res.stdout
    assert "note:" not in res.stderr  # the card names this repo id

    download = snapshot_download(REPO_ID, endpoint=hub.url, local_dir=tmp_path / "dl", token=False)
    got = {k: v for k, v in read_tree(tmp_path / "dl").items() if not k.startswith(".")}
    assert got == read_tree(exported / "encoder")
    card = ModelCard.load(os.path.join(download, "README.md"))
    reports = [json.loads((run / "eval" / p / "eval.json").read_text()) for p in ("slf", "aff")]
    assert sorted(e.metric_value for e in card.data.eval_results) == sorted(
        round(100 * r[k], 2) for r in reports for k in ("SA", "RA")
    )


def test_pushed_model_loads_from_the_hub_without_robustcl_and_evaluates_the_same(hub, exported, run, bare, tmp_path):
    assert push(hub, tmp_path, str(exported / "encoder"), REPO_ID).returncode == 0
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
model = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True).eval()
with torch.no_grad():
    save_file({{"f": model(load_file("x.safetensors")["x"]).pooler_output}}, "f.safetensors")
"""
    env = cli_env(**hub_env(hub, tmp_path, None))
    env.pop("HF_TOKEN", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(bare), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    from transformers import AutoModel

    importlib.import_module("robustcl")  # registers the model type (the name `robustcl` is the CLI helper here)
    local = AutoModel.from_pretrained(exported / "encoder").eval()
    with torch.no_grad():
        expected = local(x).pooler_output
    assert (load_file(str(tmp_path / "f.safetensors"))["f"] - expected).abs().max() <= 1e-5

    # `robustcl evaluate` of the Hub id takes the recipe shipped in the repo and measures exactly what the run's
    # own SLF evaluation measured.
    out = tmp_path / "hub-eval" / "eval.json"
    res = robustcl("evaluate", REPO_ID, "--protocol", "slf", "-o", str(out), **hub_env(hub, tmp_path, None))
    assert res.returncode == 0, res.stderr[-3000:]
    hub_report, run_report = json.loads(out.read_text()), json.loads((run / "eval/slf/eval.json").read_text())
    assert hub_report["model_kind"] == "hub" and hub_report["encoder_sha256"] == run_report["encoder_sha256"]
    assert (hub_report["SA"], hub_report["RA"]) == (run_report["SA"], run_report["RA"])


def test_revision_and_pull_requests_leave_main_untouched(hub, exported, tmp_path):
    res = push(hub, tmp_path, str(exported / "encoder"), REPO_ID, "--revision", "dev")
    assert res.returncode == 0, res.stderr[-3000:]
    assert repo_files(hub) == {} and repo_files(hub, "dev") == read_tree(exported / "encoder")

    res = push(hub, tmp_path, str(exported / "aff"), REPO_ID, "--create-pr", "--commit-message", "AFF classifier")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"robustcl: pull request {hub.url}/{REPO_ID}/discussions/1" in res.stdout
    assert repo_files(hub) == {} and repo_files(hub, "refs/pr/1") == read_tree(exported / "aff")
    assert hub.commits(REPO_ID, "refs/pr/1")[-1]["message"] == "AFF classifier"

    res = push(hub, tmp_path, str(exported / "aff"), REPO_ID, "--revision", "dev", "--create-pr")
    assert res.returncode == 0, res.stderr[-3000:]
    assert repo_files(hub, "refs/pr/2") == read_tree(exported / "aff")
    assert repo_files(hub, "dev") == read_tree(exported / "encoder")


def test_push_to_an_existing_repo_replaces_the_previous_export(hub, exported, tmp_path):
    assert push(hub, tmp_path, str(exported / "encoder"), REPO_ID).returncode == 0
    (tmp_path / "notes.md").write_text("kept")
    res = push(hub, tmp_path, str(exported / "aff"), REPO_ID, "--commit-message", "classifier")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [c["message"] for c in hub.commits(REPO_ID)][-1] == "classifier" and len(hub.commits(REPO_ID)) == 3
    # The encoder's eval/slf report would contradict the classifier's card: export files the new export lacks go.
    assert repo_files(hub) == read_tree(exported / "aff")
    assert "re-export with --repo-id my-org/digits-acl" in res.stderr  # its card names my-org/digits-acl-aff


def test_wrong_or_missing_token_is_a_clear_401(hub, exported, tmp_path):
    for token in ("hf_wrong_token_abcdefghij", None):
        res = push(hub, tmp_path, str(exported / "encoder"), REPO_ID, token=token)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "rejected the credentials (HTTP 401" in res.stderr and "HF_TOKEN" in res.stderr
        assert "Traceback" not in res.stderr and "hf_wrong_token" not in res.stdout + res.stderr
        assert not hub.repo_exists(REPO_ID)


def test_server_error_mid_commit_leaves_the_remote_as_it_was(hub, exported, tmp_path):
    hub.fail_next_commit = True
    res = push(hub, tmp_path, str(exported / "encoder"), REPO_ID)
    assert res.returncode == 1 and "HTTP 500" in res.stderr and "nothing was committed" in res.stderr
    assert repo_files(hub) == {} and len(hub.commits(REPO_ID)) == 1

    assert push(hub, tmp_path, str(exported / "encoder"), REPO_ID).returncode == 0
    before = hub.files(REPO_ID)
    hub.fail_next_commit = True
    res = push(hub, tmp_path, str(exported / "aff"), REPO_ID)
    assert res.returncode == 1 and hub.files(REPO_ID) == before


@pytest.mark.parametrize("damage", ["missing card", "stray file", "dotfile", "symlink"])
def test_only_complete_exports_are_pushed(hub, exported, tmp_path, damage):
    folder = tmp_path / "export"
    shutil.copytree(exported / "encoder", folder)
    if damage == "missing card":
        (folder / "README.md").unlink()
        expected = "incomplete export, missing README.md"
    elif damage == "stray file":
        (folder / "optimizer.pt").write_bytes(b"pickle")
        expected = "not part of a robustcl export: optimizer.pt"
    elif damage == "dotfile":
        (folder / ".env").write_text(f"HF_TOKEN={hub.token}\n")
        expected = "not part of a robustcl export: .env"
    else:
        (folder / "eval" / "slf" / "eval.json").unlink()
        (folder / "eval" / "slf" / "eval.json").symlink_to("/etc/hostname")
        expected = "eval/slf/eval.json (symlink)"
    res = push(hub, tmp_path, str(folder), REPO_ID)
    assert res.returncode == 2 and expected in res.stderr, res.stderr
    assert hub.requests == []  # refused before any network call


def test_a_symlinked_folder_cannot_smuggle_outside_files_into_a_push(exported, tmp_path):
    """A link to a folder outside the export is refused like a linked file (nothing it points to is listed)."""
    folder, outside = tmp_path / "export", tmp_path / "outside"
    shutil.copytree(exported / "encoder", folder)
    shutil.copytree(folder / "eval" / "slf", outside)
    (outside / "secrets.txt").write_text("not for the Hub\n")
    shutil.rmtree(folder / "eval" / "slf")
    (folder / "eval" / "slf").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError) as refused:
        export_files(folder)
    assert "eval/slf (symlink)" in str(refused.value) and "secrets.txt" not in str(refused.value)
