"""ggml's row quantizer (`ggml_quantize_chunk`) for the converter, from the small ggml base
library that llama-cpp-python installs, through ctypes, without importing the binding: no model,
no backend, nothing of llama.cpp's context code. None when the library isn't there (the
converter then uses gguf-py's numpy port). Set ONDEVICE_CONVERT_QUANTIZER=numpy to force that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np

from ondevice._native.binding import lib_dir

log = logging.getLogger(__name__)


def quantize_rows(rows: np.ndarray, qtype: int, out: np.ndarray) -> int:
    """Quantize C-contiguous f32 `rows` (2-D) into `out` (uint8) as ggml type `qtype`;
    returns the bytes written. Call only when `available()`."""
    lib = _ggml_base()
    assert lib is not None
    n_rows, n_per_row = rows.shape
    return lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None
    )


def available() -> bool:
    return _ggml_base() is not None


@cache
def _ggml_base() -> ctypes.CDLL | None:
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
        log.debug("quantizing with %s", path)
        return lib
    log.debug("llama.cpp's ggml library not found; quantizing with gguf-py (slower)")
    return None


def _candidates() -> list[Path]:
    names = {"darwin": ["libggml-base.dylib"], "win32": ["ggml-base.dll"]}.get(
        sys.platform, ["libggml-base.so"]
    )
    dirs = []
    if os.environ.get("LLAMA_CPP_LIB_PATH"):  # the binding's own override
        dirs.append(Path(os.environ["LLAMA_CPP_LIB_PATH"]))
    folder = lib_dir()
    if folder is not None:
        dirs.append(folder)
    return [d / n for d in dirs for n in names if (d / n).is_file()]


def forget() -> None:
    """Look the library up again on next use (after ONDEVICE_CONVERT_QUANTIZER changed)."""
    _ggml_base.cache_clear()
