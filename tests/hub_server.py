"""In-memory stand-in for the Hugging Face Hub HTTP API, so tests run the real `huggingface_hub`/`transformers` code.

Only model repos exist and every file is answered as a "regular" (inline base64) upload: no LFS, no Xet storage, so
nothing ever leaves 127.0.0.1. JSON shapes and error headers follow what huggingface_hub 2.4 parses
(`hf_api.py`, `_commit_api.py`, `file_download.py`, `utils/_http.py:hf_raise_for_status`).

Behaviour copied from the real Hub because client code depends on it:
- a new repo gets an "initial commit" with `.gitattributes` (the client asserts that a repo always has a head sha);
- a request carrying a wrong token is refused with 401 even on public repos;
- an unknown or private repo read without the token is 401 RepoNotFound (404 when authenticated), so the client
  raises `RepositoryNotFoundError` and cannot tell the two apart.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "test-user"  # namespace used when `create_repo` gets a bare name, and the `whoami` answer
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # hf_raise_for_status keys on this exact text
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """Git's blob oid: the Hub's ETag and preupload `oid` for regular files (the client's unchanged-file check)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())  # the only format huggingface_hub parses


@dataclass
class _Commit:
    oid: str
    message: str
    description: str
    files: dict[str, bytes]  # full snapshot, so reading any revision is a dict lookup
    parent: str | None
    date: str = field(default_factory=_now)


@dataclass
class _Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> head oid
    commits: dict[str, _Commit] = field(default_factory=dict)  # every commit ever made, by oid
    prs: dict[int, dict[str, Any]] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """The Hub on 127.0.0.1:<free port>. `with LocalHub() as hub: HfApi(endpoint=hub.url, token=hub.token)`.

    `fail_commits = n` makes the next n commit requests read half their body, answer 500 and apply nothing.
    `fail_next_commit = True` is the same with n = 1. huggingface_hub's default `upload_folder` (the hf_xet pipeline)
    retries a commit on 5xx up to 5 times, so a single failure is invisible there; use `fail_commits = 6` (or more) to
    make it give up. `create_commit` and the non-xet `upload_folder` path do not retry.

    `stall = {"create", "commit", ...}` makes those requests (`create`: POST /api/repos/create; otherwise the action
    after /api/models/NS/NAME/, e.g. `preupload`, `commit`, `revision`, `tree`) get no answer at all: the connection
    is accepted, the request read, and nothing is sent back until the hub stops (or `stall_s` seconds pass, so a
    client without a timeout fails late instead of hanging a test forever). Their log entry has status "stalled".

    `requests` logs every request as {"method", "path" (still URL-encoded, e.g. `refs%2Fpr%2F1`), "query",
    "authorization" (header value or None), "status"}; unknown routes answer 404 "LocalHub has no route for ...".
    """

    def __init__(self, token: str = "hf_test_token_0123456789") -> None:
        self.token = token
        self.url = ""
        self.fail_commits = 0
        self.stall: set[str] = set()
        self.stall_s = 60.0
        self._stopping = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()  # salts commit oids so identical commits still get distinct oids
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def fail_next_commit(self) -> bool:
        return self.fail_commits > 0

    @fail_next_commit.setter
    def fail_next_commit(self, value: bool) -> None:
        self.fail_commits = 1 if value else 0

    def start(self) -> LocalHub:
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled requests
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- inspection helpers for tests (raise KeyError for an unknown repo or revision)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._lookup(repo_id, revision).files)

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        with self._lock:
            chain, commit = [], self._lookup(repo_id, revision)
            while commit is not None:
                chain.append({"oid": commit.oid, "message": commit.message, "description": commit.description,
                              "files": sorted(commit.files)})  # fmt: skip
                commit = self._repos[repo_id].commits.get(commit.parent)
            return chain[::-1]

    def repo_exists(self, repo_id: str) -> bool:
        return repo_id in self._repos

    def is_private(self, repo_id: str) -> bool:
        return self._repos[repo_id].private

    def _lookup(self, repo_id: str, revision: str) -> _Commit:
        try:
            return self._resolve(self._repos[repo_id], revision)[1]
        except HubError as err:
            raise KeyError(f"{repo_id}@{revision}: {err.message}") from None

    # ---- state changes, called by the handler under self._lock

    @staticmethod
    def _resolve(repo: _Repo, rev: str) -> tuple[str | None, _Commit]:
        """(ref name, commit) for a branch, `refs/heads/x`, `refs/pr/N` or a full commit oid (ref name None)."""
        name = rev.removeprefix("refs/heads/")
        if name in repo.refs:
            return name, repo.commits[repo.refs[name]]
        if rev in repo.commits:
            return None, repo.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _commit(self, repo: _Repo, ref: str, message: str, description: str, files: dict[str, bytes]) -> _Commit:
        parent = repo.refs.get(ref)
        blobs = sorted((path, git_blob_sha1(data)) for path, data in files.items())
        salt = json.dumps([parent, message, blobs, next(self._counter)])
        commit = _Commit(hashlib.sha1(salt.encode()).hexdigest(), message, description, files, parent)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _open_pr(self, repo: _Repo, base: str, title: str, description: str) -> int:
        num = len(repo.prs) + 1
        repo.prs[num] = {"title": title, "description": description, "base": base, "createdAt": _now()}
        repo.refs[f"refs/pr/{num}"] = repo.refs[base]  # a PR is a branch forked from its base's head
        return num


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no keep-alive thread can outlive `stop()`.
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ---- plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query, self.body = {k: v[-1] for k, v in parse_qs(url.query).items()}, None
        self.entry = {"method": self.command, "path": url.path, "query": url.query,
                      "authorization": self.headers.get("Authorization"), "status": None}  # fmt: skip
        with self.hub._lock:
            self.hub.requests.append(self.entry)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        if self._kind(segs) in self.hub.stall:
            self.entry["status"] = "stalled"
            self._body()
            self.hub._stopping.wait(self.hub.stall_s)  # then close without a byte of answer
            return
        try:
            self._route(segs)
        except HubError as err:
            self._body()  # unread request bytes would turn our close into a TCP reset that hides this answer
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json({"error": err.message}, err.status, headers)
        except Exception as err:  # a server bug: surface it to the client instead of a dropped connection
            self._send_json({"error": f"LocalHub crashed: {err!r}"}, 500)

    def _send(self, body: bytes, status: int = 200, headers: dict | None = None) -> None:
        self.entry["status"] = status
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(json.dumps(obj).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def _kind(segs: list[str]) -> str:
        """The name `LocalHub.stall` uses for a request."""
        if segs == ["api", "repos", "create"]:
            return "create"
        return segs[4] if len(segs) >= 5 and segs[:2] == ["api", "models"] else "/".join(segs)

    def _body(self) -> bytes:
        if self.body is None:
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self.body

    def _repo(self, repo_id: str, write: bool = False) -> _Repo:
        if write and not self.authed:
            raise HubError(401, INVALID_CREDENTIALS)
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and not self.authed):
            raise HubError(404 if self.authed else 401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _split_rev(segs: list[str]) -> tuple[str, str]:
        """(revision, rest-of-path); tolerates an unencoded `refs/pr/N` spread over three segments."""
        n = 3 if len(segs) >= 3 and segs[0] == "refs" and segs[1] in ("pr", "heads", "convert") else 1
        return "/".join(segs[:n]), "/".join(segs[n:])

    # ---- routes

    def _route(self, segs: list[str]) -> None:
        method, header = self.command, self.headers.get("Authorization")
        if header is not None and header != f"Bearer {self.hub.token}":  # the real Hub refuses these everywhere
            raise HubError(401, INVALID_CREDENTIALS)
        self.authed = header is not None
        if segs == ["api", "agent-harnesses"]:
            return self._send_json({})
        if segs == ["api", "whoami-v2"]:
            if not self.authed:
                raise HubError(401, INVALID_CREDENTIALS)
            return self._send_json({"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})
        if segs == ["api", "validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if segs == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id, action, rest = f"{segs[2]}/{segs[3]}", (segs[4:5] or [""])[0], segs[5:]
            with self.hub._lock:
                write = method == "POST" and action in ("preupload", "commit", "branch", "discussions")
                repo = self._repo(repo_id, write=write)
            handler = getattr(self, f"_api_{action or 'info'}".replace("-", "_"), None)
            if handler is not None:
                return handler(repo_id, repo, rest)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(f"{segs[0]}/{segs[1]}", segs[3:])
        raise HubError(404, f"LocalHub has no route for {method} {self.path}")

    def _create_repo(self, payload: dict) -> None:
        if not self.authed:
            raise HubError(401, INVALID_CREDENTIALS)
        if payload.get("type", "model") != "model":
            raise HubError(400, "LocalHub only hosts model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self.hub._lock:
            if repo_id in self.hub._repos:  # the client reads `url` from this 409 when `exist_ok=True`
                message = "You already created this model repo"
                body = {"error": message, "url": f"{self.hub.url}/{repo_id}"}
                return self._send_json(body, 409, {"X-Error-Message": message})
            private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
            repo = self.hub._repos[repo_id] = _Repo(private=private)
            self.hub._commit(repo, "main", "initial commit", "", {".gitattributes": GITATTRIBUTES})
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _api_info(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        self._api_revision(repo_id, repo, ["main"])

    def _api_revision(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        with self.hub._lock:
            commit = LocalHub._resolve(repo, self._split_rev(rest)[0])[1]
        blobs = self.query.get("blobs") in ("1", "true", "True")
        siblings = [
            {"rfilename": p, **({"blobId": git_blob_sha1(b), "size": len(b)} if blobs else {})}
            for p, b in sorted(commit.files.items())
        ]
        namespace = repo_id.split("/")[0]
        self._send_json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": namespace, "sha": commit.oid,
                         "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                         "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                         "siblings": siblings, "spaces": [],
                         "usedStorage": sum(map(len, commit.files.values()))})  # fmt: skip

    @staticmethod
    def _entry(commit: _Commit, path: str) -> dict:
        if path in commit.files:
            data = commit.files[path]
            return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    @staticmethod
    def _paths(commit: _Commit) -> set[str]:
        """Every file and every folder that holds one: git has no empty folders."""
        folders = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
        return folders | set(commit.files)

    def _api_tree(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        rev, base = self._split_rev(rest)
        with self.hub._lock:
            commit = LocalHub._resolve(repo, rev)[1]
        paths, base = self._paths(commit), base.strip("/")
        if base and base not in paths:
            raise HubError(404, f"{base} does not exist on {commit.oid}", "EntryNotFound")
        prefix, recursive = f"{base}/" if base else "", self.query.get("recursive", "").lower() in ("1", "true")
        listed = [p for p in sorted(paths) if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])]
        self._send_json([self._entry(commit, p) for p in listed])  # one page: no `Link` header to follow

    def _api_paths_info(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        wanted = parse_qs(self._body().decode()).get("paths", [])  # form data: paths=a&paths=b&expand=False
        with self.hub._lock:
            commit = LocalHub._resolve(repo, self._split_rev(rest)[0])[1]
        paths = self._paths(commit)
        self._send_json([self._entry(commit, p.strip("/")) for p in wanted if p.strip("/") in paths])

    def _api_refs(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        def ref(name: str) -> dict:
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        with self.hub._lock:
            answer = {"branches": [ref(n) for n in repo.refs if not n.startswith("refs/pr/")], "converts": [],
                      "tags": [], "pullRequests": [ref(n) for n in repo.refs if n.startswith("refs/pr/")]}  # fmt: skip
        self._send_json(answer)

    def _api_preupload(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        payload = json.loads(self._body())
        with self.hub._lock:
            files = LocalHub._resolve(repo, self._split_rev(rest)[0])[1].files
        answer = []
        for item in payload["files"]:
            entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if item["path"] in files:  # lets the client skip files that did not change
                entry["oid"] = git_blob_sha1(files[item["path"]])
            answer.append(entry)
        self._send_json({"files": answer})

    def _api_branch(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        if self.command != "POST" or not rest:
            raise HubError(404, f"LocalHub has no route for {self.command} {self.path}")
        branch, start = "/".join(rest), json.loads(self._body() or b"{}").get("startingPoint") or "main"
        if branch.startswith("refs/"):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        with self.hub._lock:
            if branch in repo.refs:
                raise HubError(409, "Reference already exists")
            repo.refs[branch] = LocalHub._resolve(repo, start)[1].oid
        self._send_json({})

    def _api_discussions(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        if self.command == "POST" and not rest:
            payload = json.loads(self._body())
            if not payload.get("pullRequest"):
                raise HubError(400, "LocalHub only supports pull requests, not discussions")
            with self.hub._lock:
                num = self.hub._open_pr(repo, "main", payload.get("title", ""), payload.get("description", ""))
            return self._send_json({"num": num, "url": f"{self.hub.url}/{repo_id}/discussions/{num}"})
        pr = repo.prs.get(int(rest[0])) if rest and rest[0].isdigit() else None
        if pr is None:
            raise HubError(404, "Discussion not found")
        self._send_json({"num": int(rest[0]), "title": pr["title"], "status": "draft", "createdAt": pr["createdAt"],
                         "author": {"name": USER}, "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True,
                         "events": [], "changes": {"base": f"refs/heads/{pr['base']}"}, "filesWithConflicts": [],
                         "diff": ""})  # fmt: skip

    def _api_commit(self, repo_id: str, repo: _Repo, rest: list[str]) -> None:
        with self.hub._lock:
            fail = self.hub.fail_commits > 0
            if fail:
                self.hub.fail_commits -= 1
        if fail:
            self._fail_mid_upload()
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header, ops = lines[0]["value"], lines[1:]
        with self.hub._lock:  # parse and apply in one go: a bad line leaves the repo untouched
            ref, head = LocalHub._resolve(repo, self._split_rev(rest)[0])
            if ref is None:
                raise HubError(400, "Can only commit to a branch, not to a commit oid")
            if header.get("parentCommit") not in (None, head.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op in ops:
                key, path = op["key"], op["value"]["path"].strip("/")
                if key == "file":
                    files[path] = base64.b64decode(op["value"]["content"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(f"{path}/")}
                else:  # lfsFile / copies never happen: preupload always answers "regular"
                    raise HubError(400, f"LocalHub does not support commit operation {key!r}")
            pr_url = None
            if self.query.get("create_pr") == "1":
                num = self.hub._open_pr(repo, ref, header["summary"], header.get("description", ""))
                ref, pr_url = f"refs/pr/{num}", f"{self.hub.url}/{repo_id}/discussions/{num}"
            commit = self.hub._commit(repo, ref, header["summary"], header.get("description", ""), files)
        url = f"{self.hub.url}/{repo_id}/commit/{commit.oid}"
        self._send_json({"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": pr_url, "success": True})

    def _fail_mid_upload(self) -> None:
        """Answer 500 after half the body, as a proxy that dies mid-upload would; then drain the rest, because
        closing with unread data makes the kernel send RST and the client would see a reset instead of the 500."""
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length // 2)
        # Retry-After: 0 keeps the client's backoff at 1 s per retry instead of 1, 2, 4, 8, 8 s.
        headers = {"Retry-After": "0", "Connection": "close"}
        self._send_json({"error": "LocalHub: injected commit failure"}, 500, headers)
        self.wfile.flush()
        self.rfile.read(length - length // 2)

    def _resolve_file(self, repo_id: str, segs: list[str]) -> None:
        rev, path = self._split_rev(segs)
        with self.hub._lock:
            repo = self._repo(repo_id)
            commit = LocalHub._resolve(repo, rev)[1]
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        data = commit.files[path]
        headers.update({"ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"})
        self._send(data, 200, headers)  # a `Range` header is ignored; the client copes with a full 200 answer
