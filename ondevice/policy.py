"""The defaults that depend on the machine or the model, decided in one place: the context length,
flash attention, weight repacking (and the AMX rule), and which KV cache types a model allows.

Pure functions of facts passed in (the header's dimensions, the CPU's features, whether the
llama.cpp build has AMX kernels, where the model runs), so `ondevice fit` and `info` can ask
them without loading llama.cpp, and tests can ask them for any machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ondevice.errors import UsageError
from ondevice.settings import KV_TYPES

# --- the context ------------------------------------------------------------------------------
DEFAULT_CTX = 4096


def default_ctx(trained: int) -> int:
    """The context a load gets when none is asked for: 4096 tokens, or the model's trained
    context when that is smaller (a longer one would only hold positions it never saw)."""
    return min(DEFAULT_CTX, trained) if trained and trained > 0 else DEFAULT_CTX


# --- weight repacking --------------------------------------------------------------------------
ALLOW_AMX_ENV = "ONDEVICE_ALLOW_AMX"
AMX_NOTE = (
    "weight repacking off: this llama.cpp build has AMX kernels, which crash on this machine "
    f"class (set {ALLOW_AMX_ENV}=1 to try)"
)

# Weight types llama.cpp's CPU backend repacks, by CPU family (ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type), each with the row multiple its interleaved layout needs
# (ARM: 4 rows for Q4_0/Q8_0/IQ4_NL/MXFP4, 8 for the K-quants; the same with dotprod or i8mm).
_X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
REPACK_TYPES: dict[str, dict[str, int]] = {
    "x86_avx2": _X86_AVX2,
    "x86_avx512": {**_X86_AVX2, "Q2_K": 8},
    "arm_dotprod": {
        "Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4,
    },
    "none": {},
}  # fmt: skip


UNALIGNED_NOTE = (
    "read without mmap: the file's general.alignment leaves tensors at addresses ggml can't "
    "use mapped"
)


def has_amx_kernels(system_info: str) -> bool:
    """The AMX rule on llama.cpp's system-info line: only an x86 build compiled with AMX says
    `AMX_INT8 = 1`. ARM builds (NEON, dotprod, i8mm, SVE) never do, so they keep repacking,
    which is where their Q4_0/Q4_K speed comes from."""
    return "AMX_INT8 = 1" in system_info


def amx_build_likely(cpu_features: Iterable[str]) -> bool:
    """Whether llama.cpp as built here most likely has AMX kernels, from the CPU's flags alone:
    the binding compiles llama.cpp for the host CPU (-march=native), so a CPU that reports
    amx_int8 gets them. The loader asks the library itself (`_native.binding.amx_compiled`)."""
    return "amx_int8" in set(cpu_features)


def repack_allowed(amx_build: bool, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether weight repacking may be on, and why not.

    llama.cpp reaches its AMX kernels only through repacking ("extra buffer types"), and on the
    Sapphire Rapids VMs this project was tested on they died with SIGILL/SIGSEGV on the first
    matrix multiply, taking the process down. So AMX builds load with repacking off unless the
    user insists with ONDEVICE_ALLOW_AMX=1. Elsewhere (ARM builds included, where repacking is
    what makes Q4_0 fast) it is on, as in llama.cpp.
    """
    env = os.environ if env is None else env
    if amx_build and env.get(ALLOW_AMX_ENV) != "1":
        return False, AMX_NOTE
    return True, ""


def repack_family(cpu_features: Iterable[str]) -> str:
    """Which of REPACK_TYPES this CPU's llama.cpp build would use."""
    feats = set(cpu_features)
    if "avx512f" in feats:
        return "x86_avx512"
    if "avx2" in feats:
        return "x86_avx2"
    if "asimddp" in feats or "i8mm" in feats:
        return "arm_dotprod"
    return "none"


def repack_here(cpu_features: Iterable[str]) -> tuple[bool, str]:
    """(whether a default load repacks weights, which kernels would) on a CPU with these
    features, answered without loading llama.cpp (for `ondevice fit`, `info` and bench's
    profiles; the loader asks the library itself)."""
    feats = list(cpu_features)
    return repack_allowed(amx_build_likely(feats))[0], repack_family(feats)


# --- KV cache types ----------------------------------------------------------------------------
def kv_type_problem(head_dims: tuple[int, int], kv_type: str, arch: str = "") -> str | None:
    """Why llama.cpp would refuse this KV cache type for heads of (K, V) width, or None.

    A quantized cache stores rows in blocks of 32 values; llama.cpp refuses it when a head's
    width is not a multiple of the block (Phi-2: head size 80)."""
    if kv_type not in KV_TYPES:
        return f"unknown KV cache type {kv_type!r} (use {', '.join(KV_TYPES)})"
    block = KV_TYPES[kv_type].block
    for name, width in zip(("K", "V"), head_dims, strict=True):
        if width and width % block:
            model = f" of this model ({arch})" if arch else ""
            return (
                f"{kv_type} {name} cache blocks of {block} do not divide the head size "
                f"{width}{model}"
            )
    return None


def check_kv_type(head_dims: tuple[int, int], kv_type: str, arch: str = "") -> None:
    """UsageError (one line, before llama.cpp fails the context) for a KV type the model can't
    use."""
    if kv_type not in KV_TYPES:
        raise UsageError(
            f"unknown KV cache type {kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}"
        )
    if kv_type_problem(head_dims, kv_type) is not None:
        bad = next(d for d in head_dims if d and d % KV_TYPES[kv_type].block)
        raise UsageError(
            f"{arch or 'this model'} cannot use a {kv_type} KV cache: its head dimension {bad} "
            f"is not a multiple of {KV_TYPES[kv_type].block}",
            hint="use --kv-type f16 (or bf16/f32)",
        )


# --- attention -------------------------------------------------------------------------------
# Architectures whose attention scores overflow f16 (HF upcasts Q and K for Phi-2).
F16_OVERFLOW_ARCHS = frozenset({"phi2"})


@dataclass(frozen=True)
class AttentionSettings:
    flash_attn: str  # auto | on | off, what llama.cpp gets
    offload_kqv: bool
    notes: tuple[str, ...] = ()


def flash_attn_on_cpu(kv_type: str, asked: str = "auto") -> bool:
    """Whether attention runs fused on the CPU: as asked, and for "auto" only with a quantized
    KV cache, which needs it (see `attention_settings`)."""
    if asked != "auto":
        return asked == "on"
    return KV_TYPES.get(kv_type, KV_TYPES["f16"]).quantized


def attention_settings(
    arch: str,
    on_gpu: bool,
    flash_attn: str = "auto",
    kv_type: str = "f16",
    head_dims: tuple[int, int] = (0, 0),
) -> AttentionSettings:
    """The KV-cache and flash-attention settings a backend needs for an architecture.

    - offload_kqv is always on: with it off the KV cache and the attention stay on the CPU,
      and Phi-2 produced garbage on CUDA that way (llama.cpp issue #4437).
    - Phi-2's attention scores overflow f16. llama.cpp (0.3.36's vendored tree) asks for f32
      accumulation of K*Q on every backend, with and without flash attention, and the GPU
      kernels honour it (Vulkan: f32acc when the op's precision is F32; Metal: scores in
      float). The CPU's flash-attention kernel, though, accumulates softmax*V in f16 when the
      V cache is f16 (ggml-cpu ops.cpp, VKQ16), so for these architectures on the CPU
      flash_attn="auto" means off.
    - On the CPU, "auto" means off for every architecture whose KV cache is not quantized:
      llama.cpp's CPU flash-attention kernel (0.3.36) makes decoding deep in a context about
      twice as slow (llama-bench, demo model, 2 threads: tg32 at depth 1500 45 t/s off vs 20 on;
      chat turn 10 TTFT 139 vs 261 ms), for a few percent of prompt speed at depth 0. A
      quantized V cache needs flash attention, so there "auto" stays llama.cpp's (on).
      `ondevice tune` measures both and may store "on" for a prompt-heavy workload.
    - A quantized KV cache needs head dimensions divisible by the type's block (Phi-2's 80 is
      not: q8_0/q4_0 fail), so it is refused here with a one-line error instead of letting
      llama.cpp fail the context.
    """
    check_kv_type(head_dims, kv_type, arch)
    notes: list[str] = []
    quantized = KV_TYPES[kv_type].quantized
    fa = flash_attn
    if not on_gpu and flash_attn == "auto" and not quantized:
        fa = "off"
    if arch in F16_OVERFLOW_ARCHS and not on_gpu and kv_type != "f32" and flash_attn == "on":
        notes.append(
            f"flash attention on the CPU accumulates {arch}'s attention in f16, which can "
            "overflow; use --flash-attn auto (off) or --kv-type f32"
        )
    return AttentionSettings(flash_attn=fa, offload_kqv=True, notes=tuple(notes))


# --- OpenMP ----------------------------------------------------------------------------------
# In the binding's OpenMP build ggml's barriers between graph nodes are `omp barrier`s, hundreds
# per token, and what a waiting thread does there is libgomp's wait policy. Spinning for long
# (libgomp's default, 300000 spins, or ACTIVE) steals the cores the next token needs when they
# are shared: with the demo model on 2 busy cores we measured 1.8 tok/s spinning vs 14 passive.
# Sleeping at once (PASSIVE) costs a futex wake-up per barrier, which is cheap on some machines
# and ruinous on others: on a 2-core AMD EPYC VM, llama-bench tg on the demo model at 2 threads
# gave 32-36 tok/s PASSIVE vs 100-108 with libgomp's default spin, while on the Intel VM of
# benchmarks/RESULTS.md the two were level. A short spin before sleeping gets both: 108 tok/s
# quiet and, with two busy loops on the same cores, 34-39 tok/s vs PASSIVE's 18-34
# (benchmarks/RESULTS.md, "OpenMP wait"). GOMP_SPINCOUNT is libgomp's (the Linux wheels'); an
# OpenMP runtime that doesn't read it keeps its own default.
OMP_ENV = {"GOMP_SPINCOUNT": "300"}
OMP_USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_omp_wait(env: dict[str, str] | None = None) -> bool:
    """Give llama.cpp's OpenMP threads a short spin before they sleep at a barrier (OMP_ENV),
    unless the user chose a wait policy or spin count; True if it was set. Must happen before
    llama.cpp's libraries load (later it changes nothing)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    if any(k in env for k in OMP_USER_KEYS):
        return False
    env.update(OMP_ENV)
    return True
