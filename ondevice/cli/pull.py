"""`ondevice pull REPO`: download, convert and quantize a hub model into the local store."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ondevice.store import DEFAULT_QUANT, human_size


@click.command()
@click.argument("repo")
@click.option(
    "-q",
    "--quant",
    default=DEFAULT_QUANT,
    show_default=True,
    help="Quant type: Q4_K_M, Q5_K_M, Q8_0, F16, ... (a GGUF repo's file of this type is "
    "taken as is).",
)
@click.option("--revision", default=None, help="Hub branch, tag or commit [default: main].")
@click.option("--name", default=None, help="Store name [default: the repo's name].")
@click.option(
    "--force", is_flag=True, help="Ask the hub again and rebuild, even if the store has it."
)
@click.option("--json", "as_json", is_flag=True, help="Print the store entry as JSON.")
def pull(
    repo: str,
    quant: str,
    revision: str | None,
    name: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Pull REPO from the Hugging Face hub into the local model store.

    Downloads into the Hugging Face cache (resumable; HF_HUB_OFFLINE=1 uses only the cache),
    checks every file's size and sha256, converts and quantizes it, and stores the GGUF as
    NAME:QUANT for `ondevice run`, `chat` and friends. A second pull of the same model does
    nothing. The store is in $ONDEVICE_HOME, else your user data folder.

    \b
    Examples:
      ondevice pull microsoft/phi-2                  # → phi-2:Q4_K_M
      ondevice pull microsoft/phi-2 --quant Q8_0
      ondevice pull TheBloke/phi-2-GGUF --quant Q5_K_M
    """
    from ondevice.pull import (
        pull as pull_model,  # huggingface-hub: imported when the command runs, not for --help
    )

    # huggingface-hub prints its warnings through its own handler; don't print them twice.
    logging.getLogger("huggingface_hub").propagate = False

    def step(message: str) -> None:
        click.echo(message, err=True)

    with _sigterm_as_interrupt():
        result = pull_model(
            repo, quant=quant, revision=revision, name=name, force=force, on_step=step
        )
    entry = result.entry
    if as_json:
        status = {"status": result.status, "downloaded_bytes": result.downloaded}
        click.echo(json.dumps({**status, **entry.to_dict()}, indent=2))
        return
    if result.status == "present":
        step(
            f"{entry.ref} is already in the store ({entry.source}, {human_size(entry.size)}); "
            "--force pulls it again"
        )
    click.echo(entry.ref)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # `kill` should clean up like Ctrl-C: the pull removes its work folder on KeyboardInterrupt
    # and keeps the partial download for the next pull; the CLI group exits 130.
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
        sys.stderr.flush()
