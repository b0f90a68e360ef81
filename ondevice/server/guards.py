"""The checks every request passes before a route sees it, as ASGI middleware (outermost
first): Host (DNS rebinding, 403), then CORS (Starlette's), then the API key (401), then the
body size (413). Each answers with a JSON error in the route's dialect (ondevice.server.responses).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ondevice.server.config import ServerConfig, check_host_policy, host_allowed
from ondevice.server.responses import error_response

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/health",)


class HostGuard:
    """403 for a request whose Host header does not name this server (on a loopback bind, or
    wherever --allow-host names are configured): a web page that rebinds its own domain to
    127.0.0.1 can reach the server from the user's browser, but its requests carry its domain
    (or nothing) as Host."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app, self.config = app, config
        self.active = check_host_policy(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.active:
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host")
        if host_allowed(host, self.config):
            return await self.app(scope, receive, send)
        log.warning("refused a request with Host %r (not this server's name)", host)
        msg = f"Host {host!r} is not this server's name"
        hint = "; add it with --allow-host NAME" if host else ""
        await error_response(scope["path"], 403, msg + hint, code="host_not_allowed")(
            scope, receive, send
        )


class AuthGuard:
    """401 unless the request carries the API key, as `Authorization: Bearer KEY` (OpenAI's
    clients) or `X-Api-Key: KEY`; the `public` paths (exactly those: /health, and the chat
    page's files, which must load to ask for the key) need none. Keys are compared in constant
    time."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, public: tuple[str, ...] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.key = _digest(api_key.encode("utf-8")) if api_key else None
        self.public = frozenset(public)

    def _authorized(self, headers: Headers) -> bool:
        assert self.key is not None
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None:
            return False
        # Constant time, and over digests of equal length: timing says nothing about the key,
        # not even its length.
        return hmac.compare_digest(_digest(given.encode("utf-8", "replace")), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        if self._authorized(Headers(scope=scope)):
            return await self.app(scope, receive, send)
        response = error_response(
            scope["path"],
            401,
            "Incorrect or missing API key: send it as `Authorization: Bearer KEY` or "
            "`X-Api-Key: KEY`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class BodyLimit:
    """413 for a request body over `limit` bytes: refused from its Content-Length before
    anything is read, or once the bytes read pass the limit (chunked bodies). A body within the
    limit is read whole and handed on; later receive() calls pass through (so disconnects
    still reach the routes)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        body, messages = 0, []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += len(message.get("body", b""))
            if body > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"the request body is larger than {self.limit} bytes"
        await error_response(scope["path"], 413, msg, code="body_too_large")(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Any:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
