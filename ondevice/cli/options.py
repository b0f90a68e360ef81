"""Click options shared by the commands that load a model or sample, built from the settings
table (ondevice.settings), so every command spells them alike and the help shows the real
defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ondevice.settings import LOAD, MAX_TOKENS, SAMPLING, Setting

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
    "speculative",
)


def _checked(setting: Setting) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that validates with the table (a bad value is a UsageError: the CLI
    prints it as one line and exits 2)."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return None if value is None else setting.validate(value)

    return check


def _help(setting: Setting, show_default: bool = True) -> str:
    if not show_default or "[default" in setting.help:
        return setting.help
    return f"{setting.help.rstrip('.')} [default: {setting.default_text}]."


def _option(setting: Setting, *, name: str | None = None, default: Any = None, **kw: Any):
    click_type = kw.pop("type", {int: int, float: float}.get(setting.type, str))
    return click.option(
        *setting.flags,
        name or setting.name,
        type=click_type,
        default=default,
        callback=_checked(setting),
        help=kw.pop("help", _help(setting)),
        **kw,
    )


def load_options(
    f: Callable[..., Any] | None = None, *, speculative: str = "auto", speculative_help: str = ""
) -> Any:
    """--ctx, --threads, --backend, --gpu-layers, --flash-attn, --no-mmap, --kv-type,
    --no-fallback, --force, --speculative, --no-tune. `@load_options`, or
    `@load_options(speculative="off", speculative_help=...)` for another default."""
    if f is None:
        return lambda g: load_options(g, speculative=speculative, speculative_help=speculative_help)
    opts = [
        _option(LOAD["n_ctx"], name="ctx", help=LOAD["n_ctx"].help),
        _option(LOAD["threads"], default="auto", show_default=True, help=LOAD["threads"].help),
        _option(LOAD["backend"], default="auto", show_default=True, help=LOAD["backend"].help),
        _option(
            LOAD["gpu_layers"], default="auto", show_default=True, help=LOAD["gpu_layers"].help
        ),
        click.option(
            "--no-fallback",
            is_flag=True,
            help="Fail instead of running on the CPU when the GPU backend can't load the model.",
        ),
        _option(
            LOAD["flash_attn"],
            type=click.Choice(LOAD["flash_attn"].choices),
            default="auto",
            show_default=True,
            help=LOAD["flash_attn"].help,
        ),
        click.option(
            "--no-mmap", is_flag=True, help="Read the file into memory instead of mapping it."
        ),
        _option(LOAD["kv_type"], help=LOAD["kv_type"].help),
        click.option(
            "--force",
            is_flag=True,
            help="Load even if `ondevice fit` predicts the model won't fit the free memory.",
        ),
        _option(
            LOAD["speculative"],
            metavar="auto|lookup|off|DRAFT",
            default=speculative,
            show_default=True,
            help=LOAD["speculative"].help + speculative_help,
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
    opts = [_option(SAMPLING[name]) for name in SAMPLING_OPTIONS]
    opts.append(
        _option(MAX_TOKENS, default=MAX_TOKENS.default, show_default=True, help=MAX_TOKENS.help)
    )
    opts.append(click.option("--stop", multiple=True, help="Stop string (repeatable)."))
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """ondevice.load() keywords from the parsed load options."""
    return {
        "n_ctx": params.get("ctx"),
        "threads": params.get("threads", "auto"),
        "backend": params.get("backend", "auto"),
        "gpu_layers": params.get("gpu_layers", "auto"),  # ondevice.backends checks it
        "flash_attn": params.get("flash_attn", "auto"),
        # None leaves the choice to a stored tuning (ondevice tune), else the default.
        "use_mmap": False if params.get("no_mmap") else None,
        "kv_type": params.get("kv_type"),
        "no_fallback": params.get("no_fallback", False),
        "force": bool(params.get("force", False)),
        "tune": not params.get("no_tune", False),
        "speculative": params.get("speculative", "auto"),
    }


def sampling_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Model.stream() sampling keywords from the parsed sampling options (None = default)."""
    return {k: params[k] for k in SAMPLING_OPTIONS if params.get(k) is not None}


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
