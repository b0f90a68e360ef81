"""A loopback imitation of the Hugging Face hub's HTTP API, enough for huggingface-hub's downloads.

The real hub can't be reached from the test machines, so the tests start this server
(`http.server` in a thread on 127.0.0.1, port 0), point `HF_ENDPOINT` at it and let the real
huggingface-hub client talk to it. It speaks what huggingface-hub 2.4 asks for (see
shared/FIELD-NOTES.md "The hub's API"):

    GET  /api/models/{repo}[/revision/{rev}]          repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}?recursive=...  the file listing, with lfs sha256 and size
    HEAD /{repo}/resolve/{rev}/{path}                 X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{path}                 the bytes, honouring Range

and records every request, so a test can count traffic. Faults a test can switch on per file:
serve other bytes than the listing promises, cut the first response short, or stall mid-body.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the hub lists as `oid` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    """One file of a fake repo, and the faults to play when it is downloaded."""

    content: bytes
    lfs: bool
    served: bytes | None = None  # bytes sent instead of `content` (listing still describes content)
    cut_once_at: int | None = None  # first GET: promise everything, send this many bytes, hang up
    stall_at: int | None = None  # GET: send this many bytes, then wait for `release`
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def body(self) -> bytes:
        return self.content if self.served is None else self.served


@dataclass
class FakeRepo:
    repo_id: str
    sha: str
    files: dict[str, FakeFile]
    # Entries only in the listing (no content): to test hostile names such as "../x".
    extra_listing: list[dict] = field(default_factory=list)

    def listing(self) -> list[dict]:
        out = []
        for path, f in sorted(self.files.items()):
            entry = {"type": "file", "path": path, "size": len(f.content)}
            if f.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {len(f.content)}\n"
                entry["oid"] = git_blob_sha1(pointer.encode())
                entry["lfs"] = {
                    "oid": f.sha256,
                    "size": len(f.content),
                    "pointerSize": len(pointer),
                }
            else:
                entry["oid"] = git_blob_sha1(f.content)
            out.append(entry)
        return out + list(self.extra_listing)


@dataclass
class Request:
    method: str
    path: str
    range: str | None


class FakeHub:
    """The server: `with FakeHub() as hub: hub.add_repo(...); ... hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, sha: str | None = None
    ) -> FakeRepo:
        repo = FakeRepo(
            repo_id,
            sha or secrets.token_hex(20),
            {p: FakeFile(data, lfs=p.endswith(LFS_SUFFIXES)) for p, data in files.items()},
        )
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kwargs) -> FakeRepo:
        """A repo holding every file of a local folder (a model checkpoint built by a test)."""
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.add_repo(repo_id, files, **kwargs)

    # -- traffic ---------------------------------------------------------------------------

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def hub_requests(self) -> list[Request]:
        """Requests other than huggingface-hub's agent-harness registry look-up."""
        with self._lock:
            return [r for r in self.requests if r.path != "/api/agent-harnesses"]

    def file_gets(self, path_suffix: str = "") -> list[Request]:
        return [
            r
            for r in self.hub_requests()
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(path_suffix)
        ]

    # -- server ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for repo in self.repos.values():
            for f in repo.files.values():
                f.release.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    # -- routing ---------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append(Request(method, path, self.headers.get("Range")))
        if m := _INFO.match(path):
            return self._info(m.group(1), m.group(2) or "main")
        if m := _TREE.match(path):
            return self._tree(m.group(1), m.group(2))
        if m := _RESOLVE.match(path):
            return self._resolve(method, m.group(1), m.group(2), m.group(3))
        self._error(404, "EntryNotFound", "not found")

    def _repo(self, repo_id: str, rev: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        siblings = [{"rfilename": e["path"]} for e in repo.listing()]
        self._json(
            {
                "_id": repo.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "disabled": False,
                "gated": False,
                "siblings": siblings,
            },
            {"X-Repo-Commit": repo.sha},
        )

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is not None:
            self._json(repo.listing())

    def _resolve(self, method: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            return
        body = f.body
        headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["ETag"] = f'"{git_blob_sha1(b"pointer " + f.sha256.encode())}"'
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(len(f.content))
        else:
            headers["ETag"] = f'"{git_blob_sha1(f.content)}"'
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = int(m.group(1))
            if start >= len(body):
                self._error(416, None, "range not satisfiable")
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        part = body[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if method == "HEAD":
            return
        if f.cut_once_at is not None:
            cut, f.cut_once_at = f.cut_once_at, None
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if f.stall_at is not None and f.stall_at > start:
            self.wfile.write(part[: f.stall_at - start])
            self.wfile.flush()
            f.stalled.set()
            f.release.wait(timeout=60)
            self.close_connection = True
            return
        self.wfile.write(part)

    # -- replies ---------------------------------------------------------------------------

    def _json(self, data: object, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status: int, code: str | None, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
