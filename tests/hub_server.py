"""A local Hugging Face Hub for the tests: the HTTP endpoints that `huggingface_hub`, `diffusers` and `datasets`
call, served on 127.0.0.1 by uvicorn in a background thread.

The real Hub cannot be reached from the test machines, and mocking `huggingface_hub` would test our guesses about
it rather than the library. So this server speaks the Hub's wire protocol (as read from `huggingface_hub` 2.4's
client code: `hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`, `hf_file_system.py`) and the tests drive
it only through the real clients. It keeps the Hub's semantics where the clients depend on them: git-style blob
ids, LFS pointers and sha256 ETags, commit history per branch, `X-Error-Code` headers that the client turns into
`RepositoryNotFoundError` / `RevisionNotFoundError` / `EntryNotFoundError`, Range requests, private repos.

Not implemented (the client never needs them here): Xet storage (set `HF_HUB_DISABLE_XET=1`), multipart LFS
uploads, pull requests (`create_pr`), pagination, `.gitignore` handling, revisions containing `/`, gated repos.

File contents live in a temporary directory, keyed by sha256; repos, commits and refs live in memory, so a
stopped server restarts with the same repos (`LocalHub.stop()` / `LocalHub.start()`).

This module imports no Hugging Face library at import time: conftest.py imports it to reserve the Hub's port
before HF_ENDPOINT is set and any HF library reads it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

USER = "hub-tester"

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The Hub's default `.gitattributes`: files with these suffixes are stored with git LFS, as are files over
# 10 MiB and binary files (a NUL byte in the first 512 bytes), like the Hub's preupload endpoint decides.
LFS_SUFFIXES = (
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gz",
    ".h5",
    ".joblib",
    ".lfs",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".wav",
    ".mp3",
    ".flac",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


# Ports reserved by `reserve_endpoint`: bound (so no other socket can take them) until the Hub first serves on them.
_RESERVED_SOCKETS: dict[int, socket.socket] = {}


def reserve_endpoint() -> str:
    """A free local port for the Hub, held from now until `LocalHub.start` listens on it: the endpoint must be
    known when the test session starts (the HF libraries read HF_ENDPOINT at import), the Hub starts later."""
    reserved = socket.socket()
    # As asyncio sets for its own listeners: so that a restarted Hub can bind the port again at once, despite the
    # connections of the stopped one lingering in TIME_WAIT.
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    _RESERVED_SOCKETS[port] = reserved
    return f"http://127.0.0.1:{port}"


class HubError(Exception):
    """An error answered the Hub's way: status, `X-Error-Code` (what the client maps to an exception), message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a file's `oid` / `blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def hub_date(timestamp: float) -> str:
    """Dates as the Hub writes them (`%Y-%m-%dT%H:%M:%S.%fZ` with milliseconds)."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.lower().endswith(tuple(LFS_SUFFIXES)) or size >= LFS_MIN_SIZE or b"\0" in sample


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its content (by sha256 in the blob store), size and storage (LFS or plain git)."""

    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git object id: of the content, or of the LFS pointer

    def json(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": self.size, "oid": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: float
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Branch, tag, full commit id or a unique prefix of at least 7 hex digits."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [known for known in self.commits if known.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, commit: Commit) -> Iterator[Commit]:
        """`commit` and its ancestors, newest first."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.commits[current.parent] if current.parent else None


class HubStorage:
    """Repos, commits and refs in memory; file contents on disk by sha256; the fault hooks of the tests."""

    def __init__(self, root: Path) -> None:
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.truncations: dict[tuple[str, str, str], int] = {}
        self.pending_uploads: dict[str, tuple[str, int]] = {}  # upload nonce -> (sha256, size)
        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self.lock = threading.RLock()

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_dir / sha256
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256):
            temporary = self.blob_dir / f"{sha256}.{secrets.token_hex(4)}.tmp"
            temporary.write_bytes(data)
            temporary.replace(self.blob_dir / sha256)
        return sha256

    def read_blob(self, sha256: str) -> bytes:
        return (self.blob_dir / sha256).read_bytes()

    def stored_file(self, data: bytes, lfs: bool) -> StoredFile:
        sha256 = self.put_blob(data)
        blob_id = git_blob_id(lfs_pointer(sha256, len(data)) if lfs else data)
        return StoredFile(sha256=sha256, size=len(data), lfs=lfs, blob_id=blob_id)

    def new_commit(self, repo: Repo, parent: Commit | None, title: str, message: str, files: dict) -> Commit:
        date = time.time()
        seed = json.dumps([parent.oid if parent else None, title, message, date, len(repo.commits), sorted(files)])
        oid = hashlib.sha1(seed.encode() + b"".join(f.blob_id.encode() for f in files.values())).hexdigest()
        commit = Commit(
            oid=oid, parent=parent.oid if parent else None, title=title, message=message, date=date, files=dict(files)
        )
        repo.commits[oid] = commit
        return commit


class RequestLog:
    """ASGI middleware that appends (method, path, status) of each request to `log`: tests can check what the
    client asked for (say, that a load made no request at all)."""

    def __init__(self, app, log: list[tuple[str, str, int]]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                self.log.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, send_and_record)


class LocalHubApp:
    """The Starlette app: one method per Hub endpoint."""

    def __init__(self, storage: HubStorage, token: str) -> None:
        self.storage = storage
        self.token = token
        repo = "{kind}/{namespace}/{name}"
        model = "{namespace}/{name}"
        routes = [
            Route("/api/whoami-v2", self.whoami),
            Route("/api/validate-yaml", self.validate_yaml, methods=["POST"]),
            Route("/api/repos/create", self.create_repo, methods=["POST"]),
            Route("/api/repos/delete", self.delete_repo, methods=["DELETE"]),
            Route(f"/api/{repo}", self.repo_info),
            Route(f"/api/{repo}/revision/{{revision}}", self.repo_info),
            # A bare name (no namespace) is a missing repo, as it is on the Hub for anything but legacy models.
            Route("/api/{kind}/{name}", self.repo_info),
            Route("/api/{kind}/{name}/revision/{revision}", self.repo_info),
            Route(f"/api/{repo}/settings", self.update_settings, methods=["PUT"]),
            Route(f"/api/{repo}/tree/{{revision}}", self.tree),
            Route(f"/api/{repo}/tree/{{revision}}/{{path:path}}", self.tree),
            Route(f"/api/{repo}/paths-info/{{revision}}", self.paths_info, methods=["POST"]),
            Route(f"/api/{repo}/preupload/{{revision}}", self.preupload, methods=["POST"]),
            Route(f"/api/{repo}/commit/{{revision}}", self.commit, methods=["POST"]),
            Route(f"/api/{repo}/refs", self.refs),
            Route(f"/api/{repo}/commits/{{revision}}", self.commits),
            Route(f"/api/{repo}/branch/{{branch}}", self.branch, methods=["POST", "DELETE"]),
            Route(f"/api/{repo}/tag/{{revision}}", self.tag, methods=["POST", "DELETE"]),
            Route("/lfs/upload/{nonce}", self.lfs_upload, methods=["PUT"]),
            Route("/lfs/verify", self.lfs_verify, methods=["POST"]),
            Route(f"/{repo}.git/info/lfs/objects/batch", self.lfs_batch, methods=["POST"]),
            Route(f"/{model}.git/info/lfs/objects/batch", self.lfs_batch, methods=["POST"]),
            Route(f"/{repo}/resolve/{{revision}}/{{path:path}}", self.resolve, methods=["GET", "HEAD"]),
            Route(f"/{model}/resolve/{{revision}}/{{path:path}}", self.resolve, methods=["GET", "HEAD"]),
            Route("/{path:path}", self.not_implemented, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HubError: self.error_response})
        self.app.add_middleware(RequestLog, log=storage.request_log)

    # -- helpers -------------------------------------------------------------------------------------------------

    @staticmethod
    async def error_response(request: Request, error: Exception) -> Response:
        assert isinstance(error, HubError)
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)

    def authenticated(self, request: Request) -> bool:
        """Only the session's token is valid; any other token counts as anonymous (so a user's real `HF_TOKEN`,
        sent by a client that was given no token, still reads public repos)."""
        return request.headers.get("authorization", "") == f"Bearer {self.token}"

    def require_auth(self, request: Request) -> None:
        if not self.authenticated(request):
            raise HubError(401, "Invalid credentials in Authorization header")

    @staticmethod
    def repo_key(request: Request) -> tuple[str, str]:
        params = request.path_params
        kind = params.get("kind", "models")
        if kind not in REPO_KINDS:
            raise HubError(404, f"Unknown repo kind {kind!r}")
        if "namespace" not in params:
            return REPO_KINDS[kind], params["name"]
        return REPO_KINDS[kind], f"{params['namespace']}/{params['name']}"

    def get_repo(self, request: Request, write: bool = False) -> Repo:
        """The repo named by the URL. Like the Hub, a private repo looks missing to a reader without access."""
        if write:
            self.require_auth(request)
        repo_type, repo_id = self.repo_key(request)
        repo = self.storage.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.authenticated(request)):
            status = 404 if self.authenticated(request) else 401
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def repo_url(request: Request, repo: Repo) -> str:
        return f"{str(request.base_url).rstrip('/')}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def branch_head(self, repo: Repo, branch: str) -> Commit:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    @staticmethod
    def tree_entries(commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        """Files and folders under `prefix` ("" for the root): direct children, or all of them."""
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, stored in commit.files.items():
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) if recursive else 1
            for level in range(1, min(depth, len(parts) - 1) + 1):
                folder = base + "/".join(parts[:level])
                entries.setdefault(folder, LocalHubApp.folder_json(commit, folder))
            if recursive or len(parts) == 1:
                entries[path] = stored.json(path)
        return [entries[path] for path in sorted(entries)]

    @staticmethod
    def folder_json(commit: Commit, folder: str) -> dict:
        listing = sorted(
            (path, stored.blob_id) for path, stored in commit.files.items() if path.startswith(folder + "/")
        )
        return {"type": "directory", "path": folder, "size": 0, "oid": hashlib.sha1(repr(listing).encode()).hexdigest()}

    @staticmethod
    def path_json(commit: Commit, path: str) -> dict | None:
        if path in commit.files:
            return commit.files[path].json(path)
        if any(known.startswith(path.rstrip("/") + "/") for known in commit.files):
            return LocalHubApp.folder_json(commit, path.rstrip("/"))
        return None

    @staticmethod
    def last_commit_json(repo: Repo, commit: Commit, path: str) -> dict:
        """The newest commit in `commit`'s history that changed `path` (a file or a folder)."""

        def state(at: Commit) -> list:
            return sorted((p, f.blob_id) for p, f in at.files.items() if p == path or p.startswith(path + "/"))

        current = state(commit)
        changed = commit
        for ancestor in repo.history(commit):
            if state(ancestor) != current:
                break
            changed = ancestor
        return {"id": changed.oid, "title": changed.title, "date": hub_date(changed.date)}

    @staticmethod
    def truthy(value: str | None) -> bool:
        return (value or "").lower() in ("1", "true", "yes")

    async def not_implemented(self, request: Request) -> Response:
        raise HubError(404, f"The local test Hub does not implement {request.method} {request.url.path}")

    # -- account and repos ---------------------------------------------------------------------------------------

    async def whoami(self, request: Request) -> Response:
        self.require_auth(request)
        return JSONResponse(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER,
                "fullname": "Local Hub Tester",
                "email": f"{USER}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    async def validate_yaml(self, request: Request) -> Response:
        """Parse the card's YAML front matter: a YAML error or a non-mapping is a 400, like on the Hub."""
        content = (await request.json()).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "The metadata must be a YAML mapping."})
        status = 400 if errors else 200
        return JSONResponse({"errors": errors, "warnings": []}, status_code=status)

    async def create_repo(self, request: Request) -> Response:
        self.require_auth(request)
        payload = await request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        with self.storage.lock:
            if (repo_type, repo_id) in self.storage.repos:
                repo = self.storage.repos[(repo_type, repo_id)]
                message = f"You already created this {repo_type} repo"
                return JSONResponse({"error": message, "url": self.repo_url(request, repo)}, status_code=409)
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created=time.time())
            files = {".gitattributes": self.storage.stored_file(GITATTRIBUTES, lfs=False)}
            commit = self.storage.new_commit(repo, None, "initial commit", "", files)
            repo.branches["main"] = commit.oid
            self.storage.repos[(repo_type, repo_id)] = repo
        return JSONResponse({"url": self.repo_url(request, repo), "name": repo_id, "id": commit.oid[:24]})

    async def delete_repo(self, request: Request) -> Response:
        self.require_auth(request)
        payload = await request.json()
        key = (payload.get("type") or "model", f"{payload.get('organization') or USER}/{payload['name']}")
        with self.storage.lock:
            if self.storage.repos.pop(key, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return Response(status_code=200)

    async def update_settings(self, request: Request) -> Response:
        repo = self.get_repo(request, write=True)
        payload = await request.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] != "public"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return JSONResponse({})

    async def repo_info(self, request: Request) -> Response:
        repo = self.get_repo(request)
        commit = repo.resolve(request.path_params.get("revision", "main"))
        blobs = self.truthy(request.query_params.get("blobs"))
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=stored.size, blobId=stored.blob_id)
                if stored.lfs:
                    sibling["lfs"] = {"size": stored.size, "sha256": stored.sha256, "pointerSize": stored.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": hub_date(commit.date),
            "createdAt": hub_date(repo.created),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(stored.size for stored in commit.files.values()),
        }
        if repo.repo_type == "space":
            info["sdk"] = "gradio"
        return JSONResponse(info)

    # -- reading trees, refs and history -------------------------------------------------------------------------

    async def tree(self, request: Request) -> Response:
        repo = self.get_repo(request)
        commit = repo.resolve(request.path_params["revision"])
        path = request.path_params.get("path", "").strip("/")
        if path and path in commit.files:
            raise HubError(400, f"{path} is a file, not a folder")
        entries = self.tree_entries(commit, path, recursive=self.truthy(request.query_params.get("recursive")))
        if path and not entries:
            raise HubError(404, f"Folder {path} not found at {commit.oid}", "EntryNotFound")
        if self.truthy(request.query_params.get("expand")):
            for entry in entries:
                entry["lastCommit"] = self.last_commit_json(repo, commit, entry["path"])
        return JSONResponse(entries)

    async def paths_info(self, request: Request) -> Response:
        repo = self.get_repo(request)
        commit = repo.resolve(request.path_params["revision"])
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), self.truthy((form.get("expand") or [""])[0])
        entries = []
        for path in paths:
            entry = self.path_json(commit, path.strip("/"))
            if entry is not None:
                if expand:
                    entry["lastCommit"] = self.last_commit_json(repo, commit, entry["path"])
                entries.append(entry)
        return JSONResponse(entries)

    async def refs(self, request: Request) -> Response:
        repo = self.get_repo(request)

        def refs_json(refs: dict[str, str], kind: str) -> list[dict]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid} for name, oid in sorted(refs.items())
            ]

        return JSONResponse(
            {
                "branches": refs_json(repo.branches, "heads"),
                "tags": refs_json(repo.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    async def commits(self, request: Request) -> Response:
        repo = self.get_repo(request)
        commit = repo.resolve(request.path_params["revision"])
        return JSONResponse(
            [
                {
                    "id": ancestor.oid,
                    "title": ancestor.title,
                    "message": ancestor.message,
                    "authors": [{"user": USER, "avatar": None}],
                    "date": hub_date(ancestor.date),
                }
                for ancestor in repo.history(commit)
            ]
        )

    async def branch(self, request: Request) -> Response:
        repo = self.get_repo(request, write=True)
        branch = request.path_params["branch"]
        payload = await request.json() if request.method == "POST" and await request.body() else {}
        with self.storage.lock:
            if request.method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Branch {branch} not found", "RevisionNotFound")
                del repo.branches[branch]
                return JSONResponse({})
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return JSONResponse({})

    async def tag(self, request: Request) -> Response:
        repo = self.get_repo(request, write=True)
        payload = await request.json() if request.method == "POST" else {}
        with self.storage.lock:
            if request.method == "DELETE":
                tag = request.path_params["revision"]
                if repo.tags.pop(tag, None) is None:
                    raise HubError(404, f"Tag {tag} not found", "RevisionNotFound")
                return JSONResponse({})
            commit = repo.resolve(request.path_params["revision"])
            tag = payload["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid
        return JSONResponse({})

    # -- uploads -------------------------------------------------------------------------------------------------

    async def preupload(self, request: Request) -> Response:
        repo = self.get_repo(request, write=True)
        if self.truthy(request.query_params.get("create_pr")):
            raise HubError(400, "Pull requests are not supported by the local test Hub")
        head = self.branch_head(repo, request.path_params["revision"])
        answers = []
        for item in (await request.json())["files"]:
            path, size, sample = item["path"], int(item["size"]), base64.b64decode(item["sample"])
            mode = "lfs" if is_lfs(path, size, sample) else "regular"
            existing = head.files.get(path)
            oid = None  # the client skips an unchanged file: same storage and same sha256 (LFS) or git blob id
            if existing is not None and existing.lfs == (mode == "lfs"):
                oid = existing.sha256 if existing.lfs else existing.blob_id
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": answers, "commitOid": head.oid})

    async def lfs_batch(self, request: Request) -> Response:
        self.get_repo(request, write=True)
        payload = await request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported by the local test Hub")
        base = str(request.base_url).rstrip("/")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], int(item["size"])
            answer: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.storage.has_blob(oid, size):
                nonce = secrets.token_urlsafe(16)
                with self.storage.lock:
                    self.storage.pending_uploads[nonce] = (oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{base}/lfs/upload/{nonce}", "header": {}},
                    "verify": {"href": f"{base}/lfs/verify", "header": {}},
                }
            objects.append(answer)
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")

    async def lfs_upload(self, request: Request) -> Response:
        """The basic-transfer PUT. Like a pre-signed S3 URL it carries no token: the nonce is the permission."""
        with self.storage.lock:
            expected = self.storage.pending_uploads.pop(request.path_params["nonce"], None)
        if expected is None:
            raise HubError(403, "Unknown or already used upload URL")
        data = await request.body()
        oid, size = expected
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match: expected {size} bytes with sha256 {oid}")
        self.storage.put_blob(data)
        return Response(status_code=200, headers={"ETag": f'"{oid}"'})

    async def lfs_verify(self, request: Request) -> Response:
        self.require_auth(request)
        payload = await request.json()
        if not self.storage.has_blob(payload["oid"], int(payload["size"])):
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        return JSONResponse({})

    async def commit(self, request: Request) -> Response:
        repo = self.get_repo(request, write=True)
        if self.truthy(request.query_params.get("create_pr")):
            raise HubError(400, "Pull requests are not supported by the local test Hub")
        branch = request.path_params["revision"]
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.storage.lock:
            head = self.branch_head(repo, branch)
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.oid.startswith(parent_commit):
                raise HubError(412, f"A commit has happened since {parent_commit}: the head of {branch} is {head.oid}")
            files = dict(head.files)
            for line in lines[1:]:
                self.apply_operation(files, line["key"], line["value"])
            commit = self.storage.new_commit(
                repo, head, header.get("summary", ""), header.get("description", ""), files
            )
            repo.branches[branch] = commit.oid
        return JSONResponse(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.repo_url(request, repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def apply_operation(self, files: dict[str, StoredFile], key: str, value: dict) -> None:
        path = value["path"].strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
            files[path] = self.storage.stored_file(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            oid, size = value["oid"], value.get("size")
            if value.get("algo", "sha256") != "sha256" or not self.storage.has_blob(oid, size):
                raise HubError(
                    422,
                    f"Your push was rejected because an LFS pointer pointed to a file that does not "
                    f"exist ({path}: sha256 {oid})",
                )
            size = (self.storage.blob_dir / oid).stat().st_size
            files[path] = StoredFile(sha256=oid, size=size, lfs=True, blob_id=git_blob_id(lfs_pointer(oid, size)))
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            inside = [known for known in files if known.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for known in inside:
                del files[known]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    # -- downloads -----------------------------------------------------------------------------------------------

    async def resolve(self, request: Request) -> Response:
        repo = self.get_repo(request)
        commit = repo.resolve(request.path_params["revision"])
        path = request.path_params["path"]
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = self.storage.read_blob(stored.sha256)
        with self.storage.lock:
            cut = self.storage.truncations.get((repo.repo_type, repo.repo_id, path))
        if cut is not None:
            data = data[:cut]
        etag = f'"{stored.sha256 if stored.lfs else stored.blob_id}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        status, body = 200, data
        if "range" in request.headers:
            start, end = self.byte_range(request.headers["range"], len(data))
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        return Response(b"" if request.method == "HEAD" else body, status_code=status, headers=headers)

    @staticmethod
    def byte_range(header: str, total: int) -> tuple[int, int]:
        """The inclusive (start, end) of a single `bytes=` range; 416 when it lies outside the file."""
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if match is None or match.groups() == ("", ""):
            raise HubError(400, f"Unsupported Range header {header!r}")
        first, last = match.groups()
        if first == "":
            start, end = max(total - int(last), 0), total - 1
        else:
            start, end = int(first), min(int(last), total - 1) if last else total - 1
        if start >= total or start > end:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
        return start, end


class LocalHub:
    """A local Hub on `127.0.0.1:port`: `start()` serves it from a background thread, `stop()` takes it down
    (downloads then fail to connect, as offline), and a later `start()` serves the same repos again."""

    def __init__(self, port: int, root: Path, token: str | None = None) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.token = token or f"hf_localtesthub{secrets.token_hex(8)}"
        self.storage = HubStorage(root)
        self.app = LocalHubApp(self.storage, self.token).app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served so far, oldest first."""
        return self.storage.request_log

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            # The clients pool connections; uvicorn's default 5 s keep-alive closes an idle one just as a client may
            # reuse it ("Connection reset by peer"). The real Hub keeps connections much longer.
            timeout_keep_alive=600,
        )
        self._server = uvicorn.Server(config)
        reserved = _RESERVED_SOCKETS.pop(self.port, None)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [reserved] if reserved else None}, name="local-hub", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The local Hub could not start on {self.endpoint} (is the port taken?).")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("The local Hub did not shut down within 10 s.")
        self._server = self._thread = None

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Take the Hub down for the body of a `with` block (as if offline), then serve it again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @property
    def api(self):
        """An `HfApi` for this Hub, authenticated with the session's token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def truncate(self, repo_id: str, path: str, num_bytes: int, repo_type: str = "model") -> None:
        """Serve only the first `num_bytes` of `path` from now on, at every revision, with headers (Content-Length,
        X-Linked-Size) that match the short body, so the client stores the short file without complaint. Tree and
        paths-info listings keep the true size. The ETag stays the true file's, so a client that has the file
        cached already does not download it again: truncate before the first download (or use a fresh cache_dir
        or force_download). Undo with `restore`."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}.")
        with self.storage.lock:
            self.storage.truncations[(repo_type, repo_id, path)] = num_bytes

    def restore(self, repo_id: str, path: str, repo_type: str = "model") -> None:
        """Undo `truncate`."""
        with self.storage.lock:
            self.storage.truncations.pop((repo_type, repo_id, path), None)
