"""The ASGI application: FastAPI with the OpenAI and Ollama routers, the guards (Host, CORS,
API key, body size), every error as a JSON reply in the route's dialect, GET /health,
GET /metrics (Prometheus) and the chat page at GET / (ondevice.server.web)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import ondevice
from ondevice import stats
from ondevice.batch import QueueFull
from ondevice.errors import (
    ChatFormatError,
    ContextOverflow,
    IncompleteOutput,
    ModelClosed,
    ModelNotFound,
    OndeviceError,
    UsageError,
)
from ondevice.server import ollama_api, openai_api, web
from ondevice.server.config import ServerConfig
from ondevice.server.guards import PUBLIC_PATHS, AuthGuard, BodyLimit, HostGuard
from ondevice.server.responses import error_response
from ondevice.server.service import NotReady, Service

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error code, Retry-After seconds)
_STATUS: list[tuple[type[BaseException], int, str | None, int | None]] = [
    (ModelNotFound, 404, "model_not_found", None),
    (NotReady, 503, "model_loading", 2),
    (QueueFull, 429, "server_busy", 1),
    (ModelClosed, 503, "shutting_down", 5),
    (ContextOverflow, 400, "context_length_exceeded", None),
    (ChatFormatError, 400, "chat_format", None),
    (IncompleteOutput, 400, None, None),
    (UsageError, 400, None, None),
]


def create_app(service: Service, config: ServerConfig) -> FastAPI:
    """The application for one Service (its model loads separately: /health tells)."""
    app = FastAPI(
        title="ondevice", version=ondevice.__version__, docs_url=None, redoc_url=None,
        description="OpenAI- and Ollama-compatible API for one local model.",
    )  # fmt: skip
    app.state.service = service
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    registry = CollectorRegistry()
    registry.register(_SchedulerMetrics(service))
    responses = Counter(
        "ondevice_http_responses", "HTTP responses by route and status", ["route", "status"],
        registry=registry,
    )  # fmt: skip
    _routes(app, service, registry)
    public = PUBLIC_PATHS
    if config.web:
        web.add_routes(app)
        public += web.PUBLIC_PATHS
    else:
        app.add_api_route("/", _running, methods=["GET"], include_in_schema=False)
    _error_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(AuthGuard, api_key=config.api_key, public=public)
    if config.cors_origins:
        # No credentials, ever: the API key travels in a header the page sets itself, and a
        # wildcard origin with credentials would hand any page the user's access.
        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors_origins, allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
        )  # fmt: skip
    app.add_middleware(HostGuard, config=config)
    app.add_middleware(_CountResponses, counter=responses)
    return app


def _routes(app: FastAPI, service: Service, registry: CollectorRegistry) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        state = service.state
        body: dict[str, Any] = {"status": state}
        if state == "ok":
            body["model"] = service.name
        elif state == "failed":
            err = service.error
            body["error"] = err.one_line() if isinstance(err, OndeviceError) else str(err)
        headers = {"Retry-After": "2"} if state == "loading" else None
        return JSONResponse(body, status_code=200 if state == "ok" else 503, headers=headers)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


async def _running() -> PlainTextResponse:
    """GET / with --no-web: a line for probes (as Ollama's `Ollama is running`)."""
    return PlainTextResponse("ondevice is running")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail))

    @app.exception_handler(OndeviceError)
    async def ondevice_error(request: Request, exc: OndeviceError) -> JSONResponse:
        for kind, status, code, retry in _STATUS:
            if isinstance(exc, kind):
                headers = {"Retry-After": str(retry)} if retry else None
                return error_response(
                    request.url.path, status, exc.one_line(), code=code, headers=headers
                )
        log.error("%s %s failed: %s", request.method, request.url.path, exc.one_line())
        return error_response(request.url.path, 500, exc.one_line())


def _validation_message(exc: RequestValidationError) -> str:
    """`field.path: what is wrong` for the first few problems pydantic found."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


class _SchedulerMetrics:
    """Prometheus collector reading the scheduler's counters at each scrape."""

    _COUNTERS = ("requests", "prompt_tokens", "generated_tokens", "decode_calls", "cancelled",
                 "timeouts", "drafted_tokens", "accepted_tokens")  # fmt: skip
    _GAUGES = ("slots", "busy_slots", "queue_length", "kv_cells_used")

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Any:
        sched = self.service.sched
        m = sched.metrics() if sched is not None else {}
        for name in self._COUNTERS:
            yield CounterMetricFamily(f"ondevice_{name}", name.replace("_", " "), m.get(name, 0))
        for name in self._GAUGES:
            yield GaugeMetricFamily(f"ondevice_{name}", name.replace("_", " "), m.get(name, 0))
        yield GaugeMetricFamily("ondevice_model_loaded", "1 once the model is loaded",
                                1 if sched is not None else 0)  # fmt: skip
        yield GaugeMetricFamily("ondevice_rss_bytes", "resident memory of the server",
                                stats.rss_bytes())  # fmt: skip


class _CountResponses:
    """Counts responses by route (its path template; `other` for unknown paths) and status."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.counter.labels(route, str(status[0] or 500)).inc()
