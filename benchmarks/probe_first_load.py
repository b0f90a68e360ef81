"""What the first-load check (ondevice.probe) adds to `ondevice.load()`: on the first load of a
file (a child process loads it, decodes a few tokens, detokenizes the vocabulary), and on every
later load (one read and hash of the header, one small JSON file).

    python benchmarks/probe_first_load.py [--rounds 5] [--models demo q4km]

`demo` is the demo model, `q4km` the Phi-2-shaped Q4_K_M file that bench_vs_llama_bench.py makes
once in its cache folder (random weights; ~5 min the first time); a path works too. The demo is
pinned as known-good in ondevice.probe, so the first-load figure is measured with that pin
lifted. Each first-load round uses an empty config folder; the file is in the page cache after
a warm-up round (the host's own load then reads it from the cache too, so the probe's extra cost
on a cold disk is about one read of the file, paid once). For scale, the host's own load
(`ondevice.load(trust=True)`) is timed too. Needs a quiet machine; the figures go into
benchmarks/RESULTS.md with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ondevice  # noqa: E402
from ondevice import probe  # noqa: E402
from ondevice.gguf_header import read_header  # noqa: E402


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def first_load_s(path: Path, rounds: int) -> tuple[list[float], dict]:
    """ensure_safe() on a file this 'machine' has not checked: a fresh config dir each round."""
    header = read_header(path)
    pinned = dict(probe.KNOWN_GOOD)
    probe.KNOWN_GOOD.clear()  # measure the demo like any other file
    times, detail = [], {}
    try:
        for _ in range(rounds + 1):  # the first round warms the page cache and is dropped
            with tempfile.TemporaryDirectory() as home:
                os.environ["ONDEVICE_HOME"] = home
                t0 = time.perf_counter()
                ran = probe.ensure_safe(path, header)
                times.append(time.perf_counter() - t0)
                assert ran, "the probe did not run"
        outcome = probe.run_probe(path, header)
        detail = json.loads(outcome.detail or "{}")
    finally:
        probe.KNOWN_GOOD.update(pinned)
    return times[1:], detail


def later_load_s(path: Path, rounds: int) -> list[float]:
    """ensure_safe() on a file that passed before: what every later load pays."""
    header = read_header(path)
    with tempfile.TemporaryDirectory() as home:
        os.environ["ONDEVICE_HOME"] = home
        probe.remember(probe.identity(path, header), path, 0.0)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            assert probe.ensure_safe(path, header) is False
            times.append(time.perf_counter() - t0)
    return times


def host_load_s(path: Path, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with ondevice.load(path, n_ctx=2048, trust=True):
            pass
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["demo", "q4km"])
    args = ap.parse_args(argv)
    from bench_vs_llama_bench import model_path

    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows = []
    for name in args.models:
        path = model_path(name)
        first, detail = first_load_s(path, args.rounds)
        later = later_load_s(path, args.rounds * 4)
        host = host_load_s(path, args.rounds)
        row = {
            "model": name,
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "first_load_added_s": round(_median(first), 3),
            "first_load_added_s_all": [round(t, 3) for t in first],
            "child_phases_s": detail,
            "later_load_added_ms": round(_median(later) * 1000, 2),
            "host_load_s": round(_median(host), 3),
        }
        rows.append(row)
        print(json.dumps(row))
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
