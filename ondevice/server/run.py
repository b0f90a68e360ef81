"""Running the server: bind the socket, load the model in the background, serve with uvicorn
until a signal or a failed load ends it, then close the scheduler and the model."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from ondevice.errors import OndeviceError, UsageError
from ondevice.server.app import create_app
from ondevice.server.config import ServerConfig, check_bind
from ondevice.server.service import Service

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 3  # open streams get this long to finish on Ctrl-C / SIGTERM


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); UsageError when the address is taken."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as exc:
        raise UsageError(
            f"can't listen on {host}:{port}: {exc.strerror or exc}",
            hint="choose another --port (0 picks a free one)" if port else None,
        ) from None
    sock.set_inheritable(False)
    return sock


def serve(
    config: ServerConfig,
    load: Callable[[], Any],
    *,
    on_listening: Callable[[str], Any] | None = None,
    on_ready: Callable[[Service], Any] | None = None,
) -> None:
    """Serve until interrupted. `load()` returns the model (called on a worker thread once the
    socket listens); `on_listening(url)` and `on_ready(service)` let the CLI say so. A model
    that fails to load stops the server and its error is raised here."""
    check_bind(config)
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    service = Service(config, load)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, config), log_config=None, access_log=log.isEnabledFor(logging.INFO),
            limit_concurrency=config.max_connections, timeout_keep_alive=5,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False,
            h11_max_incomplete_event_size=config.max_body_bytes,
        )
    )  # fmt: skip

    def failed(exc: BaseException) -> None:
        server.should_exit = True

    service.on_failure, service.on_ready = failed, on_ready
    host = f"[{config.host}]" if ":" in config.host else config.host
    if on_listening is not None:
        on_listening(f"http://{host}:{port}")
    service.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    if service.error is not None:
        if isinstance(service.error, OndeviceError | KeyboardInterrupt):
            raise service.error
        raise OndeviceError(f"the model failed to load: {service.error}") from service.error
