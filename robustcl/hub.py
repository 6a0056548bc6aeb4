"""``robustcl push-to-hub``: publish an export folder to the Hugging Face Hub as one commit.

The token is whatever ``huggingface_hub`` finds (``HF_TOKEN`` or the login cache); robustcl never reads, prints or
stores it. ``HF_ENDPOINT`` selects another Hub (or a local stand-in). The Hub applies a commit atomically, so one
commit with the whole folder leaves the repo either unchanged or complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import RemoteError, UserError
from .export_layout import CARD_FILE, export_file_set, export_files


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    pr_url: str | None
    files: list[str]
    card_names_other_repo: bool  # the card's loading example names another repo id


def _scrubbed(text: str) -> str:
    """Server messages are echoed to the user; make sure a token can never be among them."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _is_connection_error(err: Exception) -> bool:
    """Refused / dropped connections and timeouts, raised by whichever HTTP client huggingface_hub uses."""
    root = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or root in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


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


def push_to_hub(
    export_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed (and the ``revision`` branch), then upload the export in a single commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from . import __version__

    export_dir = Path(export_dir)
    files = export_files(export_dir)  # refuse incomplete folders and strays before any network call
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"invalid repo id: {err}", repo_id, "use NAMESPACE/NAME, e.g. my-org/acl-r18") from None
    if "/" not in repo_id:
        raise UserError("the repo id needs a namespace", repo_id, "use NAMESPACE/NAME, e.g. my-org/acl-r18")
    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint, library_name="robustcl", library_version=__version__)
    try:
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
    except HfHubHTTPError as err:
        raise _http_error(err, repo_id, endpoint) from None
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
