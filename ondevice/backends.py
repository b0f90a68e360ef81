"""Which compute backends and devices the installed llama.cpp has, and which one a model runs on.

The binding has no wrapper for ggml's backend registry, so we call it with ctypes in the ggml
shared library that llama-cpp-python installs. Choosing: `auto` is Metal on Apple Silicon, else
a GPU (Vulkan, CUDA...) if one is present, else the CPU; `cpu`, `metal`, `vulkan`, `vulkan:N`
ask for one explicitly, and a backend that isn't compiled in is an error that says how to
reinstall the binding with it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

from ondevice.errors import BackendUnavailable

log = logging.getLogger(__name__)

# ggml_backend_dev_type
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}

REINSTALL = {
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
    "vulkan": 'CMAKE_ARGS="-DGGML_VULKAN=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python",
}


@dataclass(frozen=True)
class Device:
    """One ggml device: index in the registry, backend (registry) name, type and memory."""

    index: int
    name: str  # e.g. "CPU", "Vulkan0", "MTL0"
    description: str
    type: str  # cpu | gpu | igpu | accel
    backend: str  # registry name: "CPU", "Vulkan", "Metal", "CUDA", ...
    memory_free: int
    memory_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """The ggml library that llama-cpp-python loaded, with the registry functions typed."""
    from llama_cpp import _ggml as binding_ggml

    from ondevice import engine  # noqa: F401 - initialises llama.cpp's backends first

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


def registered_backends() -> list[str]:
    """Names of the ggml backends compiled into (or loaded by) the installed llama.cpp."""
    lib = _ggml()
    return [
        lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
        for i in range(lib.ggml_backend_reg_count())
    ]


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
                name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                type=_DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=(lib.ggml_backend_reg_name(reg) or b"").decode(errors="replace")
                if reg
                else "",
                memory_free=free.value,
                memory_total=total.value,
            )
        )
    return out


def build_info() -> dict[str, Any]:
    """How the installed binding was built: version, llama.cpp's system info, backends."""
    import llama_cpp

    from ondevice import engine

    engine.init_backend()
    return {
        "version": getattr(llama_cpp, "__version__", "unknown"),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "backends": registered_backends(),
    }


@dataclass(frozen=True)
class Placement:
    """Where a model runs: the backend family, the device's name and how many layers offload."""

    backend: str  # "cpu", "metal", "vulkan", ...
    device: str  # what Stats.backend shows: "CPU" or the GPU's description
    n_gpu_layers: int  # -1 = all
    main_gpu: int = 0


def _gpu_devices(family: str | None = None) -> list[Device]:
    gpus = [d for d in devices() if d.type in ("gpu", "igpu")]
    if family:
        gpus = [d for d in gpus if d.backend.lower() == family]
    return gpus


def choose(backend: str = "auto", gpu_layers: int | str = "auto") -> Placement:
    """Resolve a user's `backend=` to a concrete placement, or raise BackendUnavailable."""
    want = backend.lower().strip()
    layers = -1 if gpu_layers in ("auto", "all", None) else int(gpu_layers)
    if want == "cpu":
        return Placement("cpu", "CPU", 0)
    family, _, index = want.partition(":")
    if want == "auto":
        if sys.platform == "darwin" and platform.machine() == "arm64":
            metal = _gpu_devices("metal")
            if metal:
                return Placement("metal", metal[0].description or metal[0].name, layers)
        gpus = _gpu_devices()
        if gpus:
            return Placement(
                gpus[0].backend.lower(), gpus[0].description or gpus[0].name, layers, main_gpu=0
            )
        return Placement("cpu", "CPU", 0)
    if family not in ("metal", "vulkan", "cuda"):
        raise BackendUnavailable(
            f"unknown backend {backend!r}", hint="use auto, cpu, metal, vulkan or vulkan:N"
        )
    compiled = [b.lower() for b in registered_backends()]
    if family not in compiled:
        raise BackendUnavailable(
            f"backend {family!r} is not compiled into the installed llama-cpp-python "
            f"(it has: {', '.join(compiled) or 'none'})",
            hint=f"reinstall it with: {REINSTALL[family]}",
        )
    gpus = _gpu_devices(family)
    if not gpus:
        raise BackendUnavailable(
            f"backend {family!r} is compiled in but finds no device",
            hint="check the GPU driver, or use --backend cpu",
        )
    i = int(index) if index else 0
    if not 0 <= i < len(gpus):
        raise BackendUnavailable(
            f"{family} device {i} does not exist ({len(gpus)} found)",
            hint=f"use {family}:0 to {family}:{len(gpus) - 1}",
        )
    return Placement(family, gpus[i].description or gpus[i].name, layers, main_gpu=i)
