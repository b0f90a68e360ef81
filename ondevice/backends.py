"""Which compute backends and devices the installed llama.cpp has, and which one a model runs on.

`probe()` gathers the facts (platform, backends compiled in, devices with their memory) from
ggml's registry (`ondevice._native.devices`); `choose()` turns a user's `backend=`/`gpu_layers=`
into a `Placement` from those facts alone, so the selection logic is tested with simulated
probes (a Mac with Metal, a PC with two Vulkan GPUs) on any machine.

Choosing: `auto` is Metal on Apple Silicon, else a hardware GPU (Vulkan, CUDA...) if one is
present, else the CPU; `cpu`, `metal`, `vulkan`, `vulkan:N` ask for one explicitly. A backend
that isn't compiled in is an error that says how to reinstall the binding with it; a backend
that is compiled in but finds no usable device falls back to the CPU with a note (or raises,
with `fallback=False`).
"""

from __future__ import annotations

import logging
import platform
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from ondevice import fit, policy, system
from ondevice._native import binding
from ondevice._native import devices as native_devices
from ondevice._native.log import offloaded_layers  # noqa: F401 - part of this module's API
from ondevice.errors import BackendUnavailable, UsageError
from ondevice.gguf_header import GGUFHeader

log = logging.getLogger(__name__)

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
class Device(native_devices.DeviceInfo):
    """One ggml device (index in the registry, name, type, backend's registry name, memory),
    with what `choose()` asks of it."""

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


# --- the facts, from ggml's registry ------------------------------------------------------------
def registered_backends() -> list[str]:
    """Names of the ggml backends that initialised in this process ("CPU", "Vulkan", "MTL")."""
    return native_devices.registered_backends()


def compiled_backends() -> list[str]:
    """GPU backends built into the installed binding, from the libraries it ships
    (libggml-vulkan.so, libggml-metal.dylib, ...): present even when the backend found no
    device or its driver failed to initialise, unlike `registered_backends()`."""
    names = native_devices.library_names()
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
    return [Device(**vars(d)) for d in native_devices.devices()]


def device_handle(index: int) -> int:
    """The ggml_backend_dev_t of registry device `index`, as an address for llama.cpp."""
    return native_devices.device_handle(index)


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
    compiled = compiled_backends()
    wanted = ["metal"] if sys.platform == "darwin" else ["vulkan", "cuda"]
    return {
        "version": binding.version(),
        "system_info": binding.system_info(),
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


# --- per-backend settings ---------------------------------------------------------------------
def attention_settings(
    arch: str,
    placement: Placement,
    flash_attn: str = "auto",
    kv_type: str = "f16",
    head_dims: tuple[int, ...] = (),
) -> policy.AttentionSettings:
    """`ondevice.policy.attention_settings` for a placement (which says why)."""
    dims = (tuple(head_dims) + (0, 0))[:2]
    return policy.attention_settings(arch, placement.on_gpu, flash_attn, kv_type, dims)


# --- what ran -----------------------------------------------------------------------------------
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


def head_dims(header: GGUFHeader) -> tuple[int, int]:
    """The model's key and value head dimensions (what a quantized KV cache must divide)."""
    return header.head_dims


# --- everything `ondevice system` prints -------------------------------------------------------
@dataclass
class SystemInfo:
    os: str
    machine: str
    cpu_model: str
    cpu_features: list[str]
    cores_logical: int
    cores_physical: int
    cores_performance: int
    cores_efficiency: int
    core_split_source: str
    auto_threads: int
    ram_total_bytes: int
    ram_available_bytes: int
    llama_cpp_python: str
    llama_cpp_system_info: str
    backends: list[str]
    devices: list[dict[str, Any]]
    # Whether a load with default settings repacks weights into llama.cpp's interleaved layouts
    # (on, except on AMX builds), and which CPU family's layouts (ondevice.policy.REPACK_TYPES).
    repack: bool = False
    repack_family: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def system_info() -> SystemInfo:
    """Everything `ondevice system` prints; loads llama.cpp's library but no model."""
    topo = system.cpu_topology()
    mem = psutil.virtual_memory()
    build = build_info()
    return SystemInfo(
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        cpu_model=system.cpu_model(),
        cpu_features=system.cpu_features(),
        cores_logical=topo.logical,
        cores_physical=topo.physical,
        cores_performance=topo.n_performance,
        cores_efficiency=len(topo.efficiency),
        core_split_source=topo.source,
        auto_threads=system.auto_threads(),
        ram_total_bytes=mem.total,
        ram_available_bytes=mem.available,
        llama_cpp_python=build["version"],
        llama_cpp_system_info=build["system_info"],
        backends=build["backends"],
        devices=[d.to_dict() for d in devices()],
        repack=policy.repack_allowed(binding.amx_compiled())[0],
        repack_family=policy.repack_family(system.cpu_features()),
    )
