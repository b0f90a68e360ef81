"""Real chat templates rendered by ondevice and by Hugging Face's renderer (the oracle):
transformers' `render_jinja_template`, with the same messages, tools, documents and BOS/EOS text.

For every template and conversation (tests/chat_template_corpus.py):
  - ondevice renders exactly what HF renders from the messages the template saw, or both refuse;
  - where ondevice passed the caller's messages unchanged (every plain conversation), that is
    HF's rendering of the caller's messages;
  - where it adjusted them (text parts joined, tool-call arguments parsed or serialized, see
    ondevice.chat_formats), HF's rendering of the caller's messages is broken: an error, a
    Python repr of the parts, or doubly encoded JSON;
  - on test-chat-template.cpp's conversation, where HF gives llama.cpp's expected output, so
    does ondevice.
The llama.cpp templates come from the binding's sdist (benchmarks/build_llama_tools.sh fetches
it; CI does); without it only our own templates run.
"""

from __future__ import annotations

import collections

import pytest
from chat_template_corpus import (
    EXPECTED_CONVERSATION,
    Template,
    conversations,
    llama_cpp_folder,
    llama_cpp_templates,
    own_templates,
)

from ondevice import chat_formats as cf
from ondevice.chat_messages import validate_messages

render_jinja_template = pytest.importorskip(
    "transformers.utils.chat_template_utils"
).render_jinja_template

FOLDER = llama_cpp_folder()
OWN = own_templates()
LLAMA_CPP = llama_cpp_templates(FOLDER) if FOLDER else []
CONVERSATIONS = conversations()
# What HF prints when a template doesn't read a shape: the parts' repr or JSON, arguments
# encoded twice.
BROKEN = ("[{'type'", '[{"type": "text"', "{'city'", '\\"city\\"')
RESULTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _hf(t: Template, messages, tools, documents) -> str:
    rendered, _ = render_jinja_template(
        [messages],
        tools=tools,
        documents=documents,
        chat_template=t.source,
        add_generation_prompt=True,
        bos_token=t.bos,
        eos_token=t.eos,
    )
    return rendered[0]


def _fmt(t: Template) -> cf.ChatFormat:
    return cf.ChatFormat("gguf", t.source, source="gguf", bos_token=t.bos, eos_token=t.eos)


def _caller_messages(messages) -> list[dict]:
    """The caller's messages as HF's apply_chat_template hands them on (None keys dropped), with
    the reasoning aliases HF adds: what ondevice gives a template when it adjusts nothing."""
    return cf.reasoning_aliases(validate_messages(messages))


def _check(t: Template) -> collections.Counter:
    fmt = _fmt(t)
    outcome: collections.Counter = collections.Counter()
    for name, conv in CONVERSATIONS.items():
        msgs, tools, docs = conv["messages"], conv.get("tools"), conv.get("documents")
        caller = _caller_messages(msgs)
        try:
            prompt = fmt.prompt(msgs, tools=tools, documents=docs)
        except cf.ChatFormatError:
            with pytest.raises(Exception):  # noqa: B017 - HF's errors are of any type
                _hf(t, caller, tools, docs)
            outcome[f"{name}: both refuse"] += 1
            continue
        assert _hf(t, prompt.messages, tools, docs) == prompt.text, (t.name, name)
        if prompt.messages == caller:
            outcome[f"{name}: identical"] += 1
            continue
        try:
            raw = _hf(t, caller, tools, docs)
        except Exception:  # noqa: BLE001 - any error is HF refusing the shape
            outcome[f"{name}: adjusted (HF errors)"] += 1
            continue
        broken = [b for b in BROKEN if b in raw]
        assert broken, f"{t.name}/{name}: adjusted although HF renders the caller's messages"
        outcome[f"{name}: adjusted (HF prints {broken[0]})"] += 1
    return outcome


@pytest.mark.parametrize("t", OWN, ids=[t.name for t in OWN])
def test_own_templates_render_like_hugging_face(t):
    outcome = _check(t)
    RESULTS["own"] += outcome
    # our templates are written to render every conversation they have roles for
    assert not any("refuse" in k for k in outcome if not k.startswith("tools")), outcome


@pytest.mark.skipif(FOLDER is None, reason="llama.cpp's sources are not unpacked in the cache "
                    "(run benchmarks/build_llama_tools.sh --source-only)")  # fmt: skip
@pytest.mark.parametrize("t", LLAMA_CPP, ids=[f"{t.origin}:{t.name}" for t in LLAMA_CPP])
def test_llama_cpp_templates_render_like_hugging_face(t):
    RESULTS["llama.cpp"] += _check(t)


@pytest.mark.skipif(FOLDER is None, reason="llama.cpp's sources are not unpacked in the cache")
def test_expected_outputs_of_llama_cpp():
    cases = [t for t in LLAMA_CPP if t.expected is not None]
    assert len(cases) >= 30
    agree = 0
    for t in cases:
        try:
            hf = _hf(t, EXPECTED_CONVERSATION, None, None)
        except Exception:  # noqa: BLE001, S112 - llama.cpp rewrites what HF refuses
            continue
        if hf == t.expected:
            agree += 1
            assert _fmt(t).render(EXPECTED_CONVERSATION) == t.expected, t.name
    assert agree >= 20


def test_the_corpus_is_real():
    """The corpus holds what it says (when the sdist is there), and the adjustments happen where
    they should on our own templates."""
    if FOLDER is not None:
        assert sum(t.origin == "models/templates" for t in LLAMA_CPP) >= 60
        assert sum(t.origin == "tests/test-chat-template.cpp" for t in LLAMA_CPP) >= 30
    by_name = {t.name: _fmt(t) for t in OWN}
    caps = {name: cf.capabilities(fmt) for name, fmt in by_name.items()}
    assert caps["gemma-parts"].typed_content and not caps["chatml-tools"].typed_content
    assert caps["chatml-tools"].object_arguments and not caps["chatml-tools"].string_arguments
    assert caps["mistral-tools"].string_arguments and not caps["mistral-tools"].object_arguments
    conv = CONVERSATIONS["tools-string-arguments"]
    text = by_name["chatml-tools"].render(conv["messages"], tools=conv["tools"])
    assert '"arguments": {"city": "Paris"}' in text  # parsed, not encoded twice
    conv = CONVERSATIONS["tools"]
    text = by_name["mistral-tools"].render(conv["messages"], tools=conv["tools"])
    assert '"arguments": {"city": "Paris"}, "id": "call_0001"' in text  # serialized
    parts = CONVERSATIONS["text-parts"]["messages"]
    assert "First part.\nSecond part." in by_name["chatml-tools"].render(parts)
    assert "First part.Second part." in by_name["gemma-parts"].render(parts)  # its own reading


def test_summary():
    """Prints the table (pytest -s): per conversation, how many templates render it identically
    to HF, with an adjustment, or refuse it in both renderers."""
    for corpus, outcome in sorted(RESULTS.items()):
        print(f"\n{corpus}: {sum(outcome.values())} renderings")
        for key, n in sorted(outcome.items()):
            print(f"  {key}: {n}")
    assert RESULTS["own"], "the own-template tests ran first"
