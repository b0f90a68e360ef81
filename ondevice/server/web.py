"""The chat page at GET /: one HTML file, its script and its stylesheet, shipped as package data
(ondevice/server/static/) and served with a strict Content-Security-Policy, so the page talks
only to this server and model output can never run as code in it.

The page and its two files are public even when the server has an API key: they hold no
secrets, and the page must load to ask for the key. Everything the page calls (/v1/...) still
needs the key (AuthGuard).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from starlette.responses import Response

# file name -> Content-Type; the only files served under /static/ (no path is ever joined from
# a request, so nothing else in the package can be read through this route).
STATIC = {
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
PAGE = "index.html"
PUBLIC_PATHS = ("/", *(f"/static/{name}" for name in STATIC))

# Same origin only, nothing inline: a reply that smuggled markup into the page still could not
# run a script, load a resource from elsewhere or send data anywhere but back here.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on each load: a newer ondevice's page is never mixed with an older script.
    "Cache-Control": "no-cache",
}


def read(name: str) -> bytes:
    """One of the page's files, from the installed package (importlib.resources)."""
    return resources.files("ondevice.server").joinpath("static", name).read_bytes()


def add_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /static/NAME for its files, read once, here."""
    page = read(PAGE)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    for name, kind in STATIC.items():
        _static_route(app, name, read(name), kind)


def _static_route(app: FastAPI, name: str, body: bytes, kind: str) -> None:
    async def static_file() -> Response:
        return Response(body, media_type=kind, headers=HEADERS)

    app.add_api_route(f"/static/{name}", static_file, methods=["GET"], include_in_schema=False)
