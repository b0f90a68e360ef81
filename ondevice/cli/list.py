"""`ondevice list`: the models in the local store (name, quant, size, source, date)."""

from __future__ import annotations

import json

import click

from ondevice import store


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the entries.")
def list_models(as_json: bool) -> None:
    """List the models in the local store (see `ondevice pull`).

    Use a model by its name: `phi-2:Q4_K_M`, or `phi-2` for its default quant (Q4_K_M if
    pulled, else the newest).
    """
    entries = store.entries()
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo(
            f"no models in {store.models_dir()}; try `ondevice pull microsoft/phi-2`", err=True
        )
        return
    rows = [("NAME", "QUANT", "SIZE", "SOURCE", "PULLED")]
    for e in entries:
        date = e.created.replace("T", " ").removesuffix("Z")[:16]
        rows.append((e.name, e.quant, store.human_size(e.size), e.source, date))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        click.echo("  ".join(cells))
