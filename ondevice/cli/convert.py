"""`ondevice convert SRC -o OUT.gguf`: a Hugging Face safetensors model (folder or hub repo) → GGUF."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

OUTTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")


@click.command()
@click.argument("src")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The GGUF file to write.",
)
@click.option(
    "--outtype",
    type=click.Choice(OUTTYPE_CHOICES, case_sensitive=False),
    default="f16",
    show_default=True,
    help="Type of the weight matrices (norms and biases stay f32).",
)
@click.option("--revision", default=None, help="Hub branch, tag or commit (hub repos only).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option(
    "--vocab-pre",
    metavar="NAME",
    default=None,
    help="llama.cpp's pre-tokenizer name for a BPE tokenizer it can't identify (e.g. llama-bpe, "
    "qwen2, smollm, gpt-4o, gpt-2).",
)
def convert(
    src: str, out: Path, outtype: str, revision: str | None, force: bool, vocab_pre: str | None
) -> None:
    """Convert SRC, a local model folder or a hub repo id, to a GGUF file.

    Architectures: Llama (Llama 2/3.x, SmolLM2, TinyLlama), Mistral, Qwen2/2.5, Phi-2, Phi-3/3.5
    and Phi-4-mini. Only safetensors are read (pickle checkpoints are refused). OUT appears only
    once the conversion has finished; a progress bar shows on a terminal.

    \b
    Examples:
      ondevice convert microsoft/phi-2 -o phi-2-f16.gguf
      ondevice convert Qwen/Qwen2.5-0.5B-Instruct -o qwen.gguf --outtype q8_0
      ondevice convert ./my-llama-finetune -o ft-f16.gguf
    """
    from ondevice.convert import (
        convert as convert_model,  # the converter (gguf-py, safetensors): not for --help
    )

    with _sigterm_as_interrupt():
        path = convert_model(
            src, out, outtype=outtype.lower(), revision=revision, force=force, vocab_pre=vocab_pre
        )
    click.echo(str(path))


@contextmanager
def _sigterm_as_interrupt() -> Any:
    # `kill` should clean up like Ctrl-C does: the converter removes its temporary file on
    # KeyboardInterrupt, and the CLI group turns that into exit code 130.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
