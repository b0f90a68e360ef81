"""`ondevice serve`'s security, tested: the bind check, the API key, DNS rebinding (Host),
CORS, the body limit, and a request-fuzzing pass over the OpenAPI schema with zero 5xx.
A real server process (loopback, with a key) and the ASGI app in-process for the header cases."""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess

import httpx
import ollama
import openai
import pytest
from conftest import PYTHON
from hypothesis import HealthCheck, given, settings
from server_fixtures import ROOT, ServerProcess
from starlette.testclient import TestClient

from ondevice.errors import UsageError
from ondevice.server import create_app, guards
from ondevice.server.config import ServerConfig, check_bind, host_allowed
from ondevice.server.service import Service

KEY = "sk-test-4f9a2c"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(demo_path):
    args = ["--api-key", KEY, "--cors-origin", "*", "--allow-host", "myhost.lan",
            "--max-tokens", "4", "--ctx", "256", "--parallel", "2"]  # fmt: skip
    with ServerProcess(demo_path, *args) as s:
        yield s
        log = s.log
    assert "Traceback" not in log, log


# --- binding --------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_an_open_bind_without_a_key_is_refused_in_one_line(cli_env, demo_path, host):
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", "serve", str(demo_path), "--host", host],
        capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "--api-key" in lines[0] and "--no-auth" in lines[0]


def test_a_missing_or_broken_model_is_one_line_before_listening(cli_env, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    for model in (str(tmp_path / "missing.gguf"), str(bad)):
        out = subprocess.run(
            [PYTHON, "-m", "ondevice", "serve", model, "--port", "0"],
            capture_output=True, text=True, env=cli_env, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert out.returncode == 1, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
        assert "listening" not in out.stderr


def test_no_auth_is_allowed_with_a_warning_and_loopback_needs_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        check_bind(ServerConfig(host="0.0.0.0", no_auth=True))
    assert "without an API key" in caplog.text
    check_bind(ServerConfig(host="127.0.0.1"))
    check_bind(ServerConfig(host="::1"))
    check_bind(ServerConfig(host="0.0.0.0", api_key="k"))
    with pytest.raises(UsageError, match="empty"):
        check_bind(ServerConfig(host="0.0.0.0", api_key=" "))


# --- the API key ----------------------------------------------------------------------------
def test_every_route_but_health_needs_the_key(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    body = err.value.body
    assert body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == ["demo"]
    r = good.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens <= 4  # --max-tokens 4
    assert httpx.get(f"{server.url}/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
    for path in ("/v1/models", "/metrics", "/api/tags", "/openapi.json", "/static/other.js"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    # The chat page and its two files are public: they hold no secrets, and ask for the key.
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    assert isinstance(httpx.get(f"{server.url}/api/tags").json()["error"], str)  # Ollama's
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(ollama.ResponseError) as oerr:
        ollama.Client(host=server.url).list()
    assert oerr.value.status_code == 401
    assert ollama.Client(host=server.url, headers=AUTH).list().models[0].model == "demo"


def test_keys_are_compared_in_constant_time(monkeypatch):
    seen = []

    def compare(a, b):
        seen.append((a, b))
        return a == b

    monkeypatch.setattr(guards.hmac, "compare_digest", compare)
    g = guards.AuthGuard(None, KEY)
    assert g._authorized(httpx.Headers(AUTH))
    assert not g._authorized(httpx.Headers({"X-Api-Key": "nope"}))
    key = hashlib.sha256(KEY.encode()).digest()
    assert seen == [(key, key), (hashlib.sha256(b"nope").digest(), key)]


# --- DNS rebinding --------------------------------------------------------------------------
def _raw_get(url: str, host_line: str, path: str = "/health") -> int:
    """Status of a GET sent byte for byte (clients won't send an empty Host)."""
    hostport = url.removeprefix("http://")
    host, port = hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n{host_line}\r\nX-Api-Key: {KEY}\r\n"
                  "Connection: close\r\n\r\n".encode())  # fmt: skip
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_hosts_that_are_not_this_server_get_403(server):
    port = server.url.rsplit(":", 1)[1]
    refused = [
        "Host: evil.example",
        f"Host: evil.example:{port}",
        "Host: ",
        f"Host: :{port}",
        "Host: 127.0.0.1.evil.example",
        "Host: localhost.evil.example",
        "Host: 10.0.0.1",
    ]
    allowed = [f"Host: localhost:{port}", f"Host: 127.0.0.1:{port}", "Host: 127.0.0.1",
               f"Host: [::1]:{port}", "Host: app.localhost", f"Host: myhost.lan:{port}"]  # fmt: skip
    for line in refused:
        assert _raw_get(server.url, line) == 403, line
        assert _raw_get(server.url, line, "/v1/models") == 403, line
    for line in allowed:
        assert _raw_get(server.url, line) == 200, line
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"


def test_host_check_cases():
    cfg = ServerConfig(allowed_hosts=["box.internal"])
    for h in ["localhost", "LOCALHOST:80", "127.0.0.1:8080", "127.5.5.5", "[::1]", "::1",
              "[::1]:8080", "a.localhost", "box.internal:9", "localhost."]:  # fmt: skip
        assert host_allowed(h, cfg), h
    for h in [None, "", " ", ":8080", "[]:80", "[::1", "0.0.0.0", "evil", "box.internal.evil",
              "localhost:80:80", "192.168.0.1", "[::2]:80", "localhostx"]:  # fmt: skip
        assert not host_allowed(h, cfg), h


# --- CORS -----------------------------------------------------------------------------------
def _asgi(config: ServerConfig) -> TestClient:
    app = create_app(Service(config, load=lambda: None), config)  # never started: "loading"
    return TestClient(app, base_url="http://127.0.0.1")


def _preflight(client: TestClient, origin: str) -> httpx.Response:
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip


def test_cors_is_off_unless_an_origin_is_configured():
    with _asgi(ServerConfig()) as c:
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in _preflight(c, "http://evil.example").headers
    with _asgi(ServerConfig(cors_origins=["http://app.example"])) as c:
        ok = _preflight(c, "http://app.example")
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in ok.headers
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        other = _preflight(c, "http://evil.example")
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_requests_while_the_model_loads_get_503_with_retry_after():
    with _asgi(ServerConfig()) as c:
        body = {"messages": [{"role": "user", "content": "Hi"}]}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "model_loading"
        r = c.get("/api/tags")
        assert r.status_code == 503 and "loading" in r.json()["error"]


def test_a_wildcard_origin_never_comes_with_credentials(server):
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": "http://any.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Origin": "http://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


# --- bounds ---------------------------------------------------------------------------------
def test_bodies_over_1_mib_get_413(server):
    url = f"{server.url}/v1/chat/completions"
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20) + b'"}]}'
    r = httpx.post(url, content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():
        for _ in range(17):
            yield b"a" * 65536

    r = httpx.post(url, content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{server.url}/api/chat", content=big, headers=AUTH).json()["error"]
    fits = b'{"messages": [{"role": "user", "content": "' + b"a " * 400_000 + b'"}]}'
    r = httpx.post(url, content=fits, headers={**AUTH, "content-type": "application/json"},
                   timeout=120)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# --- fuzzing --------------------------------------------------------------------------------
def _fuzz(server, examples: int) -> None:
    import schemathesis  # heavy; only the fuzzing tests need it

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    failures: list[str] = []

    def check(case) -> None:
        r = case.call(base_url=server.url, headers=AUTH, timeout=120)
        if r.status_code >= 500:
            failures.append(f"{case.operation.label}: {r.status_code} {r.text[:300]}")

    for result in schema.get_all_operations():
        strategy = result.ok().as_strategy()
        run = settings(max_examples=examples, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))(given(case=strategy)(check))  # fmt: skip
        run()
    assert not failures, "\n".join(failures[:20])
    assert "Traceback" not in server.log


def test_fuzzing_the_api_gives_no_5xx(server):
    _fuzz(server, examples=12)


@pytest.mark.slow
def test_fuzzing_the_api_at_length_gives_no_5xx(server):
    _fuzz(server, examples=300)
