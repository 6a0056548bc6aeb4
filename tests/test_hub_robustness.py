"""Publishing under hostile conditions: a Hub that accepts connections and never answers, a token that cannot be sent
in an HTTP header, and repo ids, licenses or dataset names that would rewrite the model card's metadata or break
out of its code blocks. Every case ends in one line (or a safe card), never a hang or a traceback.

Commands run in this process through ``robustcl.cli.main`` against the local Hub of ``hub_server.py`` (over real
HTTP on 127.0.0.1); one tiny finished run is shared by the module.
"""

from __future__ import annotations

import http.server
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub.constants
import pytest
import yaml
from helpers import REPO, TINY, call_main
from hub_server import LocalHub
from huggingface_hub import ModelCard, set_client_factory
from huggingface_hub.utils import _http as hf_http

from robustcl import hub as robustcl_hub
from robustcl.errors import UserError
from robustcl.model_card import CardFacts, render_model_card
from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel
from robustcl.recipe import recipe_from_dict

QUICK = str(REPO / "recipes" / "quickstart.yaml")
RUN_SETS = [*TINY, "training.max_steps=2", "eval.after_pretrain=false", "logging.progress_bar=false"]
REPO_ID = "my-org/robust"
ERROR = "robustcl: error: "
INJECTED = "my-org/x\n---\nlicense: evil\n---"


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run; its ``encoder/`` is a complete export."""
    run = tmp_path_factory.mktemp("hub_robustness") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)  # call_main changes it
        assert call_main(["pretrain", QUICK, "-o", str(run), *sets(*RUN_SETS)]) == 0
    return run


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path):
    """``robustcl ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    capfd.readouterr()

    def call(*args: str) -> tuple[int, str, str]:
        code = call_main(list(args))
        out = capfd.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def online(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> LocalHub:
    """The local Hub as HF_ENDPOINT (read at import, hence patched) with its token in HF_TOKEN."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ item 9: timeouts


@pytest.mark.parametrize(
    ("stalled", "request_line"),
    [
        ("create", "POST /api/repos/create"),
        # Listing the repo's files: huggingface_hub passes timeout=None itself there, and retries it 5 times.
        ("tree", f"GET /api/models/{REPO_ID}/tree/main?recursive=true&expand=false"),
        ("commit", f"POST /api/models/{REPO_ID}/commit/main"),
    ],
)
def test_a_hub_that_never_answers_ends_in_one_line_naming_the_endpoint(
    run, online, cli, monkeypatch, stalled, request_line
):
    """Accepted connections that never get an answer: the command gives up after --timeout seconds of silence
    (instead of waiting forever) and names the request that got no answer. Before the commit request nothing was
    committed; an unanswered commit request may have been applied, and the line says so rather than guess."""
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))  # no waits between retries
    online.stall = {stalled}
    online.stall_s = 20  # a client without timeouts fails after this instead of hanging the test forever
    factory = hf_http._GLOBAL_CLIENT_FACTORY
    start = time.monotonic()
    code, out, err = cli("push-to-hub", str(run / "encoder"), REPO_ID, "--timeout", "1")
    elapsed = time.monotonic() - start
    if stalled == "tree":  # huggingface_hub logs each retry on stderr; the error is still the last, single line
        assert sum(r["status"] == "stalled" for r in online.requests) == 6
        err = err.strip().splitlines()[-1]
    line = one_error_line(err)
    assert code == 1 and elapsed < 10, (elapsed, line)
    method, path = request_line.split()
    assert f"the Hub did not answer within 1 s ({method} {online.url}{path})" in line and "--timeout" in line
    if stalled != "commit":
        assert "; nothing was committed" in line
    else:
        assert "; the commit may or may not have been applied" in line and "repo's history" in line
        assert set(online.files(REPO_ID)) == {".gitattributes"}  # (here it was not)
    assert online.token not in out + err
    assert hf_http._GLOBAL_CLIENT_FACTORY is factory  # put back after a failure too


@pytest.fixture
def recording_factory() -> Iterator[list[dict]]:
    """A user's own client factory (as set_client_factory installs, e.g. for a proxy) that records each request's
    timeouts; the library default is back afterwards."""
    seen: list[dict] = []

    def factory() -> httpx2.Client:
        client = hf_http.default_client_factory()
        client.event_hooks["request"].append(lambda request: seen.append(dict(request.extensions["timeout"])))
        return client

    factory.seen = seen  # type: ignore[attr-defined]
    set_client_factory(factory)
    yield factory
    set_client_factory(hf_http.default_client_factory)


@pytest.mark.parametrize("option", [["--timeout", "7"], []])
def test_every_request_of_a_push_has_the_timeout_and_the_client_factory_is_restored(
    run, online, cli, recording_factory, option
):
    """Each request carries the timeout (connect, read, write and pool: per operation, never a total), the user's
    client factory is still used (its hooks ran), and after the push the process's HTTP client is as it was: other
    code in the same process (tests run many commands in one) sees no timeout it did not ask for."""
    code, _, err = cli("push-to-hub", str(run / "encoder"), REPO_ID, *option)
    assert code == 0, err[-3000:]
    seconds = 7.0 if option else robustcl_hub.DEFAULT_TIMEOUT_S
    seen = recording_factory.seen
    assert len(seen) >= 4  # create, list files, preupload, commit
    assert all(t == {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds} for t in seen), seen
    assert hf_http._GLOBAL_CLIENT_FACTORY is recording_factory
    assert hf_http.get_session().timeout == httpx2.Timeout(None)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Reads an upload of any length, then answers 20 bytes one by one, 0.1 s apart."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "20")
        self.end_headers()
        for _ in range(20):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)


def test_a_slow_but_steady_transfer_outlasts_the_timeout():
    """The timeout bounds silence, not duration: with 1 s, an upload that takes 2 s (a chunk every 0.1 s) and an
    answer that trickles in over 2 s both go through: a large model upload is never cut off for its size."""

    def slow_body() -> Iterator[bytes]:
        for _ in range(20):
            time.sleep(0.1)
            yield b"y" * 1000

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with robustcl_hub.request_timeouts(1.0):
            start = time.monotonic()
            response = hf_http.get_session().post(
                f"http://127.0.0.1:{server.server_address[1]}/upload",
                content=slow_body(),
                headers={"Content-Length": "20000"},
            )
            assert response.content == b"x" * 20 and time.monotonic() - start > 3
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ item 10: the token


@pytest.mark.parametrize("bad", ["é", "\u200b", "\x7f"])
def test_a_token_that_cannot_go_in_an_http_header_is_one_line_and_never_shown(run, online, cli, monkeypatch, bad):
    """A token with a non-ASCII or invisible character (copy-paste) is refused before any request, in one line
    that names HF_TOKEN and the fix; the token itself appears nowhere in the output."""
    token = f"hf_Secret{bad}Abcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", token)
    code, out, err = cli("push-to-hub", str(run / "encoder"), REPO_ID)
    line = one_error_line(err)
    assert code == 2 and "cannot be sent in an HTTP header" in line and "(HF_TOKEN)" in line
    assert "hf auth login" in line and "exactly as the Hub shows it" in line
    for secret in (token, "hf_Secret", "Abcdefghijklmnop"):
        assert secret not in out + err
    assert online.requests == []


@pytest.mark.parametrize(
    "argv",
    [["evaluate", "my-org/robust-encoder"], ["recipe", "validate", QUICK, "--set", "data.path=my-org/some-images"]],
    ids=["evaluate-a-hub-model", "a-hub-dataset"],
)
def test_commands_that_download_refuse_such_a_token_too(online, cli, monkeypatch, argv):
    token = "hf_Secret\u00e9Abcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", token)
    code, out, err = cli(*argv)
    line = one_error_line(err)
    assert code == 2 and "cannot be sent in an HTTP header" in line and "(HF_TOKEN)" in line
    assert "hf_Secret" not in out + err and "Abcdefghijklmnop" not in out + err
    assert online.requests == []


def test_a_bad_token_in_the_login_cache_names_the_file(run, online, cli, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("hf_Cached\u00a0Abcdefghijklmnop\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_file))
    code, out, err = cli("push-to-hub", str(run / "encoder"), REPO_ID)
    line = one_error_line(err)
    assert code == 2 and f"({token_file})" in line and "Abcdefghijklmnop" not in out + err
    assert online.requests == []


# ------------------------------------------------------------------------ item 12: what reaches the card


def _front_matter(card_text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card_text, re.S)
    assert match, card_text[:500]
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize(
    "value", [INJECTED, "my org/x", "a/b/c", "-lead", "x--y", "name.git", "x" * 97, 'my-org/x")\nimport os']
)
def test_an_invalid_export_repo_id_is_refused_by_recipe_validate_and_pretrain(cli, tmp_path, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"path": "builtin:digits"}, "export": {"repo_id": value}}))
    for args in (["recipe", "validate", str(recipe)], ["pretrain", str(recipe), "-o", str(tmp_path / "out")]):
        code, _, err = cli(*args)
        line = one_error_line(err)
        assert code == 2 and "'export.repo_id'" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["my-org/acl-r18", "acl-r18", "Org_1/model.v2"])
def test_a_valid_export_repo_id_is_accepted(value):
    assert recipe_from_dict({"export": {"repo_id": value}}).export.repo_id == value


@pytest.mark.parametrize("value", ["mit\n---\nfoo: bar", "apache 2.0", "", "mit`", "x" * 65])
def test_a_license_that_is_not_an_identifier_is_refused(value):
    with pytest.raises(UserError) as refused:
        recipe_from_dict({"export": {"license": value}})
    assert "'export.license'" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("value", ["apache-2.0", "mit", "other", "cc-by-nc-sa-4.0", "bigscience-openrail-m"])
def test_hub_license_identifiers_are_accepted(value):
    assert recipe_from_dict({"export": {"license": value}}).export.license == value


def test_an_injected_repo_id_on_the_command_line_is_refused_before_anything_is_written(run, cli, tmp_path):
    out_dir = tmp_path / "export"
    code, _, err = cli("export", str(run), str(out_dir), "--repo-id", INJECTED)
    line = one_error_line(err)
    assert code == 2 and "(--repo-id / export.repo_id)" in line and "\\n---" in line
    assert not out_dir.exists()


def _tiny_model() -> RobustCLResNetModel:
    return RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1], widths=[8]))


@pytest.mark.parametrize("value", [INJECTED, "my org/x", 'my-org/x"', "a/b/c"])
def test_the_card_refuses_an_explicit_repo_id_on_every_path(value):
    """However the repo id reached the card facts, a namespaced id that is not a Hub repo id is refused."""
    with pytest.raises(UserError) as refused:
        render_model_card(CardFacts(repo_id=value, license="mit", model=_tiny_model(), resolution=8))
    assert refused.value.where == "--repo-id / export.repo_id" and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("my run (v2)", "my-run-v2"), ("x\n---\nlicense: evil\n---", "x-license-evil"), ("…", "model"), ("a.git", "a")],
)
def test_a_default_repo_id_from_a_folder_name_is_sanitised_never_refused(run, cli, tmp_path, folder, expected):
    """The default (the export folder's name) is whatever the folder is called: the export goes through, and the
    card names a valid repo id made from it; nothing of the name reaches the metadata as YAML."""
    out_dir = tmp_path / folder
    code, _, err = cli("export", str(run), str(out_dir))
    assert code == 0, err[-3000:]
    text = (out_dir / "README.md").read_text()
    meta = _front_matter(text)
    assert set(meta) == {"library_name", "license", "model_name", "pipeline_tag", "tags"}
    assert meta["model_name"] == expected and meta["license"] == "apache-2.0"
    assert f'AutoModel.from_pretrained("{expected}", trust_remote_code=True)' in text
    assert ModelCard(text).data.license == "apache-2.0"


def test_user_strings_in_the_card_body_stay_on_their_line_and_in_their_code_span(tmp_path):
    """A local dataset folder or split name with a newline, a backtick or a pipe would end a table row, a code span
    or the front matter: they are escaped."""
    data_path = str(tmp_path / "data `x` | y\n---\nlicense: evil")
    recipe = recipe_from_dict({"data": {"path": data_path, "split": "train|`a`\nb", "name": "cfg\n---"}})
    card = render_model_card(
        CardFacts(repo_id="my-org/x", license="mit", model=_tiny_model(), resolution=8, recipe=recipe)
    )
    text = str(card)
    assert _front_matter(text)["license"] == "mit"
    row = next(line for line in text.splitlines() if line.startswith("| data |"))
    assert row.count("`") == 4 and row.count(" | ") == 1 and row.endswith(" |")  # two code spans, two cells
    assert "evil" in row and "\\n" in row  # shown, escaped, on the row
    assert "\n---\nlicense" not in text and "\nlicense: evil" not in text


def test_only_a_whole_hub_dataset_id_becomes_card_metadata(tmp_path):
    """The `datasets` metadata links the card to a Hub dataset: a path that merely starts like one (a trailing
    newline) is not listed there."""
    for path, listed in (("my-org/digits", ["my-org/digits"]), ("my-org/digits\n", None)):
        recipe = recipe_from_dict({"data": {"path": path}})
        card = render_model_card(
            CardFacts(repo_id="my-org/x", license="mit", model=_tiny_model(), resolution=8, recipe=recipe)
        )
        assert _front_matter(str(card)).get("datasets") == listed
