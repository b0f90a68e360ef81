"""The one table of ondevice's settings: every sampling and load setting with its type, default,
allowed range and help text, and the KV cache types with their ggml ids and sizes.

Everything that takes a setting reads it here: `Model.stream()` and `Conversation` validate
through `check()`, the REPL's `/set` converts typed text with it, the CLI builds its options and
their help from `SAMPLING` and `LOAD`, `ondevice tune` starts from the defaults, and the engine
maps names to llama.cpp's numbers with `KV_TYPES` / `FLASH_ATTN`. A default that depends on the
machine (flash attention, weight repacking, the context) is `None` here and decided in
`ondevice.policy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ondevice.errors import UsageError


@dataclass(frozen=True)
class Setting:
    """One setting: its name (the Python keyword), type, default, the check a value must pass
    (with what it means, for messages), the help text, and the CLI option names."""

    name: str
    type: type
    default: Any
    check: Callable[[Any], bool]
    meaning: str
    help: str
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    nullable: bool = False  # None is a value ("random seed", "policy decides")

    def validate(self, value: Any) -> Any:
        """`value` converted to the setting's type (from text too) and checked; UsageError."""
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if self.nullable:
                return None
            raise UsageError(f"{self.name} needs a value ({self.meaning})")
        converted = _convert(self.type, value)
        if converted is None or (self.choices and converted not in self.choices):
            raise UsageError(f"{self.name} must be {self.meaning}, not {value!r}")
        if isinstance(converted, float) and not math.isfinite(converted):
            raise UsageError(f"{self.name} must be a finite number, not {value!r}")
        if not self.check(converted):
            raise UsageError(f"{self.name} must be {self.meaning}, not {value!r}")
        return converted

    @property
    def default_text(self) -> str:
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)


_NONE_WORDS = ("none", "random", "")
_BOOL_WORDS = {"on": True, "true": True, "yes": True, "1": True}
_BOOL_WORDS.update({"off": False, "false": False, "no": False, "0": False})
SEED_MAX = 2**32 - 2  # llama.cpp's seeds are uint32; 0xFFFFFFFF means "random"
INT_MAX = 2**31 - 1


def _convert(kind: type, value: Any) -> Any:
    if isinstance(value, bool) and kind is not bool:
        return None
    try:
        if kind is int:
            if isinstance(value, str):
                return int(value.strip(), 0)
            if isinstance(value, float):
                return int(value) if value.is_integer() else None
            return int(value)
        if kind is float:
            return float(value.strip()) if isinstance(value, str) else float(value)
        if kind is bool:
            return _BOOL_WORDS.get(value.strip().lower()) if isinstance(value, str) else bool(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _table(*items: Setting) -> dict[str, Setting]:
    return {s.name: s for s in items}


# --- sampling: what Model.stream(), Conversation, /set and `ondevice run/chat` take ------------
SAMPLING: dict[str, Setting] = _table(
    Setting(
        "temperature", float, 0.8, lambda v: v >= 0, ">= 0 (0 = greedy)",
        "Sampling temperature; 0 = greedy.", ("--temperature", "--temp"),
    ),
    Setting(
        "top_k", int, 40, lambda v: 0 <= v <= INT_MAX, ">= 0 (0 = off)",
        "Top-k; 0 = off.", ("--top-k",),
    ),
    Setting(
        "top_p", float, 0.95, lambda v: 0 < v <= 1, "in (0, 1]", "Top-p.", ("--top-p",),
    ),
    Setting(
        "min_p", float, 0.05, lambda v: 0 <= v < 1, "in [0, 1)", "Min-p.", ("--min-p",),
    ),
    Setting(
        "repeat_penalty", float, 1.0, lambda v: v > 0, "> 0 (1 = off)",
        "Repeat penalty; 1.0 = off.", ("--repeat-penalty",),
    ),
    Setting(
        "repeat_last_n", int, 64, lambda v: 0 <= v <= INT_MAX, ">= 0",
        "Tokens the repeat penalty looks back at.", ("--repeat-last-n",),
    ),
    Setting(
        "seed", int, None, lambda v: 0 <= v <= SEED_MAX, f"an integer 0..{SEED_MAX}, or none",
        "Random seed for sampling [default: random].", ("--seed",), nullable=True,
    ),
)  # fmt: skip

MAX_TOKENS = Setting(
    "max_tokens", int, 256, lambda v: v == -1 or 0 < v <= INT_MAX, "> 0, or -1 for no limit",
    "Most tokens to generate (-1: until the context is full).", ("-n", "--max-tokens"),
)  # fmt: skip


@dataclass(frozen=True)
class SamplingParams:
    """Parameters of llama.cpp's sampler chain, validated; temperature <= 0 means greedy."""

    temperature: float = SAMPLING["temperature"].default
    top_k: int = SAMPLING["top_k"].default
    top_p: float = SAMPLING["top_p"].default
    min_p: float = SAMPLING["min_p"].default
    repeat_penalty: float = SAMPLING["repeat_penalty"].default
    repeat_last_n: int = SAMPLING["repeat_last_n"].default
    seed: int | None = SAMPLING["seed"].default


def sampling_params(values: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from keyword arguments (None = the default); UsageError for an unknown
    name or a value out of range."""
    unknown = set(values) - set(SAMPLING)
    if unknown:
        raise UsageError(
            f"unknown sampling parameter(s): {', '.join(sorted(unknown))}",
            hint=f"use {', '.join(SAMPLING)}",
        )
    out = {}
    for name, value in values.items():
        if value is not None:
            out[name] = SAMPLING[name].validate(value)
    return SamplingParams(**out)


def sampling_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(SamplingParams)}


# --- KV cache types and flash attention (ggml/llama.cpp numbers) -------------------------------
@dataclass(frozen=True)
class KVType:
    """A KV cache element type: ggml's type id, and its block size and bytes per block."""

    name: str
    ggml_type: int  # ggml.h enum ggml_type
    block: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block > 1


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f32", 0, 1, 4),
        KVType("f16", 1, 1, 2),
        KVType("bf16", 30, 1, 2),
        KVType("q8_0", 8, 32, 34),
        KVType("q4_0", 2, 32, 18),
        KVType("q4_1", 3, 32, 20),
        KVType("q5_0", 6, 32, 22),
        KVType("q5_1", 7, 32, 24),
    )
}
FLASH_ATTN = ("auto", "on", "off")


# --- loading: what ondevice.load() and every command that loads a model take -------------------
LOAD: dict[str, Setting] = _table(
    Setting(
        "n_ctx", int, None, lambda v: 8 <= v <= INT_MAX, "at least 8 tokens",
        "Context length in tokens [default: 4096, or the model's trained context if smaller].",
        ("--ctx",), nullable=True,
    ),
    Setting(
        "threads", str, "auto", lambda v: v == "auto" or (v.isdigit() and 1 <= int(v) <= 4096),
        "at least 1 (and at most 4096), or auto",
        "Threads: a number, or auto (the performance cores).",
        ("-t", "--threads"),
    ),
    Setting(
        "backend", str, "auto", lambda v: True, "auto, cpu, metal, vulkan or vulkan:N",
        "auto, cpu, metal, vulkan or vulkan:N.", ("--backend",),
    ),
    Setting(
        "gpu_layers", str, "auto", lambda v: True, "auto or a number of layers",
        "Layers to offload to the GPU backend (auto = all that fit its free memory).",
        ("--gpu-layers",),
    ),
    Setting(
        "flash_attn", str, "auto", lambda v: v in FLASH_ATTN, "auto, on or off",
        "Flash attention. auto: llama.cpp's choice on a GPU; off on the CPU (faster deep in a "
        "context) unless the KV cache is quantized.", ("--flash-attn",), choices=FLASH_ATTN,
    ),
    Setting(
        "use_mmap", bool, None, lambda v: True, "on or off",
        "Map the file instead of reading it [default: on, or the tuned choice].",
        nullable=True,
    ),
    Setting(
        "kv_type", str, None, lambda v: v in KV_TYPES, f"one of {', '.join(KV_TYPES)}",
        "KV cache type: f16, bf16, f32, q8_0, q4_0 (where the model allows it) "
        "[default: f16, or the tuned one].", ("--kv-type",), nullable=True,
    ),
    Setting(
        "n_batch", int, None, lambda v: 1 <= v <= INT_MAX, "at least 1",
        "Prompt tokens per llama_decode call [default: 2048].", nullable=True,
    ),
    Setting(
        "n_ubatch", int, None, lambda v: 1 <= v <= INT_MAX, "at least 1",
        "Prompt tokens per compute pass [default: 512].", nullable=True,
    ),
    Setting(
        "speculative", str, "auto", lambda v: bool(v.strip()),
        "auto, lookup, off or a draft model",
        "Speculative decoding: by prompt lookup, auto (only while it pays), lookup (always "
        "when a lookup matches) or off; or by a draft model (a .gguf path or a store name: a "
        "smaller model with the same vocabulary, drafting only while it pays).",
        ("--speculative",),
    ),
    Setting(
        "repack", bool, None, lambda v: True, "on or off",
        "llama.cpp's weight repacking [default: on; off on AMX builds].", nullable=True,
    ),
)  # fmt: skip

# What a load without tuning uses where the table says None and no policy applies.
DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
DEFAULT_KV_TYPE = "f16"
DEFAULT_USE_MMAP = True


def check_load(name: str, value: Any) -> Any:
    """One load setting validated (UsageError otherwise); None passes for nullable ones."""
    return LOAD[name].validate(value)
