"""Quantizing blocks of f32 rows: with llama.cpp's own `ggml_quantize_chunk` when the engine's
ggml library is installed, else with gguf-py's numpy port (`gguf.quants`).

Both give the same bytes (gguf-py's Q8_0 is written to be bit-exact with ggml's reference, and
the tests check it); the C one is ~10x faster and releases the GIL, which is what makes a
2.8B-parameter Q8_0 conversion I/O-bound. Only the small ggml base library is loaded, through
ctypes, without importing llama_cpp: no model, no backend, nothing of the runtime.
Set ONDEVICE_CONVERT_QUANTIZER=numpy to force gguf-py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from functools import cache
from pathlib import Path

import gguf
import numpy as np

logger = logging.getLogger(__name__)

# The types ggml_quantize_chunk handles without an importance matrix that we write.
ENGINE_TYPES = frozenset({gguf.GGMLQuantizationType.Q8_0})


def quantize(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """f32 rows (2-D, C-contiguous) → the rows' bytes in `qtype`, as a uint8 array."""
    ggml = _ggml() if qtype in ENGINE_TYPES else None
    if ggml is None:
        return gguf.quants.quantize(rows, qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    written = ggml.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def engine_available() -> bool:
    return _ggml() is not None


@cache
def _ggml() -> ctypes.CDLL | None:
    if os.environ.get("ONDEVICE_CONVERT_QUANTIZER", "").lower() == "numpy":
        return None
    for path in _candidates():
        try:
            lib = ctypes.CDLL(str(path))
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
        logger.debug("quantizing with %s", path)
        return lib
    logger.debug("llama.cpp's ggml library not found; quantizing with gguf-py (slower)")
    return None


def _candidates() -> list[Path]:
    names = {"darwin": ["libggml-base.dylib"], "win32": ["ggml-base.dll"]}.get(
        sys.platform, ["libggml-base.so"]
    )
    dirs = []
    if os.environ.get("LLAMA_CPP_LIB_PATH"):  # the binding's own override
        dirs.append(Path(os.environ["LLAMA_CPP_LIB_PATH"]))
    try:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
    return [d / n for d in dirs for n in names if (d / n).is_file()]
