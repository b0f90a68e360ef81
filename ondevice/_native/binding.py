"""Loads llama-cpp-python's binding once, initialises llama.cpp, and answers facts about the build.

The binding's import loads libllama, libggml and the OpenMP runtime; nothing in ondevice imports
it at module level, so a process pays for it only when it first needs llama.cpp (`llama()`).
An environment variable the OpenMP runtime reads (GOMP_SPINCOUNT, which `ondevice.load()` sets
unless asked not to) must be set before that first call.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import threading
from pathlib import Path
from types import ModuleType

from ondevice._native import log as native_log

log = logging.getLogger(__name__)

_lock = threading.Lock()
_llama: ModuleType | None = None


def llama(*, route_log: bool = True) -> ModuleType:
    """The binding's ctypes module (`llama_cpp.llama_cpp`), llama.cpp initialised.

    With `route_log` (the first call decides) llama.cpp's log goes to Python logging (logger
    `ondevice.llama_cpp`, debug level) instead of stderr; the quantizer's worker process keeps
    it on stderr, where its parent reads progress.
    """
    global _llama
    if _llama is not None:
        return _llama
    with _lock:
        if _llama is None:
            import llama_cpp.llama_cpp as L  # the one import of the binding's C API

            if route_log:
                native_log.install(L)
            L.llama_backend_init()
            _llama = L
    return _llama


def loaded() -> bool:
    """Whether this process has loaded llama.cpp (through us or anyone else)."""
    return _llama is not None or "llama_cpp.llama_cpp" in sys.modules


def version() -> str:
    """llama-cpp-python's version, without loading llama.cpp when it isn't loaded yet."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("llama_cpp_python")
    except PackageNotFoundError:
        return "unknown"


def lib_dir() -> Path | None:
    """The folder of the binding's shared libraries, found without importing it."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if not spec or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "lib"
        if candidate.is_dir():
            return candidate
    return None


def system_info() -> str:
    """llama.cpp's own one-line description of the build ("CPU : SSE3 = 1 | AVX = 1 | ...")."""
    return llama().llama_print_system_info().decode(errors="replace").strip()


@functools.cache
def amx_compiled() -> bool:
    """Whether the installed llama.cpp was built with its AMX kernels (-march=native on an Intel
    Xeon with AMX). Loads llama.cpp; `amx_compiled_without_loading` answers from the files."""
    return "AMX_INT8 = 1" in system_info()  # the rule itself: ondevice.policy.has_amx_kernels


@functools.cache
def amx_compiled_without_loading() -> bool | None:
    """The same question answered from the CPU backend's shared library, without loading it:
    a build with the AMX kernels holds their buffer type's name ("AMX" beside ggml's AMX
    functions). None when the library can't be found or read (a static build)."""
    folder = lib_dir()
    if folder is None:
        return None
    found = [p for p in folder.iterdir() if p.name.startswith(("libggml-cpu", "ggml-cpu"))]
    if not found:
        return None
    try:
        data = b"".join(p.read_bytes() for p in found)
    except OSError:
        return None
    return b"ggml_backend_amx_buffer_type" in data or b"ggml_amx_init" in data
