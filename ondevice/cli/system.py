"""`ondevice system`: this machine's CPU, cores, RAM, and the llama.cpp build and devices."""

from __future__ import annotations

import json

import click

from ondevice.cli.options import mib


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def system(as_json: bool) -> None:
    """Show the CPU (model, features, performance/efficiency cores), RAM, and the installed
    llama.cpp: version, compiled backends and the devices it can run on."""
    from ondevice import (
        tune_store as tune,  # llama.cpp's build facts: imported when the command runs
    )
    from ondevice.backends import (
        system_info,  # llama.cpp's build facts: imported when the command runs
    )

    info = system_info()
    mine, everyone = tune.stored(), tune.stored(this_device=False)
    if as_json:
        data = info.to_dict()
        data["tunings"] = {"path": str(tune.tunings_path()), "this_device": mine}
        click.echo(json.dumps(data, indent=2))
        return
    gib = 1024**3
    click.echo(f"OS:        {info.os} ({info.machine})")
    click.echo(f"CPU:       {info.cpu_model}")
    click.echo(f"Features:  {' '.join(info.cpu_features) or '-'}")
    click.echo(
        f"Cores:     {info.cores_physical} physical, {info.cores_logical} logical; "
        f"{info.cores_performance} performance, {info.cores_efficiency} efficiency "
        f"(from {info.core_split_source}); threads=auto uses {info.auto_threads}"
    )
    click.echo(
        f"RAM:       {info.ram_total_bytes / gib:.1f} GiB total, "
        f"{info.ram_available_bytes / gib:.1f} GiB available"
    )
    click.echo(
        f"llama.cpp: llama-cpp-python {info.llama_cpp_python}; backends: {', '.join(info.backends)}"
    )
    click.echo(f"Build:     {info.llama_cpp_system_info}")
    click.echo(
        f"Repack:    {'on' if info.repack else 'off'} (weight layouts for {info.repack_family})"
    )
    click.echo("Devices:")
    for d in info.devices:
        mem = (
            f"{mib(d['memory_free'])} free of {mib(d['memory_total'])}" if d["memory_total"] else ""
        )
        click.echo(
            f"  [{d['index']}] {d['name']} ({d['type']}, {d['backend']}): "
            f"{d['description']} {mem}".rstrip()
        )
    others = len(everyone) - len(mine)
    click.echo(
        f"Tunings:   {len(mine)} for this device (`ondevice tune`; load() applies them unless "
        f"--no-tune){f', {others} for other devices' if others else ''}; {tune.tunings_path()}"
    )
    for e in mine:
        s = e.get("settings", {})
        f = e.get("faithfulness") or {}
        faith = f", KL {f['kl_mean']:.1e}, top-1 {f['top1']:.0%}" if "kl_mean" in f else ""
        gain = f"{e['speedup']:.2f}x the defaults" if e.get("speedup") else "defaults unmeasured"
        click.echo(
            f"  {e.get('model_name')} (sha256 {str(e.get('model_sha256'))[:12]}) "
            f"{e.get('workload')} ctx {e.get('n_ctx')}: fa={s.get('flash_attn')} "
            f"repack={s.get('repack')} mmap={s.get('use_mmap')} ub={s.get('n_ubatch')} "
            f"t={s.get('threads')} kv={s.get('kv_type')}; {gain}{faith}; "
            f"{str(e.get('created', ''))[:10]}"
        )
