"""ggml's device registry through ctypes: which backends initialised, which devices they found,
and each device's memory.

The binding wraps llama.cpp's API but not ggml's registry, so the registry functions of the ggml
library that llama-cpp-python loads are typed and called here. Only facts come out
(`DeviceInfo`); choosing a device is `ondevice.backends`' job.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from ondevice._native.binding import lib_dir, llama
from ondevice.errors import BackendUnavailable

# ggml_backend_dev_type (ggml-backend.h)
DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class DeviceInfo:
    """One ggml device as its registry describes it."""

    index: int
    name: str  # e.g. "CPU", "Vulkan0", "MTL0"
    description: str
    type: str  # cpu | gpu | igpu | accel
    backend: str  # registry name: "CPU", "Vulkan", "MTL", "CUDA", ...
    memory_free: int
    memory_total: int


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """The ggml library that llama-cpp-python loaded, with the registry functions typed."""
    llama()  # llama.cpp's logging first, so device discovery logs go through it
    from llama_cpp import _ggml as binding_ggml

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


def library_names() -> set[str]:
    """File names in the binding's library folder (libggml-vulkan.so, ...), without loading."""
    folder = lib_dir()
    return {p.name for p in folder.iterdir()} if folder is not None else set()


def devices() -> list[DeviceInfo]:
    """Every device ggml can run on, with its free and total memory."""
    lib = _ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = lib.ggml_backend_dev_backend_reg(dev)
        out.append(
            DeviceInfo(
                index=i,
                name=_text(lib.ggml_backend_dev_name(dev)),
                description=_text(lib.ggml_backend_dev_description(dev)),
                type=DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
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
