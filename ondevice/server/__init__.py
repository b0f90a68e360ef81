"""`ondevice serve`: one local model for every app on the machine, over HTTP in OpenAI's and
Ollama's dialects, every request batched on one model by `ondevice.batch.Scheduler`.

    config   ServerConfig, the bind check (no open bind without an API key), Host checks
    guards   ASGI middleware: Host (DNS rebinding), API key, body size
    schemas  the request bodies (pydantic), hence the OpenAPI schema
    service  the model, its scheduler and the prompt: what every route calls
    openai_api, ollama_api   the two dialects' routes
    web      the chat page at GET / (static/: HTML, CSS, JS as package data) and its CSP
    app      the FastAPI application: routers, guards, errors, /health, /metrics, the page
    run      bind, load in the background, serve with uvicorn

Needs the `server` extra (`pip install 'ondevice[server]'`: FastAPI, uvicorn,
prometheus-client). Importing this package (and its config module, which the CLI reads for its
defaults) does not import them; `serve` and `create_app` do, and say which extra is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from ondevice.errors import MissingExtra
from ondevice.server.config import ServerConfig

_LAZY = {"serve": "ondevice.server.run", "create_app": "ondevice.server.app"}


def require_extra() -> None:
    """MissingExtra naming the `server` extra unless its packages import."""
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtra(
                f"ondevice serve needs the server extra ({name} is not installed)",
                hint="pip install 'ondevice[server]'",
            ) from None


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ondevice.server' has no attribute {name!r}")
    require_extra()
    return getattr(importlib.import_module(module), name)


__all__ = ["ServerConfig", "create_app", "require_extra", "serve"]
