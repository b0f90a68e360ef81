"""Error replies in the dialect of the route that failed: OpenAI's `{"error": {"message", "type",
"param", "code"}}` on /v1 and elsewhere, Ollama's `{"error": "message"}` on /api."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# HTTP status -> OpenAI's error type
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error for a request to `path`, shaped as its clients expect."""
    body: dict[str, Any]
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
