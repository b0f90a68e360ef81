"""Load on `ondevice serve`: 8 clients sending requests back to back (streaming and not, chat
and completions), with 0 errors and the server's memory flat (RSS growth < 20 MB after a
warm-up). The full run (8 x 25) is behind `-m slow`; the default suite runs 8 x 3."""

from __future__ import annotations

import threading

import openai
import psutil
import pytest
from server_fixtures import ServerProcess

CLIENTS = 8
MAX_RSS_GROWTH = 20 * 1024 * 1024


def _client_loop(url: str, i: int, n: int, errors: list[str]) -> None:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    for k in range(n):
        try:
            question = f"Question {k} from client {i}: name a colour."
            if k % 3 == 0:
                r = c.completions.create(model="demo", prompt=question, max_tokens=8)
                assert r.choices[0].finish_reason in ("stop", "length")
            elif k % 3 == 1:
                events = list(c.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": question}],
                    max_tokens=8, stream=True))  # fmt: skip
                assert events[-1].choices[0].finish_reason in ("stop", "length")
            else:
                r = c.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": question}], max_tokens=8
                )
                assert r.usage.completion_tokens <= 8
        except Exception as exc:  # noqa: BLE001 - counted, and shown if any
            errors.append(f"client {i} request {k}: {type(exc).__name__}: {exc}")


def _round(url: str, n: int) -> list[str]:
    errors: list[str] = []
    threads = [threading.Thread(target=_client_loop, args=(url, i, n, errors))
               for i in range(CLIENTS)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    return errors


def _load(demo_path, per_client: int) -> None:
    with ServerProcess(demo_path, "--parallel", "4", "--ctx", "256") as s:
        proc = psutil.Process(s.pid)
        assert _round(s.url, 2) == []  # warm-up: every slot, the allocator's pools
        before = proc.memory_info().rss
        errors = _round(s.url, per_client)
        growth = proc.memory_info().rss - before
        m = s.metrics()
        log = s.log
    print(f"{CLIENTS}x{per_client}: {len(errors)} errors, RSS growth {growth / 2**20:.1f} MiB, "
          f"{m['requests_total']:.0f} requests, {m['decode_calls_total']:.0f} decodes")  # fmt: skip
    assert errors == []
    assert growth < MAX_RSS_GROWTH
    assert m["requests_total"] == CLIENTS * (per_client + 2)
    assert "Traceback" not in log


def test_eight_clients_back_to_back(demo_path):
    _load(demo_path, per_client=3)


@pytest.mark.slow
def test_eight_clients_times_25_requests(demo_path):
    _load(demo_path, per_client=25)
