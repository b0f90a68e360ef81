"""The callback form for GUI toolkits (`Model.start` -> handle), background loading
(`ondevice.load_async`) and `Model.stats()` for a status bar. Real demo model throughout."""

from __future__ import annotations

import threading
import time

import pytest

import ondevice
from ondevice import app
from ondevice.errors import Cancelled, ContextOverflow, ModelNotFound, UsageError

LONG = "Once upon a time"
WAIT_S = 120  # generous: the suite may share two cores with other work


def _recorder():
    """Callbacks that record (event, value, thread id) in the order they are called."""
    events: list[tuple[str, object, int]] = []

    def rec(kind: str):
        return lambda value: events.append((kind, value, threading.get_ident()))

    return events, {"on_token": rec("token"), "on_done": rec("done"), "on_error": rec("error")}


def test_tokens_then_done_on_the_worker_thread(demo_model):
    demo_model.reset()
    events, callbacks = _recorder()
    handle = demo_model.start("The capital of France is", max_tokens=12, temperature=0, **callbacks)
    assert handle.wait(WAIT_S) and handle.done
    kinds = [kind for kind, _, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    assert set(kinds[:-1]) == {"token"} and len(kinds) > 3  # streamed piece by piece
    result = events[-1][1]
    assert result is handle.result and result.text.startswith(" Paris")
    assert "".join(v for k, v, _ in events if k == "token") == result.text == handle.text
    assert result.stats.completion_tokens == 12 == handle.tokens
    threads = {tid for _, _, tid in events}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert handle.get() is result


@pytest.mark.parametrize(
    "prompt, kwargs, error",
    [
        ("Hi", {"temperatur": 0}, UsageError),  # a typo in a sampling keyword
        ([1] * 3000, {}, ContextOverflow),  # longer than the context
    ],
)
def test_errors_go_to_on_error_not_on_done(demo_model, prompt, kwargs, error):
    events, callbacks = _recorder()
    handle = demo_model.start(prompt, **kwargs, **callbacks)
    assert handle.wait(WAIT_S)
    assert [k for k, _, _ in events] == ["error"]
    assert isinstance(events[0][1], error) and handle.error is events[0][1]
    assert handle.result is None
    with pytest.raises(error):
        handle.get()


def test_a_raising_callback_stops_the_reply_and_reaches_on_error(demo_model):
    demo_model.reset()
    errors = []

    def on_token(text: str) -> None:
        raise RuntimeError("the UI went away")

    handle = demo_model.start(LONG, max_tokens=200, on_token=on_token, on_error=errors.append)
    assert handle.wait(WAIT_S)
    assert len(errors) == 1 and str(errors[0]) == "the UI went away"
    assert handle.tokens <= 2
    # The stream was closed, so the model's lock is free again.
    assert demo_model.generate("The capital of France is", max_tokens=3, temperature=0).text


def test_cancel_from_another_thread_stops_within_one_token(demo_model):
    demo_model.reset()
    first = threading.Event()
    done = []
    handle = demo_model.start(
        LONG, max_tokens=400, temperature=0, on_token=lambda t: first.set(), on_done=done.append
    )

    def canceller() -> None:
        first.wait(WAIT_S)
        handle.cancel()

    other = threading.Thread(target=canceller)
    other.start()
    assert handle.wait(WAIT_S)
    other.join()
    assert handle.cancelled and len(done) == 1
    result = done[0]
    assert result.finish_reason == "cancelled"
    assert handle.tokens_at_cancel is not None
    assert result.stats.completion_tokens <= handle.tokens_at_cancel + 1
    assert result.stats.completion_tokens < 400


def test_two_starts_on_one_model_run_one_after_the_other(demo_model):
    demo_model.reset()
    a = demo_model.start("The capital of France is", max_tokens=8, temperature=0)
    b = demo_model.start("The capital of France is", max_tokens=8, temperature=0)
    assert a.wait(WAIT_S) and b.wait(WAIT_S)
    assert a.result.text == b.result.text and a.result.text.startswith(" Paris")


def test_start_drives_a_conversation(demo_model):
    demo_model.reset()
    conv = demo_model.conversation(max_tokens=16, temperature=0)
    pieces = []
    handle = app.start(conv, "What is the capital of France?", on_token=pieces.append)
    assert handle.wait(WAIT_S) and handle.error is None
    assert "".join(pieces) == handle.result.text and len(conv) == 2


def test_stats_never_waits_for_the_model_lock(demo_model):
    """A status bar reads stats() every 100 ms; a generation holds the model's lock."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with demo_model.lock():
            held.set()
            release.wait(WAIT_S)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(WAIT_S)
    out = []
    reader = threading.Thread(target=lambda: out.append(demo_model.live_stats()))
    reader.start()
    reader.join(30)  # would hang until release if stats() took the lock
    still_held = not release.is_set()
    release.set()
    holder.join()
    assert out and still_held
    live = out[0]
    assert live.generating
    assert live.rss_bytes > live.model_bytes // 2 and live.kv_bytes == demo_model.kv_bytes
    assert not demo_model.live_stats().generating

    demo_model.reset()
    r = demo_model.generate("The capital of France is", max_tokens=4, temperature=0)
    after = demo_model.live_stats()
    assert after.last is r.stats and after.kv_tokens == demo_model.kv_used()
    assert "tok/s" in after.summary() and "MiB" in after.summary()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        demo_model.live_stats()
    print(f"\nModel.stats(): {(time.perf_counter() - t0) / n * 1e6:.0f} µs per call")


def test_load_async_reports_progress_then_the_model(demo_path):
    seen, done = [], []
    handle = ondevice.load_async(
        demo_path, n_ctx=256, threads=1, on_progress=seen.append, on_done=done.append
    )
    model = handle.get(WAIT_S)
    try:
        assert done == [model] and isinstance(model, ondevice.Model) and not model.closed
        assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
        assert handle.progress == pytest.approx(1.0)
        assert model.generate("The capital of France is", max_tokens=3, temperature=0).text
    finally:
        model.close()


def test_load_async_errors_and_cancel(demo_path, tmp_path):
    errors = []
    missing = ondevice.load_async(tmp_path / "nope.gguf", on_error=errors.append)
    assert missing.wait(WAIT_S)
    assert isinstance(missing.error, ModelNotFound) and errors == [missing.error]

    handle = ondevice.load_async(demo_path, n_ctx=256, threads=1)
    handle.cancel()
    assert handle.wait(WAIT_S)
    assert isinstance(handle.error, Cancelled) and handle.result is None
