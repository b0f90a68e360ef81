"""`ondevice rm NAME`: delete a model from the local store."""

from __future__ import annotations

import click

from ondevice import store


@click.command()
@click.argument("name")
def rm(name: str) -> None:
    """Delete NAME (`phi-2:Q4_K_M`, or `phi-2` if it has one quant) from the local store.

    The download stays in the Hugging Face cache, so pulling it again needs no network.
    """
    entry = store.remove(name)
    click.echo(f"removed {entry.ref} ({store.human_size(entry.size)})")
