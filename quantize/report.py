"""The quantization quality ladder: make each type from one file and measure what it costs.

For each requested type: quantize the input (in a temp dir, or `keep_dir`), then measure file
size, bits per weight, perplexity on a text, mean KL divergence and top-1 agreement against the
input (the reference). The input's logits are computed once (ReferenceLogits) and reused for
every type. Last, greedy generation speed: a few rounds that visit every file in turn, median
per file (on a shared machine a single run per file measures the neighbours more than the file).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ondevice import loader, locate
from ondevice.errors import MissingExtra, UsageError
from ondevice.gguf_header import read_header
from ondevice.runtime import Model

from .quality import QualityResult, ReferenceLogits, cache_bytes, evaluate
from .quantize import quantize
from .types import get_type

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
GEN_PROMPT = "The history of the printing press begins"


@dataclass
class LadderRow:
    """One file of the ladder (the reference is the first row, with KL 0)."""

    type: str
    file_bytes: int
    bpw: float
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    gen_tps: float
    quantize_s: float = 0.0
    path: str | None = None


@dataclass
class LadderReport:
    """The whole ladder: the rows, and how they were measured."""

    source: str
    text_tokens: int
    scored_tokens: int
    ctx: int
    threads: int | str
    rows: list[LadderRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table, one row per type."""
        lines = [
            "| type | file size | bits/weight | perplexity | KL divergence | top-1 agreement "
            "| generation tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.type} | {r.file_bytes / 2**20:.1f} MiB | {r.bpw:.2f} | "
                f"{r.perplexity:.4f} | {r.kl_divergence:.5f} | {100 * r.top1_agreement:.1f}% | "
                f"{r.gen_tps:.1f} |"
            )
        return "\n".join(lines)


def quality_ladder(
    src: str | os.PathLike[str],
    text: str,
    types: Sequence[str] = DEFAULT_TYPES,
    *,
    ctx: int = 512,
    threads: int | str = "auto",
    keep_dir: str | os.PathLike[str] | None = None,
    allow_requantize: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
    gen_tokens: int = 64,
    gen_rounds: int = 3,
    max_chunks: int | None = None,
    max_cache_bytes: int = 1 << 30,
    on_status: Callable[[str], object] | None = None,
) -> LadderReport:
    """Quantize `src` to each of `types` and measure each against `src` on `text`.

    ctx, max_chunks  the perplexity windows (see `evaluate`).
    keep_dir         keep the quantized files there (default: a temp dir, removed).
    gen_tokens       greedy tokens generated per file for the speed column (0: skip).
    gen_rounds       rounds of generation over all files; the column is the median.
    max_cache_bytes  keep the reference's logits in memory up to this size; beyond it the
                     reference model stays loaded and is evaluated again for each type.
    on_status        called with a short line as each step starts.
    """
    qtypes = [get_type(t) for t in types]
    if not qtypes:
        raise UsageError("no types given", hint="e.g. --types Q8_0,Q4_K_M,Q2_K")
    src_path = locate.resolve(src)
    src_header = read_header(src_path)
    status = on_status or (lambda _msg: None)
    n_threads = loader.resolve_threads(threads)

    status(f"reference: evaluating {src_path.name}")
    with loader.load(src_path, n_ctx=ctx, threads=n_threads) as ref_model:
        n_tokens = len(ref_model.tokenize(text, parse_special=False))
        need = cache_bytes(n_tokens, ref_model.n_vocab, ctx, max_chunks)
        reference: ReferenceLogits | Model
        if need <= max_cache_bytes:
            reference = ReferenceLogits(ref_model, text, ctx=ctx, max_chunks=max_chunks)
            ref_q = reference.result
        else:
            # Too big to keep: the reference stays loaded and is evaluated again per type.
            log.info("reference logits would take %d MiB; re-evaluating per type", need >> 20)
            reference = ref_model
            ref_q = evaluate(ref_model, text, ctx=ctx, max_chunks=max_chunks)
        report = LadderReport(
            source=str(src_path),
            text_tokens=ref_q.text_tokens,
            scored_tokens=ref_q.tokens,
            ctx=ctx,
            threads=n_threads,
        )
        report.rows.append(
            _row(f"{_file_type(src_header)} (reference)", src_path, ref_q, 0.0, True)
        )
        with tempfile.TemporaryDirectory(prefix="ondevice-ladder-") as tmp:
            out_dir = Path(keep_dir) if keep_dir is not None else Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            for qt in qtypes:
                dst = out_dir / f"{src_path.stem}-{qt.name}.gguf"
                status(f"{qt.name}: quantizing")
                made = quantize(
                    src_path,
                    dst,
                    qt,
                    allow_requantize=allow_requantize,
                    imatrix=imatrix,
                    threads=n_threads,
                )
                status(f"{qt.name}: measuring")
                with loader.load(dst, n_ctx=ctx, threads=n_threads) as m:
                    q = evaluate(m, text, ctx=ctx, reference=reference, max_chunks=max_chunks)
                report.rows.append(_row(qt.name, dst, q, made.seconds, keep_dir is not None))
            if gen_tokens > 0:
                paths = [src_path] + [out_dir / f"{src_path.stem}-{t.name}.gguf" for t in qtypes]
                status(f"generation speed: {gen_rounds} rounds over {len(paths)} files")
                speeds = _generation_speeds(paths, gen_tokens, gen_rounds, n_threads)
                for row, tps in zip(report.rows, speeds, strict=True):
                    row.gen_tps = tps
    return report


def _generation_speeds(
    paths: list[Path], gen_tokens: int, rounds: int, threads: int
) -> list[float]:
    """Median greedy tok/s per file over `rounds` rounds that visit every file in turn, so a
    busy moment of a shared machine spreads over all files instead of hitting one."""
    runs: list[list[float]] = [[] for _ in paths]
    for _ in range(max(1, rounds)):
        for i, path in enumerate(paths):
            with loader.load(path, n_ctx=64 + gen_tokens, threads=threads) as m:
                res = m.generate(GEN_PROMPT, max_tokens=gen_tokens, temperature=0)
                runs[i].append(res.stats.generation_tps)
    return [statistics.median(r) for r in runs]


def _row(name: str, path: Path, q: QualityResult, quantize_s: float, keep: bool) -> LadderRow:
    h = read_header(path)
    return LadderRow(
        type=name,
        file_bytes=path.stat().st_size,
        bpw=h.tensor_bytes * 8 / h.n_params if h.n_params else 0.0,
        perplexity=q.perplexity,
        kl_divergence=q.kl_divergence or 0.0,
        top1_agreement=q.top1_agreement if q.top1_agreement is not None else 1.0,
        gen_tps=0.0,
        quantize_s=quantize_s,
        path=str(path) if keep else None,
    )


def _file_type(header) -> str:
    """The dominant tensor type of a file, e.g. F16."""
    counts: dict[str, int] = {}
    for t in header.tensors:
        if len(t.shape) >= 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
    return max(counts, key=counts.get) if counts else "?"


def require_matplotlib() -> None:
    """Raise MissingExtra unless matplotlib (the `plot` extra) is installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtra("--plot needs matplotlib", hint="pip install 'ondevice[plot]'")


def plot_ladder(report: LadderReport, png: str | os.PathLike[str]) -> Path:
    """Save a size-vs-KL-divergence plot of the ladder (needs matplotlib: ondevice[plot])."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if not r.type.endswith("(reference)")]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.file_bytes / 2**20 for r in rows]
    ys = [r.kl_divergence for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(r.type, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence vs reference (nats)")
    ax.set_yscale("log")
    ax.set_title(f"{Path(report.source).name}: size vs quality (ctx {report.ctx})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
