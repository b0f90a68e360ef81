"""Prompt formats: turn an OpenAI-style message list into the exact text a model was trained on.

Which format a model gets, in order:
  1. an explicit choice (`chat_format=` / `--chat-format`): a built-in name, `gguf` for the
     file's own template, or the path of a Jinja template file;
  2. the GGUF's `tokenizer.chat_template`;
  3. a built-in format chosen by the model's architecture (phi2 -> `phi-2`).
There is no silent fallback to an unrelated format: with none of these, `ChatFormatError` names
`--chat-format` and the formats we have.

A GGUF's template is untrusted input (CVE-2024-34359 ran code from one). Templates are rendered
with jinja2's `ImmutableSandboxedEnvironment` (jinja2 >= 3.1.6), with the globals and filters of
Hugging Face's renderer (`raise_exception`, `strftime_now`, `tojson`, `{% generation %}`,
`trim_blocks`/`lstrip_blocks`), and bounded: operations that build huge strings are refused,
the output has a size limit, and a render that runs too long or grows the process by too much
memory is stopped (see `render_bounded`). Anything a template does wrong surfaces as
`ChatFormatError`.

Built-in formats are one entry each in `BUILTIN`, written as Jinja templates so they go through
the same renderer.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ondevice import stats
from ondevice.errors import ChatFormatError, OndeviceError, UsageError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# Bounds on rendering an (untrusted) template.
RENDER_TIMEOUT_S = 2.0
RENDER_MAX_CHARS = 4_000_000  # the rendered prompt, and any single value built while rendering
RENDER_MAX_RSS_GROWTH = 512 * 1024 * 1024
_MAX_WIDTH = 100_000  # padding/indent widths a template may ask for


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

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        timeout_s: float = RENDER_TIMEOUT_S,
        max_chars: int = RENDER_MAX_CHARS,
    ) -> str:
        """The prompt text for `messages` (validated), ending with the assistant's turn opener
        when `add_generation_prompt`. Raises ChatFormatError if the template misbehaves."""
        msgs = validate_messages(messages)
        context = {
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": None,
            "documents": None,
            **self.special_tokens,
        }
        return render_bounded(
            self.template, context, timeout_s=timeout_s, max_chars=max_chars, name=self.what
        )

    @property
    def what(self) -> str:
        """The template as error messages name it."""
        if self.source == "gguf":
            return "the model's chat template"
        if self.source == "built-in":
            return f"the built-in {self.name} format"
        return f"the chat template in {self.source}"


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


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check an OpenAI-style message list and return plain-dict copies (templates see copies)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UsageError('messages must be a list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(f"message {i} is not a dict", hint='use {"role": ..., "content": ...}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UsageError(
                f"message {i} has role {role!r}", hint=f"use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise UsageError(f"message {i} ({role}) has no text content")
        out.append({**m, "role": role, "content": content})
    return out


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


# --- the sandbox ------------------------------------------------------------------------------


class _RenderAborted(BaseException):
    """Raised inside the rendering thread to stop it (a BaseException: templates can't catch it,
    and neither can jinja's own `except Exception` handlers)."""


def _too_big(what: str) -> SecurityError:
    return SecurityError(f"the template tried to build {what} larger than the limit")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 0


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format_string(s: str) -> None:
    """Refuse format strings that pad to huge widths ('%999999999d', '{:>999999999}')."""
    for m in _PERCENT_SPEC.finditer(s):
        for part in m.groups():
            if part and part.isdigit() and int(part) > _MAX_WIDTH:
                raise _too_big("a formatted string")
    for m in _BRACE_SPEC.finditer(s):
        for num in re.findall(r"\d+", m.group(1)):
            if int(num) > _MAX_WIDTH:
                raise _too_big("a formatted string")


def _check_int_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_WIDTH:
            raise _too_big("a padded or indented string")


# Methods and filters whose integer arguments size their result.
_SIZING_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
_SIZING_FILTERS = {"center", "indent", "wordwrap", "truncate", "tojson", "batch", "slice"}


class _BoundedCodeGenerator(CodeGenerator):
    """Routes `a ~ b` (string concatenation) through a size check."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` (marks assistant text for
    training masks); for rendering it is just its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
    """`dict` as Hugging Face exposes it: callable, without attribute access to the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names (as Hugging Face's does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _TemplateRaised(TemplateError):
    """What a template's own `raise_exception(...)` raises."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    _check_format_string(fmt)
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's tojson: no HTML escaping, with indent/separators/sort_keys.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Environment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox plus size checks on the operations that build big values."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator
    max_chars = RENDER_MAX_CHARS

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            autoescape=False,
        )
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["dict"] = _TemplateDict()
        self.globals["namespace"] = _TemplateNamespace
        self.filters["tojson"] = _tojson
        for name, fn in list(self.filters.items()):
            self.filters[name] = self._bounded_filter(name, fn)

    def _check(self, value: Any) -> Any:
        if _size(value) > self.max_chars:
            raise _too_big("a value")
        return value

    def _bounded_filter(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        sizing = name in _SIZING_FILTERS
        formatting = name == "format"
        # Filters marked pass_context/pass_eval_context/pass_environment get that first.
        passes = getattr(fn, "jinja_pass_arg", None) is not None

        @wraps(fn)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            rest = args[2:] if passes else args[1:]
            if sizing:
                _check_int_args(rest, kwargs)
            if formatting:
                value = args[1] if passes else args[0]
                if isinstance(value, str):
                    _check_format_string(value)
            return self._check(fn(*args, **kwargs))

        return bounded

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * max(n, 0) > self.max_chars:
                    raise _too_big("a repeated string or list")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if right * max(abs(left), 2).bit_length() > 4096:
                    raise _too_big("a number")
        elif operator == "+":
            if _size(left) + _size(right) > self.max_chars:
                raise _too_big("a concatenated value")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
            args = right if isinstance(right, tuple) else (right,)
            _check_int_args(args, {})
        return self._check(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        target = getattr(__obj, "__wrapped__", __obj)
        name = getattr(target, "__name__", "")
        if isinstance(getattr(target, "__self__", None), str):
            if name in _SIZING_METHODS:
                _check_int_args(args, kwargs)
            elif name in ("format", "format_map"):
                _check_format_string(target.__self__)
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def bounded_concat(self, parts: Sequence[Any]) -> str:
        text = "".join(map(str, parts))
        if len(text) > self.max_chars:
            raise _too_big("a concatenated string")
        return text


_ENV: _Environment | None = None
_ENV_LOCK = threading.Lock()


def _environment() -> _Environment:
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = _Environment()
        return _ENV


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Parse and compile a template in the sandbox (cached). Raises ChatFormatError."""
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as exc:
        raise ChatFormatError(
            f"the chat template does not parse (line {exc.lineno}): {exc.message}",
            hint="pass --chat-format with a built-in format instead",
        ) from None
    except (TemplateError, RecursionError, MemoryError, ValueError) as exc:
        raise ChatFormatError(f"the chat template can't be compiled: {exc}") from None


def render_bounded(
    source: str,
    context: Mapping[str, Any],
    *,
    timeout_s: float = RENDER_TIMEOUT_S,
    max_chars: int = RENDER_MAX_CHARS,
    max_rss_growth: int = RENDER_MAX_RSS_GROWTH,
    name: str = "the chat template",
) -> str:
    """Render a template in the sandbox, within a time, output-size and memory bound.

    The render runs in a helper thread while this one watches the clock and the process's RSS;
    on a breach it raises an exception inside the helper (CPython's PyThreadState_SetAsyncExc,
    delivered between two bytecodes of the template's compiled code) and raises
    ChatFormatError here. A single C-level operation can't be interrupted, which is why the
    operations that build big values are refused up front by the environment.
    """
    template = compile_template(source)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            parts: list[str] = []
            total = 0
            for piece in template.generate(**context):
                total += len(piece)
                if total > max_chars:
                    raise _too_big(f"a prompt ({max_chars} characters)")
                parts.append(piece)
            result["text"] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    rss0 = stats.rss_bytes()
    deadline = time.monotonic() + timeout_s
    worker = threading.Thread(target=work, name="ondevice-chat-template", daemon=True)
    worker.start()
    worker.join(0.02)
    while worker.is_alive():
        reason = None
        if time.monotonic() > deadline:
            reason = f"took longer than {timeout_s:g} s"
        elif stats.rss_bytes() - rss0 > max_rss_growth:
            reason = f"used more than {max_rss_growth // (1024 * 1024)} MiB of memory"
        if reason:
            _interrupt(worker)
            worker.join(0.5)
            raise ChatFormatError(
                f"rendering {name} {reason}; stopped",
                hint="the template may be malicious or broken: pass --chat-format with a "
                "built-in format",
            )
        worker.join(0.01)
    err = result.get("error")
    if err is None:
        return result["text"]
    if isinstance(err, SecurityError):
        raise ChatFormatError(
            f"{name} tried something unsafe and was stopped: {err}",
            hint="the file may be malicious: pass --chat-format with a built-in format",
        ) from None
    if isinstance(err, _TemplateRaised):
        raise ChatFormatError(f"{name} refused the conversation: {err}") from None
    if isinstance(err, TemplateError):
        raise ChatFormatError(f"{name} failed: {err}") from None
    if isinstance(err, OndeviceError):
        raise err
    if isinstance(err, Exception):
        raise ChatFormatError(
            f"{name} failed: {type(err).__name__}: {err}",
            hint="pass --chat-format with a built-in format",
        ) from None
    raise err


def _interrupt(thread: threading.Thread) -> None:
    if thread.ident is None:
        return
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(_RenderAborted)
    )
    if n > 1:  # "if it returns a number greater than one, you're in trouble": undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)
    log.warning("stopped a chat template render in thread %s", thread.name)
