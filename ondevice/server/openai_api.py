"""OpenAI's dialect: POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events, or one JSON reply), GET /v1/models. Each route translates its body into a
`GenerationRequest` and the Generation's chunks back; usage as OpenAI reports it, and ondevice's
own numbers (tok/s, TTFT, memory, the slot) in an extra `ondevice` field."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, StreamingResponse

from ondevice.errors import ModelNotFound
from ondevice.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    _Sampling,
)
from ondevice.server.service import (
    Generation,
    GenerationRequest,
    Service,
    Unsupported,
    numbers,
)
from ondevice.server.toolcalls import finish_reason
from ondevice.tools import ToolCall

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def service(request: Request) -> Service:
    return request.app.state.service


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(service(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    svc = service(request)
    if model not in svc.names():
        raise ModelNotFound(f"model {model!r} is not served here", hint=f"use {svc.name!r}")
    return _model_card(svc)


def _model_card(svc: Service) -> dict[str, Any]:
    return {"id": svc.name, "object": "model", "created": int(svc.started), "owned_by": "ondevice"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    svc = service(request)
    svc.check_model(body.model)
    if body.top_logprobs:
        raise Unsupported("logprobs are not supported yet")
    req = _generation(body, body.max_completion_tokens or body.max_tokens)
    req.messages = [_message(i, m) for i, m in enumerate(body.messages)]
    req.tools, req.tool_choice = body.tools, body.tool_choice
    if body.parallel_tool_calls is False:
        req.notes.append("parallel_tool_calls=false is not enforced: a reply may make calls")
    if body.response_format is not None:
        rf = body.response_format.model_dump(by_alias=True, exclude_none=True)
        req.constraint["response_format"] = rf
    gen = await svc.start_generation(req)
    gen.strip_leading = True
    reply = _Reply(svc.name, "chat.completion", "chatcmpl")
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = await gen.opened(request)
        return _sse(reply.chat_events(gen, chunks, usage))
    result = await gen.result(request)
    text, calls = gen.tools.read(result.text, result.tokens)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message.update(content=text or None, tool_calls=[c.to_openai() for c in calls])
    choice = {"index": 0, "message": message, "logprobs": None}
    return JSONResponse(reply.body(gen, choice, finish_reason(result.finish_reason, calls)))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    svc = service(request)
    svc.check_model(body.model)
    if body.suffix:
        raise Unsupported("suffix (fill-in-the-middle) is not supported")
    if body.best_of not in (None, 1):
        raise Unsupported("best_of must be 1", hint="send several requests (they are batched)")
    req = _generation(body, body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
    req.prompt = _one_prompt(body.prompt)
    echo = req.prompt if body.echo and isinstance(req.prompt, str) else ""
    gen = await svc.start_generation(req)
    reply = _Reply(svc.name, "text_completion", "cmpl")
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = await gen.opened(request)
        return _sse(reply.text_events(gen, chunks, usage, echo))
    result = await gen.result(request)
    choice = {"index": 0, "text": echo + result.text, "logprobs": None}
    return JSONResponse(reply.body(gen, choice, finish_reason(result.finish_reason, [])))


# --- requests --------------------------------------------------------------------------------
def _generation(body: _Sampling, max_tokens: int | None) -> GenerationRequest:
    """What both routes share: n, sampling, seed, stop; fields we ignore become notes."""
    if body.n not in (None, 1):
        raise Unsupported("n must be 1 (one reply per request)", hint="send n requests instead")
    if body.logprobs not in (None, False, 0):
        raise Unsupported("logprobs are not supported yet")
    req = GenerationRequest(max_tokens=max_tokens, return_tokens=body.return_tokens)
    for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
        if getattr(body, name):
            req.notes.append(f"{name} is not supported and was ignored")
    req.sampling = {k: getattr(body, k) for k in _SAMPLING if getattr(body, k) is not None}
    if body.seed is not None and body.seed >= 0:  # -1: a random seed, as in llama.cpp
        req.sampling["seed"] = body.seed
    req.stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return req


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as the chat template takes it (developer is system, function is
    tool; text parts joined); tool calls and results as they came, checked by
    ondevice.chat_messages when the prompt is rendered."""
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    out: dict[str, Any] = {"role": role, "content": _text(i, m.content)}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
        if m.content is None:
            del out["content"]
    for key in ("tool_call_id", "name"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def _text(i: int, content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise Unsupported(f"message {i} has a {part.type!r} part: only text is supported")
        parts.append(part.text)
    return "".join(parts)


def _one_prompt(prompt: Any) -> str | list[int]:
    """/v1/completions' prompt: a string or token ids, or a list holding one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise Unsupported("give one prompt per request", hint="send several requests")
        prompt = prompt[0]
    return prompt


# --- replies ---------------------------------------------------------------------------------
class _Reply:
    """The envelope of one reply (id, created, model) and its bodies and stream events."""

    def __init__(self, model: str, kind: str, prefix: str) -> None:
        self.model, self.kind = model, kind
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, gen: Generation, choice: dict[str, Any], finish: str) -> dict[str, Any]:
        choice["finish_reason"] = finish
        return {**self._head(self.kind), "choices": [choice], "usage": usage(gen),
                "ondevice": numbers(gen)}  # fmt: skip

    async def chat_events(
        self, gen: Generation, chunks: AsyncIterator[Any], with_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

        head = self._head("chat.completion.chunk")
        extra = {"usage": None} if with_usage else {}
        yield {**head, "choices": [delta({"role": "assistant", "content": ""})], **extra}
        async for chunk in chunks:
            text = gen.tools.show(chunk.text, list(chunk.tokens))
            if text:
                yield {**head, "choices": [delta({"content": text})], **extra}
            if chunk.finish_reason is None:
                continue
            rest, calls = gen.tools.finish()
            if rest:
                yield {**head, "choices": [delta({"content": rest})], **extra}
            if calls:
                yield {**head, "choices": [delta({"tool_calls": _call_deltas(calls)})], **extra}
            final = delta({}, finish_reason(chunk.finish_reason, calls))
            yield {**head, "choices": [final], **extra, "ondevice": numbers(gen)}
        if with_usage:
            yield {**head, "choices": [], "usage": usage(gen)}

    async def text_events(
        self, gen: Generation, chunks: AsyncIterator[Any], with_usage: bool, echo: str
    ) -> AsyncIterator[dict[str, Any]]:
        def text(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "index": 0,
                "text": d.get("text", ""),
                "logprobs": None,
                "finish_reason": finish,
            }

        head = self._head("text_completion")
        extra = {"usage": None} if with_usage else {}
        if echo:
            yield {**head, "choices": [text({"text": echo})], **extra}
        async for chunk in chunks:
            if chunk.text:
                yield {**head, "choices": [text({"text": chunk.text})], **extra}
            if chunk.finish_reason is not None:
                final = text({}, finish_reason(chunk.finish_reason, []))
                yield {**head, "choices": [final], **extra, "ondevice": numbers(gen)}
        if with_usage:
            yield {**head, "choices": [], "usage": usage(gen)}


def _call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The calls as one stream delta: each whole, with its index (OpenAI streams a call's
    arguments in pieces; a client joins them, so one piece is the same to it)."""
    return [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]


def usage(gen: Generation) -> dict[str, int]:
    st = gen.stats
    prompt = st.prompt_tokens if st is not None else gen.prompt_tokens
    completion = st.completion_tokens if st is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per event, then `data: [DONE]`; an error after
    the stream has started is sent as an event in OpenAI's error shape."""

    async def encode() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent; tell the client
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            err = {"error": {"message": message, "type": "server_error", "param": None,
                             "code": None}}  # fmt: skip
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers=SSE_HEADERS)
