"""The local Hub stand-in (tests/hub_server.py) driven by the real huggingface_hub and transformers clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import read_tree
from hub_server import LocalHub
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils._runtime import is_xet_available

REPO = "acme/encoder"


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Skip huggingface_hub's retry sleeps (only `time.sleep` is used from that module); returns the waits asked for."""
    waits: list[float] = []
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def make_folder(root: Path, **overrides: bytes) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "README.md": "# Encoder\n\nnon-ASCII: é ✓\n".encode(),
        "weights.bin": bytes(range(256)) * 3 + b"\x00\xff",
        "sub/dir/notes.txt": b"nested\n",
        **overrides,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_create_repo_is_idempotent_with_exist_ok(hub: LocalHub, api: HfApi) -> None:
    first = api.create_repo(REPO, exist_ok=True)
    second = api.create_repo(REPO, exist_ok=True)
    assert first == second == f"{hub.url}/{REPO}"
    assert hub.repo_exists(REPO) and not hub.is_private(REPO)
    assert [c["message"] for c in hub.commits(REPO)] == ["initial commit"]  # the second call created nothing
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409


def test_upload_folder_is_one_commit_and_downloads_byte_identical(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    files = make_folder(tmp_path / "src")
    api.create_repo(REPO)
    info = api.upload_folder(folder_path=tmp_path / "src", repo_id=REPO, commit_message="Add encoder")

    history = hub.commits(REPO)
    assert [c["message"] for c in history] == ["initial commit", "Add encoder"]
    assert info.oid == history[-1]["oid"] and info.commit_url == f"{hub.url}/{REPO}/commit/{info.oid}"
    assert info.pr_url is None
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"], **files}
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *files])
    model = api.model_info(REPO)
    assert model.sha == info.oid and {s.rfilename for s in model.siblings} == {".gitattributes", *files}

    out = snapshot_download(REPO, endpoint=hub.url, token=hub.token, local_dir=tmp_path / "dl", cache_dir=tmp_path)
    downloaded = read_tree(Path(out))
    downloaded.pop(".gitattributes")
    assert downloaded == files
    single = hf_hub_download(REPO, "sub/dir/notes.txt", endpoint=hub.url, token=False, cache_dir=tmp_path / "c")
    assert Path(single).read_bytes() == files["sub/dir/notes.txt"]

    # Re-uploading unchanged files makes no commit (preupload reports each file's git oid).
    api.upload_folder(folder_path=tmp_path / "src", repo_id=REPO, commit_message="Again")
    assert len(hub.commits(REPO)) == 2


def test_branch_upload_leaves_main_untouched(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    main_files = make_folder(tmp_path / "v0")
    api.upload_folder(folder_path=tmp_path / "v0", repo_id=REPO, commit_message="v0")
    main_before = hub.commits(REPO)

    api.create_branch(REPO, branch="run-1", exist_ok=True)
    api.create_branch(REPO, branch="run-1", exist_ok=True)
    branch_files = make_folder(tmp_path / "v1", **{"config.json": b'{"hidden_size": 16}\n', "extra.txt": b"x"})
    api.upload_folder(folder_path=tmp_path / "v1", repo_id=REPO, revision="run-1", commit_message="run 1")

    assert hub.commits(REPO) == main_before
    assert hub.files(REPO) == {**hub.files(REPO, main_before[0]["oid"]), **main_files}
    assert [c["message"] for c in hub.commits(REPO, "run-1")] == ["initial commit", "v0", "run 1"]
    assert {k: v for k, v in hub.files(REPO, "run-1").items() if k != ".gitattributes"} == branch_files
    path = hf_hub_download(REPO, "config.json", revision="run-1", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b'{"hidden_size": 16}\n'
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "run-1"}


def test_upload_folder_create_pr(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    main_before = hub.commits(REPO)
    files = make_folder(tmp_path / "src")
    info = api.upload_folder(folder_path=tmp_path / "src", repo_id=REPO, create_pr=True, commit_message="Proposal")

    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1" and info.pr_revision == "refs/pr/1"
    assert hub.commits(REPO) == main_before
    assert hub.commits(REPO, "refs/pr/1")[-1]["message"] == "Proposal"
    out = snapshot_download(
        REPO, revision="refs/pr/1", endpoint=hub.url, token=hub.token, local_dir=tmp_path / "dl", cache_dir=tmp_path
    )
    assert {k: v for k, v in read_tree(Path(out)).items() if k != ".gitattributes"} == files
    path = hf_hub_download(REPO, "weights.bin", revision="refs/pr/1", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == files["weights.bin"]


def test_create_commit_create_pr_against_a_branch(hub: LocalHub, api: HfApi) -> None:
    # The `?create_pr=1` commit path (create_commit, and upload_folder without hf_xet); upload_folder itself refuses
    # create_pr=True together with a revision other than main in huggingface_hub 2.4.
    api.create_repo(REPO)
    api.create_branch(REPO, branch="dev")
    add = [CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"pr")]
    info = api.create_commit(REPO, add, commit_message="to dev", revision="dev", create_pr=True)
    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1" and info.pr_revision == "refs/pr/1"
    assert hub.files(REPO, "refs/pr/1")["a.txt"] == b"pr"
    assert "a.txt" not in hub.files(REPO, "dev") and "a.txt" not in hub.files(REPO)
    assert any(r["path"].endswith("/commit/dev") and r["query"] == "create_pr=1" for r in hub.requests)


@pytest.mark.parametrize("token", [False, "hf_wrong_token"])
def test_push_without_valid_token_is_401_and_creates_nothing(hub: LocalHub, token, tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    anon = HfApi(endpoint=hub.url, token=token)
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_repo(REPO, exist_ok=True)
    assert err.value.response.status_code == 401
    assert not hub.repo_exists(REPO)

    HfApi(endpoint=hub.url, token=hub.token).create_repo(REPO)
    before = hub.commits(REPO)
    for call in (
        lambda: anon.upload_folder(folder_path=tmp_path / "src", repo_id=REPO),
        lambda: anon.create_branch(REPO, branch="dev"),
    ):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
        assert not isinstance(err.value, RepositoryNotFoundError)  # a credentials error, not a missing repo
    assert hub.commits(REPO) == before
    assert [c["message"] for c in hub.commits(REPO)] == ["initial commit"]
    refused = [
        r for r in hub.requests if r["authorization"] != f"Bearer {hub.token}" and "validate-yaml" not in r["path"]
    ]
    assert {r["status"] for r in refused} == {401}


def test_fail_next_commit_without_retry_applies_nothing(hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    api.create_commit(REPO, [CommitOperationAdd("a.txt", b"v1")], commit_message="v1")
    before_files, before_commits = hub.files(REPO), hub.commits(REPO)

    hub.fail_next_commit = True
    with pytest.raises(HfHubHTTPError) as err:  # create_commit does not retry
        api.create_commit(REPO, [CommitOperationAdd("a.txt", b"v2" * 5000)], commit_message="v2")
    assert err.value.response.status_code == 500
    assert hub.fail_next_commit is False
    assert hub.files(REPO) == before_files and hub.commits(REPO) == before_commits

    api.create_commit(REPO, [CommitOperationAdd("a.txt", b"v2")], commit_message="v2")
    assert hub.files(REPO)["a.txt"] == b"v2"


@pytest.mark.skipif(not is_xet_available(), reason="upload_folder only retries commits in its hf_xet pipeline")
def test_upload_folder_retries_a_failed_commit_once(
    hub: LocalHub, api: HfApi, tmp_path: Path, no_backoff: list[float]
) -> None:
    api.create_repo(REPO)
    files = make_folder(tmp_path / "src")
    hub.fail_next_commit = True
    api.upload_folder(folder_path=tmp_path / "src", repo_id=REPO, commit_message="retried")

    statuses = [r["status"] for r in hub.requests if r["path"].endswith(f"{REPO}/commit/main")]
    assert statuses == [500, 200] and len(no_backoff) == 1
    assert [c["message"] for c in hub.commits(REPO)] == ["initial commit", "retried"]  # applied exactly once
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == files


def test_persistent_commit_failure_changes_nothing(
    hub: LocalHub, api: HfApi, tmp_path: Path, no_backoff: list[float]
) -> None:
    api.create_repo(REPO)
    make_folder(tmp_path / "src")
    before_files, before_commits = hub.files(REPO), hub.commits(REPO)
    hub.fail_commits = 100
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=tmp_path / "src", repo_id=REPO)
    assert err.value.response.status_code == 500
    assert hub.files(REPO) == before_files and hub.commits(REPO) == before_commits
    attempts = sum(r["path"].endswith("/commit/main") for r in hub.requests)
    assert hub.fail_commits == 100 - attempts and attempts == (6 if is_xet_available() else 1)


def test_private_repo_needs_the_token(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO, private=True)
    api.create_commit(REPO, [CommitOperationAdd("secret.txt", b"s3cr3t")], commit_message="secret")
    assert hub.is_private(REPO) and api.model_info(REPO).private

    anon = HfApi(endpoint=hub.url, token=False)
    for read in (
        lambda: anon.model_info(REPO),
        lambda: anon.list_repo_files(REPO),
        lambda: hf_hub_download(REPO, "secret.txt", endpoint=hub.url, token=False, cache_dir=tmp_path / "c"),
        lambda: snapshot_download(REPO, endpoint=hub.url, token=False, cache_dir=tmp_path / "c"),
    ):
        with pytest.raises(RepositoryNotFoundError) as err:
            read()
        assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong_token").model_info(REPO)
    assert err.value.response.status_code == 401

    path = hf_hub_download(REPO, "secret.txt", endpoint=hub.url, token=hub.token, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"s3cr3t"


def test_missing_revision_and_file_raise_the_proper_errors(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="nope", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nothing-here")


# Loads the weights of a plain BERT from main, and remote code (a BertModel subclass) from a branch.
LOADER = """
import json, sys, torch, transformers
plain = transformers.AutoModel.from_pretrained("acme/encoder")
custom = transformers.AutoModel.from_pretrained("acme/encoder", trust_remote_code=True, revision="remote-code")
config = transformers.AutoConfig.from_pretrained("acme/encoder", trust_remote_code=True, revision="remote-code")
print(json.dumps({"plain": type(plain).__name__, "custom": type(custom).__name__, "config": type(config).__name__,
                  "sums": [float(sum(p.double().sum() for p in m.state_dict().values())) for m in (plain, custom)]}))
"""


def test_transformers_loads_models_through_the_server(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=10
    )
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "bert", safe_serialization=True)
    expected = float(sum(p.double().sum() for p in model.state_dict().values()))
    api.create_repo(REPO)
    api.upload_folder(folder_path=tmp_path / "bert", repo_id=REPO)

    remote = tmp_path / "bert"
    (remote / "configuration_enc.py").write_text(
        "from transformers import BertConfig\n\nclass EncConfig(BertConfig):\n    model_type = 'enc'\n"
    )
    (remote / "modeling_enc.py").write_text(
        "from transformers import BertModel\nfrom .configuration_enc import EncConfig\n\n"
        "class EncModel(BertModel):\n    config_class = EncConfig\n"
    )
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(
        model_type="enc", auto_map={"AutoConfig": "configuration_enc.EncConfig", "AutoModel": "modeling_enc.EncModel"}
    )
    (remote / "config.json").write_text(json.dumps(cfg))
    api.create_branch(REPO, branch="remote-code")
    api.upload_folder(folder_path=remote, repo_id=REPO, revision="remote-code")

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "child_home"), HF_HUB_DISABLE_TELEMETRY="1")
    first = len(hub.requests)
    proc = subprocess.run([sys.executable, "-c", LOADER], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain"] == "BertModel" and result["custom"] == "EncModel" and result["config"] == "EncConfig"
    assert result["sums"] == pytest.approx([expected, expected])

    seen = hub.requests[first:]
    assert all(r["authorization"] is None for r in seen)  # HF_TOKEN unset: anonymous reads of a public repo
    assert all(r["status"] in (200, 404) for r in seen), seen
    assert any(r["path"].endswith("/model.safetensors") and r["method"] == "GET" for r in seen)
    assert any(r["path"].endswith("/modeling_enc.py") for r in seen)


def test_the_server_listens_on_loopback_only(hub: LocalHub) -> None:
    assert hub.url.startswith("http://127.0.0.1:") and hub._server.server_address[0] == "127.0.0.1"
