"""The child process that runs llama.cpp's quantizer: `python -m ondevice.quantize._worker`.

`ondevice.quantize.quantize()` starts it so that a native abort inside llama.cpp kills this
process, not the caller (a desktop app, a REPL). It reads one JSON job from stdin, lets
llama.cpp log to stderr (the parent reads it for progress and error messages), calls
`llama_model_quantize` with `llama_model_quantize_default_params()` adjusted by the job, and
prints one JSON line with the outcome on stdout. Exit status 0 means the output file is
complete.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time


def _imatrix_params(L, path: str):
    """(array of llama_model_imatrix_data, things to keep alive) from an imatrix file."""
    from .imatrix import read_imatrix

    data = read_imatrix(path)
    keep: list[object] = []
    arr = (L.llama_model_imatrix_data * (len(data) + 1))()
    for i, (name, values) in enumerate(data.items()):
        name_b = name.encode()
        keep.extend((name_b, values))
        arr[i].name = name_b
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(data)].name = None  # terminator
    return arr, keep, len(data)


def _kv_overrides(L, items: list[tuple[str, object]]):
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


def run(job: dict) -> int:
    import llama_cpp.llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = int(job["ftype"])
    params.nthread = int(job.get("threads") or 0)
    params.allow_requantize = bool(job.get("allow_requantize"))
    keep: list[object] = []
    if job.get("imatrix"):
        arr, alive, n = _imatrix_params(L, job["imatrix"])
        keep.extend((arr, alive))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
        kvo = _kv_overrides(
            L,
            [("quantize.imatrix.file", job["imatrix"]), ("quantize.imatrix.entries_count", n)],
        )
        keep.append(kvo)
        params.kv_overrides = ctypes.cast(kvo, ctypes.POINTER(L.llama_model_kv_override))
    t0 = time.perf_counter()
    rc = L.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    sys.stdout.write(json.dumps({"rc": int(rc), "seconds": seconds}) + "\n")
    sys.stdout.flush()
    return 0 if rc == 0 else 1


def main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        return run(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        sys.stderr.write(f"ondevice-worker: error: {exc}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
