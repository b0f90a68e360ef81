"""`ondevice fit MODEL --ram 4GB`: will this model fit in that much memory, from its header alone?

Prints each term of the predicted peak (weights, repacked copies, KV cache, compute buffer,
runtime overhead), the verdict, and if it does not fit, the largest context, KV cache type or
quantization that would. Nothing is loaded; the arithmetic is `ondevice.fit`.
"""

from __future__ import annotations

import json
import sys

import click
import psutil

from ondevice import fit as fitlib
from ondevice import locate, policy, system
from ondevice.gguf_header import read_header


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


@click.command()
@click.argument("model")
@click.option(
    "--ram",
    default=None,
    help="Memory to fit in, e.g. 4GB, 3.5GiB, 1500MiB [default: what is available now].",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=8),
    default=None,
    help="Context length [default: 4096, or the model's trained context if smaller].",
)
@click.option(
    "--kv",
    "--kv-type",
    "kv_type",
    default="f16",
    show_default=True,
    help="KV cache type: f16, q8_0, q4_0 (where the model allows it), bf16, f32.",
)
@click.option("--ubatch", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--no-mmap", is_flag=True, help="Predict for reading the file instead of mapping.")
@click.option(
    "--repack/--no-repack",
    default=None,
    help="Whether llama.cpp repacks weights [default: what a load on this machine does].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fit(
    model: str,
    ram: str | None,
    ctx: int | None,
    kv_type: str,
    ubatch: int,
    no_mmap: bool,
    repack: bool | None,
    as_json: bool,
) -> None:
    """Predict MODEL's peak memory (a .gguf path, `demo` or a store name) and say whether it
    fits in --ram; exit status 0 if it fits, 1 if not.

    \b
    peak = weights + repacked copies + KV cache + compute buffer + runtime overhead
    With mmap (the default) the weights are file-backed pages; everything else is anonymous
    memory. Weight repacking (on by default in llama.cpp, off on AMX machines) keeps a second
    copy of the repackable matrices.

    \b
    Examples:
      ondevice fit phi-2 --ram 4GB --ctx 2048
      ondevice fit model.gguf --ram 3GiB --kv q8_0 --json
    """
    path = locate.resolve(model)
    header = read_header(path)
    ram_bytes = (
        fitlib.parse_bytes(ram) if ram is not None else int(psutil.virtual_memory().available)
    )
    n_ctx = ctx or policy.default_ctx(int(header.arch_value("context_length", 0) or 0))
    repack_default, family = policy.repack_here(system.cpu_features())
    report = fitlib.fit_report(
        header,
        ram_bytes,
        n_ctx,
        kv_type,
        model=str(path),
        n_ubatch=ubatch,
        use_mmap=not no_mmap,
        repack=repack_default if repack is None else repack,
        repack_family=family,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        sys.exit(0 if report.fits else 1)
    _print_terms(report, header, path.name, n_ctx, kv_type, ubatch)
    _print_verdict(report, ram_bytes, kv_type)
    sys.exit(0 if report.fits else 1)


def _print_terms(report, header, name: str, n_ctx: int, kv_type: str, ubatch: int) -> None:
    """The prediction, term by term."""
    path_name = name
    p = report.prediction
    types = ", ".join(f"{k}×{v}" for k, v in sorted(header.type_counts().items()))
    click.echo(
        f"Model:    {path_name} ({header.architecture}, {header.n_params / 1e9:.2f} B params)"
    )
    click.echo(f"Tensors:  {types}")
    click.echo(
        f"Context:  {n_ctx} tokens, {kv_type} KV, n_ubatch {ubatch}, "
        f"mmap {'on' if p.use_mmap else 'off'}, repack {'on' if p.repack else 'off'}, "
        f"flash attention {'on' if p.flash_attn else 'off'}"
    )
    click.echo(
        f"  weights   {_mib(p.weights_bytes)}  "
        f"({'file-backed: the mapped model file' if p.use_mmap else 'anonymous: read in'})"
    )
    if p.repack:
        click.echo(f"  repacked  {_mib(p.repack_bytes)}  (anonymous copies of repacked matrices)")
    click.echo(f"  KV cache  {_mib(p.kv_bytes)}")
    click.echo(
        f"  compute   {_mib(p.compute_bytes)}  (touched; llama.cpp reserves "
        f"{p.compute_reserved_bytes / 2**20:.1f} MiB)"
    )
    click.echo(f"  overhead  {_mib(p.overhead_bytes)}  (Python, libraries, tokenizer tables)")
    click.echo(
        f"  peak      {_mib(p.predicted_peak_bytes)}  "
        f"(file-backed {p.file_backed_bytes / 2**20:.0f} MiB, anonymous "
        f"{p.anon_bytes / 2**20:.0f} MiB)"
    )


def _print_verdict(report, ram_bytes: int, kv_type: str) -> None:
    """Fits or not, and what would."""
    p = report.prediction
    spare = ram_bytes - p.predicted_peak_bytes
    if report.fits:
        click.echo(
            f"Fits in {ram_bytes / 2**20:.0f} MiB with {spare / 2**20:.0f} MiB to spare; "
            f"the largest context that fits is {report.max_ctx}."
        )
    else:
        click.echo(f"Does not fit in {ram_bytes / 2**20:.0f} MiB: {-spare / 2**20:.0f} MiB over.")
        if report.max_ctx:
            click.echo(f"  A context of {report.max_ctx} tokens would fit.")
        else:
            click.echo("  No context fits with these weights.")
        for kv in report.kv_options:
            if kv["kv_type"] != kv_type and kv.get("fits"):
                click.echo(
                    f"  --kv {kv['kv_type']} would fit "
                    f"({kv['predicted_peak_bytes'] / 2**20:.0f} MiB)."
                )
        smaller = [q for q in report.quant_options if q["fits"]]
        if smaller:
            best = smaller[0]
            click.echo(
                f"  Quantized to {best['type']} (about {best['weights_bytes'] / 2**20:.0f} MiB "
                f"of weights) it would fit: {best['predicted_peak_bytes'] / 2**20:.0f} MiB"
                + (f"; also {', '.join(q['type'] for q in smaller[1:])}" if smaller[1:] else "")
                + "."
            )
    for kv in report.kv_options:
        if not kv["allowed"] and kv["kv_type"] == "q8_0":
            click.echo(f"Note: no quantized KV cache for this model: {kv['why']}.")
    for note in report.notes:
        click.echo(f"Note: {note}.")
