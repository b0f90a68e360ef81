"""Validated, memory-mapped reading of safetensors checkpoints (one file or shards with an index).

Only safetensors are read: the format is a length-prefixed JSON header followed by raw tensor
bytes, so it can be checked completely before any tensor is touched and can never run code.
Every header is validated (size, JSON, dtypes, shapes, offsets inside the file and not
overlapping) and every problem surfaces as a `ConversionError` naming the file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from ondevice.errors import ConversionError

logger = logging.getLogger(__name__)

# A real header is a few hundred KB (Phi-2: 30 KB); safetensors itself refuses more than 100 MB.
MAX_HEADER_BYTES = 100 * 1000 * 1000

# safetensors dtype name -> bytes per element (every dtype the format defines; the converter
# itself only reads F32, F16 and BF16, see `FLOAT_DTYPES`).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# How the float dtypes look to numpy; BF16 has no numpy type, so it is read as raw 16-bit words.
FLOAT_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: a file and an absolute byte range in it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: SafetensorsFile
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


class SafetensorsFile:
    """One safetensors file: header validated on open, data memory-mapped on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ConversionError(f"{path}: can't open: {exc.strerror}") from exc
        self._mmap: mmap.mmap | None = None
        try:
            self.size = os.fstat(self.fd).st_size
            self.tensors, self.metadata = self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _fail(self, what: str) -> ConversionError:
        return ConversionError(
            f"{self.path}: not a valid safetensors file: {what}",
            hint="the download may be truncated or the file corrupt; fetch it again",
        )

    def _read_header(self) -> tuple[dict[str, TensorRef], dict[str, str]]:
        if self.size < 8:
            raise self._fail(f"{self.size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
        if 8 + header_len > self.size:
            raise self._fail(
                f"header of {header_len} bytes runs past the end of the file ({self.size} bytes)"
            )
        raw = os.pread(self.fd, header_len, 8)
        if len(raw) != header_len:
            raise self._fail("short read of the header")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")

        data_start = 8 + header_len
        data_size = self.size - data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("__metadata__ is not a string-to-string object")

        tensors: dict[str, TensorRef] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise self._fail(f"entry {name!r} is not an object")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dtype not in DTYPE_SIZES:
                raise self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
                raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]
            ):
                raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            begin, end = offsets
            if end > data_size:
                raise self._fail(
                    f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section"
                )
            expected = prod(shape) * DTYPE_SIZES[dtype]
            if end - begin != expected:
                raise self._fail(
                    f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, "
                    f"its data_offsets span {end - begin}"
                )
            ranges.append((begin, end, name))
            tensors[name] = TensorRef(name, dtype, tuple(shape), self, data_start + begin, expected)

        ranges.sort()
        for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:], strict=False):
            if begin < prev_end:
                raise self._fail(f"tensors {prev!r} and {name!r} overlap")
        return tensors, metadata

    def array(self, ref: TensorRef) -> np.ndarray:
        """A read-only numpy view of a float tensor, backed by the memory map (no copy)."""
        if self._mmap is None:
            self._mmap = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        data = np.frombuffer(
            self._mmap, dtype=FLOAT_DTYPES[ref.dtype], count=ref.n_elements, offset=ref.offset
        )
        return data.reshape(ref.shape)

    def release(self, offset: int, nbytes: int) -> None:
        """Drop this process's mapping of a byte range already converted.

        Pages of a file mapping count in our RSS while mapped even though the kernel can drop
        them at will; releasing them as we go keeps peak RSS at about one chunk, not the model.
        """
        if self._mmap is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        length = min(offset + nbytes, self.size) - start
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)
        except (OSError, ValueError):  # advisory only
            pass

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # a numpy view still references the map; the GC closes it when that goes away
                pass
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Checkpoint:
    """All safetensors files of a model folder, as one name -> `TensorRef` mapping."""

    def __init__(self, files: list[SafetensorsFile], tensors: dict[str, TensorRef]) -> None:
        self.files = files
        self.tensors = tensors

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        paths, index = find_weight_files(folder)
        files: list[SafetensorsFile] = []
        try:
            for path in paths:
                files.append(SafetensorsFile(path))
            tensors: dict[str, TensorRef] = {}
            for f in files:
                for name, ref in f.tensors.items():
                    if name in tensors:
                        raise ConversionError(
                            f"tensor {name!r} is in both {tensors[name].file.path.name} and {f.path.name}"
                        )
                    tensors[name] = ref
            if index is not None:
                _check_index(folder, index, tensors)
        except BaseException:
            for f in files:
                f.close()
            raise
        # File order, then offset order: reading front to back is kindest to a cold disk cache.
        order = {f.path: i for i, f in enumerate(files)}
        ordered = sorted(tensors.values(), key=lambda r: (order[r.file.path], r.offset))
        return cls(files, {r.name: r for r in ordered})

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map if the checkpoint is sharded.

    A folder with only pickle checkpoints is refused here, before anything is opened: loading
    a pickle runs code chosen by whoever made the file.
    """
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise ConversionError(
                    f"{index_path}: lists shard {name!r}, which is missing from {folder}"
                )
        return [folder / n for n in names], weight_map
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], None
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return found, None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{folder} has only pickle checkpoints ({', '.join(pickles)}); ondevice reads only "
            "safetensors, because loading a pickle can run arbitrary code",
            hint="use a revision of the model that has .safetensors files, or convert the "
            "checkpoint with a tool you trust",
        )
    raise ConversionError(f"{folder} has no .safetensors files")


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: can't read the shard index: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path}: no weight_map in the shard index")
    for tensor, shard in weight_map.items():
        # A shard name is a plain file name in the model folder, never a path out of it.
        if (
            not isinstance(shard, str)
            or not shard.endswith(".safetensors")
            or shard in (".", "..")
            or "/" in shard
            or "\\" in shard
            or shard.startswith(".")
        ):
            raise ConversionError(
                f"{path}: tensor {tensor!r} maps to an invalid shard name {shard!r}"
            )
    return weight_map


def _check_index(folder: Path, weight_map: dict[str, str], tensors: dict[str, TensorRef]) -> None:
    for name, shard in weight_map.items():
        ref = tensors.get(name)
        if ref is None:
            raise ConversionError(
                f"{folder / INDEX_NAME}: tensor {name!r} is not in its shard {shard}"
            )
        if ref.file.path.name != shard:
            raise ConversionError(
                f"{folder / INDEX_NAME}: tensor {name!r} is listed in {shard} but found in {ref.file.path.name}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise ConversionError(
            f"{folder / INDEX_NAME}: doesn't list tensor(s) {', '.join(extra[:5])}"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Plain json.loads keeps the last of two equal keys; two entries for one tensor name is a
    # corrupt header, not something to resolve silently.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out
