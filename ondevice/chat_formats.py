"""Prompt formats: turn an OpenAI-style message list into the exact text a model was trained on.

Which format a model gets, in order:
  1. an explicit choice (`chat_format=` / `--chat-format`): a built-in name, `gguf` for the
     file's own template, or the path of a Jinja template file;
  2. the GGUF's `tokenizer.chat_template`;
  3. a built-in format chosen by the model's architecture (phi2 -> `phi-2`).
There is no silent fallback to an unrelated format: with none of these, `ChatFormatError` names
`--chat-format` and the formats we have.

Templates are untrusted and rendered in a bounded sandbox (`ondevice.chat_sandbox`); messages are
checked and copied by `ondevice.chat_messages`. A template gets what Hugging Face's
`apply_chat_template` gives it — `messages`, `tools`, `documents`, `add_generation_prompt` and
the vocabulary's special tokens — so it renders what `transformers` renders, with two
adjustments llama.cpp also makes, each decided by rendering a probe conversation once per
template, and made only where the template would otherwise print Python's repr of a list or a
doubly encoded JSON string:
  - content given as a list of text parts goes to templates that don't read parts as the parts'
    texts joined by newlines;
  - tool-call arguments given as a JSON string go to templates that print `arguments|tojson` as
    the parsed object (and objects go to templates that print `arguments` as it is as JSON text).

Role tokens in content. `ChatFormat.prompt(..., protect=...)` renders so that text from the
caller (message content, tools, documents) can't become control tokens: `protect(s)` names the
control-token texts in a string; each is wrapped in two private-use marker characters before
rendering, and the rendered text is split at the markers into `Prompt.pieces`, the marked ones
to be tokenized as plain text (Hugging Face's `sanitize_control_tokens` does the same). Strings
without control-token text are untouched, so ordinary conversations render and tokenize
exactly as without protection.

Built-in formats are one entry each in `BUILTIN`, written as Jinja templates so they go through
the same renderer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ondevice.chat_messages import ROLES, validate_messages, validate_tools
from ondevice.chat_sandbox import (
    MAX_TEMPLATE_CHARS,
    RENDER_MAX_CHARS,
    RENDER_MAX_RSS_GROWTH,
    RENDER_TIMEOUT_S,
    RenderStopped,
    compile_template,
    literal_text,
    render_bounded,
)
from ondevice.errors import ChatFormatError

__all__ = [
    "BUILTIN",
    "ROLES",
    "RENDER_MAX_CHARS",
    "RENDER_MAX_RSS_GROWTH",
    "RENDER_TIMEOUT_S",
    "Capabilities",
    "ChatFormat",
    "Prompt",
    "adjust_messages",
    "capabilities",
    "compile_template",
    "for_model",
    "names",
    "reasoning_aliases",
    "render_bounded",
    "resolve",
    "validate_messages",
]

Protect = Callable[[str], Collection[str]]


@dataclass
class Prompt:
    """A rendered prompt and what it was rendered from.

    text          the prompt text.
    pieces        `text` in order as (text, plain) runs: `plain` runs are control-token texts that
                  came from the caller and are to be tokenized as plain text; the others are
                  tokenized with control tokens parsed. One run for ordinary conversations.
    messages      the messages as the template saw them (checked copies, adjusted as above).
    tools, documents   as the template saw them (None: none given).
    """

    text: str
    pieces: tuple[tuple[str, bool], ...]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    format: ChatFormat | None = field(default=None, repr=False)

    @property
    def generation_prompt(self) -> str:
        """The text the template adds to open the assistant's turn (`<|im_start|>assistant\\n`;
        some templates open a `<think>` block there): where the model's reply begins. Empty
        without add_generation_prompt, or if the template renders the history differently
        with and without it."""
        if not self.add_generation_prompt or self.format is None:
            return ""
        base = self.format.render_text(self.messages, False, self.tools, self.documents)
        return self.text[len(base) :] if self.text.startswith(base) else ""


@dataclass
class ChatFormat:
    """A prompt format: a Jinja chat template plus what to stop on.

    name         `chatml`, `phi-2`, ... or `gguf` for the file's own template.
    template     Jinja source, rendered like Hugging Face's `apply_chat_template`.
    stop         stop strings that end a reply in this format (besides the model's own
                 end-of-generation tokens).
    source       where it came from: "built-in", "gguf" or a template file's path.
    bos_token    the model's BOS/EOS token text, passed to the template as bos_token/eos_token.
    """

    name: str
    template: str
    stop: tuple[str, ...] = ()
    description: str = ""
    source: str = "built-in"
    bos_token: str = ""
    eos_token: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the REPL names it: `chatml (built-in)`, `gguf (the model's template)`."""
        if self.source == "gguf":
            return "the model's chat template (GGUF)"
        if self.source == "built-in":
            return f"{self.name} (built-in)"
        return f"template file {self.source}"

    @property
    def what(self) -> str:
        """The template as error messages name it."""
        if self.source == "gguf":
            return "the model's chat template"
        if self.source == "built-in":
            return f"the built-in {self.name} format"
        return f"the chat template in {self.source}"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        timeout_s: float = RENDER_TIMEOUT_S,
        max_chars: int = RENDER_MAX_CHARS,
    ) -> str:
        """The prompt text for `messages` (validated), ending with the assistant's turn opener
        when `add_generation_prompt`. Raises UsageError for a malformed message and
        ChatFormatError if the template misbehaves."""
        return self.prompt(
            messages,
            add_generation_prompt,
            tools=tools,
            documents=documents,
            timeout_s=timeout_s,
            max_chars=max_chars,
        ).text

    def prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        protect: Protect | None = None,
        timeout_s: float = RENDER_TIMEOUT_S,
        max_chars: int = RENDER_MAX_CHARS,
    ) -> Prompt:
        """Render `messages` (and `tools`/`documents`, passed to the template as Hugging Face
        passes them) into a `Prompt`. With `protect`, control-token texts it finds in the
        caller's strings end up in plain pieces (see the module docstring)."""
        compile_template(self.template)  # a broken template fails before anything else runs
        msgs = validate_messages(messages)
        tool_list = validate_tools(tools)
        docs = validate_tools(documents, "documents")
        msgs = adjust_messages(self, msgs)
        markers = _Markers.find(self.template, (msgs, tool_list, docs), protect)
        if markers is None:
            text = self.render_text(
                msgs, add_generation_prompt, tool_list, docs, timeout_s, max_chars
            )
            pieces: tuple[tuple[str, bool], ...] = ((text, False),) if text else ()
        else:
            raw = self.render_text(
                markers.wrap(msgs),
                add_generation_prompt,
                markers.wrap(tool_list),
                markers.wrap(docs),
                timeout_s,
                max_chars,
            )
            pieces = markers.split(raw)
            text = "".join(p for p, _ in pieces)
        return Prompt(text, pieces, msgs, tool_list, docs, add_generation_prompt, self)

    def render_text(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        timeout_s: float = RENDER_TIMEOUT_S,
        max_chars: int = RENDER_MAX_CHARS,
    ) -> str:
        """Render already checked messages as they are (no validation, no adjustment)."""
        context = {
            **self.special_tokens,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "messages": messages,
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
        }
        return render_bounded(
            self.template, context, timeout_s=timeout_s, max_chars=max_chars, name=self.what
        )

    def literal_text(self) -> str:
        """The template's own text and string constants, NUL-joined (its markup)."""
        return literal_text(self.template)


# --- the built-in formats: one entry per format ------------------------------------------------
# Hugging Face conventions: '\n' inside Jinja string literals is a newline; `{%-`/`-%}` trim.

_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Phi-2 is not instruction-tuned. Its model card gives `Instruct: <prompt>\nOutput:` for one
# question; a conversation repeats that pair, one line each, so the model sees the same shape it
# was prompted with at every turn. A system prompt is a plain first line. The model does not stop
# by itself: the stop strings end the reply where it would start inventing the next turn.
_PHI2 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'Instruct: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Output: ' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Output:' -}}{%- endif -%}"
)

# Meta's Llama 2 chat format: the system prompt inside the first [INST] block.
_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('llama-2 needs user and assistant turns to alternate, user first') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}"
    "{%- endif -%}"
)

# Gemma has no system role: like Gemma 3's template, the system prompt opens the first user turn.
_GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('gemma needs user and assistant turns to alternate, user first') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_ZEPHYR = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

BUILTIN: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat(
            "phi-2",
            _PHI2,
            stop=("<|endoftext|>", "\nInstruct:", "\nOutput:"),
            description="Microsoft Phi-2 (not instruction-tuned): Instruct: ... / Output: ...",
        ),
        ChatFormat(
            "chatml",
            _CHATML,
            stop=("<|im_end|>", "<|im_start|>"),
            description="<|im_start|>role ... <|im_end|> (Qwen, SmolLM, OpenHermes, ...)",
        ),
        ChatFormat(
            "llama-2",
            _LLAMA2,
            stop=("</s>",),
            description="Llama 2 chat: [INST] <<SYS>> ... [/INST]",
        ),
        ChatFormat(
            "llama-3",
            _LLAMA3,
            stop=("<|eot_id|>", "<|start_header_id|>"),
            description="Llama 3 instruct: <|start_header_id|>role<|end_header_id|>",
        ),
        ChatFormat(
            "phi-3",
            _PHI3,
            stop=("<|end|>", "<|user|>", "<|endoftext|>"),
            description="Phi-3 / Phi-3.5: <|user|> ... <|end|> <|assistant|>",
        ),
        ChatFormat(
            "gemma",
            _GEMMA,
            stop=("<end_of_turn>", "<start_of_turn>"),
            description="Gemma: <start_of_turn>user ... <end_of_turn>",
        ),
        ChatFormat(
            "zephyr",
            _ZEPHYR,
            stop=("</s>", "<|user|>"),
            description="Zephyr: <|user|> ... </s> <|assistant|>",
        ),
    )
}

# Architectures whose chat format is fixed by the architecture itself (used only when the file
# has no template of its own).
ARCH_FORMATS: dict[str, str] = {
    "phi2": "phi-2",
    "phi3": "phi-3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "qwen2": "chatml",
}

GGUF_NAME = "gguf"  # --chat-format gguf: the file's own template, or an error


def names() -> list[str]:
    """Every value --chat-format accepts besides a template file's path."""
    return [GGUF_NAME, *BUILTIN]


def _choices() -> str:
    return ", ".join(names())


# --- choosing a format for a model ----------------------------------------------------------


def resolve(metadata: Mapping[str, Any], chat_format: str | None = None) -> ChatFormat:
    """The format for a model with these GGUF key/values (see the module docstring for the order).

    `chat_format` is a built-in name, `gguf`, or a path to a Jinja template file.
    """
    tokens = _special_tokens(metadata)
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) and template.strip() else None
    arch = str(metadata.get("general.architecture", "") or "")

    def bind(fmt: ChatFormat) -> ChatFormat:
        return replace(
            fmt,
            bos_token=tokens.get("bos_token", ""),
            eos_token=tokens.get("eos_token", ""),
            special_tokens={k: v for k, v in tokens.items() if k not in ("bos_token", "eos_token")},
        )

    if chat_format:
        if chat_format in BUILTIN:
            return bind(BUILTIN[chat_format])
        if chat_format == GGUF_NAME:
            if template is None:
                raise ChatFormatError(
                    "this model has no chat template of its own",
                    hint=f"choose one with --chat-format: {', '.join(BUILTIN)}",
                )
            return bind(ChatFormat(GGUF_NAME, template, source="gguf"))
        path = Path(chat_format).expanduser()
        if path.is_file():
            size = path.stat().st_size
            if size > 4 * MAX_TEMPLATE_CHARS:  # refused unread: can't hold a valid template
                raise ChatFormatError(
                    f"the template file {path} is {size} bytes; a chat template may have "
                    f"{MAX_TEMPLATE_CHARS} characters",
                    hint="pass --chat-format with a built-in format",
                )
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatFormatError(f"can't read the template file {path}: {exc}") from None
            compile_template(source)  # fail now, not at the first message
            return bind(ChatFormat(path.stem, source, source=str(path)))
        raise ChatFormatError(
            f"unknown chat format {chat_format!r}",
            hint=f"use --chat-format with one of {_choices()}, or a Jinja template file",
        )
    if template is not None:
        compile_template(template)
        return bind(ChatFormat(GGUF_NAME, template, source="gguf"))
    if arch in ARCH_FORMATS:
        return bind(BUILTIN[ARCH_FORMATS[arch]])
    raise ChatFormatError(
        f"no chat format for this model: the file has no chat template and we have no built-in "
        f"format for architecture {arch or 'unknown'!r}",
        hint=f"choose one with --chat-format: {', '.join(BUILTIN)}, or a Jinja template file",
    )


def for_model(model: Any, chat_format: str | None = None) -> ChatFormat:
    """`resolve()` for a loaded `ondevice.Model`."""
    return resolve(model.metadata, chat_format)


def _special_tokens(metadata: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, unk_token, pad_token texts from the GGUF vocabulary."""
    vocab = metadata.get("tokenizer.ggml.tokens")
    out: dict[str, str] = {}
    if not isinstance(vocab, (list, tuple)):
        return out
    for name in ("bos", "eos", "unknown", "padding"):
        idx = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if isinstance(idx, int) and 0 <= idx < len(vocab) and isinstance(vocab[idx], str):
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            out[f"{key}_token"] = vocab[idx]
    return out


# --- what a template can read: probed once per template ---------------------------------------

_NEEDLE = "ondevice-probe-3f9a2c"


@dataclass(frozen=True)
class Capabilities:
    """What a template does with the shapes OpenAI allows (found by rendering probes).

    string_content / typed_content   it prints text content / the text of text parts.
    object_arguments / string_arguments   it prints tool-call arguments given as an object / as
                                          a JSON string the way they are meant (no repr, no
                                          second JSON encoding).
    """

    string_content: bool = True
    typed_content: bool = False
    object_arguments: bool = True
    string_arguments: bool = True


def capabilities(fmt: ChatFormat) -> Capabilities:
    """The template's `Capabilities` (cached per template and BOS/EOS text)."""
    return _capabilities(fmt.template, fmt.bos_token, fmt.eos_token)


_PROBE_TIMEOUT_S = 0.5


class _GiveUp(Exception):
    """A probe hit the watchdog: stop probing this template."""


@lru_cache(maxsize=32)
def _capabilities(template: str, bos: str, eos: str) -> Capabilities:
    fmt = ChatFormat("probe", template, source="gguf", bos_token=bos, eos_token=eos)

    def attempt(messages: list[dict[str, Any]], tools: Any = None) -> str:
        try:
            return fmt.render_text(messages, True, tools, timeout_s=_PROBE_TIMEOUT_S)
        except RenderStopped:
            raise _GiveUp from None  # a template this slow gets no more probes
        except Exception:  # noqa: BLE001 - a template that refuses a probe tells us nothing
            return ""

    try:
        text = attempt([{"role": "user", "content": _NEEDLE}])
        parts = attempt([{"role": "user", "content": [{"type": "text", "text": _NEEDLE}]}])
        as_json = json.dumps({"arg": _NEEDLE})
        objects = attempt(_probe_calls({"arg": _NEEDLE}), _PROBE_TOOLS)
        strings = attempt(_probe_calls(as_json), _PROBE_TOOLS)
    except _GiveUp:
        return Capabilities()
    return Capabilities(
        string_content=_NEEDLE in text,
        typed_content=_NEEDLE in parts and "'type'" not in parts and '"type"' not in parts,
        object_arguments=_NEEDLE in objects and "{'arg'" not in objects,
        string_arguments=as_json in strings,
    )


_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "A probe.",
            "parameters": {
                "type": "object",
                "properties": {"arg": {"type": "string"}},
                "required": ["arg"],
            },
        },
    }
]


def _probe_calls(arguments: Any) -> list[dict[str, Any]]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "probe_tool", "arguments": arguments},
    }
    return [
        {"role": "user", "content": "Use the tool."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "probe_tool", "content": "done"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks."},
    ]


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def adjust_messages(fmt: ChatFormat, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked messages as `fmt`'s template should see them: the reasoning aliases Hugging Face
    adds (`reasoning_content` and `thinking`), then the adjustments in the module docstring,
    made only where the template's probes call for them."""
    out = reasoning_aliases(messages)
    if not any(_needs_probe(m) for m in out):
        return out  # plain conversations go to every template as they are
    caps = capabilities(fmt)
    return [_adjust(m, caps) for m in out]


def reasoning_aliases(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with a reasoning text under both names templates read, `reasoning_content` and
    `thinking` (gpt-oss), taken from either or from `reasoning`, as Hugging Face does."""
    out = []
    for m in messages:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _needs_probe(m: Mapping[str, Any]) -> bool:
    return isinstance(m.get("content"), list) or "tool_calls" in m


def _adjust(m: dict[str, Any], caps: Capabilities) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, list) and caps.string_content and not caps.typed_content:
        m = {**m, "content": "\n".join(p["text"] for p in content)}
    calls = m.get("tool_calls")
    if calls and caps.object_arguments != caps.string_arguments:
        m = {**m, "tool_calls": [_adjust_call(c, caps.object_arguments) for c in calls]}
    return m


def calls_as_text(fmt: ChatFormat, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a template that can't render tool calls (it ignores them or fails): each
    assistant message's calls written into its content the way Hermes-style models write
    them (what ondevice.tools reads back for such a template), so the model still sees what it
    called — llama-server's polyfill. Other templates get `messages` as they are."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    caps = capabilities(fmt)
    if caps.object_arguments or caps.string_arguments:
        return messages
    return [_calls_as_text(m, m["tool_calls"]) if m.get("tool_calls") else m for m in messages]


def _calls_as_text(m: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    texts = [m["content"]] if isinstance(m.get("content"), str) and m["content"] else []
    for call in calls:
        fn = _adjust_call(call, True)["function"]
        body = {"name": fn.get("name"), "arguments": fn.get("arguments", {})}
        texts.append(f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>")
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    out["content"] = "\n".join(texts)
    return out


def _adjust_call(call: dict[str, Any], objects: bool) -> dict[str, Any]:
    fn = call["function"]
    args = fn.get("arguments")
    if objects and isinstance(args, str):
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):
            return call
        if not isinstance(parsed, dict):
            return call
        return {**call, "function": {**fn, "arguments": parsed}}
    if not objects and isinstance(args, dict):
        return {**call, "function": {**fn, "arguments": json.dumps(args, ensure_ascii=False)}}
    return call


# --- keeping the caller's control-token texts plain -----------------------------------------

# Private-use characters: the first pair that occurs nowhere in the template or the inputs.
_MARKER_BASE = 0xF0000


class _Markers:
    """Marker characters around the control-token texts found in the caller's strings."""

    def __init__(self, start: str, end: str, texts: Collection[str]) -> None:
        self.start, self.end = start, end
        alt = "|".join(map(re.escape, sorted(texts, key=len, reverse=True)))
        self._find = re.compile(alt)
        s, e = re.escape(start), re.escape(end)
        self._split = re.compile(f"{s}({alt}){e}|[{s}{e}]")

    @classmethod
    def find(cls, template: str, values: Any, protect: Protect | None) -> _Markers | None:
        """Markers for `values`' strings, or None when none holds a control-token text."""
        if protect is None:
            return None
        strings = list(_strings(values))
        texts = {t for s in strings for t in protect(s) if t}
        if not texts:
            return None
        for base in range(_MARKER_BASE, _MARKER_BASE + 2000, 2):
            start, end = chr(base), chr(base + 1)
            if not any(start in s or end in s for s in (template, *strings)):
                return cls(start, end, texts)
        raise ChatFormatError("no free marker characters for this conversation")

    def wrap(self, value: Any) -> Any:
        """A copy of `value` with each control-token text in its strings between markers."""
        if isinstance(value, str):
            return self._find.sub(lambda m: self.start + m.group(0) + self.end, value)
        if isinstance(value, dict):
            return {k: self.wrap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.wrap(v) for v in value]
        return value

    def split(self, rendered: str) -> tuple[tuple[str, bool], ...]:
        """The rendered text as (text, plain) pieces, markers removed. A marker left alone (a
        template cut a marked text apart) still ends a piece, so that the text on its two
        sides can't join into a control token."""
        parts = self._split.split(rendered)
        out: list[tuple[str, bool]] = []
        for i, part in enumerate(parts):
            if part:
                out.append((part, i % 2 == 1))
        return tuple(out)


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
