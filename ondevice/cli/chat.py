"""`ondevice chat [MODEL]`: an interactive chat (or one reply per line of piped input)."""

from __future__ import annotations

import sys

import click

from ondevice.cli.options import load_kwargs, load_options, sampling_kwargs, sampling_options
from ondevice.repl import Repl, default_model, format_names


@click.command()
@click.argument("model", required=False)
@load_options
@sampling_options
@click.option(
    "--chat-format",
    default=None,
    metavar="FORMAT",
    help=f"Prompt format: {format_names()}, or a Jinja template file "
    "[default: the model's template, else one for its architecture].",
)
@click.option("--system", default=None, help="System prompt.")
def chat(
    model: str | None,
    chat_format: str | None,
    system: str | None,
    max_tokens: int,
    stop: tuple[str, ...],
    **params,
) -> None:
    """Chat with MODEL: a .gguf path, `demo`, or a store name.

    Without MODEL: $ONDEVICE_MODEL, else the model pulled last, else the demo model.
    Type /help in the chat for its commands. With input piped in, each line gets one reply.

    \b
    Examples:
      ondevice chat demo
      ondevice chat phi-2 --system "You are terse." --temperature 0.2
      echo "What is the capital of France?" | ondevice chat demo
    """
    import ondevice  # the runtime: imported when the command runs, not for --help

    name = model or default_model()
    with ondevice.load(name, **load_kwargs(params)) as m:
        conv = m.conversation(
            system,
            chat_format=chat_format,
            max_tokens=max_tokens,
            stop=list(stop),
            **sampling_kwargs(params),
        )
        code = Repl(conv).run()
    if code:
        sys.exit(code)
