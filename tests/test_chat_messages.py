"""Chat messages in OpenAI's shapes: what is accepted and copied, what is refused and how it is
named (ondevice.chat_messages), and that every key reaches the template."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest

from ondevice import chat_formats as cf
from ondevice.chat_messages import plain, validate_messages, validate_tools
from ondevice.errors import UsageError

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
OPENAI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather?"}], "name": "ana"},
    {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    {"role": "assistant", "content": "22 degrees.", "reasoning_content": "easy"},
]
# Prints every key of every message, so nothing can be dropped on the way to the template.
SHOW_ALL = "{% for m in messages %}{{ m|tojson }}\n{% endfor %}{{ tools|tojson }}"


def test_openai_shapes_are_accepted_and_copied():
    out = validate_messages(OPENAI)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "assistant"]
    assert "content" not in out[2] and "refusal" not in out[2]  # None values are dropped
    assert out[2]["tool_calls"] == [CALL] and out[2]["tool_calls"] is not OPENAI[2]["tool_calls"]
    assert out[3]["tool_call_id"] == "call_1"
    assert out[1]["name"] == "ana" and out[1]["content"][0]["text"] == "Weather?"
    assert out[4]["reasoning_content"] == "easy"
    out[1]["content"][0]["text"] = "changed"
    assert OPENAI[1]["content"][0]["text"] == "Weather?"  # a copy, not the caller's dicts


def test_every_key_reaches_the_template():
    fmt = cf.ChatFormat("gguf", SHOW_ALL, source="gguf")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    lines = fmt.render(OPENAI, tools=tools).splitlines()
    seen = [json.loads(line) for line in lines[:-1]]
    assert seen[1]["name"] == "ana"
    assert seen[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert seen[3] == {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}
    # Hugging Face's reasoning aliases
    assert seen[4]["thinking"] == seen[4]["reasoning_content"] == "easy"
    assert json.loads(lines[-1]) == tools


@pytest.mark.parametrize(
    "message, match",
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
         "has an image in part 0: ondevice runs text models"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "audio"),
        ({"role": "user", "content": [{"type": "file", "file": {}}]}, "a file"),
        ({"role": "user", "content": [{"type": "text"}]}, "part 0 is not a text part"),
        ({"role": "user", "content": ["hello"]}, "part 0 is not a text part"),
        ({"role": "user", "content": 5}, "no text content"),
        ({"role": "user"}, "no text content"),
        ({"role": "assistant"}, "no text content"),
        ({"role": "developer", "content": "x"}, "use 'system'"),
        ({"role": "function", "content": "x"}, "use 'tool'"),
        ({"role": "robot", "content": "x"}, "role 'robot'"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, "only assistant messages"),
        ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "no function name"),
        ({"role": "assistant", "tool_calls": "call"}, "must be a list"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]},
         "JSON string or an object"),
        ({"role": "tool", "content": "x", "tool_call_id": 7}, "'tool_call_id' must be text"),
        ({"role": "user", "content": "bad \ud800 text"}, "not valid Unicode"),
        ({"role": "user", "content": "x", "meta": object()}, "holds a Python object"),
        ({"role": "user", "content": "x", 5: "five"}, "key that is not text"),
    ],
)  # fmt: skip
def test_bad_messages_are_named(message, match):
    with pytest.raises(UsageError, match=match) as err:
        validate_messages([{"role": "user", "content": "first"}, message])
    assert "message 1" in err.value.one_line()
    assert "\n" not in err.value.one_line()


def test_not_a_list():
    for bad in ("hello", b"x", {"role": "user", "content": "x"}, 5):
        with pytest.raises(UsageError, match="list of"):
            validate_messages(bad)
    with pytest.raises(UsageError, match="not a dict"):
        validate_messages(["hello"])


def test_plain_data_only():
    nested: list = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(UsageError, match="nested more than 64"):
        plain(nested, "tools[0]")
    assert plain(OrderedDict(a=(1, 2.5, True, None)), "x") == {"a": [1, 2.5, True, None]}
    assert type(plain(True, "x")) is bool
    with pytest.raises(UsageError, match="list of dicts"):
        validate_tools({"name": "f"})
    with pytest.raises(UsageError, match=r"documents\[0\] is not a dict"):
        validate_tools(["text"], "documents")
    assert validate_tools(None) is None
