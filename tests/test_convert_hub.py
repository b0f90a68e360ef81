"""`ondevice convert REPO_ID`: fetched with huggingface-hub from a loopback imitation of the hub
(only config, tokenizer and safetensors files; never the pickle), cached, and converted again
with `HF_HUB_OFFLINE=1` and the hub gone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from phi2_fixtures import make_tiny_phi2

REPO = "tiny-org/tiny-phi-2"
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """The few endpoints snapshot_download uses (see FIELD-NOTES), serving one folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.requests: list[str] = []
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def entry(self, name: str) -> dict:
        data = self.files[name]
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        item = {"type": "file", "path": name, "size": len(data), "oid": git_oid}
        if name.endswith((".safetensors", ".bin")):
            item["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        return item


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj: object) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        hub = self.server
        path = unquote(urlparse(self.path).path)
        hub.requests.append(f"{self.command} {path}")
        if path in (f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/revision/{SHA}"):
            siblings = [{"rfilename": n} for n in hub.files]
            return self._json({"id": REPO, "sha": SHA, "siblings": siblings})
        if path == f"/api/models/{REPO}/tree/{SHA}":
            return self._json([hub.entry(n) for n in hub.files])
        for rev in (SHA, "main"):
            prefix = f"/{REPO}/resolve/{rev}/"
            if path.startswith(prefix) and path[len(prefix) :] in hub.files:
                name = path[len(prefix) :]
                item = hub.entry(name)
                headers = {"X-Repo-Commit": SHA, "ETag": f'"{item["oid"]}"'}
                if "lfs" in item:
                    headers.update(
                        {
                            "X-Linked-Etag": f'"{item["lfs"]["oid"]}"',
                            "X-Linked-Size": str(item["size"]),
                        }
                    )
                return self._send(200, hub.files[name], headers, head)
        if path.startswith("/api/models/"):  # as the hub answers for a repo it doesn't have
            return self._send(
                401, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head
            )
        self._send(404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, head)


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory) -> Path:
    folder = make_tiny_phi2(tmp_path_factory.mktemp("hub-repo") / "repo")
    # a repo that also ships a pickle: it must never be fetched
    (folder / "pytorch_model.bin").write_bytes(b"not to be downloaded")
    return folder


@pytest.fixture
def hub(repo_folder):
    server = FakeHub(repo_folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ondevice", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hub_repo_is_fetched_once_then_works_offline(hub, tmp_path):
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        env.pop(key, None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        NO_COLOR="1",
    )
    first = run_cli(["convert", REPO, "-o", str(tmp_path / "a.gguf"), "--outtype", "f32"], env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF"
    fetched = {
        r.rsplit("/", 1)[-1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r
    }
    assert (
        "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    )
    assert "pytorch_model.bin" not in fetched and not any(
        "pytorch_model.bin" in r for r in hub.requests
    )
    snapshot = (
        tmp_path / "hf-home" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    )
    assert (snapshot / "model.safetensors").is_file()

    # online again: nothing downloaded a second time
    n_before = len(hub.requests)
    second = run_cli(["convert", REPO, "-o", str(tmp_path / "b.gguf"), "--outtype", "f32"], env)
    assert second.returncode == 0, second.stderr
    assert not any(r.startswith("GET") and "/resolve/" in r for r in hub.requests[n_before:])

    # offline, hub gone: served from the cache, same file (general.name is the repo's name)
    hub.shutdown()
    offline = run_cli(
        ["convert", REPO, "-o", str(tmp_path / "c.gguf"), "--outtype", "f32"],
        {**env, "HF_HUB_OFFLINE": "1"},
    )
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()

    # a repo that was never fetched: a one-line error, no traceback
    missing = run_cli(
        ["convert", "tiny-org/other", "-o", str(tmp_path / "d.gguf")],
        {**env, "HF_HUB_OFFLINE": "1"},
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: tiny-org/other is not in the local cache")
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "d.gguf").exists()


def test_unknown_repo_is_a_download_error(hub, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    result = run_cli(["convert", "nobody/nothing", "-o", str(tmp_path / "x.gguf")], env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no hub repo nobody/nothing"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.gguf").exists()
