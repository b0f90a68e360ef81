"""Benchmarks a model the way llama-bench does, plus what a user of a phone or laptop feels.

llama-bench's tests, with its definitions (tools/llama-bench/llama-bench.cpp):
  ppN   one batch of N prompt tokens (BOS first if the model adds one, then random token ids),
        logits for the last token only, no sampling; N / time.
  tgN   N single-token decodes (BOS, then random ids), logits each time, no sampling; N / time.
  @ dD  the KV cache is filled with D tokens first (untimed, kept between repetitions).
Each test gets its own context of p + n + d tokens (as llama-bench's), one warm-up run (the whole
prompt; one generated token), then `reps` timed repetitions with the KV cache cleared before
each: mean ± sample standard deviation of the per-repetition rates.

What llama-bench lacks, measured here too:
  load      load time cold (the file evicted from the page cache first, as far as the OS lets
            us) and warm; the page-cache residency before the cold load is recorded.
  streamN   end-to-end `Model.stream` over a text prompt: time to first token and streamed
            tok/s with sampling, detokenization and the stop checks (Stats.generation_tps).
  roofline  this machine's memory read bandwidth (numpy, one thread and all threads) and tg as a
            fraction of bandwidth / bytes read per token.
  sustained generate for S seconds in tgN blocks and record tok/s over time (phones throttle).
Every record also carries peak RSS (with its anonymous / file-backed split), model and KV bytes,
backend and device. Profiles (`phone-4gb`, ...) fix threads (pinned to performance cores), a RAM
budget checked by `fit` before loading and by the measured peak RSS after, the context and the
KV cache type.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ondevice import fit, locate, paths, policy, speculate, stats, system
from ondevice._native import binding
from ondevice._native import log as native_log
from ondevice.errors import DoesNotFit, UsageError
from ondevice.gguf_header import GGUFHeader, read_header
from ondevice.loader import load

log = logging.getLogger(__name__)

GiB = 1024**3

# A plain paragraph for the end-to-end test: repeated to the prompt length the run asks for.
STREAM_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top "
    "he could see the fishing boats returning to the harbour, the gulls circling the cliffs, "
    "and the long line of the coast fading into the mist. He wrote down the weather, the "
    "ships that passed and the hour the lamp was lit, as his father had done before him. "
)


# --- profiles -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """A device class to benchmark as: threads, a RAM budget, context and KV cache type."""

    name: str
    threads: int  # at most this many, on performance cores
    ram_bytes: int  # what the run must stay within (peak RSS)
    n_ctx: int
    kv_type: str  # preferred; f16 when the model refuses it (Phi-2: head size 80)
    about: str


# Budgets are what an app can count on, not the RAM on the box: Android keeps 1.5-2.5 GB for
# the system and other apps; laptops run a browser next to us.
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("phone-4gb", 4, int(1.5 * GiB), 1024, "q8_0", "4 GB phone: 1.5 GiB, ctx 1024"),
        Profile("phone-6gb", 4, int(2.5 * GiB), 2048, "q8_0", "6 GB phone: 2.5 GiB, ctx 2048"),
        Profile("phone-8gb", 4, int(3.5 * GiB), 2048, "q8_0", "8 GB phone: 3.5 GiB, ctx 2048"),
        Profile("laptop-8gb", 4, 5 * GiB, 4096, "f16", "8 GB laptop: 5 GiB, ctx 4096"),
        Profile("laptop-16gb", 8, 10 * GiB, 4096, "f16", "16 GB laptop: 10 GiB, ctx 4096"),
    )
}


def parse_profile(name: str) -> Profile:
    key = name.strip().lower()
    if key not in PROFILES:
        raise UsageError(f"unknown profile {name!r}", hint=f"use one of {', '.join(PROFILES)}")
    return PROFILES[key]


def parse_int_list(text: str, what: str = "threads") -> list[int]:
    """ "1,2,4" → [1, 2, 4] (each ≥ 1); UsageError otherwise."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} must be a comma-separated list of positive numbers: {text!r}")
    return values


# --- options and records --------------------------------------------------------------------
@dataclass
class BenchOptions:
    """What to run. n_prompt / n_gen 0 skip pp / tg; threads None = auto."""

    n_prompt: int = 512
    n_gen: int = 128
    reps: int = 5
    threads: list[int] | None = None
    depth: int = 0
    n_ctx: int | None = None  # None: p + n + d per test, as llama-bench
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"
    kv_type: str = "f16"
    use_mmap: bool = True
    backend: str = "auto"
    warmup: bool = True
    extras: bool = True  # load and stream tests
    roofline: bool = False
    sustained_s: float = 0.0
    profile: Profile | None = None
    seed: int = 42
    label: str = ""
    spec_prompt: str | None = None  # the speculative test's prompt (text), or None to skip
    speculative: str = "auto"


@dataclass
class BenchRecord:
    """One test's result; `to_dict()` is one line of --output json / --save."""

    model: str
    model_bytes: int
    test: str
    threads: int
    backend: str
    tps_mean: float
    tps_sd: float
    peak_rss_bytes: int
    kv_bytes: int
    n_ctx: int
    model_desc: str = ""
    n_params: int = 0
    device: str = ""
    samples_tps: list[float] = field(default_factory=list)
    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0
    reps: int = 0
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"
    kv_type: str = "f16"
    use_mmap: bool = True
    repack: bool = False
    anon_bytes: int = 0
    file_bytes: int = 0
    compute_reserved_bytes: int = 0
    predicted_peak_bytes: int = 0
    ttft_s: float | None = None
    completion_tokens: float | None = None
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    cold_cached_fraction: float | None = None
    bandwidth_bytes_s: float | None = None
    bytes_per_token: int | None = None
    roofline_tps: float | None = None
    roofline_fraction: float | None = None
    series: list[list[float]] | None = None  # sustained: [seconds, tok/s, °C or -1]
    speculative: str = ""  # the speculative test: its mode, and against plain decoding
    acceptance: float | None = None
    speedup: float | None = None
    same_text: bool | None = None
    profile: str = ""
    ram_budget_bytes: int | None = None
    within_budget: bool | None = None
    affinity: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    run_id: str = ""
    label: str = ""
    host: str = ""
    timestamp: str = ""
    build: str = ""
    # CPU model, architecture and CPU count (`machine()`): what a phone's saved run ran on.
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# llama.cpp's own numbers, from its log (kept here under their old names for callers).
native_log_lines = native_log.capture
buffer_sizes = native_log.buffer_sizes


# --- machine facts --------------------------------------------------------------------------
def memory_bandwidth(threads: int = 1, size_bytes: int = 256 * 1024 * 1024, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `reps` sums of a large float64 array (numpy),
    split over `threads` Python threads (numpy releases the GIL in the reduction)."""
    import numpy as np

    a = np.ones(max(size_bytes // 8, 1 << 16))
    parts = np.array_split(a, threads)
    best = float("inf")
    with contextlib.ExitStack() as stack:
        pool = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = stack.enter_context(ThreadPoolExecutor(threads))
        for _ in range(reps + 1):  # the first pass faults the pages in
            t0 = time.perf_counter()
            if pool is None:
                a.sum()
            else:
                list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def bytes_per_token(header: GGUFHeader, kv_bytes_per_pos: float, mean_pos: float) -> int:
    """Bytes read from memory to generate one token: every weight matrix once (the token
    embedding only for its one row, unless it doubles as the output matrix) plus the keys and
    values of every cached position."""
    names = {t.name for t in header.tensors}
    tied = "output.weight" not in names
    total = 0
    for t in header.tensors:
        if t.name.startswith("token_embd") and not tied:
            total += t.n_bytes // max(t.shape[-1], 1)
        else:
            total += t.n_bytes
    return int(total + kv_bytes_per_pos * mean_pos)


def cached_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a fresh read-only mapping),
    or None where the OS doesn't tell."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 1.0
        n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                if libc.mincore(addr, size, vec) != 0:
                    return None
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        return sum(v & 1 for v in vec) / n
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def evict_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop the file's clean pages (posix_fadvise DONTNEED); pages that
    another process has mapped stay."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_temperature() -> float:
    """The hottest thermal zone in °C (Linux/Android sysfs), or -1 where there is none."""
    best = -1.0
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        with contextlib.suppress(OSError, ValueError):
            best = max(best, int(zone.read_text()) / 1000)
    return best


@contextlib.contextmanager
def pinned(cpus: list[int] | None) -> Iterator[list[int] | None]:
    """Run the block with this thread (and the threads it starts) on `cpus`, where the OS
    allows it; restore the previous mask afterwards."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.warning("could not pin to CPUs %s: %s", cpus, exc)
        yield None
        return
    try:
        yield sorted(cpus)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, old)


# llama-bench's spelling of its backend column.
BACKEND_NAMES = {"cpu": "CPU", "metal": "Metal", "vulkan": "Vulkan"}


# --- the timed loops (also used by ondevice.tune) ----------------------------------------------
def random_tokens(rng: random.Random, n_vocab: int, n: int, bos: int | None) -> list[int]:
    """llama-bench's prompt: BOS (if the model adds one) then random ids over the vocab."""
    out = [rng.randrange(n_vocab) for _ in range(n)]
    if n and bos is not None:
        out[0] = bos
    return out


def gen_seconds(eng: Any, n: int, bos: int | None, rng: random.Random, n_vocab: int) -> float:
    """llama-bench's test_gen: n single-token decodes (BOS first, then random ids); seconds."""
    tok = bos if bos is not None else rng.randrange(n_vocab)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        eng.decode_one(tok)
        eng.synchronize()
        tok = rng.randrange(n_vocab)
    return (time.perf_counter_ns() - t0) / 1e9


# --- the runner -------------------------------------------------------------------------------
class _Runner:
    """Runs the tests of one `run_bench` call; keeps the facts every record repeats."""

    def __init__(self, path: Path, opts: BenchOptions, progress: Callable[[str], None]) -> None:
        self.path = path
        self.opts = opts
        self.progress = progress
        self.header = read_header(path)
        self.rng = random.Random(opts.seed)
        self.records: list[BenchRecord] = []
        self.bandwidth: dict[int, float] = {}
        self.affinity: list[int] | None = None
        self.desc = ""
        self.n_vocab = 0
        self.n_params = self.header.n_params
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        self.build = f"llama-cpp-python {binding.version()}"
        self.machine = machine()

    # A fresh model per test, as llama-bench makes a fresh context per test.
    def load(
        self, n_ctx: int, threads: int, speculative: str = "auto"
    ) -> tuple[Any, dict[str, int]]:
        o = self.opts
        with native_log_lines() as lines:
            m = load(
                self.path,
                backend=o.backend,
                n_ctx=n_ctx,
                threads=threads,
                flash_attn=o.flash_attn,
                use_mmap=o.use_mmap,
                n_batch=o.n_batch,
                n_ubatch=o.n_ubatch,
                kv_type=o.kv_type,
                tune=False,  # bench measures the settings it was given, not stored tunings
                speculative=speculative,
            )
        if not self.desc:
            self.desc = m.description
        self.n_vocab = m.n_vocab
        return m, buffer_sizes(lines)

    def record(self, m: Any, bufs: dict[str, int], test: str, threads: int, **kw: Any) -> None:
        o = self.opts
        mem = stats.memory_breakdown()
        config = m.config
        repack = bool(config.use_extra_bufts)
        fa_on = config.flash_attn != "off"
        pred = fit.predict(
            self.header,
            m.n_ctx,
            o.kv_type,
            o.n_ubatch,
            use_mmap=o.use_mmap,
            repack=repack,
            flash_attn=fa_on,
            repack_family=policy.repack_family(system.cpu_features()),
        )
        rec = BenchRecord(
            model=self.path.name,
            model_bytes=m.model_bytes,
            test=test,
            threads=threads,
            backend=BACKEND_NAMES.get(m.placement.backend, m.placement.backend),
            device=m.device,
            tps_mean=0.0,
            tps_sd=0.0,
            peak_rss_bytes=stats.peak_rss_bytes(),
            kv_bytes=bufs.get("KV", m.kv_bytes),
            n_ctx=m.n_ctx,
            model_desc=self.desc,
            n_params=self.n_params,
            n_batch=o.n_batch,
            n_ubatch=o.n_ubatch,
            flash_attn=config.flash_attn,  # what ran (auto may mean off)
            kv_type=o.kv_type,
            use_mmap=o.use_mmap,
            repack=repack,
            anon_bytes=mem.get("anon_bytes", 0),
            file_bytes=mem.get("file_bytes", 0),
            compute_reserved_bytes=bufs.get("compute", 0),
            predicted_peak_bytes=pred.predicted_peak_bytes,
            reps=o.reps,
            notes=list(m.notes),
            affinity=self.affinity,
            run_id=self.run_id,
            label=o.label,
            host=socket.gethostname(),
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
            build=self.build,
            machine=self.machine,
        )
        samples = kw.pop("samples", None)
        if samples is not None:
            rec.samples_tps = [round(s, 4) for s in samples]
            rec.tps_mean, rec.tps_sd = _mean_sd(samples)
        for k, v in kw.items():
            setattr(rec, k, v)
        if o.profile is not None:
            rec.profile = o.profile.name
            rec.ram_budget_bytes = o.profile.ram_bytes
            rec.within_budget = rec.peak_rss_bytes <= o.profile.ram_bytes
        self.records.append(rec)

    def tokens(self, n: int, bos: int | None) -> list[int]:
        return random_tokens(self.rng, self.n_vocab, n, bos)

    def fill_depth(self, eng: Any, bos: int | None) -> None:
        d = self.opts.depth
        if d and eng.kv_used() == d:
            return
        eng.kv_clear()
        if d:
            eng.decode(self.tokens(d, bos))

    def reset_to_depth(self, eng: Any, bos: int | None) -> None:
        d = self.opts.depth
        if d and eng.kv_used() > d and eng.kv_keep(d):
            return
        self.fill_depth(eng, bos)

    def pp(self, threads: int) -> None:
        o = self.opts
        n_ctx = o.n_ctx or max(o.n_prompt + o.depth, 8)
        m, bufs = self.load(n_ctx, threads)
        with m, m.raw() as eng:
            bos = eng.bos if eng.add_bos else None
            if o.warmup:
                eng.kv_clear()
                eng.decode(self.tokens(o.n_prompt, bos))
                eng.synchronize()
            samples = []
            for _ in range(o.reps):
                self.reset_to_depth(eng, bos)
                toks = self.tokens(o.n_prompt, bos)
                t0 = time.perf_counter_ns()
                eng.decode(toks)
                eng.synchronize()
                samples.append(o.n_prompt / ((time.perf_counter_ns() - t0) / 1e9))
            test = f"pp{o.n_prompt}" + (f" @ d{o.depth}" if o.depth else "")
            self.record(m, bufs, test, threads, samples=samples, n_prompt=o.n_prompt, depth=o.depth)
        self.progress(f"{test} t={threads}: {self.records[-1].tps_mean:.2f} t/s")

    def gen_block(self, eng: Any, n: int, bos: int | None) -> float:
        return gen_seconds(eng, n, bos, self.rng, self.n_vocab)

    def tg(self, threads: int) -> None:
        o = self.opts
        n_ctx = o.n_ctx or max(o.n_gen + o.depth, 8)
        m, bufs = self.load(n_ctx, threads)
        with m, m.raw() as eng:
            bos = eng.bos if eng.add_bos else None
            if o.warmup:
                eng.kv_clear()
                self.gen_block(eng, 1, bos)
            samples = []
            for _ in range(o.reps):
                self.reset_to_depth(eng, bos)
                samples.append(o.n_gen / self.gen_block(eng, o.n_gen, bos))
            test = f"tg{o.n_gen}" + (f" @ d{o.depth}" if o.depth else "")
            extra = self.roofline_fields(m, samples, threads, o.depth + o.n_gen / 2)
            self.record(
                m, bufs, test, threads, samples=samples, n_gen=o.n_gen, depth=o.depth, **extra
            )
        self.progress(f"{test} t={threads}: {self.records[-1].tps_mean:.2f} t/s")

    def roofline_fields(
        self, m: Any, samples: list[float], threads: int, mean_pos: float
    ) -> dict[str, Any]:
        if not self.bandwidth or not samples:
            return {}
        bw = self.bandwidth_for(threads)
        per_pos = m.kv_bytes / max(m.n_ctx, 1)
        bpt = bytes_per_token(self.header, per_pos, mean_pos)
        roof = bw / bpt
        return {
            "bandwidth_bytes_s": bw,
            "bytes_per_token": bpt,
            "roofline_tps": roof,
            "roofline_fraction": statistics.fmean(samples) / roof,
        }

    def bandwidth_for(self, threads: int) -> float:
        one = self.bandwidth.get(1, 0.0)
        every = max(self.bandwidth.values())
        return min(every, one * threads) if threads > 1 else one

    def measure_bandwidth(self) -> None:
        n_all = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        n_all = n_all or os.cpu_count() or 1
        avail = stats.psutil.virtual_memory().available
        size = int(min(512 * 1024 * 1024, avail / 8))
        self.bandwidth[1] = memory_bandwidth(1, size)
        if n_all > 1:
            self.bandwidth[n_all] = memory_bandwidth(n_all, size)
        self.progress(
            "memory read bandwidth: "
            + ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in self.bandwidth.items())
        )

    def load_test(self, threads: int) -> None:
        o = self.opts
        n_ctx = o.n_ctx or max(o.n_prompt + o.n_gen + o.depth, 256)
        evict_from_page_cache(self.path)
        before = cached_fraction(self.path)
        m, _ = self.load(n_ctx, threads)
        cold = m.load_s
        m.close()
        m, bufs = self.load(n_ctx, threads)
        warm = m.load_s
        with m:
            self.record(
                m,
                bufs,
                "load",
                threads,
                load_cold_s=cold,
                load_warm_s=warm,
                cold_cached_fraction=before,
            )
        self.progress(f"load: cold {cold:.2f} s, warm {warm:.2f} s")

    def stream_test(self, threads: int) -> None:
        o = self.opts
        n_new = max(o.n_gen, 2)
        n_prompt = max(o.n_prompt, 8)
        n_ctx = o.n_ctx or (n_prompt + n_new + 8)
        m, bufs = self.load(n_ctx, threads)
        with m:
            base = m.tokenize(STREAM_TEXT, add_special=False)
            bos = [m.bos] if m.add_bos else []
            text = (base * (n_prompt // max(len(base), 1) + 1))[: n_prompt - len(bos)]
            prompt = bos + text
            if o.warmup:
                m.generate(prompt, max_tokens=2, seed=o.seed)
            rates, ttfts, counts = [], [], []
            for _ in range(o.reps):
                m.reset()
                res = m.generate(prompt, max_tokens=n_new, seed=o.seed)
                ttfts.append(res.stats.ttft_s)
                counts.append(res.stats.completion_tokens)
                if res.stats.completion_tokens > 1:
                    rates.append(res.stats.generation_tps)
            notes = [] if rates else ["every reply ended after its first token"]
            self.record(
                m,
                bufs,
                f"stream{n_new}",
                threads,
                samples=rates,
                n_prompt=len(prompt),
                n_gen=n_new,
                ttft_s=statistics.fmean(ttfts),
                completion_tokens=statistics.fmean(counts),
                **self.roofline_fields(m, rates, threads, len(prompt) + n_new / 2),
            )
            self.records[-1].notes += notes
        r = self.records[-1]
        self.progress(
            f"stream{n_new} t={threads}: {r.tps_mean:.2f} tok/s, TTFT {r.ttft_s * 1000:.0f} ms"
        )

    def speculative_test(self, threads: int) -> None:
        """The prompt file's reply streamed with speculative decoding and without, alternately
        (greedy, n_gen tokens): tok/s, the speed-up, acceptance, and whether the text agreed."""
        o = self.opts
        assert o.spec_prompt is not None
        n_new = max(o.n_gen, 2)
        # A draft model (a path or a store name) is loaded beside the model: mode "draft".
        by_draft = o.speculative not in speculate.MODES
        m, bufs = self.load(o.n_ctx or 4096, threads, o.speculative if by_draft else "auto")
        mode = speculate.DRAFT if by_draft else o.speculative
        label = f"draft {m.draft.path.name}" if by_draft else o.speculative
        with m:
            tokens = m.tokenize(o.spec_prompt)
            spec, plain, same = [], [], True
            drafted = accepted = 0
            for _ in range(o.reps):
                runs = {}
                for run in ("off", mode):
                    m.reset()
                    runs[run] = m.generate(tokens, max_tokens=n_new, temperature=0, speculative=run)
                plain.append(runs["off"].stats.generation_tps)
                spec.append(runs[mode].stats.generation_tps)
                drafted += runs[mode].stats.drafted_tokens
                accepted += runs[mode].stats.accepted_tokens
                same = same and runs["off"].text == runs[mode].text
            speedup = statistics.fmean(spec) / statistics.fmean(plain) if plain else None
            self.record(
                m, bufs, f"speculative{n_new}", threads, samples=spec, n_prompt=len(tokens),
                n_gen=n_new, speculative=label, speedup=speedup, same_text=same,
                acceptance=accepted / drafted if drafted else 0.0,
            )  # fmt: skip
        r = self.records[-1]
        self.progress(
            f"speculative{n_new} ({label}) t={threads}: {r.tps_mean:.2f} tok/s, "
            f"{speedup or 0:.2f}x plain, acceptance {r.acceptance:.0%}"
        )

    def sustained_test(self, threads: int) -> None:
        o = self.opts
        block = max(o.n_gen, 16)
        m, bufs = self.load(o.n_ctx or (block + o.depth), threads)
        series: list[list[float]] = []
        with m, m.raw() as eng:
            bos = eng.bos if eng.add_bos else None
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < o.sustained_s:
                self.reset_to_depth(eng, bos)
                tps = block / self.gen_block(eng, block, bos)
                series.append(
                    [round(time.perf_counter() - t_start, 3), round(tps, 3), cpu_temperature()]
                )
            rates = [s[1] for s in series]
            k = max(1, len(rates) // 10)
            ratio = statistics.fmean(rates[-k:]) / statistics.fmean(rates[:k]) if rates else 0
            self.record(
                m,
                bufs,
                f"sustained{o.sustained_s:g}s",
                threads,
                samples=rates,
                n_gen=block,
                depth=o.depth,
                series=series,
                notes=list(m.notes) + [f"last/first tenth: {ratio:.3f}"],
            )
        self.progress(f"sustained {o.sustained_s:g}s: last/first tenth {ratio:.3f}")


def _check_budget(
    header: GGUFHeader, opts: BenchOptions, n_ctx: int, repack: bool, family: str
) -> None:
    prof = opts.profile
    if prof is None:
        return
    kw: dict[str, Any] = dict(use_mmap=opts.use_mmap, repack=repack, repack_family=family)
    pred = fit.predict(header, n_ctx, opts.kv_type, opts.n_ubatch, **kw)
    if pred.predicted_peak_bytes > prof.ram_bytes:
        best = fit.max_context(header, prof.ram_bytes, opts.kv_type, **kw)
        raise DoesNotFit(
            f"{Path(header.path).name} needs about {pred.predicted_peak_bytes / GiB:.2f} GiB at ctx "
            f"{n_ctx} ({opts.kv_type} KV) but profile {prof.name} allows "
            f"{prof.ram_bytes / GiB:.2f} GiB",
            hint=(f"the largest context that fits is {best}" if best else "use a smaller quant")
            + f" (see `ondevice fit {Path(header.path).name} --ram {prof.ram_bytes}`)",
        )


def apply_profile(header: GGUFHeader, opts: BenchOptions) -> tuple[BenchOptions, list[int]]:
    """Options with the profile's threads, context and KV type (falling back to f16 where the
    model refuses the quantized cache), and the performance cores to pin to."""
    prof = opts.profile
    if prof is None:
        return opts, []
    topo = system.cpu_topology()
    if topo.performance:
        cores = list(topo.performance)
    elif hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
    else:
        cores = list(range(topo.logical))
    n = max(1, min(prof.threads, len(cores)))
    kv = prof.kv_type
    if fit.kv_type_problem(header, kv):
        kv = "f16"
    # A profile with fewer threads than performance cores takes the fastest of them (a
    # Snapdragon 8 Gen 3's X4 and its 3.15 GHz A720s before the 2.96 GHz pair).
    pin = topo.fastest(n) if topo.performance else cores[:n]
    return replace(opts, threads=[n], n_ctx=prof.n_ctx, kv_type=kv), pin


def run_bench(
    model: str | os.PathLike[str],
    opts: BenchOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRecord]:
    """Run the benchmark; one record per test (and per thread count)."""
    opts = opts or BenchOptions()
    progress = progress or (lambda msg: log.info("%s", msg))
    path = locate.resolve(model)
    header = read_header(path)
    if opts.reps < 1:
        raise UsageError("repetitions (-r) must be at least 1")
    if opts.n_prompt < 0 or opts.n_gen < 0 or opts.depth < 0:
        raise UsageError("-p, -n and -d must not be negative")
    why = fit.kv_type_problem(header, opts.kv_type)
    if why and opts.profile is None:
        raise UsageError(why, hint="use --kv-type f16")
    opts, cores = apply_profile(header, opts)
    if opts.profile is not None:
        features = system.cpu_features()
        allowed, _ = policy.repack_allowed(policy.amx_build_likely(features))
        _check_budget(header, opts, opts.n_ctx or 0, allowed, policy.repack_family(features))
        if opts.kv_type != opts.profile.kv_type:
            progress(f"{opts.profile.kv_type} KV cache refused by this model; using f16")
    threads = opts.threads or [system.auto_threads()]
    runner = _Runner(path, opts, progress)
    with pinned(cores) as pin:
        runner.affinity = pin
        if opts.roofline:
            runner.measure_bandwidth()
        if opts.extras:
            runner.load_test(threads[0])
        for t in threads:
            if opts.n_prompt:
                runner.pp(t)
            if opts.n_gen:
                runner.tg(t)
            if opts.extras:
                runner.stream_test(t)
            if opts.spec_prompt is not None:
                runner.speculative_test(t)
        if opts.sustained_s > 0:
            runner.sustained_test(threads[-1])
    if opts.profile is not None:
        for r in runner.records:
            if r.within_budget is False:
                r.notes.append(
                    f"peak RSS {r.peak_rss_bytes / GiB:.2f} GiB is over the profile's "
                    f"{opts.profile.ram_bytes / GiB:.2f} GiB budget"
                )
    return runner.records


def machine() -> str:
    return f"{system.cpu_model()} ({platform.machine()}, {os.cpu_count()} CPUs)"


# --- saved runs -------------------------------------------------------------------------------
def save(records: list[BenchRecord], path: str | os.PathLike[str]) -> None:
    """Add the records to a JSON-lines file (one record per line); the file is rewritten
    atomically, so it never holds a partial line."""
    import json

    target = Path(path)
    try:
        old = target.read_text(encoding="utf-8") if target.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {target} to add to it: {exc}") from None
    if old and not old.endswith("\n"):
        old += "\n"
    new = "".join(json.dumps(r.to_dict()) + "\n" for r in records)
    paths.write_text(target, old + new)


def load_saved(path: str | os.PathLike[str]) -> list[BenchRecord]:
    """Read a --save file; UsageError naming the line when it isn't one."""
    import json

    known = set(BenchRecord.__dataclass_fields__)
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            out.append(BenchRecord(**{k: v for k, v in data.items() if k in known}))
        except (ValueError, TypeError) as exc:
            raise UsageError(
                f"{path}:{i} is not a saved benchmark record ({exc})",
                hint="pass a file written by `ondevice bench --save`",
            ) from None
    return out
