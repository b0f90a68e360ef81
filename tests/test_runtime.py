"""The runtime on the real demo model: determinism, stats, stop strings, cancel, threads, errors."""

from __future__ import annotations

import threading
import time

import pytest

import ondevice
from ondevice.errors import ContextOverflow, ModelClosed, ModelNotFound, UsageError
from ondevice.gguf_header import read_header

PROMPT = "The capital of France is"


def greedy(model, prompt=PROMPT, n=24, **kw):
    return model.generate(prompt, max_tokens=n, temperature=0, **kw)


def test_greedy_answer_is_paris(demo_model):
    r = greedy(demo_model)
    assert r.text.strip().startswith("Paris"), r.text


def test_greedy_identical_across_runs_and_thread_counts(demo_path, demo_model):
    first = greedy(demo_model).text
    demo_model.reset()
    second = greedy(demo_model).text
    with ondevice.load(demo_path, n_ctx=512, threads=1) as one_thread:
        third = greedy(one_thread).text
    assert first == second == third


def test_stats_are_plausible(demo_path, demo_model):
    demo_model.reset()
    r = greedy(demo_model, n=16)
    s = r.stats
    header = read_header(demo_path)
    assert s.prompt_tokens == len(demo_model.tokenize(PROMPT))
    assert s.prompt_eval_tokens == s.prompt_tokens
    assert s.completion_tokens == len(r.tokens) == 16
    assert s.prompt_tps > 0 and s.generation_tps > 0
    assert 0 < s.ttft_s < s.total_s
    assert s.load_s > 0
    assert s.peak_rss_bytes >= s.rss_bytes > s.model_bytes
    with demo_model.raw() as eng:  # llama.cpp's own count
        llama_size = eng.model_bytes
    assert s.model_bytes == header.tensor_bytes == llama_size
    assert s.kv_bytes > 0 and s.n_ctx == 2048
    assert s.backend == "CPU" and s.threads == 2
    assert s.finish_reason == "length"
    assert set(s.to_dict()) >= {
        "prompt_tokens",
        "prompt_eval_tokens",
        "completion_tokens",
        "prompt_tps",
        "generation_tps",
        "ttft_s",
        "load_s",
        "rss_bytes",
        "peak_rss_bytes",
        "model_bytes",
        "kv_bytes",
        "backend",
        "threads",
        "finish_reason",
    }


def test_kv_cache_prefix_is_reused(demo_model):
    demo_model.reset()
    greedy(demo_model, n=4)
    again = greedy(demo_model, PROMPT + " a city", n=4)
    # Everything up to the previous prompt stayed in the cache.
    assert again.stats.prompt_eval_tokens < again.stats.prompt_tokens
    assert again.stats.prompt_eval_tokens <= 3


def test_kv_reuse_does_not_change_output(demo_model):
    demo_model.reset()
    cold = greedy(demo_model, PROMPT + " a city").text
    demo_model.reset()
    greedy(demo_model, n=4)
    warm = greedy(demo_model, PROMPT + " a city").text
    assert cold == warm


def test_stream_chunks_add_up_and_end_with_stats(demo_model):
    chunks = list(demo_model.stream(PROMPT, max_tokens=12, temperature=0))
    assert all(c.stats is None and c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].stats is not None and chunks[-1].finish_reason == "length"
    text = "".join(c.text for c in chunks)
    assert text == greedy(demo_model, n=12).text


def test_stop_string_ends_reply_without_leaking(demo_model):
    full = greedy(demo_model, n=32).text
    assert "." in full
    r = greedy(demo_model, n=32, stop=["."])
    assert r.text == full[: full.index(".")]
    assert r.finish_reason == "stop"
    # A stop string spanning several tokens: nothing of it may appear in any chunk.
    target = full.strip().split()[1][:3] if len(full.split()) > 1 else "Par"
    streamed = list(demo_model.stream(PROMPT, max_tokens=32, temperature=0, stop=[target]))
    joined = "".join(c.text for c in streamed)
    assert target not in joined
    assert full.startswith(joined)


def test_stop_string_prefix_is_held_back_then_released(demo_model):
    full = greedy(demo_model, n=16).text
    # A stop string that starts like the output but then differs: all text must come out.
    bogus = full[:4] + "\x00never"
    r = greedy(demo_model, n=16, stop=[bogus])
    assert r.text == full


def test_seeded_sampling_is_reproducible(demo_model):
    a = demo_model.generate(PROMPT, max_tokens=16, temperature=0.9, seed=42).text
    b = demo_model.generate(PROMPT, max_tokens=16, temperature=0.9, seed=42).text
    assert a == b


def test_sampling_parameters_are_checked(demo_model):
    with pytest.raises(UsageError, match="unknown sampling"):
        demo_model.generate(PROMPT, temprature=0.1)
    with pytest.raises(UsageError, match="top_p"):
        demo_model.generate(PROMPT, top_p=0)


def test_cancel_from_another_thread_stops_within_a_token(demo_model):
    seen = []
    stream = demo_model.stream("1, 2, 3, 4, 5, 6,", max_tokens=400, temperature=0)
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 5:
            t = threading.Thread(target=demo_model.cancel)
            t.start()
            t.join()
        if chunk.finish_reason:
            break
    final = seen[-1]
    assert final.finish_reason == "cancelled"
    assert final.stats.completion_tokens <= 7
    # The model stays usable after a cancel.
    assert greedy(demo_model).text.strip().startswith("Paris")


def test_cancel_event(demo_model):
    ev = threading.Event()
    ev.set()
    r = demo_model.generate(PROMPT, max_tokens=50, cancel=ev)
    assert r.finish_reason == "cancelled" and r.stats.completion_tokens == 0


def test_concurrent_use_is_serialized(demo_model):
    expected = greedy(demo_model, n=12).text
    results, errors = [], []

    def worker():
        try:
            for _ in range(2):
                results.append(greedy(demo_model, n=12).text)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results == [expected] * 8


def test_reentrant_use_in_one_thread_is_an_error(demo_model):
    stream = demo_model.stream(PROMPT, max_tokens=8)
    next(stream)
    with pytest.raises(UsageError, match="already generating"):
        demo_model.generate(PROMPT, max_tokens=2)
    stream.close()
    assert greedy(demo_model, n=2).text


def test_prompt_longer_than_context_is_a_typed_error(demo_path):
    with ondevice.load(demo_path, n_ctx=256, threads=2) as m:
        n_ctx = m.n_ctx  # llama.cpp may round the context up
        with pytest.raises(ContextOverflow, match=f"context holds {n_ctx}"):
            m.generate("word " * (n_ctx + 10), max_tokens=4)
        # A prompt that leaves a little room stops with "length" when the context fills.
        r = m.generate("word " * (n_ctx - 20), max_tokens=100, temperature=0)
        assert r.finish_reason == "length"
        assert r.stats.prompt_tokens + r.stats.completion_tokens == n_ctx


def test_close_is_idempotent_and_use_after_close_is_an_error(demo_path):
    m = ondevice.load(demo_path, n_ctx=256, threads=2)
    assert m.path == demo_path
    assert m.metadata["general.architecture"] == "llama"
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(ModelClosed):
        m.generate(PROMPT)


def test_load_reports_progress(demo_path):
    seen = []
    with ondevice.load(demo_path, n_ctx=256, threads=2, on_progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)


def test_unknown_model_and_missing_file():
    with pytest.raises(ModelNotFound, match="unknown model"):
        ondevice.load("no-such-model")
    with pytest.raises(ModelNotFound, match="no such file"):
        ondevice.load("./missing.gguf")


def test_bad_load_arguments(demo_path):
    with pytest.raises(UsageError):
        ondevice.load(demo_path, threads=0)
    with pytest.raises(UsageError):
        ondevice.load(demo_path, kv_type="q9")


def test_generation_speed_is_reported_not_asserted(demo_model):
    # Speed is a benchmark (benchmarks/), not a unit test; here only that timing is sane.
    t0 = time.perf_counter()
    r = greedy(demo_model, n=8)
    assert r.stats.total_s <= time.perf_counter() - t0


def test_load_can_be_cancelled_from_on_progress(demo_path):
    from ondevice.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        ondevice.load(demo_path, n_ctx=256, threads=2, on_progress=lambda v: False)
