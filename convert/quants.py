"""Quantizing blocks of f32 rows: with llama.cpp's own `ggml_quantize_chunk` when the engine's
ggml library is installed (`ondevice._native.ggml_quants`), else with gguf-py's numpy port
(`gguf.quants`).

Both give the same bytes (gguf-py's Q8_0 is written to be bit-exact with ggml's reference, and
the tests check it); the C one is ~10x faster and releases the GIL, which is what makes a
2.8B-parameter Q8_0 conversion I/O-bound. Set ONDEVICE_CONVERT_QUANTIZER=numpy to force gguf-py.
"""

from __future__ import annotations

import gguf
import numpy as np

from ondevice._native import ggml_quants

# The types ggml_quantize_chunk handles without an importance matrix that we write.
ENGINE_TYPES = frozenset({gguf.GGMLQuantizationType.Q8_0})


def quantize(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """f32 rows (2-D, C-contiguous) → the rows' bytes in `qtype`, as a uint8 array."""
    if qtype not in ENGINE_TYPES or not ggml_quants.available():
        return gguf.quants.quantize(rows, qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    written = ggml_quants.quantize_rows(rows, int(qtype), out)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def engine_available() -> bool:
    return ggml_quants.available()
