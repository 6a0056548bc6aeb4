"""``robustcl push-to-hub``: publish an export folder to the Hugging Face Hub as one commit.

The token is whatever ``huggingface_hub`` finds (``HF_TOKEN`` or the login cache); robustcl never prints or stores
it, and only looks at it to refuse one that cannot be sent. ``HF_ENDPOINT`` selects another Hub (or a local
stand-in). The Hub applies a commit atomically, so one commit with the whole folder leaves the repo either unchanged
or complete. Every request has a timeout (``--timeout``): a Hub that stops answering ends the push, it never hangs.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RemoteError, UserError, shown
from .export_layout import CARD_FILE, export_file_set, export_files

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

# Seconds of silence allowed per wait (connecting, between bytes sent or received, for a pooled connection), not a
# bound on a whole request: a large upload at any steady speed never hits it. huggingface_hub uses 10 s for its own
# download timeouts; a commit answer comes only after the Hub has checked every file, which can take tens of seconds
# for a large commit, so pushes get 60 s. A request that gets no answer fails after a minute (one that
# huggingface_hub retries, after each of its up to 6 tries).
DEFAULT_TIMEOUT_S = 60.0
REPO_ID_RULE = (
    "NAMESPACE/NAME or NAME of letters, digits, '-', '_' and '.' (at most 96 each, not starting or ending with '-' "
    "or '.', no '--' or '..', no '.git' ending), e.g. my-org/acl-r18"
)


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    pr_url: str | None
    files: list[str]
    card_names_other_repo: bool  # the card's loading example names another repo id


def invalid_repo_id(repo_id: str) -> bool:
    """Whether ``repo_id`` breaks huggingface_hub's rules for repo ids (``validate_repo_id``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return True
    return False


@contextmanager
def request_timeouts(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client, while inside, waits at most ``seconds`` to connect, between bytes sent
    or received and for a pooled connection; the client factory in place before (the default one or a user's, e.g.
    with a proxy) is put back afterwards, so other code in the process gets the client it had.

    huggingface_hub builds its client with ``timeout=None``; most ``HfApi`` calls (create_repo, preupload, commit)
    pass no timeout of their own and some pass ``timeout=None`` explicitly (its pagination, behind
    list_repo_files), which overrides a client's default. ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``
    only reach its metadata and download calls. Hence a factory around the current one whose client bounds every
    wait a request leaves unbounded, before any other hook or the transport sees it. Transfers to Xet storage (LFS
    files on the real Hub) go through ``hf_xet``, which has its own timeouts (``HF_XET_CLIENT_READ_TIMEOUT``).
    """
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    # No public getter for the factory in place; without the attribute, the library default is the one to restore.
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def bound(request: httpx2.Request) -> None:
        # The transport reads the request's own timeouts; a call's explicit `timeout=None` put None there.
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            kind: seconds if given.get(kind) is None else given[kind] for kind in ("connect", "read", "write", "pool")
        }

    def with_timeouts() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        client.event_hooks["request"].insert(0, bound)
        return client

    set_client_factory(with_timeouts)  # also closes the current client: the next request builds one with timeouts
    try:
        yield
    finally:
        set_client_factory(previous)


def check_token_sendable() -> None:
    """Refuse a token that cannot be an HTTP header value (an accent or an invisible character picked up by
    copy-paste) before any request: httpx would fail with a UnicodeEncodeError traceback. Names the character's code
    point, never the token."""
    from huggingface_hub import constants, get_token

    if os.environ.get("HF_TOKEN"):
        where = "HF_TOKEN"
    elif os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        where = "HUGGING_FACE_HUB_TOKEN"
    else:
        where = str(constants.HF_TOKEN_PATH)
    try:
        token = get_token()
    except UnicodeDecodeError:
        raise UserError("the saved Hub token is not text", where, "log in again with `hf auth login`") from None
    bad = next((c for c in token or "" if not (c.isascii() and c.isprintable())), None)
    if bad is None:
        return
    fix = "set HF_TOKEN to the token exactly as the Hub shows it, or log in with `hf auth login`"
    if where != "HF_TOKEN":
        fix = "log in again with `hf auth login`, or set HF_TOKEN to the token exactly as the Hub shows it"
    raise UserError(
        "the Hub token contains characters that cannot be sent in an HTTP header "
        f"(U+{ord(bad):04X} {unicodedata.name(bad, 'control character')}; the token itself is not shown)",
        where,
        fix,
    )


def _scrubbed(text: str) -> str:
    """Server messages are echoed to the user; make sure a token can never be among them."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _is_connection_error(err: Exception) -> bool:
    """Refused / dropped connections and timeouts, raised by whichever HTTP client huggingface_hub uses."""
    root = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or root in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


def _timeout_error(err: Exception, repo_id: str, endpoint: str, seconds: float) -> RemoteError:
    """A request that got no answer within ``seconds``, named. Only an unanswered commit may have been applied."""
    try:
        request = err.request  # type: ignore[attr-defined]
        target, commit = f"{request.method} {request.url}", "/commit/" in request.url.path
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when it does not know the request
        target, commit = "a request", False
    what = f"the Hub did not answer within {seconds:g} s ({_scrubbed(target)}); " + (
        "the commit may or may not have been applied" if commit else "nothing was committed"
    )
    fix = (
        "look for the commit in the repo's history and run the same command again if it is not there"
        if commit
        else "check the connection and HF_ENDPOINT and run the same command again"
    )
    return RemoteError(what, f"{endpoint} {repo_id}", fix + ", or allow longer silences with --timeout")


def _http_error(err: Exception, repo_id: str, endpoint: str) -> UserError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    detail = _scrubbed(str(getattr(err, "server_message", None) or err).strip().splitlines()[0])
    if status == 401:
        return UserError(
            f"the Hub at {endpoint} rejected the credentials (HTTP 401: {detail})",
            repo_id,
            "set HF_TOKEN to a token with write access or log in with `hf auth login`",
        )
    if status == 403:
        return UserError(
            f"no write access (HTTP 403: {detail})",
            repo_id,
            "use a token with write access to this namespace, or push to your own namespace",
        )
    if status is not None and status < 500:
        return UserError(
            f"the Hub refused the request (HTTP {status}: {detail})", repo_id, "check REPO_ID and --revision"
        )
    return RemoteError(
        f"the Hub failed during the upload ({'HTTP ' + str(status) if status else type(err).__name__}: {detail}); "
        "nothing was committed",
        f"{endpoint} {repo_id}",
        "run the same command again",
    )


def _check_repo_id(repo_id: str) -> None:
    if invalid_repo_id(repo_id):
        raise UserError(f"invalid repo id {shown(repo_id)}", "REPO_ID", f"use {REPO_ID_RULE}")
    if "/" not in repo_id:
        raise UserError("the repo id needs a namespace", repo_id, "use NAMESPACE/NAME, e.g. my-org/acl-r18")


def push_to_hub(
    export_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PushResult:
    """Create ``repo_id`` if needed (and the ``revision`` branch), then upload the export in a single commit.
    ``timeout``: seconds any request may stay silent (see :func:`request_timeouts`)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    export_dir = Path(export_dir)
    files = export_files(export_dir)  # refuse incomplete folders and strays before any network call
    _check_repo_id(repo_id)
    check_token_sendable()
    endpoint = constants.ENDPOINT
    try:
        with request_timeouts(timeout):
            repo_url, info = _upload(
                endpoint,
                export_dir,
                files,
                repo_id,
                private=private,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
            )
    except HfHubHTTPError as err:
        raise _http_error(err, repo_id, endpoint) from None
    except httpx2.TimeoutException as err:
        raise _timeout_error(err, repo_id, endpoint, timeout) from None
    except Exception as err:
        if not _is_connection_error(err):
            raise
        raise _http_error(err, repo_id, endpoint) from None
    card = (export_dir / CARD_FILE).read_text()
    return PushResult(
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        files=files,
        card_names_other_repo=f'from_pretrained("{repo_id}"' not in card,
    )


def _upload(
    endpoint: str,
    export_dir: Path,
    files: list[str],
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
) -> tuple[str, CommitInfo]:
    """The requests of a push: create the repo (and branch), list its files, commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from . import __version__

    api = HfApi(endpoint=endpoint, library_name="robustcl", library_version=__version__)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    # Export files of an earlier push that this export lacks (e.g. an evaluation) would contradict its card.
    stale = set(api.list_repo_files(repo_id, revision=revision)) & export_file_set() - set(files)
    # One commit of exactly the checked files (what upload_folder does, but also for a pull request against
    # a branch, which upload_folder refuses).
    info = api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=[
            *(CommitOperationAdd(path_in_repo=name, path_or_fileobj=export_dir / name) for name in files),
            *(CommitOperationDelete(path_in_repo=name) for name in sorted(stale)),
        ],
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} (robustcl {__version__} export)",
    )
    return repo_url, info
