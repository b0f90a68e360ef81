"""`ondevice serve` as clients use it: a real server process on a free loopback port, the
official `openai` and `ollama` Python packages, the demo model. Streaming and not, usage, stop,
seeds, response_format, Ollama's routes, 8 concurrent clients against one at a time, a client
killed mid-stream, and bad requests (always 4xx, never 5xx or a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import jsonschema
import ollama
import openai
import pytest
from server_fixtures import ServerProcess

CTX = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Tell me a joke about cats.",
    "How do plants make food?",
    "Say hello in Spanish.",
    "What is the largest planet?",
]


@pytest.fixture(scope="module")
def server(demo_path):
    with ServerProcess(demo_path, "--parallel", "4", "--ctx", str(CTX)) as s:
        yield s
        log = s.log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(client, messages=QUESTION, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="demo", messages=messages, **kw)


# --- OpenAI ---------------------------------------------------------------------------------
def test_chat_reply_usage_and_ondevice_numbers(client):
    r = chat(client, max_tokens=8)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "demo"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    extra = r.model_extra["ondevice"]
    assert extra["completion_tokens"] == 8 and extra["prompt_tokens"] == r.usage.prompt_tokens
    assert extra["ttft_s"] > 0 and extra["generation_tps"] > 0 and extra["rss_bytes"] > 0


def test_streaming_gives_the_same_text_and_usage_last(client):
    whole = chat(client, max_tokens=16).choices[0].message.content
    stream = chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole
    assert events[0].choices[0].delta.role == "assistant"
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 16


def test_stop_string_ends_the_reply_before_it(client):
    whole = chat(client, max_tokens=16).choices[0].message.content
    words = whole.split()
    assert len(words) >= 3, whole
    stop = " " + words[2]
    r = chat(client, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == whole[: whole.index(stop)]


def test_temperature_0_and_a_seed_repeat_the_reply(client):
    first, again = chat(client), chat(client)
    assert first.choices[0].message.content == again.choices[0].message.content
    # The second request found its prefix in a slot: only its last prompt token was evaluated.
    extra = again.model_extra["ondevice"]
    assert extra["prompt_eval_tokens"] == 1 < extra["prompt_tokens"]
    a = chat(client, temperature=1.0, seed=1234, max_tokens=16).choices[0].message.content
    b = chat(client, temperature=1.0, seed=1234, max_tokens=16).choices[0].message.content
    assert a == b


def test_response_format_json_schema_and_json_object(client):
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome", "Berlin"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = chat(client, max_tokens=32, response_format=rf)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = chat(client, max_tokens=24, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_completions_match_the_library(client, demo_model):
    prompt = "The capital of France is"
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
    demo_model.reset()
    expected = demo_model.generate(prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == expected.stats.prompt_tokens
    stream = client.completions.create(
        model="demo", prompt=prompt, max_tokens=8, temperature=0, stream=True, echo=True
    )
    assert "".join(e.choices[0].text for e in stream) == prompt + expected.text


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"


# --- Ollama ---------------------------------------------------------------------------------
def test_ollama_chat_generate_and_tags(server):
    c = ollama.Client(host=server.url)
    opts = {"temperature": 0, "num_predict": 12}
    r = c.chat(model="demo", messages=QUESTION, options=opts)
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count == 12 and r.prompt_eval_count > 0 and r.done_reason == "length"
    parts = list(c.chat(model="demo", messages=QUESTION, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    g = c.generate(model="demo", prompt=QUESTION[0]["content"], options=opts)
    assert g.response == r.message.content  # generate renders the same chat template
    raw = c.generate(model="demo", prompt="The capital of France is", raw=True, options=opts)
    assert raw.response and raw.eval_count == 12
    tags = c.list()
    assert [m.model for m in tags.models] == ["demo"]
    assert tags.models[0].details.family == "llama" and tags.models[0].size > 0
    assert c.show("demo").details.quantization_level == "Q4_1"
    assert [m.model for m in c.ps().models] == ["demo"]
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model="llama3", messages=QUESTION)
    assert err.value.status_code == 404


# --- concurrency ----------------------------------------------------------------------------
NEAR_TIE = 0.3  # logits; the divergences seen here were 0.02-0.15 apart


def _reply(client, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a greedy reply (llama-server's `return_tokens` extension)."""
    r = chat(client, [{"role": "user", "content": prompt}], max_tokens=24,
             extra_body={"return_tokens": True})  # fmt: skip
    extra = r.model_extra["ondevice"]
    assert len(extra["token_ids"]) == r.usage.completion_tokens
    return extra["prompt_token_ids"], extra["token_ids"]


def test_eight_concurrent_clients_get_the_replies_they_get_alone(server, demo_model):
    """The same greedy replies batched as one at a time, but where llama.cpp's batched kernels
    round differently at a near-tie: every divergence is checked to be one (the two tokens'
    logits within NEAR_TIE where the replies part), and counted."""
    solo = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    alone = [_reply(solo, p) for p in PROMPTS]
    together: list[tuple[list[int], list[int]] | None] = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        barrier.wait()
        together[i] = _reply(c, PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(t is not None for t in together)
    diverged = 0
    for (prompt, a), got in zip(alone, together, strict=True):
        assert got is not None and got[0] == prompt  # the same prompt tokens
        b = got[1]
        if a == b:
            continue
        diverged += 1
        k = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        logits = demo_model.score(prompt + a[:k])[-1]
        gap = abs(float(logits[a[k]]) - float(logits[b[k]]))
        assert gap < NEAR_TIE, f"diverged at token {k} where the logits are {gap:.3f} apart"
    print(f"{diverged} of {len(PROMPTS)} replies diverged, each at a near-tie")


_STREAMER = textwrap.dedent(
    """
    import sys, openai
    c = openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0)
    s = c.chat.completions.create(model="demo", max_tokens=400, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    for event in s:
        print("chunk", flush=True)
    """
)


_WAITER = textwrap.dedent(
    """
    import sys, openai
    c = openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0)
    print("sending", flush=True)
    c.chat.completions.create(model="demo", max_tokens=400, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    """
)


@pytest.mark.parametrize("script", [_STREAMER, _WAITER], ids=["streaming", "waiting"])
def test_a_client_killed_mid_reply_frees_its_slot(server, script):
    before = server.metrics()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, f"{server.url}/v1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(5 if script is _STREAMER else 1):
            assert proc.stdout.readline() in ("chunk\n", "sending\n")
        t0 = time.monotonic()
        while server.metrics()["generated_tokens_total"] < before["generated_tokens_total"] + 5:
            assert time.monotonic() - t0 < 60, "the reply did not start"
            time.sleep(0.05)
        assert server.metrics()["busy_slots"] >= 1
        proc.kill()
    finally:
        proc.wait(10)
    after = server.wait_slots_free()
    assert after["cancelled_total"] == before["cancelled_total"] + 1
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < 400


# --- bad requests ---------------------------------------------------------------------------
def test_bad_requests_are_4xx_with_a_message(server, client):
    url = f"{server.url}/v1/chat/completions"
    cases = [
        (b"{not json", 400),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400),
        (b'{"messages": "hi"}', 400),
        (b'{"messages": []}', 400),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404),
        (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": '
         b'{"type": "json_schema"}}', 400),
        (b"[1, 2, 3]", 400),
        (b"", 400),
    ]  # fmt: skip
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"], body
    surrogate = b'{"model": "demo", "prompt": "a\\ud800b"}'  # a lone surrogate, as JSON allows
    r = httpx.post(f"{server.url}/v1/completions", content=surrogate,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    r = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    r = httpx.post(f"{server.url}/api/chat", json={"model": "demo", "messages": "x"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    long = "the cat sat on the mat " * 400  # ~2400 tokens, the context holds 512
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, [{"role": "user", "content": long}])
    assert err.value.code == "context_length_exceeded"
    assert "512" in str(err.value)


def test_max_tokens_beyond_the_context_is_clamped_and_reported(client):
    long = [{"role": "user", "content": "the cat sat on the mat " * 80}]  # ~490 of 512 tokens
    r = chat(client, long, max_tokens=100_000)
    room = CTX - r.usage.prompt_tokens
    assert 0 < room < 40
    assert r.model_extra["ondevice"]["max_tokens"] == room
    assert r.usage.completion_tokens <= room
    assert any("lowered" in n for n in r.model_extra["ondevice"]["notes"])


def test_a_full_server_answers_429_with_retry_after(demo_path):
    with ServerProcess(demo_path, "--parallel", "1", "--max-queue", "1", "--ctx", "256") as s:
        body = {"messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 60, "temperature": 0}  # fmt: skip
        results: list[int] = []

        def post() -> None:
            results.append(httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)
                           .status_code)  # fmt: skip

        first = threading.Thread(target=post)
        first.start()
        while s.metrics()["busy_slots"] < 1:
            time.sleep(0.05)
        second = threading.Thread(target=post)
        second.start()
        while s.metrics()["queue_length"] < 1:
            time.sleep(0.05)
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        first.join(120)
        second.join(120)
        assert results == [200, 200]


def test_speculative_serve_drafts_for_a_lone_request(demo_path, client):
    """`serve --speculative lookup`: a request running alone drafts by prompt lookup and
    verifies in its steps (its numbers and /metrics say how many); the default server
    doesn't draft, so its temperature-0 replies repeat exactly."""
    text = "Repeat this exactly: red, green, blue, red, green, blue, red, green, blue."
    msgs = [{"role": "user", "content": text}]
    plain = chat(client, msgs, max_tokens=40)
    assert plain.model_extra["ondevice"]["drafted_tokens"] == 0
    with ServerProcess(
        demo_path, "--parallel", "2", "--ctx", "512", "--speculative", "lookup"
    ) as s:
        spec = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        r = chat(spec, msgs, max_tokens=40)
        extra = r.model_extra["ondevice"]
        assert 0 < extra["accepted_tokens"] <= extra["drafted_tokens"]
        m = s.metrics()
        assert m["drafted_tokens_total"] == extra["drafted_tokens"]
        assert m["decode_calls_total"] < r.usage.completion_tokens + 1
