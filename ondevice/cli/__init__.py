"""The `ondevice` command line: a click group whose commands live one module each in this package.

Library code raises `OndeviceError`s; this is the only layer that prints them and picks exit
codes (1 for a failure, 2 for usage, 130 for Ctrl-C, 128+N for SIGTERM/SIGHUP, which end a
command as cleanly as Ctrl-C), and it never shows a traceback for them.
Commands are imported lazily so that `ondevice --help` and a failing command stay fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from ondevice.errors import OndeviceError
from ondevice.processes import Terminated, terminate_on_signals

# name -> "module:attribute" of the click command. Adding a command is one line here.
COMMANDS: dict[str, str] = {
    "run": "ondevice.cli.run:run",
    "info": "ondevice.cli.info:info",
    "system": "ondevice.cli.system:system",
    "bench": "ondevice.cli.bench:bench",
    "fit": "ondevice.cli.fit:fit",
    "convert": "ondevice.cli.convert:convert",
    "pull": "ondevice.cli.pull:pull",
    "list": "ondevice.cli.list:list_models",
    "rm": "ondevice.cli.rm:rm",
    "chat": "ondevice.cli.chat:chat",
    "quantize": "ondevice.cli.quantize:quantize",
    "perplexity": "ondevice.cli.perplexity:perplexity",
    "tune": "ondevice.cli.tune:tune",
    "serve": "ondevice.cli.serve:serve",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is used or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        try:
            with terminate_on_signals():
                return super().invoke(ctx)
        except OndeviceError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Terminated as exc:
            click.echo(f"terminated ({exc})", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            # `ondevice run ... | head`: the reader went away; that's not an error of ours.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ondevice")
@click.option(
    "-v", "--verbose", count=True, help="Log more (-v info, -vv debug, with llama.cpp's own log)."
)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Run small language models on this machine: convert, quantize, chat, benchmark."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
