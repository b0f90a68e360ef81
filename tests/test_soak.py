"""Load: many threads on one Model, many generations and many load/close cycles in one process.

- 8 threads × 25 greedy requests on one Model (the default run: 8 × 2): nothing crashes and
  every reply equals the one the same prompt got serially.
- 1000 short generations in one process (default: 60): RSS grows by less than 20 MB.
- load/close 100 times (default: 8): RSS does not grow (less than 8 MB over the cycles after
  the first few, which fill allocator caches).
The memory figures come from a fresh child process (psutil RSS) and are printed with `-s`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import ondevice

PYTHON = sys.executable
# Distinct first words: the KV cache keeps the longest common prefix with the previous call, and
# prompts that share none are evaluated the same way whatever ran before them.
PROMPTS = [
    f"{w} is" for w in (
        "Paris", "Water", "Music", "Gold", "Winter", "Python", "Bread", "Light", "Chess", "Coffee",
        "Rain", "Mars", "Silver", "Books", "Tigers", "Glass", "Jazz", "Salt", "Iron", "Snow",
        "Tea", "Oceans", "Wind", "Maple", "Honey",
    )
]  # fmt: skip
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(demo_path):
    with ondevice.load(demo_path, n_ctx=512, threads=1) as m:
        yield m


def greedy(m: ondevice.Model, prompt: str) -> list[int]:
    return m.generate(prompt, max_tokens=MAX_TOKENS, temperature=0).tokens


@pytest.mark.parametrize(
    "n_threads, n_requests",
    [(8, 2), pytest.param(8, 25, marks=pytest.mark.slow, id="8x25")],
)
def test_threads_share_one_model(n_threads, n_requests, model):
    serial = {p: greedy(model, p) for p in PROMPTS[:n_requests]}
    assert all(serial.values())
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        # each thread walks the prompts from a different starting point
        order = PROMPTS[:n_requests][k % n_requests :] + PROMPTS[:n_requests][: k % n_requests]
        try:
            for p in order:
                out = greedy(model, p)
                with lock:
                    results.append((p, out))
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == n_threads * n_requests
    mismatched = [(p, out, serial[p]) for p, out in results if out != serial[p]]
    assert mismatched == []


def test_cancel_from_another_thread_leaves_the_model_usable(model):
    """A generation cancelled from another thread ends with "cancelled"; the next one is the
    same as before."""
    before = greedy(model, PROMPTS[0])
    started = threading.Event()
    chunks = []

    def consume() -> None:
        for chunk in model.stream(PROMPTS[1], max_tokens=200, temperature=0):
            started.set()
            chunks.append(chunk)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60)
    model.cancel()
    t.join(60)
    assert chunks[-1].finish_reason in ("cancelled", "stop", "length")
    assert greedy(model, PROMPTS[0]) == before


SOAK_SCRIPT = r"""
import gc, json, sys
import ondevice
from ondevice import stats
path, n_gen, n_load = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
if n_gen:
    with ondevice.load(path, n_ctx=256, threads=1) as m:
        def gen(i):
            m.generate(f"Number {i} is", max_tokens=4, temperature=0.7, seed=i)
        for i in range(20):
            gen(i)
        gc.collect()
        r0 = stats.rss_bytes()
        for i in range(n_gen):
            gen(i)
        gc.collect()
        out["gen_rss_growth"] = stats.rss_bytes() - r0
        out["gen_rss"] = stats.rss_bytes()
if n_load:
    def cycle():
        with ondevice.load(path, n_ctx=256, threads=1) as m:
            m.generate("Hi", max_tokens=1, temperature=0)
    for _ in range(5):
        cycle()
    gc.collect()
    r0 = stats.rss_bytes()
    for _ in range(n_load):
        cycle()
    gc.collect()
    out["load_rss_growth"] = stats.rss_bytes() - r0
print(json.dumps(out))
"""


def soak(demo_path, n_gen: int, n_load: int) -> dict:
    proc = subprocess.run(
        [PYTHON, "-c", SOAK_SCRIPT, str(demo_path), str(n_gen), str(n_load)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "n_gen, n_load",
    [(60, 8), pytest.param(1000, 100, marks=pytest.mark.slow, id="1000-gen-100-loads")],
)
def test_memory_does_not_grow(n_gen, n_load, demo_path):
    got = soak(demo_path, n_gen, n_load)
    mib = {k: round(v / 2**20, 2) for k, v in got.items()}
    print(f"soak: {n_gen} generations, {n_load} load/close cycles: {mib}")
    assert got["gen_rss_growth"] < 20 * 2**20
    assert got["load_rss_growth"] < 8 * 2**20
