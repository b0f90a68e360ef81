"""llama.cpp's file quantizer (`llama_model_quantize`) and the list of file types it offers.

`run(job)` is what the quantizer's worker process calls (ondevice.quantize._worker): llama.cpp
logs to that process's stderr, where the parent reads progress. `file_types()` reads the
binding's LLAMA_FTYPE_* constants, so a newer llama.cpp brings its new types along.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

from ondevice._native.binding import llama


def file_types() -> dict[str, int]:
    """llama.cpp's file types by name (`Q4_K_M` -> its llama_ftype value)."""
    L = llama(route_log=False)
    found: dict[str, int] = {}
    for attr in dir(L):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            found[attr[len("LLAMA_FTYPE_MOSTLY_") :]] = int(getattr(L, attr))
        elif attr == "LLAMA_FTYPE_ALL_F32":
            found["F32"] = int(getattr(L, attr))
    return found


def _imatrix_params(L: Any, data: dict[str, Any]) -> tuple[Any, list[object]]:
    """(array of llama_model_imatrix_data, things to keep alive) from per-tensor weights."""
    keep: list[object] = []
    arr = (L.llama_model_imatrix_data * (len(data) + 1))()
    for i, (name, values) in enumerate(data.items()):
        name_b = name.encode()
        keep.extend((name_b, values))
        arr[i].name = name_b
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(data)].name = None  # terminator
    return arr, keep


def _kv_overrides(L: Any, items: list[tuple[str, object]]) -> Any:
    """A terminated llama_model_kv_override array (metadata llama-quantize also writes)."""
    arr = (L.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items):
        arr[i].key = key.encode()[:127]
        if isinstance(value, str):
            arr[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = value.encode()[:127]
        else:
            arr[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = int(value)
    arr[len(items)].key = b""
    return arr


def run(job: dict[str, Any], imatrix: dict[str, Any] | None = None) -> tuple[int, float]:
    """Quantize job["src"] into job["dst"] as job["ftype"]; returns (llama.cpp's return code,
    seconds). `imatrix` maps tensor names to float32 importance weights."""
    L = llama(route_log=False)
    params = L.llama_model_quantize_default_params()
    params.ftype = int(job["ftype"])
    params.nthread = int(job.get("threads") or 0)
    params.allow_requantize = bool(job.get("allow_requantize"))
    keep: list[object] = []
    if imatrix:
        arr, alive = _imatrix_params(L, imatrix)
        keep.extend((arr, alive))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
        kvo = _kv_overrides(
            L,
            [
                ("quantize.imatrix.file", job["imatrix"]),
                ("quantize.imatrix.entries_count", len(imatrix)),
            ],
        )
        keep.append(kvo)
        params.kv_overrides = ctypes.cast(kvo, ctypes.POINTER(L.llama_model_kv_override))
    t0 = time.perf_counter()
    rc = L.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    return int(rc), time.perf_counter() - t0
