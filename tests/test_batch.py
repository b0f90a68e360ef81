"""The batch scheduler's parts the server leans on, on the real demo model: tokenizing on
another thread while it generates, chunks delivered to asyncio, cancelling (a running job, and
a queued one that leaves the queue at once), and wall-time limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ondevice.batch import QueueFull, QueueTimeout, Scheduler
from ondevice.errors import UsageError

PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture
def sched(demo_model):
    with Scheduler(demo_model, max_queue=1) as s:
        yield s


def _tokens(sched: Scheduler, text: str = PROMPT) -> list[int]:
    return sched.model.tokenize(text)


def _wait(predicate, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_vocab_works_from_another_thread_while_a_job_generates(sched, demo_model):
    expected = _tokens(sched, "The capital of France is")
    job = sched.submit(_tokens(sched), max_tokens=64, temperature=0)
    got: list[list[int]] = []
    worker = threading.Thread(
        target=lambda: got.extend(_tokens(sched, "The capital of France is") for _ in range(50))
    )
    worker.start()
    worker.join(60)
    result = job.wait(120)
    assert got == [expected] * 50
    assert demo_model.detokenize(expected) == "The capital of France is"
    assert b"".join(demo_model.token_bytes(expected)) == b"The capital of France is"
    assert result.stats.completion_tokens > 0


def test_chunks_arrive_on_the_event_loop_and_add_up_to_the_result(sched):
    async def main() -> tuple[list[str], str, str, int]:
        ajob = sched.submit_async(_tokens(sched), max_tokens=24, temperature=0)
        texts, reason, ident = [], "", 0
        async for chunk in ajob:
            ident = threading.get_ident()
            texts.append(chunk.text)
            reason = chunk.finish_reason or reason
        assert ajob.job is not None
        return texts, reason, ajob.job.result.text, ident

    texts, reason, whole, ident = asyncio.run(main())
    assert "".join(texts) == whole and whole
    assert reason == "length"
    assert ident == threading.get_ident()  # the loop's thread, not the scheduler's


def test_cancel_frees_the_slot_and_a_queued_job_leaves_the_queue_at_once(sched):
    running = sched.submit(_tokens(sched), max_tokens=2000, temperature=0)
    _wait(lambda: sched.metrics()["busy_slots"] == 1)
    done: list[str] = []
    queued = sched.submit(_tokens(sched), max_tokens=8, on_done=lambda j: done.append("done"))
    with pytest.raises(QueueFull):  # max_queue=1: the queue is full
        sched.submit(_tokens(sched), max_tokens=8)
    sched.cancel(queued)
    _wait(lambda: sched.metrics()["queue_length"] == 0, timeout=5)
    assert queued.wait(5).finish_reason == "cancelled" and done == ["done"]
    assert running.result is None  # the running one went on
    third = sched.submit(_tokens(sched), max_tokens=8)  # its queue place is free again
    sched.cancel(running)
    assert running.wait(10).finish_reason == "cancelled"
    assert running.result.stats.completion_tokens < 2000
    assert third.wait(60).stats.completion_tokens == 8
    m = sched.metrics()
    assert m["busy_slots"] == 0 and m["cancelled"] == 2


def test_time_limit_ends_a_running_job_and_fails_a_queued_one(sched):
    t0 = time.perf_counter()
    running = sched.submit(_tokens(sched), max_tokens=4000, temperature=0, time_limit_s=0.5)
    queued = sched.submit(_tokens(sched), max_tokens=8, time_limit_s=0.2)
    with pytest.raises(QueueTimeout, match="time limit"):
        queued.wait(10)
    result = running.wait(30)
    assert result.finish_reason == "length"
    assert any("time limit" in n for n in result.stats.notes)
    assert time.perf_counter() - t0 < 10
    assert sched.metrics()["timeouts"] == 2


def test_a_bad_time_limit_is_a_usage_error(sched):
    with pytest.raises(UsageError, match="time_limit_s"):
        sched.submit(_tokens(sched), time_limit_s=0)
