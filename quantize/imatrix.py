"""Reads an importance matrix file (llama-imatrix's output) into per-tensor weights.

Two formats exist, and llama.cpp's quantizer takes both (common/imatrix-loader.cpp):
- GGUF (current): tensors `<name>.in_sum2` and `<name>.counts`, both F32; the weights are the
  sums divided by the count of their expert slice (1 where the count is 0).
- legacy `.dat`: int32 entry count, then per entry int32 name length, name, int32 ncall,
  int32 value count, float32 values (sums times ncall; divided by ncall here).
The binding's `llama_model_quantize` wants the already-divided weights, as llama-quantize
computes them before calling it; this module does the same.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ondevice.errors import QuantizeError

_SUM_SUFFIX = ".in_sum2"
_COUNT_SUFFIX = ".counts"


def read_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Tensor name -> float32 importance weights, as llama-quantize would pass them."""
    p = Path(path)
    if not p.is_file():
        raise QuantizeError(f"no such imatrix file: {p}", hint="check the --imatrix path")
    with p.open("rb") as f:
        magic = f.read(4)
    try:
        data = _read_gguf(p) if magic == b"GGUF" else _read_legacy(p)
    except QuantizeError:
        raise
    except (ValueError, IndexError, KeyError, struct.error, OSError) as exc:
        raise QuantizeError(
            f"{p}: not a readable importance matrix ({exc})",
            hint="make one with llama.cpp's llama-imatrix",
        ) from None
    if not data:
        raise QuantizeError(f"{p}: the importance matrix has no entries")
    for name, values in data.items():
        if not np.all(np.isfinite(values)):
            raise QuantizeError(f"{p}: the importance matrix has non-finite values for {name}")
    return data


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.endswith(_SUM_SUFFIX):
            sums[t.name[: -len(_SUM_SUFFIX)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(_COUNT_SUFFIX):
            counts[t.name[: -len(_COUNT_SUFFIX)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise QuantizeError(f"{path}: mismatched sums and counts for {odd}")
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float32)
        if c.size == 0 or s.size % c.size:
            raise QuantizeError(f"{path}: {name} has {s.size} sums but {c.size} counts")
        per = s.reshape(c.size, -1)
        safe = np.where(c > 0, c, 1.0)[:, None]
        out[name] = np.where(c[:, None] > 0, per / safe, 1.0).astype(np.float32).reshape(-1)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ValueError(f"truncated at byte {pos}")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(raw) // 12:
        raise ValueError(f"implausible entry count {n_entries}")
    out: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (n_name,) = take("<i")
        if n_name < 0 or pos + n_name > len(raw):
            raise ValueError(f"bad name length at byte {pos}")
        name = raw[pos : pos + n_name].decode("utf-8")
        pos += n_name
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ValueError(f"bad value count for {name}")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = values / ncall if ncall > 0 else values
    return out
