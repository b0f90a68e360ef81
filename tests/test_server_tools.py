"""Tool calls through `ondevice serve` with the official `openai` and `ollama` clients and the
demo model: tool_choice required / named (always a valid call), auto (the model writes a call
in Hermes' format, shown by two examples in the history; the text before it streams, the call
never shows as text), the tool's result sent back, Ollama's shapes, and refusals."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest
from server_fixtures import ServerProcess
from test_tools import PARAMS, TOOLS

from ondevice import tools
from ondevice.server.toolcalls import ToolReply


def _call(name: str, args: dict) -> str:
    return (
        "Checking.\n<tool_call>\n"
        + json.dumps({"name": name, "arguments": args})
        + "\n</tool_call>"
    )


# Two worked examples: the 135M demo model has no tool training, but it copies a pattern.
FEW_SHOT = [
    {"role": "system", "content": "You call tools. Answer every question with a <tool_call>."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": _call("get_weather", {"city": "Paris", "unit": "celsius"})},
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": _call("get_weather", {"city": "Rome", "unit": "celsius"})},
    {"role": "user", "content": "What is the weather in Oslo?"},
]


@pytest.fixture(scope="module")
def server(demo_path):
    with ServerProcess(demo_path, "--parallel", "2", "--ctx", "2048") as s:
        yield s
        log = s.log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _check(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


def test_required_and_named_give_valid_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is 17 plus 25?"}],
            tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed, max_tokens=120,
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        _check(call)
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
        tool_choice=named, temperature=0, max_tokens=80,
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add"
    _check(call)


def test_a_streamed_required_call_is_a_tool_calls_delta(client):
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather in Lima?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=80, stream=True,
    )  # fmt: skip
    events = [e for e in stream if e.choices]
    assert not "".join(e.choices[0].delta.content or "" for e in events)
    deltas = [d for e in events for d in (e.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    assert deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads(deltas[0].function.arguments), PARAMS["get_weather"])
    assert events[-1].choices[0].finish_reason == "tool_calls"


def test_auto_reads_the_models_own_call_and_streams_the_text_before_it(client):
    kw = dict(model="demo", messages=FEW_SHOT, tools=TOOLS, temperature=0, max_tokens=80)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and _check(call)["city"]
    events = [e for e in client.chat.completions.create(**kw, stream=True) if e.choices]
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert text.strip() == "Checking." and "<tool" not in text
    deltas = [d for e in events for d in (e.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments) == json.loads(call.function.arguments)
    assert events[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice none: the same request is plain text
    plain = client.chat.completions.create(**kw, tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and "<tool_call>" in plain.message.content


def test_the_tools_result_goes_back(client):
    first = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", temperature=0, max_tokens=80,
    )  # fmt: skip
    msg = first.choices[0].message
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp_c": 4}'},
    ]
    r = client.chat.completions.create(
        model="demo", messages=history, tools=TOOLS, temperature=0, max_tokens=16
    )
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


def test_ollama_tool_calls(server):
    c = ollama.Client(host=server.url)
    opts = {"temperature": 0, "num_predict": 80}
    r = c.chat(model="demo", messages=FEW_SHOT, tools=TOOLS, options=opts)
    assert r.message.content == "Checking."
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), PARAMS["get_weather"])
    parts = list(c.chat(model="demo", messages=FEW_SHOT, tools=TOOLS, options=opts, stream=True))
    text = "".join(p.message.content or "" for p in parts)
    assert text.strip() == "Checking." and "<tool" not in text
    calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"] and parts[-1].done
    history = [
        *FEW_SHOT,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": '{"temp_c": 4}', "tool_name": "get_weather"},
    ]
    after = c.chat(model="demo", messages=history, tools=TOOLS, options={"num_predict": 8})
    assert after.done and after.eval_count > 0
    show = c.show("demo")
    assert "completion" in show.capabilities  # the demo's template does not render tools


def test_bad_tool_requests_are_400(client):
    q = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(tools=TOOLS, tool_choice="dance"), "not none, auto, required"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}),
         "one of the tools"),
        (dict(tools=[{"type": "function", "function": {}}]), "no function name"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
         "can't be combined"),
        (dict(messages=[{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
         "no function name"),
    ]  # fmt: skip
    for kw, needle in cases:
        kw = {"messages": q, **kw}
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="demo", max_tokens=4, **kw)


def test_held_back_text_is_what_could_still_open_a_call(demo_model):
    """The stream's view of a reply cut into pieces anywhere: the trigger split across
    chunks never shows, a false start ("<to" then "day") does."""
    plan = tools.plan(TOOLS, "auto", "<tool_call>")
    body = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    watch = ToolReply(demo_model, plan)
    pieces = ["Hi <to", "day. <", "tool_", "call>", body, "</tool_call>"]
    shown = [watch.show(t, demo_model.tokenize(t, add_special=False)) for t in pieces]
    assert "".join(shown) == "Hi <today. "
    rest, calls = watch.finish()
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    cut = ToolReply(demo_model, plan)  # the reply ended inside the call: it is sent as text
    assert cut.show("Ok <tool_call>{", [1, 2]) == "Ok "
    assert cut.finish() == ("<tool_call>{", [])
