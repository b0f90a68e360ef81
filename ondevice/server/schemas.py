"""Request bodies of the OpenAI and Ollama routes as pydantic models: FastAPI validates every
request with them (a wrong type is a 400 naming the field) and publishes them as the OpenAPI
schema that the fuzzing test generates requests from.

Unknown fields are ignored (clients add fields faster than servers learn them); fields that
are accepted but not supported yet (logprobs, images) are refused by the routes with a clear
400. Sizes are bounded here and by the body limit (ondevice.server.config).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ondevice.server.config import MAX_MESSAGES, MAX_STOPS
from ondevice.settings import INT_MAX, SEED_MAX

_LAX = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Body(BaseModel):
    model_config = _LAX


class ContentPart(BaseModel):
    """One part of a message's content: {"type": "text", "text": ...} (other types, such as
    image_url, are refused by the routes)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str = Field(max_length=64)
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """The sampling fields OpenAI's two generation routes share, and llama.cpp's extras."""

    model: str = Field("", max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT_MAX)
    min_p: float | None = Field(None, ge=0, lt=1)
    repeat_penalty: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=-1, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # llama-server's extension: the token ids (prompt and reply) in the `ondevice` field.
    return_tokens: bool = False


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    """POST /v1/completions: one prompt (text, or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(max_length=MAX_MESSAGES)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)


# --- Ollama ----------------------------------------------------------------------------------
class OllamaOptions(_Body):
    """Ollama's `options` (the ones that mean something here; the rest are ignored)."""

    num_predict: int | None = Field(None, ge=-2, le=INT_MAX)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT_MAX)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=-1, le=SEED_MAX)
    stop: list[str] | None = Field(None, max_length=MAX_STOPS)
    repeat_penalty: float | None = Field(None, gt=0, le=100)
    repeat_last_n: int | None = Field(None, ge=-1, le=INT_MAX)
    num_ctx: int | None = None  # the server's context is fixed at start (--ctx)


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _OllamaBody(_Body):
    model: str = Field("", max_length=512)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None


class OllamaChatRequest(_OllamaBody):
    """POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaBody):
    """POST /api/generate."""

    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = Field(None, max_length=1 << 20)
    raw: bool = False
    images: list[str] | None = None


class OllamaShowRequest(_Body):
    """POST /api/show (`name` is the field's old spelling)."""

    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)
    verbose: bool | None = None
