"""Click options shared by the commands that load a model, so every command spells them alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
LOAD_OPTIONS = (
    "ctx",
    "threads",
    "backend",
    "gpu_layers",
    "flash_attn",
    "no_mmap",
    "kv_type",
    "no_fallback",
    "force",
    "no_tune",
)


def load_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--ctx, --threads, --backend, --gpu-layers, --flash-attn, --no-mmap, --kv-type,
    --no-fallback, --force, --no-tune."""
    opts = [
        click.option(
            "--ctx",
            "ctx",
            type=click.IntRange(min=8),
            default=None,
            help="Context length in tokens [default: 4096 or the model's, if smaller].",
        ),
        click.option(
            "-t",
            "--threads",
            default="auto",
            show_default=True,
            help="Threads: a number, or auto (the performance cores).",
        ),
        click.option(
            "--backend",
            default="auto",
            show_default=True,
            help="auto, cpu, metal, vulkan or vulkan:N.",
        ),
        click.option(
            "--gpu-layers",
            default="auto",
            show_default=True,
            help="Layers to offload to the GPU backend (auto = all that fit its free memory).",
        ),
        click.option(
            "--no-fallback",
            is_flag=True,
            help="Fail instead of running on the CPU when the GPU backend can't load the model.",
        ),
        click.option(
            "--flash-attn",
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            show_default=True,
            help="Flash attention. auto: llama.cpp's choice on a GPU; off on the CPU (faster deep "
            "in a context) unless the KV cache is quantized.",
        ),
        click.option(
            "--no-mmap", is_flag=True, help="Read the file into memory instead of mapping it."
        ),
        click.option(
            "--kv-type",
            default=None,
            help="KV cache type: f16, bf16, f32, q8_0, q4_0 (where the model allows it) "
            "[default: f16, or the tuned one].",
        ),
        click.option(
            "--force",
            is_flag=True,
            help="Load even if `ondevice fit` predicts the model won't fit the free memory.",
        ),
        click.option(
            "--no-tune",
            is_flag=True,
            help="Ignore the settings stored by `ondevice tune` (use the defaults).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--temperature, --top-k, --top-p, --min-p, --repeat-penalty, --seed, --max-tokens, --stop."""
    opts = [
        click.option(
            "--temperature",
            "--temp",
            "temperature",
            type=float,
            default=None,
            help="Sampling temperature; 0 = greedy [default: 0.8].",
        ),
        click.option("--top-k", type=int, default=None, help="Top-k [default: 40; 0 = off]."),
        click.option("--top-p", type=float, default=None, help="Top-p [default: 0.95]."),
        click.option("--min-p", type=float, default=None, help="Min-p [default: 0.05]."),
        click.option(
            "--repeat-penalty",
            type=float,
            default=None,
            help="Repeat penalty [default: 1.0 = off].",
        ),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
        click.option(
            "-n",
            "--max-tokens",
            type=int,
            default=256,
            show_default=True,
            help="Most tokens to generate (-1: until the context is full).",
        ),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """ondevice.load() keywords from the parsed load options."""
    gpu = params.get("gpu_layers", "auto")
    return {
        "n_ctx": params.get("ctx"),
        "threads": params.get("threads", "auto"),
        "backend": params.get("backend", "auto"),
        "gpu_layers": gpu,  # "auto" or a number; ondevice.backends checks it
        "flash_attn": params.get("flash_attn", "auto"),
        # None leaves the choice to a stored tuning (ondevice tune), else the default.
        "use_mmap": False if params.get("no_mmap") else None,
        "kv_type": params.get("kv_type"),
        "no_fallback": params.get("no_fallback", False),
        "force": bool(params.get("force", False)),
        "tune": not params.get("no_tune", False),
    }


def sampling_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Model.stream() sampling keywords from the parsed sampling options (None = default)."""
    return {k: params[k] for k in SAMPLING_OPTIONS if params.get(k) is not None}


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
