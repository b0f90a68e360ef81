"""Which compute backends and devices the installed llama.cpp has, and which one a model runs on.

The binding has no wrapper for ggml's backend registry, so we call it with ctypes in the ggml
shared library that llama-cpp-python installs. `probe()` gathers the facts (platform, backends
compiled in, devices with their memory); `choose()` turns a user's `backend=`/`gpu_layers=`
into a `Placement` from those facts alone, so the selection logic is tested with simulated
probes (a Mac with Metal, a PC with two Vulkan GPUs) on any machine.

Choosing: `auto` is Metal on Apple Silicon, else a hardware GPU (Vulkan, CUDA...) if one is
present, else the CPU; `cpu`, `metal`, `vulkan`, `vulkan:N` ask for one explicitly. A backend
that isn't compiled in is an error that says how to reinstall the binding with it; a backend
that is compiled in but finds no usable device falls back to the CPU with a note (or raises,
with `fallback=False`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ondevice.errors import BackendUnavailable, UsageError

if TYPE_CHECKING:
    from ondevice.gguf_check import GGUFHeader

log = logging.getLogger(__name__)

# ggml_backend_dev_type (ggml-backend.h)
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

# Our backend names -> ggml registry names (Metal registers as "MTL"; older builds "Metal").
FAMILIES: dict[str, tuple[str, ...]] = {
    "metal": ("MTL", "Metal"),
    "vulkan": ("Vulkan",),
    "cuda": ("CUDA",),
}
# Shared libraries that llama-cpp-python installs per compiled-in backend (libggml-<x>.so).
_LIBRARY_NAMES = {"metal": "metal", "vulkan": "vulkan", "cuda": "cuda"}

_REINSTALL_FLAGS = {
    "metal": "-DGGML_METAL=on",
    "vulkan": "-DGGML_VULKAN=on",
    "cuda": "-DGGML_CUDA=on",
}
REINSTALL = {
    family: f'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir llama-cpp-python'
    for family, flag in _REINSTALL_FLAGS.items()
}

# Vulkan drivers that run on the CPU (Mesa's lavapipe shows as "llvmpipe"). They are real
# Vulkan devices, good for testing, but slower than llama.cpp's own CPU backend, so `auto`
# never picks them; `vulkan` does when asked.
_SOFTWARE_DEVICE = re.compile(r"llvmpipe|lavapipe|swiftshader|softpipe", re.IGNORECASE)

# Memory left free on the device when sizing gpu_layers="auto": the driver's own allocations
# and fragmentation of the device heap are not in our arithmetic.
GPU_RESERVE_BYTES = 256 * 1024 * 1024
GPU_RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class Device:
    """One ggml device: index in the registry, backend (registry) name, type and memory."""

    index: int
    name: str  # e.g. "CPU", "Vulkan0", "MTL0"
    description: str
    type: str  # cpu | gpu | igpu | accel
    backend: str  # registry name: "CPU", "Vulkan", "MTL", "CUDA", ...
    memory_free: int
    memory_total: int

    @property
    def family(self) -> str:
        """Our name for its backend: cpu, metal, vulkan, cuda (or the registry name, lowered)."""
        for family, names in FAMILIES.items():
            if self.backend in names:
                return family
        return self.backend.lower()

    @property
    def software(self) -> bool:
        """A Vulkan driver that emulates a GPU on the CPU (lavapipe)."""
        return bool(_SOFTWARE_DEVICE.search(self.description))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["family"] = self.family
        out["software"] = self.software
        return out


@dataclass(frozen=True)
class Probe:
    """The facts `choose()` decides from: the platform, what is compiled in, the devices."""

    platform: str  # sys.platform: "darwin", "linux", "win32"
    machine: str  # platform.machine(): "arm64", "x86_64", ...
    compiled: tuple[str, ...]  # our family names whose library is installed: ("vulkan",)
    registered: tuple[str, ...]  # ggml registry names that initialised: ("CPU", "Vulkan")
    devices: tuple[Device, ...]

    @property
    def apple_silicon(self) -> bool:
        return self.platform == "darwin" and self.machine == "arm64"


@dataclass(frozen=True)
class Placement:
    """Where a model runs: the backend family, the device and how many layers offload.

    device_index is the device's index in ggml's registry (None on the CPU); runtime passes
    that one device to llama.cpp, so `vulkan:1` means exactly that device and `cpu` means no
    GPU at all (not even for llama.cpp's offload of large CPU-side matrix products).
    """

    backend: str  # "cpu", "metal", "vulkan", ...
    device: str  # what Stats.backend shows: "CPU" or "Vulkan0 (llvmpipe ...)"
    n_gpu_layers: int  # -1 = all (and the output layer), 0 = none
    main_gpu: int = 0
    device_index: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def on_gpu(self) -> bool:
        return self.device_index is not None and self.n_gpu_layers != 0

    def with_note(self, note: str) -> Placement:
        return replace(self, notes=(*self.notes, note))


CPU = Placement("cpu", "CPU", 0)


# --- ggml's registry through ctypes -----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """The ggml library that llama-cpp-python loaded, with the registry functions typed."""
    from llama_cpp import _ggml as binding_ggml

    from ondevice import engine

    engine.init_backend()  # llama.cpp's logging first, so device discovery logs go through it
    lib = binding_ggml.libggml
    vp = ctypes.c_void_p
    sigs = {
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], vp),
        "ggml_backend_dev_name": ([vp], ctypes.c_char_p),
        "ggml_backend_dev_description": ([vp], ctypes.c_char_p),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
        "ggml_backend_dev_memory": (
            [vp, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
            None,
        ),
        "ggml_backend_dev_backend_reg": ([vp], vp),
        "ggml_backend_reg_count": ([], ctypes.c_size_t),
        "ggml_backend_reg_get": ([ctypes.c_size_t], vp),
        "ggml_backend_reg_name": ([vp], ctypes.c_char_p),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def _text(value: bytes | None) -> str:
    return (value or b"").decode(errors="replace")


def registered_backends() -> list[str]:
    """Names of the ggml backends that initialised in this process ("CPU", "Vulkan", "MTL")."""
    lib = _ggml()
    return [
        _text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
        for i in range(lib.ggml_backend_reg_count())
    ]


def compiled_backends() -> list[str]:
    """GPU backends built into the installed binding, from the libraries it ships
    (libggml-vulkan.so, libggml-metal.dylib, ...): present even when the backend found no
    device or its driver failed to initialise, unlike `registered_backends()`."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = {p.name for p in lib_dir.iterdir()} if lib_dir.is_dir() else set()
    found = []
    for family, stem in _LIBRARY_NAMES.items():
        if any(n.startswith((f"libggml-{stem}.", f"ggml-{stem}.")) for n in names):
            found.append(family)
    registered = set(registered_backends())
    for family, reg_names in FAMILIES.items():  # statically linked builds have no such file
        if family not in found and registered & set(reg_names):
            found.append(family)
    return found


def devices() -> list[Device]:
    """Every device ggml can run on, with its free and total memory."""
    lib = _ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = lib.ggml_backend_dev_backend_reg(dev)
        out.append(
            Device(
                index=i,
                name=_text(lib.ggml_backend_dev_name(dev)),
                description=_text(lib.ggml_backend_dev_description(dev)),
                type=_DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=_text(lib.ggml_backend_reg_name(reg)) if reg else "",
                memory_free=free.value,
                memory_total=total.value,
            )
        )
    return out


def device_handle(index: int) -> int:
    """The ggml_backend_dev_t of registry device `index`, as an address for llama.cpp."""
    lib = _ggml()
    if not 0 <= index < lib.ggml_backend_dev_count():
        raise BackendUnavailable(f"ggml has no device {index}")
    return int(lib.ggml_backend_dev_get(index))


def probe() -> Probe:
    """The real facts of this process: platform, compiled and registered backends, devices."""
    return Probe(
        platform=sys.platform,
        machine=platform.machine(),
        compiled=tuple(compiled_backends()),
        registered=tuple(registered_backends()),
        devices=tuple(devices()),
    )


def build_info() -> dict[str, Any]:
    """How the installed binding was built: version, llama.cpp's system info, backends, and
    the reinstall command for each GPU backend this platform could use but lacks."""
    import llama_cpp

    from ondevice import engine

    engine.init_backend()
    compiled = compiled_backends()
    wanted = ["metal"] if sys.platform == "darwin" else ["vulkan", "cuda"]
    return {
        "version": getattr(llama_cpp, "__version__", "unknown"),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "backends": registered_backends(),
        "gpu_backends_compiled": compiled,
        "reinstall": {f: REINSTALL[f] for f in wanted if f not in compiled},
    }


# --- choosing -----------------------------------------------------------------------------------
def _label(dev: Device) -> str:
    return f"{dev.name} ({dev.description})" if dev.description else dev.name


def _gpus(p: Probe, family: str | None = None) -> list[Device]:
    gpus = [d for d in p.devices if d.type in ("gpu", "igpu")]
    if family:
        gpus = [d for d in gpus if d.family == family]
    return gpus


def parse_backend(backend: str) -> tuple[str, int | None]:
    """Parse `vulkan:1` into ("vulkan", 1) and `auto` into ("auto", None); UsageError on nonsense."""
    want = str(backend).lower().strip()
    family, sep, index = want.partition(":")
    if family not in ("auto", "cpu", *FAMILIES) or (sep and family in ("auto", "cpu")):
        raise UsageError(
            f"unknown backend {backend!r}", hint="use auto, cpu, metal, vulkan or vulkan:N"
        )
    if not sep:
        return family, None
    if not index.isdigit():
        raise UsageError(f"bad device index in {backend!r}", hint=f"use {family}:0, {family}:1...")
    return family, int(index)


def parse_gpu_layers(gpu_layers: int | str | None) -> int | None:
    """None for "auto"/"all"/None (decide from memory), else a count >= 0 (-1 = all)."""
    if gpu_layers is None or str(gpu_layers).lower() in ("auto", "all"):
        return None
    try:
        n = int(gpu_layers)
    except (TypeError, ValueError):
        raise UsageError(
            f"gpu_layers must be auto or a number, not {gpu_layers!r}", hint="e.g. --gpu-layers 20"
        ) from None
    if n < -1:
        raise UsageError(f"gpu_layers must be -1 (all), 0 or more, got {n}")
    return n


def choose(
    backend: str = "auto",
    gpu_layers: int | str | None = "auto",
    *,
    header: GGUFHeader | None = None,
    n_ctx: int = 4096,
    kv_type: str = "f16",
    n_ubatch: int = 512,
    fallback: bool = True,
    probe_data: Probe | None = None,
) -> Placement:
    """Resolve a user's `backend=` and `gpu_layers=` to a concrete placement.

    backend     auto | cpu | metal | vulkan | vulkan:N | cuda (N counts that backend's GPUs).
    gpu_layers  "auto": every layer that fits the device's free memory (with `header`, by the
                arithmetic of ondevice.fit; without it, all); or a number (-1 = all).
    fallback    when the backend is compiled in but has no usable device, or the model fits
                no layer on it: True places it on the CPU with a note, False raises.
    probe_data  the facts to decide from (default: `probe()` of this process); tests pass
                simulated ones.

    Raises BackendUnavailable when the backend is not compiled into the installed binding
    (with the reinstall command), or when it has no usable device and fallback is False.
    """
    family, index = parse_backend(backend)
    layers = parse_gpu_layers(gpu_layers)
    if family == "cpu" or layers == 0:
        return CPU
    p = probe_data if probe_data is not None else probe()

    if family == "auto":
        dev = _auto_device(p)
        if dev is None:
            return CPU
        return _offload(dev, layers, header, n_ctx, kv_type, n_ubatch, fallback)

    if family not in p.compiled:
        raise BackendUnavailable(
            f"backend {family!r} is not compiled into the installed llama-cpp-python "
            f"(it has: {', '.join(['cpu', *p.compiled])})",
            hint=f"reinstall it with: {REINSTALL[family]}",
        )
    gpus = _gpus(p, family)
    i = index or 0
    if not gpus or i >= len(gpus):
        if not gpus:
            why = f"{family} is compiled in but finds no usable device"
            hint = "check the GPU driver (ondevice system lists the devices), or use --backend cpu"
        else:
            why = f"{family} device {i} does not exist ({len(gpus)} found)"
            hint = f"use {family}:0 to {family}:{len(gpus) - 1}"
        if not fallback:
            raise BackendUnavailable(why, hint=hint)
        log.warning("%s; running on the CPU", why)
        return CPU.with_note(f"{why}; ran on the CPU instead")
    return _offload(gpus[i], layers, header, n_ctx, kv_type, n_ubatch, fallback)


def _auto_device(p: Probe) -> Device | None:
    """Metal on Apple Silicon; else a hardware GPU (discrete before integrated); else None."""
    if p.apple_silicon:
        metal = _gpus(p, "metal")
        if metal:
            return metal[0]
    hardware = [d for d in _gpus(p) if not d.software]
    hardware.sort(key=lambda d: (d.type != "gpu", d.family != "vulkan", d.index))
    return hardware[0] if hardware else None


def _offload(
    dev: Device,
    layers: int | None,
    header: GGUFHeader | None,
    n_ctx: int,
    kv_type: str,
    n_ubatch: int,
    fallback: bool,
) -> Placement:
    # main_gpu stays 0: runtime passes llama.cpp this one device, the only one it then sees.
    placement = Placement(dev.family, _label(dev), -1, device_index=dev.index)
    if layers is not None:
        return replace(placement, n_gpu_layers=layers)
    if header is None or dev.memory_free <= 0:
        return placement
    n = layers_that_fit(header, dev.memory_free, n_ctx, kv_type, n_ubatch)
    n_layer = int(header.arch_value("block_count", 0) or 0)
    if n == 0:
        why = (
            f"not one layer of the model fits {dev.name}'s "
            f"{dev.memory_free / 2**20:.0f} MiB free memory"
        )
        if not fallback:
            raise BackendUnavailable(why, hint="use --backend cpu, or a smaller model or context")
        log.warning("%s; running on the CPU", why)
        return CPU.with_note(f"{why}; ran on the CPU instead")
    if n != -1:
        placement = placement.with_note(
            f"{n}/{n_layer} layers fit {dev.name}'s free memory; the rest run on the CPU"
        )
    return replace(placement, n_gpu_layers=n)


# --- gpu_layers="auto": the fit arithmetic, per layer -----------------------------------------
def layer_bytes(header: GGUFHeader) -> tuple[list[int], int]:
    """Bytes of each repeating layer's weights (blk.N.*), and of the output part (everything
    but the token embeddings, which llama.cpp keeps on the CPU)."""
    n_layer = int(header.arch_value("block_count", 0) or 0)
    per_layer = [0] * n_layer
    output = 0
    for t in header.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) < n_layer:
            per_layer[int(m.group(1))] += t.n_bytes
        elif not t.name.startswith("token_embd"):
            output += t.n_bytes
    if not any(t.name.startswith("output.") for t in header.tensors):
        # Tied embeddings: llama.cpp puts a copy of token_embd on the output layer's device.
        output += sum(t.n_bytes for t in header.tensors if t.name.startswith("token_embd."))
    return per_layer, output


def layers_that_fit(
    header: GGUFHeader, free_bytes: int, n_ctx: int, kv_type: str = "f16", n_ubatch: int = 512
) -> int:
    """How many layers to offload into `free_bytes` of device memory: -1 when the whole model
    (every layer and the output) fits, else the count of layers (llama.cpp offloads the last
    ones) whose weights and KV cache fit next to the compute buffer; 0 when none does."""
    from ondevice import fit

    per_layer, output = layer_bytes(header)
    if not per_layer:
        return -1
    kv_per_layer = fit.kv_cache_bytes(header, n_ctx, kv_type) // len(per_layer)
    budget = free_bytes * (1 - GPU_RESERVE_FRACTION) - GPU_RESERVE_BYTES
    budget -= fit.compute_bytes(header, n_ctx, n_ubatch)
    if sum(per_layer) + kv_per_layer * len(per_layer) + output <= budget:
        return -1
    n, used = 0, 0
    for weights in reversed(per_layer):  # llama.cpp offloads the last n layers
        used += weights + kv_per_layer
        if used > budget:
            break
        n += 1
    return n


# --- per-backend settings (Phi-2's attention must not overflow in f16) ------------------------
@dataclass(frozen=True)
class AttentionSettings:
    flash_attn: str  # auto | on | off, what llama.cpp gets
    offload_kqv: bool
    notes: tuple[str, ...] = ()


# Architectures whose attention scores overflow f16 (HF upcasts Q and K for Phi-2).
F16_OVERFLOW_ARCHS = frozenset({"phi2"})


def attention_settings(
    arch: str,
    placement: Placement,
    flash_attn: str = "auto",
    kv_type: str = "f16",
    head_dims: tuple[int, ...] = (),
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
      not: q8_0/q4_0 fail), so we refuse it here with a one-line error instead of letting
      llama.cpp fail the context.
    """
    from ondevice import engine

    notes: list[str] = []
    block = engine.KV_TYPE_SIZES.get(kv_type, (1, 2))[0]
    if block > 1:
        bad = sorted({d for d in head_dims if d and d % block})
        if bad:
            raise UsageError(
                f"{arch} cannot use a {kv_type} KV cache: its head dimension {bad[0]} is not a "
                f"multiple of {block}",
                hint="use --kv-type f16 (or bf16/f32)",
            )
    fa = flash_attn
    if not placement.on_gpu and flash_attn == "auto" and block == 1:
        fa = "off"
    if arch in F16_OVERFLOW_ARCHS and not placement.on_gpu and kv_type != "f32":
        if flash_attn == "on":
            notes.append(
                f"flash attention on the CPU accumulates {arch}'s attention in f16, which can "
                "overflow; use --flash-attn auto (off) or --kv-type f32"
            )
    return AttentionSettings(flash_attn=fa, offload_kqv=True, notes=tuple(notes))


# --- what ran -----------------------------------------------------------------------------------
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def offloaded_layers(log_lines: list[str]) -> tuple[int, int] | None:
    """(offloaded, total) from llama.cpp's load log line "offloaded 31/31 layers to GPU"."""
    for line in reversed(log_lines):
        m = _OFFLOADED.search(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def describe(placement: Placement, offloaded: tuple[int, int] | None) -> str:
    """Stats.backend: "CPU", or the device with how much of the model it holds."""
    if not placement.on_gpu:
        return "CPU"
    if offloaded is None:
        return placement.device
    done, total = offloaded
    return f"{placement.device}, {done}/{total} layers offloaded"


def engine_devices(placement: Placement) -> list[int]:
    """The ggml devices llama.cpp may use for this placement: the chosen GPU, or none."""
    return [device_handle(placement.device_index)] if placement.on_gpu else []


def head_dims(header: GGUFHeader) -> tuple[int, ...]:
    """The model's key and value head dimensions (what a quantized KV cache must divide)."""

    def first(value: Any) -> int:
        return int(max(value)) if isinstance(value, list) and value else int(value or 0)

    n_embd = first(header.arch_value("embedding_length", 0))
    n_head = first(header.arch_value("attention.head_count", 0))
    k = first(header.arch_value("attention.key_length", 0)) or (n_embd // n_head if n_head else 0)
    v = first(header.arch_value("attention.value_length", 0)) or k
    return (k, v)
