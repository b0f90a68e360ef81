"""Real chat templates for the rendering tests, and the conversations they are rendered with.

Where they come from:
  - llama.cpp's `models/templates/*.jinja` and the templates in `tests/test-chat-template.cpp`
    (with their expected outputs), read from llama-cpp-python's sdist as
    benchmarks/build_llama_tools.sh unpacks it (`$ONDEVICE_BENCH_CACHE/llama.cpp-<version>`,
    default ~/.cache/ondevice-bench); not copied into this repository;
  - tests/data/chat_templates/*.jinja: a few templates of our own that follow the published
    layouts (ChatML with tools, Llama 3.1 JSON tool calls, Mistral [TOOL_CALLS], Gemma, text
    parts), so the tests always render something.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OWN = HERE / "data" / "chat_templates"


@dataclass
class Template:
    name: str
    source: str
    bos: str = "<s>"
    eos: str = "</s>"
    expected: str | None = None  # llama.cpp's expected rendering of EXPECTED_CONVERSATION
    origin: str = ""


def llama_cpp_folder() -> Path | None:
    """The unpacked llama.cpp source of the installed binding's sdist (or of any version there,
    the templates barely change), or None."""
    cache = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache/ondevice-bench"))
    try:
        import llama_cpp

        preferred = cache / f"llama.cpp-{llama_cpp.__version__}"
    except ImportError:  # pragma: no cover - the binding is a dependency
        preferred = cache / "llama.cpp-none"
    candidates = [preferred, *sorted(cache.glob("llama.cpp-*"), reverse=True)]
    for folder in candidates:
        if (folder / "models" / "templates").is_dir():
            return folder
    return None


def own_templates() -> list[Template]:
    return [
        Template(p.stem, p.read_text(encoding="utf-8"), origin="tests/data/chat_templates")
        for p in sorted(OWN.glob("*.jinja"))
    ]


def llama_cpp_templates(folder: Path) -> list[Template]:
    out = [
        Template(p.stem, p.read_text(encoding="utf-8"), origin="models/templates")
        for p in sorted((folder / "models" / "templates").glob("*.jinja"))
    ]
    cpp = folder / "tests" / "test-chat-template.cpp"
    if cpp.is_file():
        out += _cpp_cases(cpp.read_text(encoding="utf-8"))
    return out


# --- tests/test-chat-template.cpp --------------------------------------------------------------

_LITERAL = re.compile(r'(?:U8C\(\s*|u8)?"((?:[^"\\]|\\.)*)"\s*\)?')
_FIELD = re.compile(r"/\* \.(\w+)= \*/\s*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'", "0": "\0"}


def _c_string(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def _cpp_cases(text: str) -> list[Template]:
    """The test cases of test-chat-template.cpp: name, template, expected outputs, bos/eos."""
    start = text.index("std::vector<TestCase> test_cases")
    body = text[start : text.index("};", start)]
    cases: list[dict[str, str]] = []
    pos = 0
    while True:
        m = _FIELD.search(body, pos)
        if m is None:
            break
        name = m.group(1)
        lit = _LITERAL.match(body, m.end())
        pos = m.end()
        if lit is None:
            continue
        value = _c_string(lit.group(1))
        pos = lit.end()
        if name == "name":
            cases.append({})
        if cases:
            cases[-1][name] = value
    out = []
    for c in cases:
        if "template_str" not in c:
            continue
        expected = c.get("expected_output_jinja") or c.get("expected_output")
        out.append(
            Template(
                c["name"],
                c["template_str"],
                bos=c.get("bos_token", ""),
                eos=c.get("eos_token", ""),
                expected=expected,
                origin="tests/test-chat-template.cpp",
            )
        )
    return out


# --- conversations --------------------------------------------------------------------------------

# The conversation test-chat-template.cpp renders (its expected outputs are for this one).
EXPECTED_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
]


def _tool_call(arguments) -> dict:
    return {
        "id": "call_0001",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


def conversations() -> dict[str, dict]:
    """Named conversations: messages plus (where any) tools and documents."""
    call_turns = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [_tool_call({"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_0001", "name": "get_weather", "content": "22 C"},
        {"role": "assistant", "content": "It is 22 degrees in Paris."},
        {"role": "user", "content": "Thanks!"},
    ]
    return {
        "plain": {"messages": EXPECTED_CONVERSATION},
        "no-system": {"messages": EXPECTED_CONVERSATION[1:]},
        "one-turn": {"messages": [{"role": "user", "content": "Hi"}]},
        "unicode": {
            "messages": [
                {"role": "user", "content": "Grüße, 東京 🌸\n\t«quotes» \"double\" 'single'"}
            ]
        },
        "tools": {"messages": call_turns, "tools": TOOLS},
        "tools-string-arguments": {
            "messages": [
                call_turns[0],
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [_tool_call('{"city": "Paris"}')],
                },
                *call_turns[2:],
            ],
            "tools": TOOLS,
        },
        "tools-offered": {"messages": EXPECTED_CONVERSATION[1:2], "tools": TOOLS},
        "text-parts": {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "First part."},
                        {"type": "text", "text": "Second part."},
                    ],
                },
            ]
        },
        "documents": {
            "messages": [{"role": "user", "content": "What does the memo say?"}],
            "documents": [{"title": "Memo", "text": "The meeting moved to Friday."}],
        },
    }
