"""`ondevice run MODEL [PROMPT]`: complete one prompt, streaming text to stdout (or `--json`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import ondevice
from ondevice import constrain
from ondevice.cli.options import load_kwargs, load_options, sampling_kwargs, sampling_options
from ondevice.errors import UsageError


def read_stdin() -> str:
    """Standard input as text; bytes that aren't UTF-8 become U+FFFD (with a warning) instead
    of a UnicodeDecodeError."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        click.echo(
            f"warning: standard input is not valid UTF-8 (byte {exc.start}); "
            "invalid bytes were replaced with U+FFFD",
            err=True,
        )
        return data.decode("utf-8", errors="replace")


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@load_options
@sampling_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"text": ..., "stats": {...}} instead of streaming.',
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "text"]),
    default="text",
    show_default=True,
    help="json: the reply is always one JSON object.",
)
@click.option(
    "--json-schema",
    type=click.Path(dir_okay=False),
    help="A JSON schema file: the reply always validates against it.",
)
@click.option(
    "--grammar",
    type=click.Path(dir_okay=False),
    help="A GBNF grammar file (llama.cpp's format): the reply always matches it.",
)
@click.option(
    "--stats/--no-stats",
    "show_stats",
    default=False,
    help="Print the stats line to stderr after the text.",
)
def run(
    model: str,
    prompt: str | None,
    as_json: bool,
    show_stats: bool,
    fmt: str,
    json_schema: str | None,
    grammar: str | None,
    max_tokens: int,
    stop: tuple[str, ...],
    **params,
) -> None:
    """Complete PROMPT (or standard input) with MODEL: a .gguf path, `demo`, or a store name.

    \b
    Examples:
      ondevice run demo "The capital of France is" --temperature 0
      echo "Once upon a time" | ondevice run demo -n 64 --json
      ondevice run demo "A person as JSON:" --json-schema person.json
    """
    specs = [s for s in (json_schema, grammar, "json" if fmt == "json" else None) if s]
    if len(specs) > 1:
        raise UsageError("give one of --format json, --json-schema and --grammar")
    constraint = constrain.stream_kwargs(specs[0]) if specs else {}
    if grammar and constraint.get("json_schema") is not None:
        constraint = {"grammar": Path(grammar).read_text(encoding="utf-8")}
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt given", hint="pass PROMPT or pipe text on stdin")
        prompt = read_stdin()
    if not prompt:
        raise UsageError("the prompt is empty", hint="pass a non-empty PROMPT")
    with ondevice.load(model, **load_kwargs(params)) as m:
        stream = m.stream(
            prompt, max_tokens=max_tokens, stop=list(stop), **constraint, **sampling_kwargs(params)
        )
        if as_json:
            parts, final = [], None
            for chunk in stream:
                parts.append(chunk.text)
                final = chunk.stats or final
            click.echo(json.dumps({"text": "".join(parts), "stats": final.to_dict()}, indent=2))
            return
        out = sys.stdout
        final = None
        for chunk in stream:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            final = chunk.stats or final
        out.write("\n")
        out.flush()
        if show_stats and final is not None:
            click.echo(final.summary(), err=True)
