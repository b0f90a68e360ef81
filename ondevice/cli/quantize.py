"""`ondevice quantize IN OUT --type T`, and `ondevice quantize --report IN` (the quality ladder)."""

from __future__ import annotations

import json
import sys

import click

from ondevice.errors import UsageError


class _TypesHelp(click.Command):
    """Lists the quantization types at the end of --help (built only when help is shown: it
    needs the llama.cpp binding, which `ondevice --help` should not have to load)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from ondevice.quantize.types import (
            type_table,  # the binding's type list: only when the help is shown
        )

        formatter.write_paragraph()
        formatter.write_text(
            "Types (llama.cpp's, typical bits per weight as llama-quantize documents them "
            "for Llama-3-8B; small models come out larger):"
        )
        with formatter.indentation():
            for line in type_table().splitlines():
                formatter.write_text(line)


def _threads(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"threads must be a number or 'auto', not {value!r}") from None
    if n < 1:
        raise UsageError(f"threads must be at least 1, got {n}")
    return n


@click.command(cls=_TypesHelp)
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="[OUT]", required=False)
@click.option("--type", "qtype", default="Q4_K_M", show_default=True, help="Quantization type.")
@click.option(
    "--allow-requantize", is_flag=True, help="Start from an already quantized file (loses more)."
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False),
    help="Importance matrix (llama-imatrix output); the IQ1/IQ2/IQ3_XXS types need one.",
)
@click.option("-t", "--threads", default="auto", show_default=True, help="Threads: N or auto.")
@click.option("--report", is_flag=True, help="Quality ladder: make each of --types from IN.")
@click.option(
    "--types",
    default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K",
    show_default=True,
    help="--report: comma-separated types.",
)
@click.option("--text", type=click.Path(dir_okay=False), help="--report: text file to score.")
@click.option(
    "--ctx", type=click.IntRange(min=8), default=512, show_default=True, help="--report: window."
)
@click.option("--chunks", type=int, default=None, help="--report: score only the first N windows.")
@click.option("--keep", type=click.Path(file_okay=False), help="--report: keep the files in DIR.")
@click.option(
    "--gen-tokens",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="--report: greedy tokens per file for the tok/s column (0: skip).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="--report: save size vs KL as PNG.")
def quantize(
    src: str,
    dst: str | None,
    qtype: str,
    allow_requantize: bool,
    imatrix: str | None,
    threads: str,
    report: bool,
    types: str,
    text: str | None,
    ctx: int,
    chunks: int | None,
    keep: str | None,
    gen_tokens: int,
    as_json: bool,
    plot: str | None,
) -> None:
    """Quantize the GGUF model IN to OUT with llama.cpp's own quantizer.

    IN should be an F16/BF16/F32 file (or pass --allow-requantize). The work runs in a child
    process and writes a temp file beside OUT: OUT appears only when complete.

    \b
    Examples:
      ondevice quantize model-f16.gguf model-q4_k_m.gguf --type Q4_K_M
      ondevice quantize --report model-f16.gguf --text wiki.txt --types Q8_0,Q4_K_M,Q2_K
    """
    n_threads = _threads(threads)
    if report:
        if dst is not None:
            raise UsageError(
                "--report takes only IN", hint="drop OUT (use --keep DIR to keep files)"
            )
        if not text:
            raise UsageError("--report needs --text FILE", hint="a few thousand tokens of prose")
        _report(
            src,
            text,
            types,
            ctx,
            chunks,
            n_threads,
            keep,
            gen_tokens,
            as_json,
            plot,
            allow_requantize,
            imatrix,
        )
        return
    if dst is None:
        raise UsageError("missing OUT", hint="ondevice quantize IN OUT --type Q4_K_M")
    from ondevice.quantize import (
        quantize as run_quantize,  # gguf-py and the worker: imported when the command runs
    )

    progress = _Progress(sys.stderr.isatty() and not as_json)
    result = run_quantize(
        src,
        dst,
        qtype,
        allow_requantize=allow_requantize,
        imatrix=imatrix,
        threads=n_threads,
        on_progress=progress,
    )
    progress.done()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(
            f"wrote {result.path} ({result.type}, {result.file_bytes / 2**20:.1f} MiB, "
            f"{result.bpw:.2f} bits/weight) in {result.seconds:.1f}s"
        )


def _report(
    src, text_file, types, ctx, chunks, threads, keep, gen_tokens, as_json, plot, requant, imatrix
):
    from ondevice.quantize.quality import read_text  # the runtime: only for --report
    from ondevice.quantize.report import (  # the runtime and matplotlib: only for --report
        plot_ladder,
        quality_ladder,
        require_matplotlib,
    )

    if plot:
        require_matplotlib()  # fail before the long part, not after it
    text = read_text(text_file)

    names = [t.strip() for t in types.split(",") if t.strip()]
    tty = sys.stderr.isatty()

    def status(msg: str) -> None:
        if tty:
            click.echo(msg, err=True)

    rep = quality_ladder(
        src,
        text,
        names,
        ctx=ctx,
        threads=threads or "auto",
        keep_dir=keep,
        allow_requantize=requant,
        imatrix=imatrix,
        max_chunks=chunks,
        gen_tokens=gen_tokens,
        on_status=status,
    )
    if plot:
        plot_ladder(rep, plot)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        return
    click.echo(
        f"{rep.source}: {rep.scored_tokens} tokens scored (ctx {rep.ctx}, "
        f"text {rep.text_tokens} tokens), {rep.threads} threads"
    )
    click.echo(rep.table())
    if plot:
        click.echo(f"plot: {plot}")


class _Progress:
    """`[ 12/272] blk.1.attn_q.weight` on one terminal line, redrawn per tensor."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        width = len(str(total))
        sys.stderr.write(f"\r\x1b[2K[{done:>{width}}/{total}] {name}")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
