"""`ondevice serve [MODEL]`: an OpenAI- and Ollama-compatible HTTP server for one model, every
request batched on it (ondevice.server)."""

from __future__ import annotations

from pathlib import Path

import click

from ondevice import locate
from ondevice.cli.options import load_kwargs, load_options
from ondevice.gguf_header import read_header
from ondevice.repl import default_model, format_names
from ondevice.server.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_QUEUE,
    TIME_LIMIT_S,
)

DEFAULT_PARALLEL = 4


@click.command()
@click.argument("model", required=False)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
    help="Port to listen on (0: a free one, printed at start).",
)  # fmt: skip
@click.option(
    "--parallel", "-np", default=DEFAULT_PARALLEL, show_default=True, type=click.IntRange(1, 256),
    help="Requests generated at once (each with --ctx tokens of context of its own).",
)  # fmt: skip
@load_options(
    speculative="off",
    speculative_help=" While one request runs alone its step drafts; off by default, because "
    "drafts can flip near-ties, and a server's replies at temperature 0 should repeat exactly.",
)
@click.option(
    "--api-key", envvar="ONDEVICE_API_KEY", default=None, metavar="KEY",
    help="Require this key (Authorization: Bearer KEY, or X-Api-Key) on every route but "
    "/health and the chat page's files (the page asks for it) [env: ONDEVICE_API_KEY].",
)  # fmt: skip
@click.option(
    "--no-auth", is_flag=True,
    help="Allow a non-loopback --host without --api-key (anyone who reaches it can use it).",
)  # fmt: skip
@click.option(
    "--cors-origin", multiple=True, metavar="ORIGIN",
    help="Let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API "
    "(repeatable) [default: none].",
)  # fmt: skip
@click.option(
    "--allow-host", multiple=True, metavar="NAME",
    help="Accept this Host name besides localhost and loopback addresses (repeatable).",
)  # fmt: skip
@click.option(
    "--chat-format", default=None, metavar="FORMAT",
    help=f"Prompt format: {format_names()}, or a Jinja template file [default: the model's].",
)  # fmt: skip
@click.option("--name", default=None, help="The model's name in the API [default: MODEL].")
@click.option(
    "--max-tokens", type=click.IntRange(1), default=None,
    help="Most tokens one request may generate [default: the room left in the context].",
)  # fmt: skip
@click.option(
    "--max-queue", type=click.IntRange(0), default=MAX_QUEUE, show_default=True,
    help="Requests that may wait for a slot; more get 429 with Retry-After.",
)  # fmt: skip
@click.option(
    "--max-connections", type=click.IntRange(1), default=MAX_CONNECTIONS, show_default=True,
    help="Open connections; more get 503.",
)  # fmt: skip
@click.option(
    "--max-body", type=click.IntRange(1024), default=MAX_BODY_BYTES, show_default=True,
    help="Largest request body in bytes; larger get 413.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(0.1), default=TIME_LIMIT_S, show_default=True,
    help="Seconds one request may take, waiting included.",
)  # fmt: skip
@click.option(
    "--no-web", is_flag=True,
    help="No chat page at http://HOST:PORT/ (the API only; GET / says the server runs).",
)  # fmt: skip
def serve(model: str | None, **opts) -> None:
    """Serve MODEL over HTTP: OpenAI's API (/v1/chat/completions, /v1/completions,
    /v1/models) and Ollama's (/api/chat, /api/generate, /api/tags, ...), with parallel
    requests batched in one decode.

    Open http://127.0.0.1:8080/ in a browser to chat with the model (--no-web: the API only).
    MODEL as for `ondevice chat` (default: $ONDEVICE_MODEL, the model pulled last, the demo
    model). --ctx is each slot's context, so the KV cache holds --parallel x --ctx tokens.
    Binds 127.0.0.1; another --host needs --api-key (or --no-auth).

    \b
    Examples:
      ondevice serve demo
      ondevice serve phi-2 --parallel 2 --port 11434
      OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=none your-app
    """
    # The runtime and the server's stack (FastAPI, uvicorn): imported when the command runs,
    # not for `ondevice --help`.
    import ondevice
    from ondevice import server  # FastAPI and uvicorn load with server.serve, not before

    server.require_extra()

    name = model or default_model()
    # A missing or malformed file is one line now, before the server says it listens.
    read_header(locate.resolve(name))
    config = server.ServerConfig(
        host=opts["host"], port=opts["port"], api_key=opts["api_key"], no_auth=opts["no_auth"],
        cors_origins=list(opts["cors_origin"]), allowed_hosts=list(opts["allow_host"]),
        max_body_bytes=opts["max_body"], max_connections=opts["max_connections"],
        max_queue=opts["max_queue"], time_limit_s=opts["timeout"], max_tokens=opts["max_tokens"],
        model_name=opts["name"] or _api_name(name), chat_format=opts["chat_format"],
        web=not opts["no_web"],
    )  # fmt: skip
    kwargs = load_kwargs(opts)

    def load():
        return ondevice.load(name, parallel=opts["parallel"], **kwargs)

    def ready(service) -> None:
        m = service.model
        click.echo(
            f"ready: {config.model_name} ({m.path.name}), {len(service.sched.slots)} slots x "
            f"{m.n_ctx} tokens, {m.device}",
            err=True,
        )

    server.serve(
        config, load, on_listening=lambda url: click.echo(f"listening on {url}", err=True),
        on_ready=ready,
    )  # fmt: skip


def _api_name(model: str) -> str:
    """`demo` and store names as given; a file's name without .gguf."""
    p = Path(model)
    return p.stem if p.suffix == ".gguf" or len(p.parts) > 1 else model
