"""`ondevice bench MODEL`: llama-bench's pp/tg tests plus load time, TTFT, streamed tok/s, memory,
roofline, sustained runs and device profiles; and `--compare FILE` for saved runs side by side.

The measuring is `ondevice.bench.run_bench`; this module parses options and prints the records
as markdown (llama-bench's columns), JSON or CSV, and draws the optional PNG.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from ondevice import bench as bench_lib
from ondevice import paths
from ondevice.bench import BenchRecord
from ondevice.errors import DoesNotFit, MissingExtra, UsageError


def _mib(n: float | None) -> str:
    return "-" if not n else f"{n / 1024 / 1024:.0f} MiB"


def _size(n: int) -> str:
    """llama-bench's size column."""
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _params(n: int) -> str:
    """llama-bench's params column."""
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _tps(r: BenchRecord) -> str:
    return f"{r.tps_mean:.2f} ± {r.tps_sd:.2f}"


def _extra_result(r: BenchRecord) -> str:
    if r.test == "load":
        cached = (
            ""
            if r.cold_cached_fraction is None
            else f" ({r.cold_cached_fraction:.0%} in page cache before)"
        )
        return f"cold {r.load_cold_s:.2f} s{cached}, warm {r.load_warm_s:.2f} s"
    if r.test.startswith("stream"):
        return (
            f"{_tps(r)} tok/s, TTFT {r.ttft_s * 1000:.0f} ms ({r.n_prompt}-token prompt, "
            f"{r.completion_tokens:.0f} tokens)"
        )
    if r.test.startswith("speculative"):
        return (
            f"{_tps(r)} tok/s ({r.speculative}), {r.speedup or 0:.2f}x plain decoding, "
            f"acceptance {r.acceptance or 0:.0%}, same text: {'yes' if r.same_text else 'no'}"
        )
    if r.series:
        temps = [s[2] for s in r.series if s[2] >= 0]
        temp = f", {min(temps):.0f}-{max(temps):.0f} °C" if temps else ""
        return f"{_tps(r)} t/s over {len(r.series)} blocks{temp}; " + "; ".join(r.notes[-1:])
    return _tps(r)


def format_md(records: list[BenchRecord]) -> str:
    """llama-bench's markdown table (model, size, params, backend, threads, test, t/s) with
    peak RSS, KV and roofline columns; then the extra tests (load, stream, sustained)."""
    main = [r for r in records if re.match(r"(pp|tg)\d", r.test)]
    extra = [r for r in records if r not in main]
    roof = any(r.roofline_fraction is not None for r in main)
    lines = []
    if main:
        head = "| model | size | params | backend | threads | test | t/s | peak RSS | KV |"
        sep = "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
        if roof:
            head += " roofline |"
            sep += " ---: |"
        lines += [head, sep]
        for r in main:
            row = (
                f"| {r.model_desc or r.model} | {_size(r.model_bytes)} | "
                f"{_params(r.n_params)} | {r.backend} | {r.threads} | {r.test} | {_tps(r)} | "
                f"{_mib(r.peak_rss_bytes)} | {_mib(r.kv_bytes)} |"
            )
            if roof:
                row += (
                    f" {r.roofline_fraction:.0%} of {r.roofline_tps:.1f} |"
                    if r.roofline_fraction is not None
                    else " - |"
                )
            lines.append(row)
    if extra:
        if lines:
            lines.append("")
        lines += ["| test | threads | result | peak RSS |", "| --- | ---: | --- | ---: |"]
        for r in extra:
            lines.append(
                f"| {r.test} | {r.threads} | {_extra_result(r)} | {_mib(r.peak_rss_bytes)} |"
            )
    budget = [r for r in records if r.ram_budget_bytes]
    if budget:
        worst = max(r.peak_rss_bytes for r in budget)
        ok = all(r.within_budget for r in budget)
        lines.append("")
        lines.append(
            f"profile {budget[0].profile}: peak RSS {_mib(worst)} "
            f"{'within' if ok else 'OVER'} the {_mib(budget[0].ram_budget_bytes)} budget "
            f"(ctx {budget[0].n_ctx}, {budget[0].kv_type} KV, threads {budget[0].threads}"
            + (f" pinned to CPUs {budget[0].affinity}" if budget[0].affinity else "")
            + ")"
        )
    if records:
        r = records[0]
        lines.append("")
        lines.append(
            f"{r.model} · {r.device} · n_batch {r.n_batch} · n_ubatch {r.n_ubatch} · "
            f"flash attn {r.flash_attn} · KV {r.kv_type} · repack {'on' if r.repack else 'off'}"
            f" · mmap {'on' if r.use_mmap else 'off'} · {r.build}"
        )
    return "\n".join(lines)


def format_json(records: list[BenchRecord]) -> str:
    import json

    return json.dumps([r.to_dict() for r in records], indent=2)


def format_csv(records: list[BenchRecord]) -> str:
    import csv
    import io
    import json

    buf = io.StringIO()
    keys = list(BenchRecord.__dataclass_fields__)
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in records:
        row = r.to_dict()
        for k, v in row.items():
            if isinstance(v, (list, dict)):
                row[k] = json.dumps(v)
        w.writerow(row)
    return buf.getvalue()


FORMATS = {"md": format_md, "json": format_json, "csv": format_csv}


def format_compare(records: list[BenchRecord]) -> str:
    """Saved runs side by side: one row per (model, test, threads), one column per run."""
    runs: dict[str, BenchRecord] = {}
    for r in records:
        runs.setdefault(r.run_id or r.timestamp, r)
    if not runs:
        return "no records"
    cols = list(runs)
    rows: dict[tuple[str, str, int], dict[str, BenchRecord]] = {}
    for r in records:
        rows.setdefault((r.model, r.test, r.threads), {})[r.run_id or r.timestamp] = r

    def title(rec: BenchRecord) -> str:
        parts = [rec.label or rec.host, rec.timestamp[:16].replace("T", " ")]
        if rec.profile:
            parts.append(rec.profile)
        return " ".join(p for p in parts if p)

    lines = [
        "| model | test | threads | " + " | ".join(title(runs[c]) for c in cols) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for (model, test, threads), by_run in rows.items():
        cells = []
        for c in cols:
            r = by_run.get(c)
            if r is None:
                cells.append("-")
            elif r.test == "load":
                cells.append(f"{r.load_cold_s:.2f} / {r.load_warm_s:.2f} s")
            else:
                cells.append(_tps(r))
        lines.append(f"| {model} | {test} | {threads} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("t/s: mean ± sd; load: cold / warm seconds.")
    return "\n".join(lines)


def plot(records: list[BenchRecord], path: str | os.PathLike[str]) -> None:
    """A PNG: tok/s over time for a sustained run, else the rates per test and thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("--plot needs matplotlib", hint="pip install 'ondevice[plot]'") from None
    sustained = [r for r in records if r.series]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if sustained:
        r = sustained[0]
        t = [s[0] for s in r.series]
        ax.plot(t, [s[1] for s in r.series], marker=".", label="tok/s")
        ax.set_xlabel("seconds")
        ax.set_ylabel(f"tg{r.n_gen} tok/s")
        ax.set_ylim(bottom=0)
        temps = [s[2] for s in r.series]
        if any(x >= 0 for x in temps):
            ax2 = ax.twinx()
            ax2.plot(t, temps, color="tab:red", alpha=0.5, label="°C")
            ax2.set_ylabel("°C")
        ax.set_title(f"{r.model_desc or r.model}: sustained generation, {r.threads} threads")
    else:
        rated = [r for r in records if r.tps_mean > 0]
        labels = [f"{r.test}\nt={r.threads}" for r in rated]
        bars = ax.bar(labels, [r.tps_mean for r in rated], yerr=[r.tps_sd for r in rated])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel("tokens/s")
        if rated:
            ax.set_title(f"{rated[0].model_desc or rated[0].model} on {rated[0].device}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with paths.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _read_prompt(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"can't read the prompt file {path}: {exc}") from None


_PROFILE_HELP = "; ".join(
    f"{p.name}: {p.about}, {p.kv_type} KV" for p in bench_lib.PROFILES.values()
)


def _speculative_mode(value: str) -> str:
    if value == "off" or not value.strip():
        raise click.BadParameter("auto, lookup or a draft model (off is what it compares with)")
    return value


@click.command(context_settings={"show_default": True})
@click.argument("model", required=False)
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, help="pp tokens.")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, help="tg tokens.")
@click.option("-r", "--reps", type=click.IntRange(min=1), default=5, help="Repetitions.")
@click.option(
    "-t", "--threads", default=None, help="Thread counts to sweep, e.g. 1,2,4 [default: auto]."
)
@click.option(
    "-d", "--depth", type=click.IntRange(min=0), default=0, help="Fill the KV cache first."
)
@click.option(
    "--ctx",
    type=click.IntRange(min=8),
    default=None,
    help="Context for every test [default: p + n + d per test, as llama-bench].",
)
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=2048)
@click.option("-ub", "--ubatch-size", "n_ubatch", type=click.IntRange(min=1), default=512)
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto")
@click.option("--kv-type", default="f16", help="KV cache type (f16, q8_0, ...).")
@click.option("--backend", default="auto", help="auto, cpu, metal, vulkan or vulkan:N.")
@click.option("--no-mmap", is_flag=True, help="Read the file instead of mapping it.")
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up run before each test.")
@click.option(
    "--no-extras", is_flag=True, help="Only llama-bench's pp/tg tests (no load/stream tests)."
)
@click.option("--roofline", is_flag=True, help="Measure memory bandwidth; tg as its fraction.")
@click.option(
    "--sustained",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Also generate for this long, recording tok/s over time.",
)
@click.option("--profile", default=None, help=f"Device profile: {_PROFILE_HELP}.")
@click.option(
    "-o", "--output", type=click.Choice(["md", "json", "csv"]), default="md", help="Format."
)
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG."
)
@click.option(
    "--save", type=click.Path(dir_okay=False), default=None, help="Append to a JSON-lines file."
)
@click.option(
    "--compare",
    type=click.Path(dir_okay=False),
    default=None,
    help="Print the runs saved in this file side by side (after this run, if MODEL is given).",
)
@click.option("--label", default="", help="Name for this run in --compare columns.")
@click.option(
    "--speculative-prompt",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Also test speculative decoding on this prompt (a text file): its reply with and "
    "without, greedy, -n tokens.",
)
@click.option(
    "--speculative",
    metavar="auto|lookup|DRAFT",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, v: _speculative_mode(v),
    help="What the speculative test measures: prompt lookup (auto, lookup) or a draft model "
    "(a .gguf path or a store name) loaded beside MODEL.",
)
@click.option("--seed", type=int, default=42, help="Random token ids and sampling seed.")
def bench(
    model: str | None,
    n_prompt: int,
    n_gen: int,
    reps: int,
    threads: str | None,
    depth: int,
    ctx: int | None,
    n_batch: int,
    n_ubatch: int,
    flash_attn: str,
    kv_type: str,
    backend: str,
    no_mmap: bool,
    no_warmup: bool,
    no_extras: bool,
    roofline: bool,
    sustained: float,
    profile: str | None,
    output: str,
    plot_path: str | None = None,
    save: str | None = None,
    compare: str | None = None,
    label: str = "",
    seed: int = 42,
    speculative_prompt: str | None = None,
    speculative: str = "auto",
) -> None:
    """Benchmark MODEL (a .gguf path, `demo` or a store name).

    \b
    Tests (llama-bench's definitions; mean ± sd over -r repetitions after a warm-up):
      ppN       one batch of N random prompt tokens, no sampling
      tgN       N single-token decodes, no sampling
      load      load time, cold (file evicted from the page cache) and warm
      streamN   Model.stream end to end: time to first token and streamed tok/s
                (sampling, detokenization, stop checks included)
    Every record has peak RSS (anonymous / file-backed), model and KV bytes, backend.

    \b
    Profiles (--profile) fix threads (pinned to the performance cores), a RAM
    budget (checked by `ondevice fit` before loading and against the measured
    peak RSS after; exit 1 when over), the context and the KV cache type
    (q8_0 on phones where the model allows it; Phi-2 can only have f16):
      phone-4gb    4 threads, 1.5 GiB, ctx 1024, q8_0 KV
      phone-6gb    4 threads, 2.5 GiB, ctx 2048, q8_0 KV
      phone-8gb    4 threads, 3.5 GiB, ctx 2048, q8_0 KV
      laptop-8gb   4 threads, 5 GiB,   ctx 4096, f16 KV
      laptop-16gb  8 threads, 10 GiB,  ctx 4096, f16 KV

    \b
    Examples:
      ondevice bench demo
      ondevice bench phi-2 -p 128 -n 64 -t 1,2,4 --roofline
      ondevice bench phi-2 --profile phone-6gb --save runs.jsonl --label pixel8
      ondevice bench phi-2 --sustained 300 --plot sustained.png
      ondevice bench --compare runs.jsonl
    """
    if model is None:
        if compare is None:
            raise UsageError("no MODEL given", hint="pass a model, or --compare FILE")
        click.echo(format_compare(bench_lib.load_saved(compare)))
        return
    opts = bench_lib.BenchOptions(
        n_prompt=n_prompt,
        n_gen=n_gen,
        reps=reps,
        threads=bench_lib.parse_int_list(threads) if threads else None,
        depth=depth,
        n_ctx=ctx,
        n_batch=n_batch,
        n_ubatch=min(n_ubatch, n_batch),
        flash_attn=flash_attn,
        kv_type=kv_type,
        use_mmap=not no_mmap,
        backend=backend,
        warmup=not no_warmup,
        extras=not no_extras,
        roofline=roofline,
        sustained_s=sustained,
        profile=bench_lib.parse_profile(profile) if profile else None,
        seed=seed,
        label=label,
        spec_prompt=_read_prompt(speculative_prompt) if speculative_prompt else None,
        speculative=speculative,
    )
    if plot_path and not plot_path.lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG; name it *.png, not {plot_path}")
    records = bench_lib.run_bench(model, opts, progress=lambda msg: click.echo(msg, err=True))
    if save:
        bench_lib.save(records, save)
    if compare:
        click.echo(format_compare(bench_lib.load_saved(compare)))
    else:
        click.echo(FORMATS[output](records).rstrip("\n"))
    if plot_path:
        plot(records, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    over = [r for r in records if r.within_budget is False]
    if over:
        worst = max(r.peak_rss_bytes for r in over)

        raise DoesNotFit(
            f"peak RSS {worst / 2**30:.2f} GiB went over the {opts.profile.name} budget of "
            f"{opts.profile.ram_bytes / 2**30:.2f} GiB",
            hint="use a smaller quant or context (see `ondevice fit`)",
        )
