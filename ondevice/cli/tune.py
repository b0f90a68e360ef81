"""`ondevice tune MODEL`: measure llama.cpp's settings on this device for a workload and store
the fastest faithful ones, which `ondevice run`, `chat` and `ondevice.load()` then use."""

from __future__ import annotations

import json

import click

from ondevice import tune as tune_lib
from ondevice.errors import UsageError
from ondevice.fit import parse_bytes


def _rates(values: dict) -> str:
    return ", ".join(f"{k}: {v:.1f}" for k, v in values.items()) or "-"


def report(r: tune_lib.TuneResult) -> str:
    """The human-readable result: every candidate, the choice, faithfulness and how."""
    segs = tune_lib.workload_segments(r.workload, r.n_ctx)
    mib = 1024 * 1024
    lines = [
        f"Tuned {r.model} for the {r.workload} workload at ctx {r.n_ctx} on {r.device['cpu']} "
        f"(device {r.device_id}) in {r.elapsed_s:.0f} s.",
        "",
        f"{'candidate':<56} {'tok/s':>9}  {'peak RSS':>9}  "
        "pp tok/s (tokens@depth); tg tok/s (depth)",
    ]
    for p in r.probes:
        mark = " (defaults)" if p is r.defaults else " (chosen)" if p is r.best else ""
        tps = f"{tune_lib._workload_tps(segs, p):.1f}" if p.costs else "-"
        rss = f"{p.peak_rss_bytes / mib:.0f} MiB" if p.peak_rss_bytes else "-"
        status = "" if p.status == "ok" else f"  [{p.status}: {p.reason}]"
        runs = f" x{len(p.costs)}" if len(p.costs) > 1 else ""
        lines.append(
            f"{p.settings.label() + mark:<56} {tps:>9}  {rss:>9}  "
            f"{_rates(p.pp)}; {_rates(p.tg)}{runs}{status}"
        )
    d, b = r.defaults, r.best
    if r.speedup is None:
        vs = f"the defaults were not measured ({d.status}: {d.reason})"
    else:
        vs = (
            f"{r.speedup:.2f}x the defaults' workload speed ({tune_lib._workload_tps(segs, b):.1f}"
            f" vs {tune_lib._workload_tps(segs, d):.1f} tok/s), peak RSS "
            f"{b.peak_rss_bytes / mib:.0f} vs {d.peak_rss_bytes / mib:.0f} MiB"
        )
    lines += ["", f"Chosen: {(r.settings or b.settings).label()}: {vs}."]
    f = r.faithfulness
    if f is not None:
        lines.append(
            f"Faithfulness vs the defaults: next-token KL {f.kl_mean:.2e} (max {f.kl_max:.2e}), "
            f"top-1 agreement {f.top1:.1%} over {f.n_positions} positions: "
            + ("pass" if f.passed else f"FAIL ({f.reason})")
        )
    lines += ["", f"How: {r.how}"]
    if r.stored_in:
        lines.append(
            f"Stored in {r.stored_in}; ondevice.load(), `run` and `chat` use it "
            "(tune=False / --no-tune to not)."
        )
    return "\n".join(lines)


@click.command()
@click.argument("model")
@click.option(
    "--workload",
    type=click.Choice(tune_lib.WORKLOADS),
    default="chat",
    show_default=True,
    help="chat: turns filling the context; long-prompt: one long document then an answer; "
    "short: a short question and answer.",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=64),
    default=None,
    help="Context length to tune at [default: 4096 or the model's, if smaller].",
)
@click.option(
    "--ram",
    default=None,
    help="RAM budget, e.g. 3GB or 2.5GiB: settings whose predicted or measured peak RSS "
    "exceeds it are excluded.",
)
@click.option(
    "--time-budget",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds to spend; candidates that would overrun it are not measured.",
)
@click.option(
    "--knobs",
    default=",".join(tune_lib.KNOBS),
    show_default=True,
    help="Which settings to search, comma-separated.",
)
@click.option("--no-save", is_flag=True, help="Measure and report, but store nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def tune(
    model: str,
    workload: str,
    ctx: int | None,
    ram: str | None,
    time_budget: float,
    knobs: str,
    no_save: bool,
    as_json: bool,
) -> None:
    """Measure settings for MODEL on this device and keep the fastest faithful ones.

    \b
    Examples:
      ondevice tune demo
      ondevice tune phi-2 --workload long-prompt --ctx 2048 --ram 3GB --time-budget 900
    """

    chosen = [k.strip() for k in knobs.split(",") if k.strip()]
    bad = [k for k in chosen if k not in tune_lib.KNOBS]
    if bad or not chosen:
        raise UsageError(
            f"unknown knob(s): {', '.join(bad) or '(none given)'}",
            hint=f"use some of {', '.join(tune_lib.KNOBS)}",
        )
    result = tune_lib.tune(
        model,
        workload,
        n_ctx=ctx,
        ram_budget=parse_bytes(ram) if ram else None,
        time_budget=time_budget,
        knobs=chosen,
        save=not no_save,
        progress=lambda msg: click.echo(msg, err=True),
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(report(result))
