"""Ollama's dialect: POST /api/chat and /api/generate (NDJSON streaming by default, or one JSON
reply), GET /api/tags, POST /api/show, GET /api/ps, GET /api/version — so Ollama clients
(`OLLAMA_HOST=http://127.0.0.1:8080`) talk to the one model this server runs. Durations are
nanoseconds, as Ollama reports them; ondevice's own numbers are in an extra `ondevice` field."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from typing import Any

import gguf
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, StreamingResponse

import ondevice
from ondevice.errors import UsageError
from ondevice.server.schemas import (
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaMessage,
    OllamaOptions,
    OllamaShowRequest,
    _OllamaBody,
)
from ondevice.server.service import (
    Generation,
    GenerationRequest,
    Service,
    Unsupported,
    numbers,
)
from ondevice.tools import ToolCall

router = APIRouter()
NS = 1_000_000_000
_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def service(request: Request) -> Service:
    return request.app.state.service


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request) -> Any:
    svc = service(request)
    svc.check_model(body.model)
    if not body.messages:  # Ollama's way to load a model: nothing to generate
        return _loaded(svc, {"message": {"role": "assistant", "content": ""}})
    req = _generation(body)
    req.messages = [_message(i, m) for i, m in enumerate(body.messages)]
    req.tools = body.tools  # Ollama has no tool_choice: the model decides (auto)
    gen = await svc.start_generation(req)
    gen.strip_leading = True
    return await _reply(svc, gen, request, body.stream, chat=True)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request) -> Any:
    svc = service(request)
    svc.check_model(body.model)
    for name in ("suffix", "template", "images", "context"):
        if getattr(body, name):
            raise Unsupported(f"{name} is not supported", hint="use /api/chat for conversations")
    if not body.prompt:
        return _loaded(svc, {"response": ""})
    req = _generation(body)
    if body.raw:
        req.prompt = body.prompt
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        req.messages = [*system, {"role": "user", "content": body.prompt}]
    gen = await svc.start_generation(req)
    gen.strip_leading = not body.raw
    return await _reply(svc, gen, request, body.stream, chat=False)


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.ready()
    return {"models": [_model_entry(svc)]}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.check_model(body.model or body.name)
    svc.ready()
    header = svc.model.header
    info = {k: v for k, v in header.small_metadata().items() if _info_key(k)}
    return {
        "modelfile": f"FROM {svc.model.path}\n",
        "parameters": "",
        "template": svc.model.chat_template or "",
        "details": _details(svc),
        "model_info": json.loads(json.dumps(info, default=str)),
        "capabilities": _capabilities(svc),
        "modified_at": _mtime(svc),
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.ready()
    entry = _model_entry(svc)
    size = svc.model.model_bytes + svc.model.kv_bytes
    entry.update(size=size, size_vram=0, expires_at="2999-01-01T00:00:00Z",
                 context_length=svc.model.n_ctx)  # fmt: skip
    return {"models": [entry]}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": ondevice.__version__}


# --- requests --------------------------------------------------------------------------------
def _generation(body: _OllamaBody) -> GenerationRequest:
    opts = body.options or OllamaOptions()
    n = opts.num_predict
    req = GenerationRequest(max_tokens=None if n is None or n < 0 else n)
    if n == 0:
        raise UsageError("num_predict must not be 0", hint="use -1 for no limit")
    req.sampling = {k: getattr(opts, k) for k in _OPTIONS if getattr(opts, k) is not None}
    if opts.seed is not None and opts.seed >= 0:
        req.sampling["seed"] = opts.seed
    if opts.repeat_last_n is not None and opts.repeat_last_n >= 0:
        req.sampling["repeat_last_n"] = opts.repeat_last_n
    if opts.num_ctx is not None:
        req.notes.append("num_ctx is ignored: the context is set when the server starts (--ctx)")
    req.stop = list(opts.stop or ())
    if body.format == "json":
        req.constraint["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        req.constraint["json_schema"] = body.format
    return req


def _message(i: int, m: OllamaMessage) -> dict[str, Any]:
    """An Ollama message as the chat template takes it: tool calls (arguments as objects,
    no ids) and tool results (`tool_name`) as they came; checked when the prompt is
    rendered."""
    if m.images:
        raise Unsupported(f"message {i} has images: only text is supported")
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", **c} for c in m.tool_calls]
    if m.tool_name:
        out["name"] = m.tool_name
    return out


# --- replies ---------------------------------------------------------------------------------
async def _reply(svc: Service, gen: Generation, request: Request, stream: bool, chat: bool):
    def piece(text: str, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        if not chat:
            return {"response": text}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [_call(c) for c in calls]
        return {"message": message}

    if not stream:
        result = await gen.result(request)
        text, calls = gen.tools.read(result.text, result.tokens)
        return JSONResponse(_final(svc, gen, piece(text, calls), result.finish_reason))
    chunks = await gen.opened(request)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                text = gen.tools.show(chunk.text, list(chunk.tokens))
                if text:
                    body = {"model": svc.name, "created_at": _now(), **piece(text)}
                    yield _line({**body, "done": False})
                if chunk.finish_reason is not None:
                    rest, calls = gen.tools.finish()
                    if rest or calls:  # Ollama sends the calls in a chunk of their own
                        body = {"model": svc.name, "created_at": _now(), **piece(rest, calls)}
                        yield _line({**body, "done": False})
                    yield _line(_final(svc, gen, piece(""), chunk.finish_reason))
        except Exception as exc:  # noqa: BLE001 - the status line is sent; tell the client
            yield _line({"error": getattr(exc, "message", None) or str(exc)})

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _call(call: ToolCall) -> dict[str, Any]:
    """Ollama's shape of a call: the function's name and its arguments as an object."""
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _final(svc: Service, gen: Generation, body: dict[str, Any], finish: str) -> dict[str, Any]:
    st = gen.stats
    out = {"model": svc.name, "created_at": _now(), **body, "done": True,
           "done_reason": "length" if finish == "length" else "stop"}  # fmt: skip
    if st is not None:
        prompt_s = st.prompt_eval_tokens / st.prompt_tps if st.prompt_tps else 0.0
        eval_s = max(st.total_s - st.ttft_s, 0.0)
        out.update(
            total_duration=int(st.total_s * NS), load_duration=0,
            prompt_eval_count=st.prompt_tokens, prompt_eval_duration=int(prompt_s * NS),
            eval_count=st.completion_tokens, eval_duration=int(eval_s * NS),
        )  # fmt: skip
    out["ondevice"] = numbers(gen)
    return out


def _capabilities(svc: Service) -> list[str]:
    """What Ollama clients check before they send tools: "tools" when the template renders
    them."""
    fmt = svc.fmt
    renders_tools = fmt is not None and "tools" in fmt.template
    return ["completion", "tools"] if renders_tools else ["completion"]


def _loaded(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    svc.ready()
    return {"model": svc.name, "created_at": _now(), **body, "done_reason": "load", "done": True}


def _model_entry(svc: Service) -> dict[str, Any]:
    st = svc.model.path.stat()
    # An identifier of this file (path, size, time), not its sha256: hashing a multi-GB file
    # for a listing would take seconds.
    digest = hashlib.sha256(f"{svc.model.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return {"name": svc.name, "model": svc.name, "modified_at": _mtime(svc), "size": st.st_size,
            "digest": digest, "details": _details(svc)}  # fmt: skip


def _details(svc: Service) -> dict[str, Any]:
    md = svc.model.metadata
    arch = svc.model.architecture
    try:
        quant = gguf.LlamaFileType(int(md.get("general.file_type"))).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        quant = "unknown"
    n = svc.model.header.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": size, "quantization_level": quant}  # fmt: skip


def _mtime(svc: Service) -> str:
    t = datetime.fromtimestamp(svc.model.path.stat().st_mtime, timezone.utc)
    return t.isoformat().replace("+00:00", "Z")


def _info_key(key: str) -> bool:
    return not key.startswith("tokenizer.") or key == "tokenizer.ggml.model"
