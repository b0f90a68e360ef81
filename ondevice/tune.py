"""`ondevice tune`: measures llama.cpp's settings on this device for one model and one workload,
and keeps the fastest faithful ones so that `ondevice.load()` uses them from then on.

llama.cpp's defaults are picked for many machines at once; on a given one, flash attention,
weight repacking, the micro-batch, the thread count and the KV cache type can each be worth
tens of percent, in either direction, and which way depends on how deep into the context the
work happens. So we measure instead of guessing:

  candidates  flash attention on/off; weight repacking where this build can use it (not on
              AMX builds, whose kernels crash here: the engine forces it off, so it is listed
              as unavailable, never tried); mmap or reading the file; n_ubatch; threads
              (the performance cores first, then fewer); KV cache types the model allows.
  a probe     one candidate, measured with bench's timed loops: load it (after fit's
              prediction says it fits the RAM budget), walk the KV cache through the depths
              the workload reaches, timing a prompt chunk and a block of single-token decodes
              at each depth point, then read the peak RSS (it must also fit the budget).
  cost        a workload is prompt and generated tokens spread over depths (`Segment`s); a
              probe's cost is the sum over segments of tokens x seconds per token, the latter
              interpolated between the measured depth points and averaged over the segment's
              depths. Lower is better; "workload tok/s" is tokens over that cost.
  search      coordinate descent from the defaults, one knob at a time in order of expected
              effect; a close call (< RECHECK apart) is measured again, interleaved, and the
              means decide; within TIE the incumbent stays unless it needs >5% more memory.
              The search stops when the time budget would be overrun.
  faithful    a candidate that changes numerics (flash attention, repacking, KV type) must
              keep the next-token distribution: mean KL divergence <= KL_MAX and top-1
              agreement >= TOP1_MIN against the defaults, on a fixed text, with every
              position's logits (Engine.decode_all_logits).
  stored      per (device fingerprint, model sha256, workload) in tunings.json in the user's
              config dir ($ONDEVICE_HOME/config when set). The sha256 is cached by path, size
              and mtime, so a load doesn't hash a 1.7 GB file each time.
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ondevice import bench, fit, locate, policy, stats, system
from ondevice._native import binding
from ondevice._native import log as native_log
from ondevice.errors import DoesNotFit, OndeviceError, UsageError
from ondevice.gguf_header import read_header
from ondevice.loader import load
from ondevice.logits import kl_per_position
from ondevice.tune_store import (
    WORKLOADS,
    device_fingerprint,
    device_id,
    model_sha256,
    save_tuning,
)

log = logging.getLogger(__name__)

# In order of expected effect: on a busy or small machine the thread count decides most.
KNOBS = ("threads", "flash_attn", "repack", "kv_type", "n_ubatch", "use_mmap")
# Re-measure when two candidates are closer than this (the shared machine's noise is ~10%).
RECHECK = 0.08
# Within this, the incumbent stays (unless the challenger needs >5% less memory).
TIE = 0.03
KL_MAX = 0.01
TOP1_MIN = 0.90
TG_BLOCK = 32  # single-token decodes per depth point
# A probe running this many times longer than the incumbent's is stopped: it is slower anyway
# (the successive-halving idea: don't finish measuring a loser).
ABORT_FACTOR = 3.0

# The fixed text of the faithfulness check: plain prose, ~200 tokens for most vocabularies.
FAITH_TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under "
    "water. Farmers moved their animals to the hills while the children watched from the "
    "bridge. In the town, the baker kept his ovens burning, because people would need bread "
    "whatever the weather did. An old map in the library showed that the same thing had "
    "happened a century before, when the mill was built and the channel was narrowed. The "
    "engineers who came from the capital measured the banks, counted the bridges and wrote a "
    "long report recommending a wider channel, new gates and a second road out of the valley. "
    "Nobody read it until the next flood, when it was found in a drawer, exactly as they had "
    "left it, with a note asking for the money to be sent in spring."
)


# --- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The knobs a tuning sets (what `ondevice.load()` takes)."""

    flash_attn: str = "auto"  # "on", "off" or "auto" (llama.cpp / ondevice decide)
    repack: bool = True  # llama.cpp's weight repacking (use_extra_bufts)
    use_mmap: bool = True
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 1
    kv_type: str = "f16"

    def label(self) -> str:
        return (
            f"fa={self.flash_attn} repack={'on' if self.repack else 'off'} "
            f"mmap={'on' if self.use_mmap else 'off'} ub={self.n_ubatch} t={self.threads} "
            f"kv={self.kv_type}"
        )

    def load_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def numerics(self) -> tuple[str, bool, str]:
        """The part that changes the arithmetic (the rest only changes speed and memory)."""
        return (self.flash_attn, self.repack, self.kv_type)


def repack_usable() -> bool:
    """Whether this llama.cpp build may repack weights here (off on AMX builds, whose kernels
    die with SIGILL on this project's machines: ondevice.policy.repack_allowed)."""
    return policy.repack_allowed(binding.amx_compiled())[0]


def default_settings(threads: int | None = None) -> Settings:
    """What `ondevice.load()` uses untuned: llama.cpp's defaults (flash attention auto, repacking
    where usable, mmap, n_batch 2048 / n_ubatch 512, f16 KV) on the performance cores."""
    return Settings(repack=repack_usable(), threads=threads or system.auto_threads())


# --- workloads ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """`tokens` prompt ("pp") or generated ("tg") tokens spread evenly over depths
    [depth0, depth1); prompt tokens arrive `chunk` at a time (one llama_decode call each)."""

    kind: str
    tokens: int
    depth0: int
    depth1: int
    chunk: int = 1


def workload_segments(name: str, n_ctx: int) -> list[Segment]:
    """Where a workload spends its tokens at context n_ctx.

    short        a 64-token question, a 128-token answer, from an empty cache.
    long-prompt  a document filling 3/4 of the context in one prompt, then 128 tokens.
    chat         turns of ~64 prompt tokens (the new message; the history stays cached) and
                 ~128 reply tokens until the context is full: a third of the tokens are prompt,
                 two thirds generated, spread evenly over depths 0..n_ctx.
    """
    if name == "short":
        p = max(8, min(64, n_ctx // 4))
        g = max(1, min(128, n_ctx - p - 1))
        return [Segment("pp", p, 0, p, p), Segment("tg", g, p, p + g)]
    if name == "long-prompt":
        p = max(8, n_ctx * 3 // 4)
        g = max(1, min(128, n_ctx - p - 1))
        return [Segment("pp", p, 0, p, p), Segment("tg", g, p, p + g)]
    if name == "chat":
        return [
            Segment("pp", n_ctx // 3, 0, n_ctx, min(64, n_ctx // 4)),
            Segment("tg", n_ctx - n_ctx // 3, 0, n_ctx),
        ]
    raise UsageError(f"unknown workload {name!r}", hint=f"use one of {', '.join(WORKLOADS)}")


def depth_points(segments: Sequence[Segment], n_ctx: int, tg_block: int = TG_BLOCK) -> list[int]:
    """Depths to measure at: each segment's start, and for long spans its middle and end too
    (a token's cost grows with depth, roughly linearly; three points see the curve)."""
    top = max(0, n_ctx - max(tg_block, 64) - 2)
    # A one-chunk prompt is timed as a whole, and generation right after it is timed there.
    whole_ends = {s.depth1 for s in segments if s.kind == "pp" and s.chunk >= s.tokens}
    pts: set[int] = set()
    for s in segments:
        if s.kind == "pp" and s.chunk >= s.tokens:
            continue
        if s.kind == "tg" and s.depth0 in whole_ends and s.depth1 - s.depth0 <= 256:
            continue
        pts.add(min(s.depth0, top))
        if s.depth1 - s.depth0 > 256:
            pts.add(min((s.depth0 + s.depth1) // 2, top))
            pts.add(top)
    return sorted(pts)


def _mean_over(points: list[tuple[int, float]], d0: int, d1: int) -> float:
    """Mean of a piecewise-linear function of depth (flat beyond the measured points) over
    [d0, d1]."""
    pts = sorted(points)
    if len(pts) == 1 or d1 <= d0:
        return _interp(pts, d0)
    n = 64
    return statistics.fmean(_interp(pts, d0 + (d1 - d0) * (i + 0.5) / n) for i in range(n))


def _interp(pts: list[tuple[int, float]], d: float) -> float:
    if d <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if d <= x1:
            return y0 + (y1 - y0) * (d - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


# --- probes -------------------------------------------------------------------------------------
@dataclass
class Probe:
    """One candidate's measurements (several runs when it was re-measured)."""

    settings: Settings
    costs: list[float] = field(default_factory=list)  # estimated workload seconds per run
    pp: dict[str, float] = field(default_factory=dict)  # "depth/chunk" -> tok/s (last run)
    tg: dict[int, float] = field(default_factory=dict)  # depth -> tok/s (last run)
    peak_rss_bytes: int = 0
    predicted_peak_bytes: int = 0
    load_s: float = 0.0
    wall_s: float = 0.0
    flash_attn_resolved: str = ""
    status: str = "ok"  # ok, excluded (RAM), failed, unfaithful
    reason: str = ""

    @property
    def cost(self) -> float:
        return statistics.fmean(self.costs) if self.costs else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = self.cost if self.costs else None
        out["tg"] = {str(k): v for k, v in self.tg.items()}
        return out


def _time_decode(eng: Any, tokens: list[int]) -> float:
    t0 = time.perf_counter_ns()
    eng.decode(tokens)
    eng.synchronize()
    return (time.perf_counter_ns() - t0) / 1e9


def measure(
    path: Path,
    settings: Settings,
    segments: Sequence[Segment],
    n_ctx: int,
    *,
    seed: int = 7,
    tg_block: int = TG_BLOCK,
    probe: Probe | None = None,
    deadline: float | None = None,
) -> Probe:
    """Load `path` with `settings` (untuned) and measure the workload's segments; adds one run
    to `probe` (a new one by default). Raises TooSlow when perf_counter() passes `deadline`."""
    probe = probe or Probe(settings)
    rng = random.Random(seed)
    t_wall = time.perf_counter()

    def check() -> None:
        if deadline is not None and time.perf_counter() > deadline:
            probe.wall_s += time.perf_counter() - t_wall
            raise TooSlow(f"stopped after {time.perf_counter() - t_wall:.0f} s")

    with native_log.capture() as lines:
        m = load(path, n_ctx=n_ctx, tune=False, backend="auto", **settings.load_kwargs())
    probe.flash_attn_resolved = native_log.flash_attn_resolved(lines, settings.flash_attn)
    with m, m.raw() as eng:
        probe.load_s = m.load_s
        nv = eng.n_vocab
        bos = eng.bos if eng.add_bos else None
        block = max(1, min(tg_block, n_ctx // 8))
        # Warm-up (llama-bench's): one prompt batch and one generated token, then forget them.
        eng.decode(bench.random_tokens(rng, nv, min(32, n_ctx // 4), bos))
        bench.gen_seconds(eng, 1, bos, rng, nv)
        eng.kv_clear()
        spent: dict[int, int] = {}
        pp_pts: dict[Segment, list[tuple[int, float]]] = {}
        tg_pts: list[tuple[int, float]] = []
        whole: dict[Segment, float] = {}
        # One-chunk prompts first: each is its own timed decode from an empty cache.
        for s in segments:
            if s.kind == "pp" and s.chunk >= s.tokens:
                eng.kv_clear()
                sec = _time_decode(eng, bench.random_tokens(rng, nv, s.tokens, bos))
                whole[s] = sec
                probe.pp[f"{s.tokens}@{s.depth0}"] = s.tokens / sec
                check()
                for t in segments:
                    if t.kind == "tg" and t.depth0 == s.depth1:
                        gsec = bench.gen_seconds(eng, block, None, rng, nv)
                        tg_pts.append((s.depth1, gsec / block))
                        probe.tg[s.depth1] = block / gsec
        eng.kv_clear()
        depth = 0
        for d in depth_points(segments, n_ctx, block):
            if d > depth:  # untimed fill to the next point, in big batches
                eng.decode(bench.random_tokens(rng, nv, d - depth, bos if depth == 0 else None))
                depth = d
                check()
            for s in segments:
                if s.kind == "pp" and s.chunk < s.tokens and s.depth0 <= d < s.depth1:
                    sec = _time_decode(eng, bench.random_tokens(rng, nv, s.chunk, None))
                    pp_pts.setdefault(s, []).append((d, sec / s.chunk))
                    probe.pp[f"{s.chunk}@{d}"] = s.chunk / sec
                    eng.kv_keep(d)
                    check()
                if s.kind == "tg" and s.depth0 <= d < max(s.depth1, s.depth0 + 1):
                    if d not in spent:
                        gsec = bench.gen_seconds(eng, block, bos if d == 0 else None, rng, nv)
                        spent[d] = 1
                        tg_pts.append((d, gsec / block))
                        probe.tg[d] = block / gsec
                        eng.kv_keep(d)
                        check()
        probe.peak_rss_bytes = max(probe.peak_rss_bytes, stats.peak_rss_bytes())
    cost = _workload_cost(segments, whole, pp_pts, tg_pts)
    probe.costs.append(cost)
    probe.wall_s += time.perf_counter() - t_wall
    return probe


def _workload_cost(
    segments: Sequence[Segment],
    whole: dict[Segment, float],
    pp_pts: dict[Segment, list[tuple[int, float]]],
    tg_pts: list[tuple[int, float]],
) -> float:
    """The workload's estimated seconds: measured whole prompts as they are, the rest tokens
    times seconds per token averaged over the segment's depths."""
    cost = 0.0
    for s in segments:
        if s in whole:
            cost += whole[s]
        elif s.kind == "pp":
            cost += s.tokens * _mean_over(pp_pts[s], s.depth0, s.depth1)
        else:
            pts = [p for p in tg_pts if s.depth0 <= p[0] <= s.depth1] or tg_pts
            cost += s.tokens * _mean_over(pts, s.depth0, s.depth1)
    return cost


class TooSlow(Exception):
    """A probe passed its deadline (it is slower than the incumbent)."""


# --- faithfulness -------------------------------------------------------------------------------
@dataclass
class Faithfulness:
    """Next-token agreement of a candidate with the reference on FAITH_TEXT."""

    kl_mean: float
    kl_max: float
    top1: float
    n_positions: int
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(path: Path, settings: Settings, n_ctx: int, tokens: list[int] | None) -> Any:
    with load(path, n_ctx=n_ctx, tune=False, **settings.load_kwargs()) as m:
        if tokens is None:
            tokens = m.tokenize(FAITH_TEXT)[: n_ctx - 1]
        return tokens, m.score(tokens)


def check_faithful(
    model: str | os.PathLike[str],
    settings: Settings,
    reference: Settings | None = None,
    *,
    reference_model: str | os.PathLike[str] | None = None,
    n_ctx: int = 512,
) -> Faithfulness:
    """Compare `settings` on `model` with `reference` (default: the defaults) on
    `reference_model` (default: the same file) by next-token KL divergence and top-1 agreement
    over every position of a fixed text."""
    cand_path = locate.resolve(model)
    ref_path = locate.resolve(reference_model) if reference_model is not None else cand_path
    reference = reference or default_settings(settings.threads)
    tokens, ref = _logits(ref_path, reference, n_ctx, None)
    _, got = _logits(cand_path, settings, n_ctx, tokens)
    if ref.shape != got.shape:
        return Faithfulness(math.inf, math.inf, 0.0, 0, False, "the vocabularies differ")

    kl = kl_per_position(ref, got)
    top1 = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())
    kl_mean = float(kl.mean()) if np.isfinite(kl).all() else math.inf
    ok = kl_mean <= KL_MAX and top1 >= TOP1_MIN
    why = "" if ok else f"KL {kl_mean:.4g} (max {KL_MAX}), top-1 {top1:.1%} (min {TOP1_MIN:.0%})"
    return Faithfulness(kl_mean, float(kl.max()), top1, len(tokens), ok, why)


# --- the search ---------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What `tune()` measured and chose."""

    model: str
    model_sha256: str
    workload: str
    n_ctx: int
    device: dict[str, Any]
    device_id: str
    defaults: Probe
    best: Probe
    probes: list[Probe]
    faithfulness: Faithfulness | None
    unavailable: dict[str, str]
    skipped: list[str]
    ram_budget_bytes: int | None
    time_budget_s: float
    elapsed_s: float
    how: str
    stored_in: str = ""
    # What is stored: best.settings with flash_attn "auto" replaced by what it resolved to.
    settings: Settings | None = None

    @property
    def speedup(self) -> float | None:
        """Defaults' workload time over the chosen settings'; None when the defaults were not
        measured (over the RAM budget, or they failed)."""
        if not (self.best.costs and self.defaults.costs and self.defaults.status == "ok"):
            return None
        return self.defaults.cost / self.best.cost

    def entry(self) -> dict[str, Any]:
        """What tunings.json keeps of this result."""
        segs = workload_segments(self.workload, self.n_ctx)
        f = self.faithfulness
        return {
            "device_id": self.device_id,
            "device": self.device,
            "model_sha256": self.model_sha256,
            "model_name": Path(self.model).name,
            "model_path": self.model,
            "model_bytes": os.path.getsize(self.model),
            "workload": self.workload,
            "n_ctx": self.n_ctx,
            "backend": "CPU",
            "settings": asdict(self.settings or self.best.settings),
            "defaults": asdict(self.defaults.settings),
            "workload_tps": _workload_tps(segs, self.best),
            "default_workload_tps": _workload_tps(segs, self.defaults),
            "speedup": self.speedup,
            "peak_rss_bytes": self.best.peak_rss_bytes,
            "default_peak_rss_bytes": self.defaults.peak_rss_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "faithfulness": f.to_dict() if f else None,
            "how": self.how,
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["defaults"] = self.defaults.to_dict()
        out["best"] = self.best.to_dict()
        out["probes"] = [p.to_dict() for p in self.probes]
        out["speedup"] = self.speedup
        return out


def _candidates(
    knob: str, header: Any, current: Settings, max_chunk: int
) -> tuple[list[Any], str | None]:
    """Values to try for one knob, or ([], why not). `max_chunk` is the workload's largest
    prompt chunk: micro-batches at least that large all run it in one pass."""
    if knob == "flash_attn":
        return ["on", "off"], None
    if knob == "repack":
        if not repack_usable():
            return [], (
                "unavailable: this llama.cpp build has AMX kernels, reached through repacking, "
                "which crash on this machine (set ONDEVICE_ALLOW_AMX=1 to try)"
            )
        if not fit.repackable_bytes(header, policy.repack_family(system.cpu_features())):
            return [], "nothing in this model is repacked on this CPU"
        return [True, False], None
    if knob == "threads":
        topo = system.cpu_topology()
        n = topo.n_performance
        vals = [n, n - 1, n // 2, topo.logical if topo.logical > n else 0]
        return sorted({v for v in vals if v >= 1}, reverse=True), None
    if knob == "kv_type":
        vals = [k for k in ("f16", "q8_0", "bf16") if fit.kv_type_problem(header, k) is None]
        why = None if len(vals) > 1 else "the model allows no other KV cache type"
        if current.flash_attn == "off" and "q8_0" in vals:
            # llama.cpp refuses a quantized V cache without flash attention.
            vals.remove("q8_0")
            why = "q8_0 not tried: a quantized V cache needs flash attention, which is off"
        return vals, why
    if knob == "n_ubatch":
        vals = [u for u in (128, 256, 512, 1024) if u <= max(current.n_batch, 1024)]
        # Sizes >= the largest chunk differ only in their compute buffer: keep the smallest.
        big = [u for u in vals if u >= max_chunk]
        vals = {u for u in vals if u < max_chunk} | {current.n_ubatch, *big[:1]}
        why = None if len(vals) > 1 else "one micro-batch holds every prompt chunk"
        return sorted(vals), why
    if knob == "use_mmap":
        return [True, False], None
    raise UsageError(f"unknown knob {knob!r}", hint=f"use some of {', '.join(KNOBS)}")


def tune(
    model: str | os.PathLike[str],
    workload: str = "chat",
    *,
    n_ctx: int | None = None,
    ram_budget: int | None = None,
    time_budget: float = 600.0,
    knobs: Sequence[str] = KNOBS,
    save: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure settings for `model` under `workload` on this device and store the winner."""
    t_start = time.perf_counter()
    path = locate.resolve(model)
    header = read_header(path)
    workload_segments(workload, 8)  # validates the name early
    ctx = n_ctx or policy.default_ctx(int(header.arch_value("context_length", 0) or 0))
    if ctx < 64:
        raise UsageError(f"tuning needs a context of at least 64 tokens, got {ctx}")
    search = _Search(path, header, workload, ctx, ram_budget, time_budget, progress, t_start)
    search.start()
    for knob in knobs:
        search.step(knob)
    return search.result(knobs, save)


class _Search:
    """Coordinate descent over the knobs from the defaults (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        header: Any,
        workload: str,
        ctx: int,
        ram_budget: int | None,
        time_budget: float,
        progress: Callable[[str], None] | None,
        t_start: float,
    ) -> None:
        self.path, self.header, self.workload, self.ctx = path, header, workload, ctx
        self.segments = workload_segments(workload, ctx)
        self.ram_budget, self.time_budget, self.t_start = ram_budget, time_budget, t_start
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.sha = model_sha256(path)
        self.device = device_fingerprint()
        self.family = policy.repack_family(system.cpu_features())
        self.probes: list[Probe] = []
        self.unavailable: dict[str, str] = {}
        self.skipped: list[str] = []
        self.faith_cache: dict[tuple[str, bool, str], Faithfulness] = {}
        self.reference = default_settings()
        self.by_settings: dict[Settings, Probe] = {}
        self.best: Probe | None = None  # the incumbent
        self.defaults_probe: Probe | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def predicted(self, s: Settings) -> int:
        return fit.predict(
            self.header,
            self.ctx,
            s.kv_type,
            min(s.n_ubatch, s.n_batch),
            use_mmap=s.use_mmap,
            repack=s.repack and repack_usable(),
            repack_family=self.family,
            flash_attn=None if s.flash_attn == "auto" else s.flash_attn == "on",
        ).predicted_peak_bytes

    def start(self) -> None:
        self.say(
            f"tuning {self.path.name} for {self.workload} at ctx {self.ctx} "
            f"({_describe(self.segments)})"
        )
        self.defaults_probe = self.run(self.reference)
        self.best = self.defaults_probe
        self.by_settings = {self.reference: self.defaults_probe}

    def run(self, s: Settings, p: Probe | None = None) -> Probe:
        """Measure one candidate (once more, for a given probe), within the budgets."""
        p = p or Probe(s, predicted_peak_bytes=self.predicted(s))
        if not any(q is p for q in self.probes):
            self.probes.append(p)
        budget = self.ram_budget
        if budget is not None and p.predicted_peak_bytes > budget:
            p.status = "excluded"
            p.reason = f"predicted peak {_mib(p.predicted_peak_bytes)} > budget {_mib(budget)}"
            self.say(f"  {s.label()}: {p.reason}")
            return p
        # Stop a candidate that takes ABORT_FACTOR x the incumbent's time (not the defaults').
        best = self.best
        inc = best if best is not None and p is not best and best.costs else None
        deadline = time.perf_counter() + ABORT_FACTOR * inc.wall_s / len(inc.costs) if inc else None
        try:
            measure(
                self.path, s, self.segments, self.ctx, probe=p, seed=7 + len(p.costs),
                deadline=deadline,
            )  # fmt: skip
        except OndeviceError as exc:
            p.status, p.reason = "failed", exc.one_line()
            self.say(f"  {s.label()}: failed ({p.reason})")
            return p
        except TooSlow as exc:
            p.status = "aborted"
            p.reason = f"{exc}: over {ABORT_FACTOR:g}x the incumbent's probe time, so slower"
            self.say(f"  {s.label()}: {p.reason}")
            return p
        if budget is not None and p.peak_rss_bytes > budget:
            p.status = "excluded"
            p.reason = f"measured peak RSS {_mib(p.peak_rss_bytes)} > budget {_mib(budget)}"
        self.say(
            f"  {s.label()}: {_workload_tps(self.segments, p):.1f} workload tok/s, "
            f"peak RSS {_mib(p.peak_rss_bytes)}" + (f" ({p.reason})" if p.reason else "")
        )
        return p

    def faithful(self, s: Settings) -> bool:
        if s.numerics() == self.reference.numerics() or _same_numerics(s, self.defaults_probe):
            return True
        key = s.numerics()
        if key not in self.faith_cache:
            f = check_faithful(self.path, s, self.reference, n_ctx=min(self.ctx, 512))
            self.faith_cache[key] = f
            self.say(f"  faithfulness of {s.label()}: KL {f.kl_mean:.2e}, top-1 {f.top1:.1%}")
        return self.faith_cache[key].passed

    def _alternatives(self, knob: str) -> list[Any]:
        assert self.best is not None and self.defaults_probe is not None
        max_chunk = max(min(s.chunk, s.tokens) for s in self.segments if s.kind == "pp")
        values, why = _candidates(knob, self.header, self.best.settings, max_chunk)
        if why:
            self.unavailable[knob] = why
        alts = [v for v in values if v != getattr(self.best.settings, knob)]
        if knob == "flash_attn" and self.best.settings.flash_attn == "auto":
            # "auto" is one of on/off; measuring both would measure it twice.
            alts = [v for v in alts if v != self.defaults_probe.flash_attn_resolved]
        return alts

    def step(self, knob: str) -> None:
        """Try the other values of one knob against the incumbent; keep the winner."""
        best = self.best
        assert best is not None
        tried = [best]
        for v in self._alternatives(knob):
            s = replace(best.settings, **{knob: v})
            if knob == "n_ubatch":
                s = replace(s, n_batch=max(s.n_batch, v))
            if s in self.by_settings:
                tried.append(self.by_settings[s])
                continue
            # The next probe costs about what the incumbent's did (one knob differs).
            est = best.wall_s / max(len(best.costs), 1)
            if self.elapsed() + est > self.time_budget:
                self.skipped.append(f"{knob}={v}")
                continue
            self.by_settings[s] = self.run(s)
            tried.append(self.by_settings[s])
        winner = _choose(best, [p for p in tried if _usable(p)])
        winner = self._recheck(knob, best, winner)
        if winner is not best and not self.faithful(winner.settings):
            winner.status = "unfaithful"
            winner.reason = self.faith_cache[winner.settings.numerics()].reason
            self.say(f"  {winner.settings.label()} rejected: {winner.reason}")
            rest = [p for p in tried if _usable(p) and p is not winner]
            winner = _choose(best, rest) if rest else best
            if winner is not best and not self.faithful(winner.settings):
                winner = best
        self.best = winner

    def _recheck(self, knob: str, best: Probe, winner: Probe) -> Probe:
        """A close call is measured again, both candidates, and the means decide."""
        if winner is best or winner.cost <= best.cost * (1 - RECHECK):
            return winner
        est = best.wall_s / max(len(best.costs), 1) + winner.wall_s / len(winner.costs)
        if self.elapsed() + est > self.time_budget:
            return winner
        self.say(f"  close call on {knob}: measuring both again")
        self.run(best.settings, best)
        self.run(winner.settings, winner)
        if _usable(winner) and _usable(best):
            return _choose(best, [best, winner])
        return winner

    def result(self, knobs: Sequence[str], save: bool) -> TuneResult:
        best, defaults = self.best, self.defaults_probe
        assert best is not None and defaults is not None
        if not _usable(best):
            raise DoesNotFit(
                f"no setting of {self.path.name} at ctx {self.ctx} measured within the RAM budget",
                hint="raise --ram, or lower --ctx",
            )
        faith = None
        if best is not defaults:  # reported even when only speed knobs changed
            faith = self.faith_cache.get(best.settings.numerics()) or check_faithful(
                self.path, best.settings, self.reference, n_ctx=min(self.ctx, 512)
            )
        how = _how(
            self.workload, self.ctx, self.segments, knobs, self.unavailable, self.skipped,
            self.ram_budget,
        )  # fmt: skip
        result = TuneResult(
            model=str(self.path), model_sha256=self.sha, workload=self.workload, n_ctx=self.ctx,
            device=self.device, device_id=device_id(self.device), defaults=defaults, best=best,
            probes=self.probes, faithfulness=faith, unavailable=self.unavailable,
            skipped=self.skipped, ram_budget_bytes=self.ram_budget,
            time_budget_s=self.time_budget, elapsed_s=self.elapsed(), how=how,
        )  # fmt: skip
        result.settings = best.settings
        if best.settings.flash_attn == "auto" and best.flash_attn_resolved in ("on", "off"):
            result.settings = replace(best.settings, flash_attn=best.flash_attn_resolved)
        if save:
            result.stored_in = str(save_tuning(result.entry()))
        return result


def _usable(p: Probe) -> bool:
    return p.status == "ok" and bool(p.costs)


def _same_numerics(s: Settings, defaults: Probe) -> bool:
    """flash_attn "auto" resolved to the same thing as the candidate's explicit value."""
    fa = defaults.flash_attn_resolved or defaults.settings.flash_attn
    return (fa, *defaults.settings.numerics()[1:]) == s.numerics()


def _choose(incumbent: Probe, probes: list[Probe]) -> Probe:
    """The cheapest probe; within TIE the incumbent stays unless another needs >5% less
    memory."""
    if not probes:
        return incumbent
    top = min(probes, key=lambda p: p.cost)
    if incumbent not in probes:
        return top
    if top.cost < incumbent.cost * (1 - TIE):
        return top
    close = [p for p in probes if p.cost <= incumbent.cost * (1 + TIE)]
    lean = min(close, key=lambda p: p.peak_rss_bytes)
    if lean.peak_rss_bytes < incumbent.peak_rss_bytes * 0.95:
        return lean
    return incumbent


def _workload_tps(segments: Sequence[Segment], p: Probe) -> float:
    return sum(s.tokens for s in segments) / p.cost if p.costs else 0.0


def _describe(segments: Sequence[Segment]) -> str:
    parts = []
    for s in segments:
        what = "prompt" if s.kind == "pp" else "generated"
        chunk = f" in chunks of {s.chunk}" if s.kind == "pp" and s.chunk < s.tokens else ""
        parts.append(f"{s.tokens} {what} tokens{chunk} at depths {s.depth0}-{s.depth1}")
    return "; ".join(parts)


def _how(
    workload: str,
    ctx: int,
    segments: Sequence[Segment],
    knobs: Sequence[str],
    unavailable: dict[str, str],
    skipped: list[str],
    ram_budget: int | None,
) -> str:
    whole = [s for s in segments if s.kind == "pp" and s.chunk >= s.tokens]
    pts = sorted({s.depth1 for s in whole} | set(depth_points(segments, ctx)))
    text = (
        f"Workload {workload} at ctx {ctx}: {_describe(segments)}. Each candidate was loaded "
        + (
            f"and its {len(whole)} one-chunk prompt(s) timed whole from an empty cache, "
            if whole
            else ""
        )
        + f"and timed at depths {', '.join(map(str, pts))} (a prompt chunk where the workload "
        f"has chunked prompts, and {TG_BLOCK} single-token decodes); seconds per token were "
        "interpolated linearly in depth and averaged over each segment's depths, so the cost "
        "is the workload's estimated time. Coordinate descent from the defaults over "
        f"{', '.join(knobs)}; candidates closer than {RECHECK:.0%} were measured again, "
        f"within {TIE:.0%} the incumbent stayed unless another needed >5% less memory, and "
        f"a candidate still running at {ABORT_FACTOR:g}x the incumbent's probe time was stopped; "
        f"numerics-changing settings had to keep KL <= {KL_MAX} and top-1 >= {TOP1_MIN:.0%} "
        "against the defaults."
    )
    if ram_budget is not None:
        text += f" RAM budget {_mib(ram_budget)}: fit's prediction before loading, peak RSS after."
    for k, why in unavailable.items():
        text += f" {k}: {why}."
    if skipped:
        text += f" Not measured (time budget): {', '.join(skipped)}."
    return text


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
