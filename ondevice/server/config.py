"""What `ondevice serve` is told: where to listen, who may call it, and its bounds; and the
checks of the bind address and of a request's Host header (DNS rebinding)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ondevice.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 1 << 20  # a long chat history is tens of KiB
MAX_CONNECTIONS = 128
MAX_QUEUE = 64
TIME_LIMIT_S = 600.0  # one request's wall time, queue included
MAX_MESSAGES = 1024
MAX_STOPS = 16
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServerConfig:
    """Settings of one server (the CLI's options; tests build it directly)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    no_auth: bool = False
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # names besides loopback/localhost
    max_body_bytes: int = MAX_BODY_BYTES
    max_connections: int = MAX_CONNECTIONS
    max_queue: int = MAX_QUEUE
    time_limit_s: float = TIME_LIMIT_S
    max_tokens: int | None = None  # a cap on one request's tokens (default: the context)
    model_name: str = "model"
    chat_format: str | None = None
    web: bool = True  # the chat page at GET / (--no-web: a plain-text line instead)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only reaches this machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(config: ServerConfig) -> None:
    """Refuse to listen beyond this machine without an API key, unless --no-auth says so."""
    if config.api_key is not None and not config.api_key.strip():
        raise UsageError("--api-key is empty", hint="give a key, e.g. from `openssl rand -hex 24`")
    if is_loopback(config.host) or config.api_key:
        return
    if not config.no_auth:
        raise UsageError(
            f"--host {config.host} lets other machines reach the server, and it has no API key",
            hint="add --api-key KEY (clients send it as a Bearer token), or --no-auth to serve "
            "without one",
        )
    log.warning(
        "serving on %s without an API key (--no-auth): anyone who can reach this address "
        "can use the model",
        config.host,
    )


def host_allowed(header: str | None, config: ServerConfig) -> bool:
    """Whether a request's Host header names this server: a loopback address, localhost (or
    *.localhost), or a configured name. Empty hosts (`Host:`, `Host: :8080`) are refused: a
    DNS-rebinding page could send them (Ollama's fix was bypassed that way)."""
    if not header:
        return False
    host = _host_part(header.strip())
    if not host:
        return False
    if is_loopback(host):
        return True
    name = host.strip("[]").rstrip(".").lower()
    return any(name == h.strip().rstrip(".").lower() for h in config.allowed_hosts)


def _host_part(header: str) -> str:
    """`localhost:8080` -> `localhost`, `[::1]:8080` -> `[::1]`, `::1` -> `::1`."""
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else ""
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def check_host_policy(config: ServerConfig) -> bool:
    """Whether Host headers are checked: on a loopback bind (where DNS rebinding is the
    threat), and wherever names were configured with --allow-host."""
    return is_loopback(config.host) or bool(config.allowed_hosts)


def cors_origins(origins: Sequence[str]) -> list[str]:
    """The --cors-origin values, checked: `*` or scheme://host[:port] each."""
    out = []
    for o in origins:
        o = o.strip().rstrip("/")
        if o != "*" and "://" not in o:
            raise UsageError(
                f"--cors-origin {o!r} is not an origin", hint="use e.g. http://localhost:3000 or *"
            )
        out.append(o)
    return out
