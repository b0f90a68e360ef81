"""Conversations on the real demo model: KV-cache reuse between turns (by prompt_eval_tokens),
the history, dropping old turns when the context fills, cancelling, saving and loading."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import ondevice
from ondevice.conversation import Conversation, _common_prefix_len
from ondevice.errors import ContextOverflow, UsageError

SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "What is the capital of France?",
    "And the capital of Italy?",
    "Name a large animal.",
    "What is two plus two?",
]


def kv_used(model) -> int:
    return model.kv_used()


def spell(model, tokens) -> str:
    return model.detokenize(tokens, special=True)


@pytest.fixture(scope="module")
def small_model(demo_path):
    """The demo model with a 256-token context and flash attention off."""
    with ondevice.load(demo_path, n_ctx=256, threads=2, flash_attn="off") as m:
        yield m


def test_turns_evaluate_only_new_tokens(demo_model):
    demo_model.reset()
    conv = demo_model.conversation(SYSTEM, temperature=0, max_tokens=12)
    first = conv.send(QUESTIONS[0])
    assert first.text
    assert first.stats.prompt_eval_tokens == first.stats.prompt_tokens  # empty cache
    for question in QUESTIONS[1:3]:
        cached = kv_used(demo_model)
        reply = conv.send(question)
        st = reply.stats
        # Everything in the cache (the previous prompt and reply) was reused ...
        assert st.prompt_eval_tokens == st.prompt_tokens - cached
        # ... so only the new user turn and the template around it were evaluated.
        assert 0 < st.prompt_eval_tokens < 40 < st.prompt_tokens
        assert reply.text and reply.stats.completion_tokens > 0
        # The tokens sent spell exactly the rendered history.
        prompt = conv.format.render(conv.messages[:-1], add_generation_prompt=True)
        assert spell(demo_model, conv.tokens[: st.prompt_tokens]) == prompt
    assert [m["role"] for m in conv.messages] == ["system"] + ["user", "assistant"] * 3


def test_reuse_does_not_change_the_reply(small_model):
    # Flash attention off: with it on, llama.cpp's attention over a KV cache filled in two
    # steps is not bit-identical to one filled at once, and a greedy near-tie can flip.
    small_model.reset()
    conv = small_model.conversation(SYSTEM, temperature=0, max_tokens=12)
    conv.send(QUESTIONS[0])
    for question in QUESTIONS[1:3]:
        reply = conv.send(question)
        assert reply.stats.prompt_eval_tokens < reply.stats.prompt_tokens / 2
        # The same history evaluated from scratch, through the stateless chat() API.
        small_model.reset()
        chunks = list(small_model.chat(conv.messages[:-1], max_tokens=12, temperature=0))
        assert chunks[-1].stats.prompt_eval_tokens == chunks[-1].stats.prompt_tokens
        assert "".join(c.text for c in chunks) == reply.text


def test_chat_streams_like_stream(demo_model):
    demo_model.reset()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    chunks = list(demo_model.chat(messages, max_tokens=24, temperature=0))
    assert len(chunks) > 2
    assert all(c.stats is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.finish_reason in ("stop", "length")
    assert final.stats.ttft_s > 0
    assert "Paris" in "".join(c.text for c in chunks)
    # the same messages again: all but the last prompt token come from the cache
    again = list(demo_model.chat(messages, max_tokens=1, temperature=0))
    assert again[-1].stats.prompt_eval_tokens == 1


def test_format_stops_apply(demo_model):
    # Phi-2's format on the demo model: whatever it writes, no invented turn comes back.
    conv = demo_model.conversation(chat_format="phi-2", temperature=0, max_tokens=24)
    reply = conv.send("Write one sentence about the sea.")
    assert "Instruct:" not in reply.text and "Output:" not in reply.text
    assert conv.render().startswith("Instruct: Write one sentence about the sea.\nOutput: ")


def test_system_prompt_and_reset(demo_model):
    demo_model.reset()
    conv = demo_model.conversation(SYSTEM, temperature=0, max_tokens=8)
    assert conv.system == SYSTEM
    conv.send(QUESTIONS[0])
    conv.reset()
    assert len(conv) == 0
    assert conv.messages == [{"role": "system", "content": SYSTEM}]
    reply = conv.send(QUESTIONS[1])
    # the system prompt stayed in the KV cache across the reset
    assert 0 < reply.stats.prompt_eval_tokens < reply.stats.prompt_tokens
    conv.system = "You answer in French."
    assert conv.messages[0] == {"role": "system", "content": "You answer in French."}
    assert conv.render().startswith("<|im_start|>system\nYou answer in French.<|im_end|>")
    conv.system = None
    assert conv.messages[0]["role"] == "user"


def test_save_and_load(demo_model, tmp_path):
    conv = demo_model.conversation(SYSTEM, temperature=0, max_tokens=4)
    conv.send(QUESTIONS[0])
    conv.send(QUESTIONS[1])
    path = conv.save(tmp_path / "talk.json")
    assert [p.name for p in tmp_path.iterdir()] == ["talk.json"]  # no temp file left
    doc = json.loads(path.read_text())
    assert doc["system"] == SYSTEM and len(doc["messages"]) == 4

    other = demo_model.conversation(temperature=0, max_tokens=4)
    assert other.load(path) == 4
    assert other.messages == conv.messages
    reply = other.send(QUESTIONS[2])
    assert reply.text

    # A plain OpenAI-style message list loads too.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(conv.messages))
    third = demo_model.conversation()
    assert third.load(plain) == 4 and third.system == SYSTEM

    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not a saved conversation"):
        third.load(bad)
    with pytest.raises(UsageError, match="no such file"):
        third.load(tmp_path / "missing.json")
    assert third.messages == conv.messages  # a failed load changes nothing


def test_cancel_keeps_the_session(demo_model):
    demo_model.reset()
    conv = demo_model.conversation(SYSTEM, temperature=0, max_tokens=200)
    cancel = threading.Event()
    seen = []
    for chunk in conv.stream("Tell me a long story about a dragon.", cancel=cancel):
        seen.append(chunk)
        if chunk.text:
            cancel.set()
    final = seen[-1]
    assert final.finish_reason == "cancelled"
    assert final.stats.completion_tokens < 10
    assert conv.messages[-1]["role"] == "assistant"  # the part shown is kept
    # cancelled before the first word: the turn is not added
    cancel = threading.Event()
    cancel.set()
    before = conv.messages
    list(conv.stream("Another question?", cancel=cancel))
    assert conv.messages == before
    reply = conv.send(QUESTIONS[0], max_tokens=6)
    assert reply.finish_reason in ("stop", "length") and reply.text


def test_closing_a_stream_early_releases_the_model(demo_model):
    conv = demo_model.conversation(temperature=0, max_tokens=32)
    stream = conv.stream("Count from one to twenty.")
    next(stream)
    stream.close()
    assert conv.last is not None and conv.last.finish_reason == "cancelled"
    assert demo_model.generate("Hello", max_tokens=2).stats.completion_tokens > 0


def test_full_context_drops_oldest_turns(small_model):
    conv = small_model.conversation("Be brief.", temperature=0, max_tokens=8)
    filler = "Please remember this sentence about apples and oranges and pears. " * 3
    dropped_at = None
    for i in range(8):
        reply = conv.send(f"Fact {i}: {filler}")
        assert reply.stats.prompt_tokens < small_model.n_ctx
        if reply.dropped_turns:
            dropped_at = i
            assert any("dropped" in n for n in reply.stats.notes)
            break
    assert dropped_at is not None, "the history never filled a 256-token context"
    msgs = conv.messages
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["role"] == "user" and not msgs[1]["content"].startswith("Fact 0:")
    assert msgs[-2]["content"].startswith(f"Fact {dropped_at}:")
    # the next turn reuses the cache again
    reply = conv.send("Thanks.")
    assert reply.dropped_turns == 0
    assert reply.stats.prompt_eval_tokens < reply.stats.prompt_tokens


def test_message_longer_than_the_context(small_model):
    conv = small_model.conversation(temperature=0, max_tokens=8)
    conv.send("Hi")
    before = conv.messages
    with pytest.raises(ContextOverflow, match=f"context holds {small_model.n_ctx}"):
        conv.stream("word " * 400)
    assert conv.messages == before


def test_settings():
    conv = Conversation.__new__(Conversation)  # set() needs no model
    conv.settings = {}
    assert conv.set("temperature", "0.2") == 0.2
    assert conv.set("top_k", "0") == 0
    assert conv.set("max_tokens", "-1") == -1
    assert conv.set("seed", "42") == 42
    assert conv.set("seed", "none") is None and "seed" not in conv.settings
    for name, value in [("top_p", "0"), ("temperature", "-1"), ("max_tokens", "0"), ("top_k", "x")]:
        with pytest.raises(UsageError, match=name):
            conv.set(name, value)
    with pytest.raises(UsageError, match="unknown setting"):
        conv.set("warmth", "1")


def test_empty_message(demo_model):
    with pytest.raises(UsageError, match="empty"):
        demo_model.conversation().stream("   ")


def test_common_prefix_len():
    assert _common_prefix_len(b"", b"abc") == 0
    assert _common_prefix_len(b"abc", b"abc") == 3
    assert _common_prefix_len(b"abcdef", b"abcxef") == 3
    data = bytes(range(256)) * 40
    for i in (0, 1, 255, 5000, len(data) - 1):
        other = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        assert _common_prefix_len(data, other) == i
        assert _common_prefix_len(data[:i], other) == i


# --- OpenAI shapes: tools, tool messages, every key kept -----------------------------------------

CHATML_TOOLS = str(Path(__file__).parent / "data" / "chat_templates" / "chatml-tools.jinja")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def test_tool_turns_and_every_key_through_save_and_load(demo_model, tmp_path):
    demo_model.reset()
    conv = demo_model.conversation(
        "Be brief.", chat_format=CHATML_TOOLS, tools=TOOLS, temperature=0, max_tokens=8
    )
    conv.send("What is the weather in Paris?")
    assert "<tools>" in conv.last_prompt.text and '"name": "get_weather"' in conv.last_prompt.text
    assert conv.last_prompt.generation_prompt == "<|im_start|>assistant\n"
    # The app runs the call it got back (parsing calls is not this test's business) ...
    conv.append({"role": "assistant", "content": None, "tool_calls": [CALL]})
    # ... and sends the result as a tool message.
    result = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C"}
    reply = conv.send(result)
    text = conv.last_prompt.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert text.endswith(
        "<tool_response>\n22 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    st = reply.stats
    assert 0 < st.prompt_eval_tokens < st.prompt_tokens / 2  # the cache still serves the history
    roles = [m["role"] for m in conv.messages]
    assert roles == ["system", "user", "assistant", "assistant", "tool", "assistant"]
    assert conv.messages[3]["tool_calls"] == [CALL] and conv.messages[4] == result

    path = conv.save(tmp_path / "tools.json")
    other = demo_model.conversation(chat_format=CHATML_TOOLS)
    assert other.load(path) == 5
    assert other.messages == conv.messages and other.tools == TOOLS
    assert other.render(True) == conv.render(True)
    # one turn without the tools
    assert "<tools>" not in other.send("Bye.", tools=None).text and other.tools == TOOLS
    assert "<tools>" not in other.last_prompt.text


def test_chat_takes_tools_and_documents(demo_model):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = list(
        demo_model.chat(messages, chat_format=CHATML_TOOLS, tools=TOOLS, max_tokens=2)
    )
    without = list(demo_model.chat(messages, chat_format=CHATML_TOOLS, max_tokens=2))
    assert with_tools[-1].stats.prompt_tokens > without[-1].stats.prompt_tokens + 20


def test_bad_messages_and_files_are_one_line_errors(demo_model, tmp_path):
    conv = demo_model.conversation()
    for bad, match in [
        (5, "a message is text"),
        ([], "the message list is empty"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
         "image"),
        ({"role": "system", "content": "x"}, "Conversation.system"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=match):
            conv.stream(bad)
    files = {
        "nested.json": "[" * 100_000 + "]" * 100_000,
        "digits.json": '{"format": "ondevice.conversation", "messages": [], "n": '
        + "9" * 5000
        + "}",
        "image.json": json.dumps([{"role": "user", "content": [{"type": "image", "url": "x"}]}]),
        "tools.json": json.dumps({"format": "ondevice.conversation", "messages": [], "tools": 5}),
    }
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    (tmp_path / "folder.json").mkdir()
    for name in [*files, "folder.json"]:
        with pytest.raises(UsageError) as err:
            conv.load(tmp_path / name)
        assert "\n" not in err.value.one_line() and str(tmp_path / name) in err.value.one_line()
    assert conv.messages == []
