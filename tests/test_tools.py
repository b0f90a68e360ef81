"""Tool calls on the real demo model: tool_choice="required" and a named tool always give a
valid call (the demo model has no tool training), the lazy trigger grammar behind "auto", the
native formats read back, and the call's round trip through the history."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ondevice import tools
from ondevice.errors import UsageError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "b": {"type": "integer", "minimum": 0, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "maxLength": 60}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "What is 17 plus 25?", "Find news about robots."]


def test_required_returns_a_valid_call_to_one_of_three_tools(demo_model):
    for seed in range(12):
        demo_model.reset()
        conv = demo_model.conversation(max_tokens=120, temperature=0.8, seed=seed)
        reply = conv.send(QUESTIONS[seed % 3], tools=TOOLS, tool_choice="required")
        assert reply.finish_reason == "stop", reply.text
        (call,) = reply.tool_calls
        assert call.name in PARAMS
        jsonschema.validate(call.arguments, PARAMS[call.name])
        assert call.id.startswith("call_")
        msg = conv.messages[-1]
        assert msg["role"] == "assistant"


def test_a_named_tool_is_the_one_called(demo_model):
    conv = demo_model.conversation(max_tokens=80, temperature=0)
    choice = {"type": "function", "function": {"name": "add"}}
    reply = conv.send("Add 2 and 3.", tools=TOOLS, tool_choice=choice)
    (call,) = reply.tool_calls
    assert call.name == "add"
    jsonschema.validate(call.arguments, PARAMS["add"])


def test_the_tool_result_goes_back_and_the_history_keeps_it(demo_model, tmp_path):
    conv = demo_model.conversation(max_tokens=60, temperature=0)
    reply = conv.send("What is the weather in Rome?", tools=TOOLS, tool_choice="required")
    call = reply.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})}
    after = conv.send(result, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert after.tool_calls == [] and after.stats.completion_tokens > 0
    roles = [m["role"] for m in conv.messages]
    assert roles[-3:] == ["assistant", "tool", "assistant"]
    assert conv.messages[-2]["tool_call_id"] == call.id
    saved = conv.save(tmp_path / "tools.json")
    again = demo_model.conversation()
    again.load(saved)
    assert again.messages == conv.messages


def test_lazy_grammar_starts_at_its_trigger(demo_model):
    """Free text until the trigger, then the grammar (which starts with it) decides the rest."""
    demo_model.reset()
    r = demo_model.generate(
        "The capital of France is",
        max_tokens=20,
        temperature=0,
        lazy_grammar=(" Paris", 'root ::= " Paris" " is big."'),  # " Paris" is one token
    )
    assert r.text == " Paris is big.", r.text
    assert r.stats.constraint == "lazy"
    # A trigger that never appears leaves the text free.
    free = demo_model.generate(
        "The capital of France is",
        max_tokens=6,
        temperature=0,
        lazy_grammar=("zebra", 'root ::= "zebra"'),
    )
    plain = demo_model.generate("The capital of France is", max_tokens=6, temperature=0)
    assert free.text == plain.text


@pytest.mark.parametrize(
    "template, fmt, text, expected",
    [
        (
            "...<tool_call>...",
            "hermes",
            'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
            [("add", {"a": 1, "b": 2})],
        ),
        (
            "...[TOOL_CALLS]...",
            "mistral",
            '[TOOL_CALLS][{"name": "search", "arguments": {"query": "x"}}]',
            [("search", {"query": "x"})],
        ),
        (
            '... "parameters" ...',
            "llama3",
            '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
            [("get_weather", {"city": "Oslo", "unit": "celsius"})],
        ),
        ("...<tool_call>...", "hermes", "no call here", []),
        (
            "...<tool_call>...",
            "hermes",
            '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # not a tool
            [],
        ),
    ],
)
def test_native_formats_are_read_back(template, fmt, text, expected):
    p = tools.plan(TOOLS, "auto", template)
    assert p.format == fmt and p.trigger
    _, calls = tools.parse_calls(text, p)
    assert [(c.name, c.arguments) for c in calls] == expected


def test_auto_grammar_parses_for_each_format(demo_model):
    """Each format's trigger grammar is valid GBNF for llama.cpp."""
    for template in ("<tool_call>", "[TOOL_CALLS]", '"parameters"'):
        p = tools.plan(TOOLS, "auto", template)
        r = demo_model.generate(
            "Hi", max_tokens=2, lazy_grammar=(p.trigger, tools.trigger_grammar(p))
        )
        assert r.stats.completion_tokens >= 1


@pytest.mark.parametrize(
    "choice, needle",
    [
        ("nope", "not none, auto, required"),
        ({"type": "function", "function": {"name": "x"}}, "one of the tools"),
    ],
)
def test_bad_tool_choice(demo_model, choice, needle):
    with pytest.raises(UsageError, match=needle):
        demo_model.conversation().send("Hi", tools=TOOLS, tool_choice=choice)


def test_tool_choice_without_tools():
    with pytest.raises(UsageError, match="needs tools"):
        tools.plan(None, "required", "")
