"""`ondevice perplexity MODEL TEXTFILE`: llama-perplexity's measurement, plus KL vs a reference."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("model")
@click.argument("textfile", type=click.Path(dir_okay=False))
@click.option("--ctx", type=click.IntRange(min=8), default=512, show_default=True, help="Window.")
@click.option(
    "--reference",
    help="Reference model (e.g. the F16 file): also report KL divergence and top-1 agreement.",
)
@click.option("--chunks", type=int, default=None, help="Score only the first N windows.")
@click.option("-t", "--threads", default="auto", show_default=True, help="Threads: N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def perplexity(
    model: str,
    textfile: str,
    ctx: int,
    reference: str | None,
    chunks: int | None,
    threads: str,
    as_json: bool,
) -> None:
    """Perplexity of MODEL on TEXTFILE, computed as llama.cpp's llama-perplexity does.

    The text is cut into windows of --ctx tokens and the second half of each window is scored.
    With --reference, the same windows also give the mean KL divergence of MODEL's token
    distributions from the reference's, and how often both pick the same top token.

    \b
    Examples:
      ondevice perplexity model-q4_k_m.gguf wiki.txt --reference model-f16.gguf
      ondevice perplexity demo tests/data/alice-ch1.txt --ctx 128 --json
    """
    from ondevice.quantize.quality import (  # the runtime: imported when the command runs, not for --help
        evaluate,
        read_text,
    )

    tty = sys.stderr.isatty() and not as_json

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\r\x1b[2K[{done}/{total}] windows")
            sys.stderr.flush()

    result = evaluate(
        model,
        read_text(textfile),
        ctx=ctx,
        reference=reference,
        threads=threads,
        max_chunks=chunks,
        on_progress=progress,
    )
    if tty:
        sys.stderr.write("\r\x1b[2K")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(
        f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
        f"({result.chunks} windows of {result.ctx}; text {result.text_tokens} tokens)"
    )
    if result.kl_divergence is not None:
        click.echo(
            f"KL divergence {result.kl_divergence:.6f} nats/token, top-1 agreement "
            f"{100 * result.top1_agreement:.2f}% vs {reference}"
        )
