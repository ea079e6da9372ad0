"""A local, in-memory stand-in for the Hugging Face Hub HTTP API, for tests.

What is fake: the server. ``LocalHub`` implements the subset of the huggingface.co
HTTP API that ``HfApi.create_repo``, ``HfApi.upload_folder`` / ``create_commit``,
``hf_hub_download`` and ``snapshot_download`` use (as of huggingface_hub 2.4):

* ``POST /api/repos/create``                                  create a repo (409 if it exists)
* ``POST /api/validate-yaml``                                 README.md metadata check (always ok)
* ``GET  /api/whoami-v2``                                     the fake user behind any token
* ``GET  /api/{models,datasets,spaces}/{repo_id}[/revision/{rev}]``  repo info ("sha", "siblings")
* ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]``         file listing (snapshot_download)
* ``POST /api/{type}s/{repo_id}/preupload/{rev}``             "regular" vs "lfs" upload mode per file
* ``POST /{repo_id}.git/info/lfs/objects/batch``              git-LFS batch API, "basic" transfer
* ``PUT  /__lfs__/upload/...`` and ``POST /__lfs__/verify/...``  where the batch API sends the bytes
* ``POST /api/{type}s/{repo_id}/commit/{rev}``                NDJSON commit (header/file/lfsFile/deleted*)
* ``HEAD|GET /{repo_id}/resolve/{rev}/{path}``                file download with the Hub's headers

Repos, commits and file contents live in memory. Each commit gets a 40-hex id; branches
are "main" (created with the repo, holding a ``.gitattributes`` like on the real Hub) and
``refs/pr/N`` for ``create_pr=True`` commits. LFS objects are stored per repo by sha256.
Anything else answers 404 with an ``X-Error-Message`` naming the missing route.

What is real: the ``huggingface_hub`` client, unmodified, talking HTTP to this server
(``HfApi(endpoint=hub.endpoint)``, ``hf_hub_download(..., endpoint=hub.endpoint)``).
One client switch matters: with ``hf_xet`` installed the client uploads through the Xet
storage protocol, which this server does not implement, so tests must make
``huggingface_hub.constants.HF_HUB_DISABLE_XET`` true (the fixtures in ``fake_hub.fixtures``
do) so that uploads take the git-LFS path.

Failure modes: set ``hub.fail_all = True`` and every request answers HTTP 500;
``refused_endpoint()`` gives an ``http://127.0.0.1:PORT`` where nothing listens.

The server binds 127.0.0.1 on an ephemeral port, serves from a daemon thread and bounds
request bodies (``max_body_bytes``); ``stop()`` closes the listening socket and any open
keep-alive connections.
"""

from __future__ import annotations

import base64
import binascii
import collections
import fnmatch
import hashlib
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space")

# The Hub's default .gitattributes: files matching these patterns are stored with LFS.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)  # fmt: skip
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
# Like the Hub, large files go to LFS even when no pattern matches (binary files too, see _looks_binary).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _utc_iso(ts: float) -> str:
    # The client parses dates with '%Y-%m-%dT%H:%M:%S.%fZ'.
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_lfs_path(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    # git matches slash-less patterns against the basename, the others against the whole path.
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in LFS_PATTERNS)


def _looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # The sample is the first 512 bytes: a multi-byte character cut at the end is still text.
        return err.reason != "unexpected end of data"
    return False


@dataclass(frozen=True)
class HubFile:
    """One file of one commit. ``lfs`` files were committed as LFS pointers (bytes kept here)."""

    data: bytes
    lfs: bool
    sha256: str
    blob_id: str  # git oid: of the content for regular files, of the pointer file for LFS files
    pointer_size: int | None

    @classmethod
    def make(cls, data: bytes, *, lfs: bool) -> HubFile:
        sha256 = hashlib.sha256(data).hexdigest()
        if not lfs:
            return cls(data, False, sha256, git_blob_sha1(data), None)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(data, True, sha256, git_blob_sha1(pointer), len(pointer))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid; the client compares it to its local one."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, HubFile]
    timestamp: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    pr_count: int = 0

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit id -> commit (None if unknown)."""
        oid = self.branches.get(revision)
        if oid is None and _COMMIT_RE.match(revision):
            oid = revision
        return self.commits.get(oid) if oid else None

    def head(self, branch: str = DEFAULT_BRANCH) -> Commit:
        return self.commits[self.branches[branch]]

    def files(self, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """Path -> content at ``revision`` (for assertions)."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} in {self.repo_id}")
        return {path: f.data for path, f in commit.files.items()}

    def add_commit(self, parent: Commit | None, title: str, description: str, files: dict[str, HubFile]) -> Commit:
        now = time.time()
        digest = hashlib.sha1()
        # Unique even for identical trees (git commits differ by timestamp too).
        for part in (parent.oid if parent else "", title, description, repr(time.time_ns()), str(len(self.commits))):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].blob_id}\0".encode())
        commit = Commit(digest.hexdigest(), parent.oid if parent else None, title, description, dict(files), now)
        self.commits[commit.oid] = commit
        return commit


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # as sent, query string included
    authorization: str | None


class HubError(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code header where the client keys on it."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _BodyTooLarge(Exception):
    pass


# repo_id is "name" or "namespace/name"; the regex engine backtracks to the right split.
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API = r"^/api/(?P<plural>models|datasets|spaces)/" + _REPO
# Dataset and space repos are prefixed in git/resolve URLs; models are not.
_PREFIXED = r"^/(?:(?P<prefix>datasets|spaces)/)?" + _REPO
# Where the LFS batch answer sends uploads (this server's own URLs, not the Hub's).
_LFS_OBJECT = r"(?P<type>model|dataset|space)/" + _REPO + r"/(?P<oid>[0-9a-f]{64})$"


class LocalHub:
    """In-memory Hub server. ``start()`` it, point the client at ``endpoint``, ``stop()`` it.

    Attributes for tests:
        fail_all: when true, every request answers HTTP 500 (checked per request).
        repos: ``{(repo_type, repo_id): Repo}``; prefer ``repo(repo_id)``.
        requests: the last requests received (``RecordedRequest``), oldest first.
    """

    def __init__(self, *, user: str = "test-user", max_body_bytes: int = 256 * 1024 * 1024):
        self.user = user
        self.max_body_bytes = max_body_bytes
        self.fail_all = False
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=10_000)
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub already started")
        self._server = _Server(self)
        # A short poll interval keeps stop() (which waits for the serving loop to notice) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        logger.debug("LocalHub listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- state access ----------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit


def refused_endpoint() -> str:
    """An ``http://127.0.0.1:PORT`` endpoint where nothing listens (connections are refused).

    The port was free when probed; another process could take it afterwards, which is
    unlikely within one test.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def track(self, conn: socket.socket, active: bool) -> None:
        with self._connections_lock:
            (self._connections.add if active else self._connections.discard)(conn)

    def close_connections(self) -> None:
        # Handler threads of keep-alive connections block on the next request line:
        # shutting their sockets down makes them return.
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: keep-alive like the real Hub (the client pools connections); every answer has a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _Server

    # -- plumbing --------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub.requests.append(RecordedRequest(method, self.path, self.headers.get("Authorization")))
        try:
            # Always read the body first, even to fail: answering before the client finished
            # sending would reset the connection and the client would see a network error.
            body = self._read_body()
        except _BodyTooLarge:
            self.close_connection = True
            self._send_json(413, {"error": f"Request body over {hub.max_body_bytes} bytes"})
            return
        except (ValueError, OSError) as err:
            self.close_connection = True
            self._send_json(400, {"error": f"Unreadable request body: {err}"})
            return

        if hub.fail_all:
            self._send_json(500, {"error": "LocalHub: fail_all is set"})
            return

        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = body
        for route_method, pattern, handler in _ROUTES:
            if route_method != method:
                continue
            match = pattern.match(url.path)
            if match is None:
                continue
            try:
                handler(self, {k: unquote(v) for k, v in match.groupdict().items() if v is not None})
            except HubError as err:
                self._send_error(err)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away mid-answer
            except Exception:
                logger.exception("LocalHub: error while handling %s %s", method, self.path)
                self._send_json(500, {"error": "LocalHub internal error"})
            return
        logger.warning("LocalHub: no route for %s %s", method, url.path)
        self._send_error(HubError(404, f"LocalHub does not implement {method} {url.path}"))

    def _read_body(self) -> bytes:
        limit = self.server.hub.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # The client streams file objects (LFS PUT) with chunked encoding when it cannot size them.
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise _BodyTooLarge
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)  # CRLF closing the chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise _BodyTooLarge
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        self._send(status, json.dumps(payload).encode(), content_type, headers)

    def _send_error(self, err: HubError) -> None:
        # Header values must be one latin-1 line: escape anything else (file names can be unicode).
        header_message = err.message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
        headers = {"X-Error-Message": header_message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json(err.status, {"error": err.message}, headers)

    def _base_url(self) -> str:
        # Build URLs with the host the client used, so that they parse against its endpoint.
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.server.hub.port}'}"

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self._base_url()}/{prefix}{repo.repo_id}"

    # -- routes ----------------------------------------------------------------------------

    def _create_repo(self, _: dict[str, str]) -> None:
        payload = self._json_body()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo name or type: {name!r}, {repo_type!r}")
        repo_id = f"{org}/{name}" if org else name
        hub = self.server.hub
        with hub._lock:
            existing = hub.repos.get((repo_type, repo_id))
            if existing is not None:
                self._send_json(
                    409, {"error": f"You already created this {repo_type} repo", "url": self._repo_url(existing)}
                )
                return
            private = payload.get("visibility") == "private" or payload.get("private") is True
            repo = Repo(repo_type, repo_id, private, time.time())
            initial = repo.add_commit(
                None, "initial commit", "", {".gitattributes": HubFile.make(DEFAULT_GITATTRIBUTES, lfs=False)}
            )
            repo.branches[DEFAULT_BRANCH] = initial.oid
            hub.repos[(repo_type, repo_id)] = repo
        self._send_json(200, {"url": self._repo_url(repo), "name": repo_id, "id": initial.oid[:24]})

    def _validate_yaml(self, _: dict[str, str]) -> None:
        self._send_json(200, {"errors": [], "warnings": []})

    def _whoami(self, _: dict[str, str]) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.server.hub.user
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def _repo_info(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        repo_type = groups["plural"][:-1]
        with hub._lock:
            repo = hub._get_repo(repo_type, groups["repo"])
            commit = hub._get_commit(repo, groups.get("rev", DEFAULT_BRANCH))
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                f = commit.files[path]
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else hub.user,
            "sha": commit.oid,
            "lastModified": _utc_iso(commit.timestamp),
            "createdAt": _utc_iso(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo.repo_id
        self._send_json(200, info)

    def _tree(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._get_repo(groups["plural"][:-1], groups["repo"])
            commit = hub._get_commit(repo, groups["rev"])
        base = groups.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        files, folders = [], set()
        for path, f in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # Every folder between `base` and the file is listed (only the first level if not recursive).
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                files.append(entry)
        if base and not files and not folders:
            raise HubError(404, f"Entry not found: {base}", code="EntryNotFound")
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}/{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._send_json(200, dirs + files)

    def _preupload(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._get_repo(groups["plural"][:-1], groups["repo"])
            commit = hub._get_commit(repo, groups["rev"])
        answers = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = _is_lfs_path(path) or size >= LFS_SIZE_THRESHOLD or _looks_binary(sample)
            existing = commit.files.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,  # gitIgnore is not evaluated
                    # Lets the client skip files whose content is already there.
                    "oid": existing.oid if existing else None,
                }
            )
        self._send_json(200, {"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        repo_type = groups.get("prefix", "models")[:-1]
        with hub._lock:
            repo = hub._get_repo(repo_type, groups["repo"])
            stored = set(repo.lfs_objects)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(422, "LocalHub only implements the LFS 'upload' operation")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _OID_RE.match(oid) or not isinstance(size, int):
                raise HubError(422, f"Invalid LFS object: {obj!r}")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in stored:  # no "actions" tells the client the object is already there
                where = f"{repo_type}/{repo.repo_id}/{oid}"
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self._base_url()}/__lfs__/upload/{where}"},
                    "verify": {"href": f"{self._base_url()}/__lfs__/verify/{where}"},
                }
            objects.append(answer)
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        self._send_json(200, answer, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        oid = groups["oid"]
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        with hub._lock:
            repo = hub._get_repo(groups["type"], groups["repo"])
            repo.lfs_objects[oid] = self.body
        # S3 answers uploads with the MD5 ETag; the client only reads it for multipart uploads.
        self._send(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._get_repo(groups["type"], groups["repo"])
            data = repo.lfs_objects.get(groups["oid"])
        expected = self._json_body().get("size")
        if data is None or (expected is not None and expected != len(data)):
            raise HubError(404, f"LFS object {groups['oid']} not found (or wrong size)")
        self._send_json(200, {"oid": groups["oid"], "size": len(data)})

    def _commit(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0]["value"]
        with hub._lock:
            repo = hub._get_repo(groups["plural"][:-1], groups["repo"])
            revision = groups["rev"]
            if revision not in repo.branches:
                raise HubError(404, f"Cannot commit to {revision!r}: not a branch", code="RevisionNotFound")
            parent = repo.head(revision)
            expected_parent = header.get("parentCommit")
            if expected_parent and not parent.oid.startswith(expected_parent):
                raise HubError(412, f"A commit has happened since {expected_parent}. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                self._apply_operation(repo, files, line.get("key"), line.get("value") or {})
            commit = repo.add_commit(parent, header.get("summary", ""), header.get("description", ""), files)
            pr_url = None
            if self.query.get("create_pr", "").lower() in ("1", "true"):
                repo.pr_count += 1
                repo.branches[f"refs/pr/{repo.pr_count}"] = commit.oid
                pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
            else:
                repo.branches[revision] = commit.oid
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    @staticmethod
    def _apply_operation(repo: Repo, files: dict[str, HubFile], key: str | None, value: dict[str, Any]) -> None:
        path = str(value.get("path", "")).strip("/")
        if not path:
            raise HubError(400, f"Commit operation {key!r} without a path")
        if key == "file":
            content = value.get("content", "")
            try:
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            except binascii.Error as err:
                raise HubError(400, f"Invalid base64 content for {path}") from err
            files[path] = HubFile.make(data, lfs=False)
        elif key == "lfsFile":
            data = repo.lfs_objects.get(value.get("oid", ""))
            if data is None:
                raise HubError(400, f"LFS object {value.get('oid')} for {path} was not uploaded")
            files[path] = HubFile.make(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def _resolve(self, groups: dict[str, str]) -> None:
        hub = self.server.hub
        repo_type = groups.get("prefix", "models")[:-1]
        with hub._lock:
            repo = hub._get_repo(repo_type, groups["repo"])
            commit = hub._get_commit(repo, groups["rev"])
        f = commit.files.get(groups["path"])
        if f is None:
            # X-Repo-Commit on the 404 lets the client cache the file's absence for that commit.
            raise HubError(
                404, f"Entry not found: {groups['path']}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        # The real Hub answers LFS files with a redirect to a CDN; this server serves them
        # directly, with the headers the client reads (X-Linked-* win over ETag / Content-Length).
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        else:
            headers["ETag"] = f'"{f.blob_id}"'
        status, data = 200, f.data
        byte_range = self._parse_range(self.headers.get("Range"), f.size)
        if byte_range is not None:  # the client asks for a range when it resumes a download
            start, end = byte_range
            status, data = 206, f.data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self._send(status, data, "application/octet-stream", headers)

    @staticmethod
    def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (value or "").strip())
        if size == 0 or match is None or (match.group(1) == "" and match.group(2) == ""):
            return None
        if match.group(1) == "":  # suffix range: the last N bytes
            start, end = max(size - int(match.group(2)), 0), size - 1
        else:
            start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
        if start > end:
            raise HubError(416, f"Range {value} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return start, end


_ROUTES: list[tuple[str, re.Pattern[str], Callable[[_Handler, dict[str, str]], None]]] = [
    ("POST", re.compile(r"^/api/repos/create$"), _Handler._create_repo),
    ("POST", re.compile(r"^/api/validate-yaml$"), _Handler._validate_yaml),
    ("GET", re.compile(r"^/api/whoami-v2$"), _Handler._whoami),
    ("GET", re.compile(_API + r"(?:/revision/(?P<rev>[^/]+))?$"), _Handler._repo_info),
    ("GET", re.compile(_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), _Handler._tree),
    ("POST", re.compile(_API + r"/preupload/(?P<rev>[^/]+)$"), _Handler._preupload),
    ("POST", re.compile(_API + r"/commit/(?P<rev>[^/]+)$"), _Handler._commit),
    ("POST", re.compile(_PREFIXED + r"\.git/info/lfs/objects/batch$"), _Handler._lfs_batch),
    ("PUT", re.compile(r"^/__lfs__/upload/" + _LFS_OBJECT), _Handler._lfs_upload),
    ("POST", re.compile(r"^/__lfs__/verify/" + _LFS_OBJECT), _Handler._lfs_verify),
    ("GET", re.compile(_PREFIXED + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), _Handler._resolve),
    ("HEAD", re.compile(_PREFIXED + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), _Handler._resolve),
]  # fmt: skip
