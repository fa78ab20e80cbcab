"""A small Hugging Face Hub look-alike on 127.0.0.1, for tests that run the real client.

The tests point the real ``huggingface_hub`` client at this server through
``HF_ENDPOINT`` instead of mocking the client's Python functions, so they catch
any request the client really makes.  It answers exactly the endpoints that
``create_repo``, ``create_branch``, ``create_commit`` (preupload, LFS batch with
the *basic* transfer, NDJSON commit), ``whoami``, ``repo_info``,
``list_repo_tree``, ``snapshot_download`` / ``hf_hub_download`` and the
client's telemetry call use in huggingface_hub 2.4, keeps repositories in
memory, and records every request so a test can assert that one commit was made
or that no request was made at all.

The client must run with ``HF_HUB_DISABLE_XET=1``: with ``hf_xet`` installed it
otherwise sends LFS files to a Xet CAS service, which this server does not speak.

It is bounded: it listens on loopback only, on a random port, refuses bodies over
``MAX_BODY`` bytes and shuts itself down after ``lifetime_s`` seconds even if the
test forgot to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

MAX_BODY = 256 * 1024 * 1024
#: Paths the real Hub stores through LFS (its default .gitattributes) or any file this large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"

_REPO = r"(?P<repo>[^/]+/[^/]+?)"


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub stores this file through LFS rather than as a plain git blob."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def git_blob_id(data: bytes) -> str:
    """The git object id of a regular file, as the Hub reports it (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its bytes and whether it went through LFS."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        """What the Hub sends as the file's ETag: sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else git_blob_id(self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def head(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        out, commit = [], self.head(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


def write_hf_cache(cache_dir: str | Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> Path:
    """Lay ``files`` out in a Hugging Face cache exactly as ``hf_hub_download`` does; returns the snapshot folder.

    ``models--{org}--{name}/blobs/<etag>`` holds each file once (the etag is the
    sha256 for LFS files and the git blob id otherwise), ``snapshots/<commit>/<path>``
    is a relative symlink to its blob and ``refs/<ref>`` holds the commit hash.
    """
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    for path, data in files.items():
        stored = StoredFile(data, is_lfs(path, len(data)))
        blob = storage / "blobs" / stored.etag
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


class HubError(Exception):
    """An HTTP error answer, with the Hub's ``X-Error-Code`` where the client relies on one."""

    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class FakeHub:
    """In-memory Hub.  ``tokens`` maps a token to ``(user name, namespaces it may write to)``."""

    def __init__(self, tokens: dict[str, tuple[str, set[str]]], lifetime_s: float = 120.0):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Publish ``files`` as ``repo_id`` (one commit on main, LFS by name or size); returns the commit."""
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            stored = {path: StoredFile(data, is_lfs(path, len(data))) for path, data in files.items()}
            return self._new_commit(repo, "main", "add files", stored).oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].head(revision)
        return {path: f.data for path, f in commit.files.items()}

    # -- auth --------------------------------------------------------------------------------
    def _user(self, headers) -> tuple[str, set[str]] | None:
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _require_write(self, headers, namespace: str) -> None:
        user = self._user(headers)
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        _, writable = user
        if namespace not in writable:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")

    def _repo(self, headers, repo_id: str, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        if write:
            self._require_write(headers, namespace)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if repo.private and not write:
            user = self._user(headers)
            if user is None or namespace not in user[1]:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    @staticmethod
    def _head(repo: Repo, revision: str) -> Commit:
        commit = repo.head(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, StoredFile]) -> Commit:
        self._commit_counter += 1
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(f"{repo.repo_id}:{self._commit_counter}:{message}".encode()).hexdigest()
        commit = Commit(oid, parent, message, files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    # -- endpoints ---------------------------------------------------------------------------
    def whoami(self, req):
        user = self._user(req.headers)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        name, writable = user
        orgs = [{"name": ns, "type": "org"} for ns in sorted(writable - {name})]
        return 200, {"type": "user", "name": name, "orgs": orgs, "auth": {"type": "access_token"}}

    def agent_harnesses(self, req):
        """The registry the client's telemetry fetches when HF_HUB_DISABLE_TELEMETRY is not set: empty."""
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def create_repo(self, req):
        body = req.json()
        user = self._user(req.headers)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = body.get("organization") or user[0]
        self._require_write(req.headers, namespace)
        repo_id = f"{namespace}/{body['name']}"
        if body.get("type", "model") != "model":
            raise HubError(400, "this test Hub only hosts models")
        if repo_id in self.repos:
            # The client reads "url" from this 409 answer when exist_ok=True.
            raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_id, private)
        self._new_commit(repo, "main", "initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, req):
        content = req.json().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def model_info(self, req, repo, revision="main"):
        repo = self._repo(req.headers, repo)
        commit = self._head(repo, unquote(revision))
        siblings = [{"rfilename": p, "size": len(f.data), "blobId": git_blob_id(f.data)} for p, f in commit.files.items()]
        return 200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}

    def list_tree(self, req, repo, revision, path=None):
        repo = self._repo(req.headers, repo)
        commit = self._head(repo, unquote(revision))
        entries = []
        for p, f in sorted(commit.files.items()):
            entry = {"type": "file", "path": p, "size": len(f.data), "oid": git_blob_id(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        return 200, entries

    def list_refs(self, req, repo):
        repo = self._repo(req.headers, repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        return 200, {"branches": branches, "converts": [], "tags": []}

    def create_branch(self, req, repo, branch):
        repo = self._repo(req.headers, repo, write=True)
        branch = unquote(branch)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = (req.json() or {}).get("startingPoint") or "main"
        repo.branches[branch] = self._head(repo, start).oid
        return 200, {}

    def preupload(self, req, repo, revision):
        repo = self._repo(req.headers, repo, write=True)
        head = self._head(repo, unquote(revision))
        answers = []
        for f in req.json()["files"]:
            lfs = is_lfs(f["path"], f["size"])
            existing = head.files.get(f["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else git_blob_id(existing.data))
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": answers, "commitOid": head.oid}

    def lfs_batch(self, req, repo):
        self._repo(req.headers, repo, write=True)
        body = req.json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(422, "this test Hub only accepts basic LFS uploads")
        objects = []
        for obj in body["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/__lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/__lfs/{obj['oid']}/verify"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, req, oid):
        data = req.body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded bytes do not hash to {oid}")
        self.lfs_objects[oid] = data
        return 200, {}

    def lfs_verify(self, req, oid):
        body = req.json()
        if self.lfs_objects.get(oid) is None or len(self.lfs_objects[oid]) != body.get("size"):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return 200, {}

    def commit(self, req, repo, revision):
        repo = self._repo(req.headers, repo, write=True)
        branch = unquote(revision)
        head = self._head(repo, branch)
        if branch not in repo.branches:
            raise HubError(400, f"can only commit on a branch, not {branch}")
        lines = [json.loads(line) for line in req.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None or len(data) != value.get("size", len(data)):
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"unsupported commit operation {key}")
        commit = self._new_commit(repo, branch, lines[0]["value"]["summary"], files)
        return 200, {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                     "success": True, "pullRequestUrl": None}

    def resolve(self, req, repo, revision, path):
        repo = self._repo(req.headers, repo)
        commit = self._head(repo, unquote(revision))
        stored = commit.files.get(unquote(path))
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"'}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.etag}"', "X-Linked-Size": str(len(stored.data))})
        return 200, stored.data, headers

    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", "model_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", "list_tree"),
        ("GET", rf"/api/models/{_REPO}/refs", "list_refs"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("GET", rf"/api/models/{_REPO}", "model_info"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/__lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/__lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
        ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def dispatch(self, req) -> tuple[int, bytes, dict[str, str]]:
        """Route one request; every answer is ``(status, body bytes, extra headers)``."""
        path = urlsplit(req.path).path
        with self._lock:
            self.requests.append((req.command, path))
            for method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, path)
                if method == req.command and match:
                    try:
                        status, body, *extra = getattr(self, name)(req, **match.groupdict())
                    except HubError as err:
                        headers = {"X-Error-Message": err.message}
                        if err.code:
                            headers["X-Error-Code"] = err.code
                        return err.status, json.dumps({"error": err.message, **err.body}).encode(), headers
                    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                    return status, raw, (extra[0] if extra else {"Content-Type": "application/json"})
            self.unhandled.append((req.command, path))
        return 404, json.dumps({"error": f"no route for {req.command} {path}"}).encode(), {}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def body(self) -> bytes:
            return self._body

        def json(self):
            raw = self.body()
            return json.loads(raw) if raw else {}

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        raise HubError(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise HubError(413, "request body too large")
            return self.rfile.read(length)

        def _serve(self) -> None:
            # One handler serves every request of a keep-alive connection: read this request's
            # whole body first so the stream stays in sync.
            try:
                self._body = self._read_body()
                status, raw, headers = hub.dispatch(self)
            except HubError as err:
                status, raw, headers = err.status, json.dumps({"error": err.message}).encode(), {}
                self.close_connection = True
            except Exception as err:  # a bug in this server: answer 500 rather than hang up
                status, raw, headers = 500, json.dumps({"error": repr(err)}).encode(), {}
                hub.unhandled.append((self.command, f"{self.path}: {err!r}"))
            self.send_response(status, HTTPStatus(status).phrase)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

        do_GET = do_POST = do_PUT = do_HEAD = _serve

    return Handler
