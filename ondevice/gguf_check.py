"""Reads and validates a GGUF file's header in Python before llama.cpp ever sees the file.

llama.cpp aborts the whole process on many malformed GGUF files, and gguf-py's reader trusts the
counts it reads (a 3 MB file claiming a 3-million-element array costs it seconds and gigabytes).
This reader bounds every count and length by the bytes that are actually left in the file, so a
hostile header costs at most a pass over the file's own bytes, and every problem becomes one
`InvalidModelFile` naming the offset and the field. It reads only the header; tensor data is
never touched (the file is memory-mapped, so only the header's pages are read).

Layout (GGUF v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 key/value count, the key/
value pairs, the tensor infos (name, dims, type, offset), padding to `general.alignment`, data.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ondevice.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 65535  # far above any real key; a longer "key" is garbage
# The tokenizer is the only large metadata; an array longer than this is refused outright
# (the largest real vocabularies are ~260k tokens).
MAX_ARRAY_LEN = 16 * 1024 * 1024

# GGUF value types: id -> (name, struct format or None for variable size, size)
_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("uint8", "<B", 1),
    1: ("int8", "<b", 1),
    2: ("uint16", "<H", 2),
    3: ("int16", "<h", 2),
    4: ("uint32", "<I", 4),
    5: ("int32", "<i", 4),
    6: ("float32", "<f", 4),
    7: ("bool", "<?", 1),
    10: ("uint64", "<Q", 8),
    11: ("int64", "<q", 8),
    12: ("float64", "<d", 8),
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
T_STRING, T_ARRAY = 8, 9
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, T_STRING: "string", T_ARRAY: "array"}

# Keys whose type the spec fixes; a wrong type here is what crashes readers.
_EXPECTED_TYPES = {
    "general.alignment": 4,
    "general.architecture": T_STRING,
}
# Tokenizer arrays: key -> element type, and which ones must match the token count.
_TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens": T_STRING,
    "tokenizer.ggml.scores": 6,
    "tokenizer.ggml.token_type": 5,
    "tokenizer.ggml.merges": T_STRING,
}
_PER_TOKEN = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_TOKEN_ID_KEYS = (
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.eot_token_id",
)
# Hyperparameters llama.cpp reads for every text model, as `{arch}.<name>`.
_REQUIRED_ARCH_KEYS = ("block_count", "embedding_length")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header: name, shape (ggml order, fastest dim first), type."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # relative to the start of the data section
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.type_id).name


@dataclass
class GGUFHeader:
    """Everything in a GGUF file except the tensor data, validated."""

    path: str
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, str]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    # Large tokenizer arrays are summarised in `metadata` views that want it small.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (what llama.cpp's `llama_model_size` reports)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def arch_value(self, name: str, default: Any = None) -> Any:
        """`{arch}.{name}` from the metadata, e.g. arch_value("context_length")."""
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts

    def small_metadata(self, max_items: int = 16) -> dict[str, Any]:
        """Metadata with long arrays replaced by a short description (for printing)."""
        out: dict[str, Any] = {}
        for key, value in self.metadata.items():
            if isinstance(value, list) and len(value) > max_items:
                out[key] = f"[{len(value)} × {self.value_types[key]}]"
            else:
                out[key] = value
        return out


class _Cursor:
    """Bounds-checked reads from the mapped file; every failure names offset and field."""

    def __init__(self, path: str, buf: mmap.mmap | bytes, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0
        self.field = "header"

    def fail(self, message: str, offset: int | None = None, hint: str | None = None):
        raise InvalidModelFile(
            self.path,
            message,
            offset=self.pos if offset is None else offset,
            field=self.field,
            hint=hint,
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(
                f"{what} needs {n} bytes but only {self.size - self.pos} remain "
                "(file truncated or length corrupt)"
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def scalar(self, type_id: int, what: str) -> Any:
        _, fmt, size = _SCALARS[type_id]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, max_len: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            self.fail(f"{what} length {n} exceeds {max_len}", offset=start)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp treats strings as bytes; keep them, but visibly.
            return raw.decode("utf-8", errors="replace")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at `path`.

    Raises `InvalidModelFile` for anything llama.cpp could trip over: wrong magic or version,
    counts or lengths that run past the end of the file, unknown value or tensor types, bad
    alignment, duplicate keys or tensor names, bad tensor shapes, offsets that are unaligned,
    out of the file or overlapping, malformed tokenizer arrays, missing architecture keys.
    """
    spath = os.fspath(path)
    try:
        size = os.path.getsize(spath)
        fh = open(spath, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InvalidModelFile(spath, "file not found") from None
    except IsADirectoryError:
        raise InvalidModelFile(spath, "is a directory, not a .gguf file") from None
    except OSError as exc:
        raise InvalidModelFile(spath, f"cannot read: {exc.strerror or exc}") from None
    with fh:
        if size < 24:
            raise InvalidModelFile(
                spath, f"file is {size} bytes, too short for a GGUF header", offset=0, field="magic"
            )
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(spath, buf, size)
        finally:
            buf.close()


def _parse(path: str, buf: mmap.mmap, size: int) -> GGUFHeader:
    cur = _Cursor(path, buf, size)
    cur.field = "magic"
    magic = cur.take(4, "magic")
    if magic != GGUF_MAGIC:
        cur.fail(
            f"bad magic {magic!r}, expected b'GGUF' (not a GGUF model file)",
            offset=0,
            hint="pass a .gguf file; convert Hugging Face weights with `ondevice convert`",
        )
    cur.field = "version"
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)", offset=4)
    cur.field = "tensor_count"
    n_tensors = cur.u64("tensor count")
    cur.field = "kv_count"
    n_kv = cur.u64("key/value count")
    # Each key/value needs at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes, and each
    # tensor info at least 8 + 1 + 4 + 8 + 4 + 8 bytes; more than that cannot be in the file.
    if n_kv > (size - cur.pos) // 14:
        cur.fail(f"key/value count {n_kv} cannot fit in a {size}-byte file", offset=16)
    if n_tensors > (size - cur.pos) // 33:
        cur.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file", offset=8)

    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    raw_types: dict[str, int] = {}
    for i in range(n_kv):
        cur.field = f"key #{i}"
        key_at = cur.pos
        key = cur.string("key", max_len=MAX_KEY_BYTES)
        if not key:
            cur.fail("empty key", offset=key_at)
        if key in metadata:
            cur.fail(f"duplicate key {key!r}", offset=key_at)
        cur.field = key
        vtype = cur.u32("value type")
        if vtype not in _TYPE_NAMES:
            cur.fail(f"unknown value type {vtype}", offset=cur.pos - 4)
        value, elem = _read_value(cur, vtype, key)
        metadata[key] = value
        raw_types[key] = vtype
        value_types[key] = _TYPE_NAMES[vtype] if elem is None else f"array[{_TYPE_NAMES[elem]}]"
        if elem is not None:
            raw_types[key + "[]"] = elem

    _check_metadata(cur, metadata, raw_types)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        cur.field = f"tensor #{i}"
        at = cur.pos
        name = cur.string("tensor name", max_len=MAX_KEY_BYTES)
        if not name:
            cur.fail("empty tensor name", offset=at)
        if name in names:
            cur.fail(f"duplicate tensor name {name!r}", offset=at)
        names.add(name)
        cur.field = f"tensor {name!r}"
        n_dims = cur.u32("dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"dimension count {n_dims} not in 1..{MAX_DIMS}", offset=cur.pos - 4)
        dims = tuple(cur.u64(f"dimension {d}") for d in range(n_dims))
        n_el = 1
        for d, dim in enumerate(dims):
            if dim == 0:
                cur.fail(f"dimension {d} is 0")
            n_el *= dim
            if n_el >= 1 << 62:  # ggml uses int64 element counts; keep well clear of overflow
                cur.fail(f"element count of shape {dims} overflows")
        type_at = cur.pos
        type_id = cur.u32("tensor type")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            cur.fail(f"unknown tensor type {type_id}", offset=type_at)
        if dims[0] % block:
            cur.fail(
                f"first dimension {dims[0]} is not a multiple of {qtype.name}'s block size {block}"
            )
        offset = cur.u64("data offset")
        if offset % alignment:
            cur.fail(
                f"data offset {offset} is not a multiple of the alignment {alignment}",
                offset=cur.pos - 8,
            )
        tensors.append(TensorInfo(name, dims, type_id, offset, n_el, n_el // block * type_size))

    cur.field = "tensor data"
    data_offset = -(-cur.pos // alignment) * alignment
    data_size = size - data_offset
    # Offsets must stay inside the file and never overlap; sorted by offset, each tensor must
    # end at or before the next one starts.
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset + t.n_bytes > data_size:
            cur.fail(
                f"tensor {t.name!r} ({t.n_bytes} bytes at data offset {t.offset}) runs "
                f"past the end of the file ({max(data_size, 0)} data bytes; truncated?)",
                offset=data_offset + t.offset,
            )
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.n_bytes > b.offset:
            cur.fail(f"tensors {a.name!r} and {b.name!r} overlap", offset=data_offset + b.offset)
    if n_tensors == 0:
        cur.fail("the file holds no tensors (a vocabulary-only file is not a model)")

    return GGUFHeader(
        path=path,
        version=version,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
    )


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, int | None]:
    """Read one value of type `vtype`; returns (value, element type for arrays)."""
    if vtype in _SCALARS:
        return cur.scalar(vtype, "value"), None
    if vtype == T_STRING:
        return cur.string("string value"), None
    # array
    elem = cur.u32("array element type")
    if elem not in _TYPE_NAMES or elem == T_ARRAY:
        # Nested arrays exist in the spec but no model uses them and llama.cpp rejects them.
        cur.fail(f"unsupported array element type {elem}", offset=cur.pos - 4)
    count_at = cur.pos
    count = cur.u64("array length")
    remaining = cur.size - cur.pos
    min_size = 8 if elem == T_STRING else _SCALARS[elem][2]
    if count > MAX_ARRAY_LEN or count * min_size > remaining:
        cur.fail(f"array length {count} cannot fit in the {remaining} bytes left", offset=count_at)
    if elem == T_STRING:
        out = []
        buf, pos, size = cur.buf, cur.pos, cur.size
        unpack = struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                cur.pos = pos
                cur.fail("string array runs past the end of the file")
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if n > size - pos:
                cur.pos = pos - 8
                cur.fail(f"string of length {n} in array runs past the end of the file")
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors="replace"))
            pos += n
        cur.pos = pos
        return out, elem
    nbytes = count * _SCALARS[elem][2]
    arr = np.frombuffer(cur.take(nbytes, "array data"), dtype=_NUMPY[elem])
    if elem == 7:
        arr = arr.astype(bool)
    return arr.tolist(), elem


def _check_metadata(cur: _Cursor, md: dict[str, Any], types: dict[str, int]) -> None:
    cur.field = "metadata"
    for key, expected in _EXPECTED_TYPES.items():
        if key in md and types[key] != expected:
            cur.field = key
            cur.fail(f"must be of type {_TYPE_NAMES[expected]}, not {_TYPE_NAMES[types[key]]}")
    if "general.alignment" in md:
        align = md["general.alignment"]
        if align == 0 or align & (align - 1):
            cur.field = "general.alignment"
            cur.fail(f"alignment {align} is not a power of two")
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        cur.field = "general.architecture"
        cur.fail("missing general.architecture")
    for name in _REQUIRED_ARCH_KEYS:
        key = f"{arch}.{name}"
        if key not in md:
            cur.field = key
            cur.fail(f"missing {key} (required for architecture {arch!r})")
        if types[key] not in (2, 4, 10) or not 0 < int(md[key]) < 1 << 24:
            cur.field = key
            cur.fail(f"{key} must be a positive unsigned integer, got {md[key]!r}")
    for key, elem in _TOKENIZER_ARRAYS.items():
        if key in md:
            cur.field = key
            if types[key] != T_ARRAY or types.get(key + "[]") != elem:
                cur.fail(f"must be an array of {_TYPE_NAMES[elem]}")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_tokens = len(tokens)
        if n_tokens == 0:
            cur.field = "tokenizer.ggml.tokens"
            cur.fail("empty vocabulary")
        for key in _PER_TOKEN:
            if key in md and len(md[key]) != n_tokens:
                cur.field = key
                cur.fail(f"has {len(md[key])} entries for {n_tokens} tokens")
        for key in _TOKEN_ID_KEYS:
            if key in md:
                cur.field = key
                value = md[key]
                if value == -1 and types[key] in (5, 11):  # "none", as some converters write
                    continue
                if isinstance(value, (list, str, float)) or not 0 <= int(value) < n_tokens:
                    cur.fail(f"token id {value!r} is outside the vocabulary of {n_tokens}")
