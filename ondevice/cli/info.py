"""`ondevice info MODEL`: what a GGUF file holds, from its header alone (nothing is loaded)."""

from __future__ import annotations

import json

import click

from ondevice import fit, locate, policy, system
from ondevice.cli.options import mib
from ondevice.gguf_header import read_header
from ondevice.settings import check_load


def model_info(model: str, n_ctx: int | None = None, kv_type: str = "f16") -> dict:
    """The facts `ondevice info` prints, as a dict (library function)."""
    path = locate.resolve(model)
    h = read_header(path)
    trained = int(h.arch_value("context_length", 0) or 0)
    ctx = n_ctx or policy.default_ctx(trained)
    check_load("kv_type", kv_type)
    repack, family = policy.repack_here(system.cpu_features())
    pred = fit.predict(h, ctx, kv_type, repack=repack, repack_family=family)
    return {
        "path": str(path),
        "name": h.metadata.get("general.name"),
        "architecture": h.architecture,
        "parameters": h.n_params,
        "file_bytes": h.file_size,
        "tensor_bytes": h.tensor_bytes,
        "bits_per_weight": round(8 * h.tensor_bytes / max(h.n_params, 1), 3),
        "tensor_types": h.type_counts(),
        "file_type": h.metadata.get("general.file_type"),
        "context_length": trained,
        "layers": h.arch_value("block_count"),
        "embedding_length": h.arch_value("embedding_length"),
        "vocab_size": len(h.metadata.get("tokenizer.ggml.tokens", ())),
        "chat_template": "tokenizer.chat_template" in h.metadata,
        "gguf_version": h.version,
        "memory_estimate": pred.to_dict(),
    }


@click.command()
@click.argument("model")
@click.option(
    "--ctx",
    type=click.IntRange(min=8),
    default=None,
    help="Context for the memory estimate [default: 4096 or the model's].",
)
@click.option("--kv-type", default="f16", show_default=True, help="KV cache type for the estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Also list every metadata key.")
def info(model: str, ctx: int | None, kv_type: str, as_json: bool, show_metadata: bool) -> None:
    """Describe MODEL (a .gguf path, `demo` or a store name) without loading it:
    architecture, parameters, tensor types, sizes, context, chat template, memory estimate."""
    data = model_info(model, ctx, kv_type)
    if show_metadata:
        data["metadata"] = read_header(data["path"]).small_metadata()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    est = data["memory_estimate"]
    types = ", ".join(f"{k}×{v}" for k, v in sorted(data["tensor_types"].items()))
    click.echo(f"Model:          {data['name'] or '-'} ({data['path']})")
    click.echo(
        f"Architecture:   {data['architecture']}, {data['layers']} layers, "
        f"embedding {data['embedding_length']}, vocab {data['vocab_size']}"
    )
    click.echo(
        f"Parameters:     {data['parameters'] / 1e6:.1f} M "
        f"({data['bits_per_weight']:.2f} bits per weight)"
    )
    click.echo(f"Tensor types:   {types}")
    click.echo(
        f"File size:      {mib(data['file_bytes'])} (tensor data {mib(data['tensor_bytes'])})"
    )
    click.echo(f"Context length: {data['context_length']} (trained)")
    click.echo(f"Chat template:  {'yes' if data['chat_template'] else 'no'}")
    click.echo(
        f"Memory at ctx {est['n_ctx']} ({est['kv_type']} KV): "
        f"{mib(est['predicted_peak_bytes'])} = weights {mib(est['weights_bytes'])} + "
        f"KV {mib(est['kv_bytes'])} + compute {mib(est['compute_bytes'])} + "
        f"overhead {mib(est['overhead_bytes'])}"
    )
    if show_metadata:
        for key, value in data["metadata"].items():
            click.echo(f"  {key} = {value}")
