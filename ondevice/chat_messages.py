"""Chat messages in OpenAI's shapes, checked and copied into the plain data a template may see.

Accepted, as OpenAI's chat API and Hugging Face's `apply_chat_template` take them:
  - roles `system`, `user`, `assistant` and `tool`;
  - `content` as text, or as a list of parts `{"type": "text", "text": ...}`; image, audio and
    file parts are refused (ondevice runs text models); an assistant message with `tool_calls`
    may have no content;
  - assistant `tool_calls`: `[{"id": ..., "type": "function", "function": {"name": ...,
    "arguments": <a JSON string or an object>}}]`; a tool message's `tool_call_id`; `name`;
  - any other key (`reasoning_content`, `thinking`, ...), kept as it is.
Keys whose value is None are dropped (OpenAI sends `content: null` beside tool calls; templates
handle a missing key, not a None), as Hugging Face does. What a template sees is a copy made of
JSON types only (dict, list, str, int, float, bool): no object of the caller's reaches the
sandbox, and every string is valid Unicode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ondevice.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")
_OTHER_ROLES = {"developer": "system", "function": "tool", "model": "assistant", "human": "user"}
_MEDIA_PARTS = {
    "image": "an image",
    "image_url": "an image",
    "input_image": "an image",
    "audio": "audio",
    "input_audio": "audio",
    "video": "a video",
    "video_url": "a video",
    "file": "a file",
    "input_file": "a file",
}
_MAX_DEPTH = 64  # nesting of lists and dicts inside one message, tool or document


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check an OpenAI-style message list and return plain copies (templates see copies).
    Raises UsageError naming the message and what is wrong with it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UsageError('messages must be a list of {"role": ..., "content": ...} dicts')
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, Mapping):
        raise UsageError(f"message {i} is not a dict", hint='use {"role": ..., "content": ...}')
    role = m.get("role")
    if role not in ROLES:
        hint = f"use one of {', '.join(ROLES)}"
        if isinstance(role, str) and role in _OTHER_ROLES:
            hint = f"use {_OTHER_ROLES[role]!r} for what OpenAI calls {role!r}"
        raise UsageError(f"message {i} has role {role!r}", hint=hint)
    where = f"message {i} ({role})"
    msg = {k: v for k, v in m.items() if v is not None}
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if not isinstance(key, str):
            raise UsageError(f"{where} has a key that is not text: {key!r}")
        if key == "content":
            out[key] = _content(where, value)
        elif key == "tool_calls":
            if role != "assistant":
                raise UsageError(f"{where} has tool_calls; only assistant messages do")
            out[key] = _tool_calls(where, value)
        elif key in ("tool_call_id", "name") and not isinstance(value, str):
            raise UsageError(f"{where}: {key!r} must be text")
        else:
            out[key] = plain(value, f"{where} {key!r}")
    if "content" not in out and not (role == "assistant" and out.get("tool_calls")):
        raise UsageError(f"{where} has no text content")
    return out


def _content(where: str, content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return plain(content, where)
    if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
        raise UsageError(
            f"{where} has no text content",
            hint='content is text, or a list of {"type": "text", "text": ...} parts',
        )
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _MEDIA_PARTS:
            raise UsageError(
                f"{where} has {_MEDIA_PARTS[kind]} in part {j}: ondevice runs text models",
                hint='send {"type": "text", "text": ...} parts only',
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise UsageError(
                f"{where}: part {j} is not a text part",
                hint='a part is {"type": "text", "text": ...}',
            )
        parts.append(plain(part, f"{where} part {j}"))
    return parts


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise UsageError(f"{where}: tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise UsageError(
                f"{where}: tool call {j} has no function name",
                hint='a tool call is {"type": "function", "function": {"name": ..., '
                '"arguments": ...}}',
            )
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, Mapping)):
            raise UsageError(
                f"{where}: tool call {j}'s arguments must be a JSON string or an object"
            )
        out.append(plain(call, f"{where} tool call {j}"))
    return out


def validate_tools(tools: Any, what: str = "tools") -> list[dict[str, Any]] | None:
    """`tools` (or `documents`): None, or a list of dicts, copied as plain data."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise UsageError(f"{what} must be a list of dicts")
    out = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise UsageError(f"{what}[{j}] is not a dict")
        out.append(plain(tool, f"{what}[{j}]"))
    return out


def plain(value: Any, where: str, depth: int = 0) -> Any:
    """A copy of `value` made of JSON types (tuples become lists); UsageError for anything else,
    for a lone surrogate in a string, or for nesting deeper than 64."""
    if value is None or type(value) in (bool, int, float):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"{where} has text that is not valid Unicode (a lone surrogate)"
            ) from None
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if depth >= _MAX_DEPTH:
        raise UsageError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UsageError(f"{where} has a key that is not text: {k!r}")
            out[plain(k, where)] = plain(v, where, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v, where, depth + 1) for v in value]
    raise UsageError(
        f"{where} holds a Python {type(value).__name__}, not JSON data",
        hint="messages, tools and documents hold JSON data: text, numbers, lists and dicts",
    )
