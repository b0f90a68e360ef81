"""The sandbox chat templates are compiled and rendered in, with bounds on time, memory and size.

A GGUF's `tokenizer.chat_template` is untrusted input (CVE-2024-34359 ran code from one). It is
compiled and rendered with jinja2's `ImmutableSandboxedEnvironment` (jinja2 >= 3.1.6), with the
globals and filters of Hugging Face's renderer (`raise_exception`, `strftime_now`, `tojson`,
`{% generation %}`, `trim_blocks`/`lstrip_blocks`), so real templates render exactly as
`transformers` renders them.

The bounds. A watchdog thread stops a compile and render that together run longer than
`RENDER_TIMEOUT_S` or grow the process by more than `RENDER_MAX_RSS_GROWTH`; it can only act between two bytecodes,
so every operation that could run long or build a huge value inside one C call is checked
*before* it runs:
  - the source: at most `MAX_TEMPLATE_CHARS` characters, `MAX_TEMPLATE_TOKENS` lexer tokens and
    `MAX_TEMPLATE_NODES` syntax-tree nodes, and its generated Python at most `MAX_CODE_CHARS`
    (compiling a 3 MB template took 23 s and 3.5 GB; real templates are under 17 kB);
  - integers: no operand of an arithmetic operator over `MAX_INT_BITS` bits, no product or power
    beyond it (one `x % y` on numbers built by repeated squaring holds the GIL for minutes);
  - strings and lists: every value a template builds, and every value it turns into text (`{{ x }}`,
    `~`, `%`, `|string`, `|join`, `|tojson`, ...), is at most `RENDER_MAX_CHARS` characters,
    counted through nested lists and dicts before the text is built; `|join`, `|replace`,
    `str.replace`, `|indent`, `|wordwrap` and padding widths compute their result's size first;
  - the rendered prompt is at most `RENDER_MAX_CHARS` characters and valid Unicode.
Whatever a template does wrong — a syntax error, Python's own nesting limits, a lone surrogate,
`raise_exception`, a bound — surfaces as one `ChatFormatError`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache, wraps
from itertools import islice
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ondevice.errors import ChatFormatError, OndeviceError
from ondevice.watchdog import Exceeded, run_bounded

log = logging.getLogger(__name__)

# The largest of the 70 templates llama.cpp ships (models/templates, 2026-12) is 16.7 kB
# (gpt-oss), 2461 lexer tokens and 1287 syntax nodes (Kimi-K3), 56 kB of generated Python: the
# bounds leave 6-10x room, and at these sizes the worst template we could write compiles in
# about half a second.
MAX_TEMPLATE_CHARS = 100_000
MAX_TEMPLATE_TOKENS = 25_000
MAX_TEMPLATE_NODES = 10_000
MAX_CODE_CHARS = 600_000

# A compile and a render together: the watchdog's own reaction time keeps the total under 2 s.
RENDER_TIMEOUT_S = 1.8
RENDER_MAX_CHARS = 4_000_000  # the rendered prompt, and any value built while rendering
RENDER_MAX_ITEMS = 200_000  # elements of one list or dict a template builds
# The watchdog samples memory every few milliseconds; what one bounded operation can allocate
# between two samples stays well inside the 256 MiB this leaves room for.
RENDER_MAX_RSS_GROWTH = 192 * 1024 * 1024
MAX_INT_BITS = 4096
_MAX_WIDTH = 100_000  # padding/indent widths a template may ask for
_MAX_JSON_INDENT = 64
_POLL_S = 0.005


def _too_big(what: str) -> SecurityError:
    return SecurityError(f"the template tried to build {what} larger than the limit")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 0


def _weight(value: Any, limit: int, indent: int = 0) -> int:
    """About how many characters `str(value)` (or JSON with `indent`) has: strings by length,
    containers by what they hold, walked without recursion and given up once over `limit` (so a
    list holding the same long string a million times costs nothing to refuse)."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 + len(v) * (2 + indent * (depth + 1))
            if total > limit:
                return total
            items = v.items() if isinstance(v, dict) else v
            for item in items:
                if isinstance(item, tuple) and isinstance(v, dict):
                    stack.append((item[0], depth + 1))
                    stack.append((item[1], depth + 1))
                else:
                    stack.append((item, depth + 1))
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, jinja2.utils.Namespace):
            total += 16
        else:
            total += 24
        if total > limit:
            return total
    return total


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_NESTED_SPEC = re.compile(r"\{[^{}]*:[^{}]*\{")


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


def _check_percent(fmt: str, args: Sequence[Any]) -> None:
    """`fmt % args`: widths written in `fmt`, or taken from `args` by a `*`."""
    _check_format_string(fmt)
    if "*" in fmt:
        _check_int_args(args, {})


def _check_int_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_WIDTH:
            raise _too_big("a padded or indented string")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ints(operator: str, left: Any, right: Any) -> None:
    """Integer arithmetic stays small: CPython's big-integer operations hold the GIL."""
    if not (_is_int(left) or _is_int(right)):
        return
    lbits = left.bit_length() if _is_int(left) else 0
    rbits = right.bit_length() if _is_int(right) else 0
    if max(lbits, rbits) > MAX_INT_BITS:
        raise _too_big("a number")
    if operator == "*" and _is_int(left) and _is_int(right) and lbits + rbits > MAX_INT_BITS:
        raise _too_big("a number")
    if operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
        if right * max(lbits, 2) > MAX_INT_BITS:
            raise _too_big("a number")


def _replaced_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    """The length of `s.replace(old, new, count)`, computed without building it."""
    s, old, new = str(s) if not isinstance(s, (str, bytes)) else s, old, new
    if not isinstance(old, type(s)) or not isinstance(new, type(s)):
        old, new = str(old), str(new)
        s = str(s)
    n = len(s) + 1 if not old else s.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


# Filters whose integer arguments size their result.
_SIZING_FILTERS = {"center", "batch", "slice"}
# Filters that never turn a container into text: their inputs need no size walk.
_PLAIN_FILTERS = {
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby",
    "int", "items", "last", "length", "list", "map", "max", "min", "reject", "rejectattr",
    "reverse", "round", "select", "selectattr", "slice", "sort", "sum", "unique", "random",
}  # fmt: skip
# Methods of str/bytes whose integer arguments size their result.
_SIZING_METHODS = {"center", "ljust", "rjust", "zfill"}
_REFUSED_METHODS = {"translate", "maketrans"}


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


class TemplateRaised(TemplateError):
    """What a template's own `raise_exception(...)` raises."""


def _raise_exception(message: Any) -> None:
    if _weight(message, 10_000) > 10_000:
        message = "(a message too long to show)"
    raise TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 1000:
        raise _too_big("a date format")
    _check_format_string(fmt)
    return datetime.now().strftime(fmt)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if not all(_is_int(x) and 0 <= x <= 1000 for x in (n, min, max)):
        raise _too_big("lorem ipsum")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


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

    intercepted_binops = frozenset({"*", "**", "+", "-", "%", "/", "//"})
    code_generator_class = _BoundedCodeGenerator
    max_chars = RENDER_MAX_CHARS

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            autoescape=False,
            finalize=self._finalize,
        )
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["dict"] = _TemplateDict()
        self.globals["namespace"] = _TemplateNamespace
        self.globals["lipsum"] = _lipsum
        self.filters["tojson"] = _tojson
        for name, fn in list(self.filters.items()):
            self.filters[name] = self._bounded_filter(name, fn)

    # --- checks ----------------------------------------------------------------------------
    def _check(self, value: Any) -> Any:
        """A value just built: a bounded size."""
        if isinstance(value, (str, bytes)):
            if len(value) > self.max_chars:
                raise _too_big("a value")
        elif isinstance(value, (list, tuple, dict, set)):
            if len(value) > RENDER_MAX_ITEMS:
                raise _too_big("a list")
        elif _is_int(value) and value.bit_length() > MAX_INT_BITS + 64:
            raise _too_big("a number")
        return value

    def _check_text(self, *values: Any, indent: int = 0) -> None:
        """Values about to be turned into text: bounded, counted through what they contain."""
        total = 0
        for v in values:
            if not isinstance(v, str) or indent:
                total += _weight(v, self.max_chars, indent)
            else:
                total += len(v)
            if total > self.max_chars:
                raise _too_big("a string")

    def _finalize(self, value: Any) -> Any:
        # `{{ x }}`: jinja calls str(x) next.
        if not isinstance(value, str):
            self._check_text(value)
        return value

    def bounded_concat(self, parts: Sequence[Any]) -> str:
        self._check_text(*parts)
        return "".join(map(str, parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_ints(operator, left, right)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if not (_size(seq) and _is_int(n) and n > 0):
                    continue
                if isinstance(seq, (str, bytes)):
                    if len(seq) * n > self.max_chars:
                        raise _too_big("a repeated string")
                elif len(seq) * n > RENDER_MAX_ITEMS:
                    raise _too_big("a repeated list")
                elif _weight(seq, self.max_chars) * n > self.max_chars:
                    raise _too_big("a repeated list")
        elif operator == "+":
            if _size(left) and _size(right):
                if _weight(left, self.max_chars) + _weight(right, self.max_chars) > self.max_chars:
                    raise _too_big("a concatenated value")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            _check_percent(left, args)
            self._check_text(left, *(right.values() if isinstance(right, dict) else args))
        return self._check(super().call_binop(context, operator, left, right))

    # --- filters ---------------------------------------------------------------------------
    def _bounded_filter(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        # Filters marked pass_context/pass_eval_context/pass_environment get that first.
        passes = getattr(fn, "jinja_pass_arg", None) is not None
        check = _FILTER_CHECKS.get(name)
        stringifies = name not in _PLAIN_FILTERS

        @wraps(fn)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            head, rest = (args[:1], args[1:]) if passes else ((), args)
            if name in _SIZING_FILTERS:
                _check_int_args(rest[1:], kwargs)
            if stringifies:
                self._check_text(*rest, *kwargs.values())
            if check is not None:
                rest = check(self, list(rest), kwargs)
            return self._check(fn(*head, *rest, **kwargs))

        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        target = getattr(__obj, "__wrapped__", __obj)
        name = getattr(target, "__name__", "")
        owner = getattr(target, "__self__", None)
        __self._check_text(*args, *kwargs.values())
        if isinstance(owner, (str, bytes)):
            __self._check_method(owner, name, args, kwargs)
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def _check_method(self, owner: str | bytes, name: str, args: Any, kwargs: Any) -> None:
        if name in _REFUSED_METHODS:
            raise SecurityError(f"str.{name} is not available in chat templates")
        if name in _SIZING_METHODS:
            _check_int_args(args, kwargs)
        elif name == "expandtabs":
            _check_int_args(args, kwargs)
            size = args[0] if args and _is_int(args[0]) else 8
            if len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * size > (
                self.max_chars
            ):
                raise _too_big("a string")
        elif name in ("format", "format_map") and isinstance(owner, str):
            _check_format_string(owner)
            if _NESTED_SPEC.search(owner):  # widths from the arguments: '{:>{w}}'.format(x, w=9)
                _check_int_args(args, kwargs)
        elif name == "replace" and len(args) >= 2:
            if _replaced_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1) > (
                self.max_chars
            ):
                raise _too_big("a replaced string")
        elif name == "join" and args:
            items = args[0]
            if isinstance(items, (list, tuple)):
                n = len(items)
                if _weight(items, self.max_chars) + n * len(owner) > self.max_chars:
                    raise _too_big("a joined string")


def _check_join(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """`value|join(d)`: the result's size from its parts, before joining. A generator (from
    `map`, `select`, ...) is read into a list first, at most RENDER_MAX_ITEMS long."""
    if not args:
        return args
    value = args[0]
    if not isinstance(value, (list, tuple, str)):
        if isinstance(value, (dict, set, frozenset)):
            value = list(value)
        else:
            try:
                value = list(islice(iter(value), RENDER_MAX_ITEMS + 1))
            except TypeError:
                return args  # not iterable: jinja raises its own error
        if len(value) > RENDER_MAX_ITEMS:
            raise _too_big("a list")
        args[0] = value
    sep = args[1] if len(args) > 1 else kwargs.get("d", "")
    n = len(value)
    if _weight(value, env.max_chars) + n * _weight(sep, env.max_chars) > env.max_chars:
        raise _too_big("a joined string")
    return args


def _check_replace(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    if len(args) >= 3:
        count = args[3] if len(args) > 3 else kwargs.get("count")
        if _replaced_size(args[0], args[1], args[2], count) > env.max_chars:
            raise _too_big("a replaced string")
    return args


def _check_indent(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    if args:
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        if w > _MAX_WIDTH:
            raise _too_big("an indented string")
        s = str(args[0])
        if len(s) + (s.count("\n") + 1) * w > env.max_chars:
            raise _too_big("an indented string")
    return args


def _check_wordwrap(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    if args:
        width = args[1] if len(args) > 1 else kwargs.get("width", 79)
        wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring")
        s = str(args[0])
        lines = len(s) // max(width if _is_int(width) else 1, 1) + s.count("\n") + 1
        if len(s) + lines * (len(wrap) if isinstance(wrap, str) else 1) > env.max_chars:
            raise _too_big("a wrapped string")
    return args


def _check_tojson(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    indent = args[2] if len(args) > 2 else kwargs.get("indent")
    separators = args[3] if len(args) > 3 else kwargs.get("separators")
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    if width > _MAX_JSON_INDENT:
        raise _too_big("indented JSON")
    if separators is not None and _weight(separators, 1000) > 1000:
        raise _too_big("JSON separators")
    # Escapes make JSON up to 6 times its weight: bounded, and checked again once built.
    if args and _weight(args[0], env.max_chars, width) > env.max_chars:
        raise _too_big("JSON")
    return args


def _check_pprint(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    # pprint indents nested values by one column per level.
    if args and _weight(args[0], env.max_chars, 1) > env.max_chars:
        raise _too_big("a pretty-printed value")
    return args


def _check_format(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    if args and isinstance(args[0], str):
        _check_percent(args[0], (*args[1:], *kwargs.values()))
    return args


def _check_urlize(env: _Environment, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    # target= and rel= are copied into every link.
    if any(isinstance(v, str) and len(v) > 1000 for v in (*args[1:], *kwargs.values())):
        raise _too_big("a link attribute")
    return args


_FILTER_CHECKS: dict[str, Callable[[_Environment, list[Any], dict[str, Any]], list[Any]]] = {
    "join": _check_join,
    "replace": _check_replace,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "tojson": _check_tojson,
    "urlize": _check_urlize,
    "pprint": _check_pprint,
    "format": _check_format,
}


_ENV: _Environment | None = None
_ENV_LOCK = threading.Lock()


def _environment() -> _Environment:
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = _Environment()
        return _ENV


# --- compiling --------------------------------------------------------------------------------


def _compile(source: str) -> jinja2.Template:
    """Parse and compile `source`, refusing it before each costly step if it is too big."""
    env = _environment()
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatFormatError(
            f"the chat template is {len(source)} characters long; the limit is "
            f"{MAX_TEMPLATE_CHARS} (real templates are under 20 000)",
            hint="pass --chat-format with a built-in format",
        )
    for n, _ in enumerate(env.lex(source), 1):
        if n > MAX_TEMPLATE_TOKENS:
            raise _compile_limit(f"more than {MAX_TEMPLATE_TOKENS} tokens")
    tree = env.parse(source)
    for n, _ in enumerate(tree.find_all(jinja2.nodes.Node), 1):
        if n > MAX_TEMPLATE_NODES:
            raise _compile_limit(f"more than {MAX_TEMPLATE_NODES} syntax nodes")
    code = env.compile(tree, raw=True)
    if len(code) > MAX_CODE_CHARS:
        raise _compile_limit(f"more than {MAX_CODE_CHARS} characters of compiled code")
    return env.template_class.from_code(
        env, compile(code, "<template>", "exec"), env.make_globals(None), None
    )


def _compile_limit(what: str) -> ChatFormatError:
    return ChatFormatError(
        f"the chat template has {what}; real templates are far smaller",
        hint="pass --chat-format with a built-in format",
    )


def compile_template(source: str) -> jinja2.Template:
    """Parse and compile a template in the sandbox, within the bounds. Raises ChatFormatError.
    Both outcomes are cached: a template that failed fails again at no cost."""
    if not isinstance(source, str):
        raise ChatFormatError("the chat template is not text")
    outcome = _compiled(source)
    if isinstance(outcome, ChatFormatError):
        raise ChatFormatError(outcome.message, hint=outcome.hint)
    return outcome


@lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template | ChatFormatError:
    try:
        return _watched(lambda: _compile(source), RENDER_TIMEOUT_S, RENDER_MAX_RSS_GROWTH, "")
    except _Failed as failed:  # the watchdog's RenderStopped is not cached: load may pass
        return _compile_error(failed.error)


def _compile_error(err: BaseException) -> ChatFormatError:
    if isinstance(err, ChatFormatError):
        return err
    if isinstance(err, TemplateSyntaxError):
        return ChatFormatError(
            f"the chat template does not parse (line {err.lineno}): {err.message}",
            hint="pass --chat-format with a built-in format instead",
        )
    if isinstance(err, SyntaxError):  # Python's own limits: IndentationError, nested blocks
        return ChatFormatError(
            f"the chat template is nested too deeply to compile ({err.msg})",
            hint="pass --chat-format with a built-in format",
        )
    if isinstance(err, RecursionError):
        return ChatFormatError(
            "the chat template is nested too deeply to compile",
            hint="pass --chat-format with a built-in format",
        )
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ChatFormatError(
        f"the chat template can't be compiled: {text}",
        hint="pass --chat-format with a built-in format",
    )


# --- rendering --------------------------------------------------------------------------------


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
    `timeout_s` counts a compile this call had to make. Raises ChatFormatError, naming the
    template as `name`."""
    start = time.monotonic()
    template = compile_template(source)
    left_s = max(timeout_s - (time.monotonic() - start), 0.1)

    def work() -> str:
        parts: list[str] = []
        total = 0
        for piece in template.generate(**context):
            total += len(piece)
            if total > max_chars:
                raise _too_big(f"a prompt ({max_chars} characters)")
            parts.append(piece)
        text = "".join(parts)
        text.encode("utf-8")  # a lone surrogate ('%c' % 55296) fails here, not in the tokenizer
        return text

    try:
        return _watched(work, left_s, max_rss_growth, name, timeout_s)
    except _Failed as failed:
        raise _render_error(failed.error, name) from None


def _render_error(err: BaseException, name: str) -> OndeviceError:
    if isinstance(err, OndeviceError):
        return err
    if isinstance(err, SecurityError):
        return ChatFormatError(
            f"{name} tried something unsafe and was stopped: {err}",
            hint="the file may be malicious: pass --chat-format with a built-in format",
        )
    if isinstance(err, TemplateRaised):
        return ChatFormatError(f"{name} refused the conversation: {err}")
    if isinstance(err, UnicodeError):
        return ChatFormatError(
            f"{name} produced text that is not valid Unicode (a lone surrogate)",
            hint="pass --chat-format with a built-in format",
        )
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, TemplateError):
        return ChatFormatError(f"{name} failed: {text}")
    return ChatFormatError(
        f"{name} failed: {type(err).__name__}{': ' + text if text else ''}",
        hint="pass --chat-format with a built-in format",
    )


class RenderStopped(ChatFormatError):
    """The watchdog stopped a compile or render that ran too long or used too much memory."""


class _Failed(Exception):
    """The watched call raised `error` (an exception of any kind, handed over unchanged)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _watched(
    fn: Callable[[], Any],
    timeout_s: float,
    max_rss_growth: int,
    name: str,
    shown_s: float | None = None,
) -> Any:
    """Run `fn` within the time and memory bound (ondevice.watchdog); a breach is
    RenderStopped, and what `fn` raises comes back wrapped in `_Failed`. Single C-level
    operations can't be interrupted: the environment's checks keep each of them small."""
    try:
        return run_bounded(
            fn,
            timeout_s=timeout_s,
            max_rss_growth=max_rss_growth,
            name="ondevice-chat-template",
            poll_s=_POLL_S,
            shown_s=shown_s,
        )
    except Exceeded as exc:
        what = f"rendering {name}" if name else "compiling the chat template"
        raise RenderStopped(
            f"{what} {exc.reason}; stopped",
            hint="the template may be malicious or broken: pass --chat-format with a "
            "built-in format",
        ) from None
    except Exception as err:  # noqa: BLE001 - the template's own failure, reported as such
        raise _Failed(err) from None


def literal_text(source: str) -> str:
    """The template's own text: its raw text and string constants, joined with NULs so that no
    search can match across two of them (what Hugging Face treats as the template's markup)."""
    compile_template(source)  # within the bounds, or ChatFormatError
    tree = _environment().parse(source)
    parts = {n.data for n in tree.find_all(jinja2.nodes.TemplateData)}
    parts |= {n.value for n in tree.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(parts))
