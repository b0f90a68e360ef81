"""Reads and validates a GGUF file's header in Python, before llama.cpp ever sees the file.

llama.cpp aborts the whole process on many malformed GGUF files, and gguf-py's reader trusts the
counts it reads (a 3 MB file claiming a 3-million-element array costs it seconds and gigabytes).
This reader bounds every count and length by the bytes actually left in the file and by fixed
limits (MAX_*), so a hostile header costs at most one pass over a bounded number of bytes and
objects, and every problem becomes one `InvalidModelFile` naming the offset and the field. It
reads only the header, with pread (a file that shrinks under us is an error, not a SIGBUS);
tensor data is never read.

Beyond the GGUF structure it refuses the well-formed files that still abort llama.cpp 0.3.36,
each shown to abort it by loading a mutated file in a subprocess (tests/test_gguf_check.py,
tests/test_fuzz.py): duplicate tokens (tokens compared as C strings), tokenizers that can't
tokenize (no vocabulary; SPM without byte tokens; misplaced byte tokens), more than 512 layers,
inconsistent expert counts, an unknown rope scaling type, odd or too many rotary dimensions,
negative or NaN norm epsilons, keys or tensor names with NUL bytes (llama.cpp would look up a
different key than the one checked here).

Layout (GGUF v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 key/value count, the key/
value pairs, the tensor infos (name, dims, type, offset), padding to `general.alignment`, data.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ondevice import model_check
from ondevice.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_KEY_BYTES = 65535  # the spec's limit; real keys are < 100 bytes
# Bounds that keep parsing a hostile file within time and memory (each element becomes a Python
# object of ~30-60 bytes). Real models stay far below: the largest vocabularies have ~260k tokens,
# so tokens + scores + types + merges stay under ~1.5 M elements, and ~1k tensors.
MAX_ARRAY_LEN = 1 << 21  # elements in one tokenizer.* array
MAX_OTHER_ARRAY_LEN = 1 << 16  # elements in any other array (per-layer values: <= 512)
MAX_TOTAL_ELEMENTS = 3 << 20  # elements in all metadata arrays together
MAX_STRING_BYTES = 16 << 20  # one metadata string (chat templates are ~10 kB)
MAX_HEADER_BYTES = 64 << 20  # metadata + tensor infos (~2 MB for a 50k-token vocabulary)
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS

# ggml tensor types of the llama.cpp this package is built against: id -> (name, block, bytes).
# Removed ids (4, 5: Q4_2/Q4_3; 31-33, 36-38: repacked layouts no longer stored in files) and
# ids >= 43 are refused.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# GGUF value types: id -> (name, struct format, size)
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
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1"}
_NUMPY.update({10: "<u8", 11: "<i8", 12: "<f8"})
T_STRING, T_ARRAY = 8, 9
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, T_STRING: "string", T_ARRAY: "array"}

# Keys whose type the spec fixes (llama.cpp asserts on some, our own code reads the others).
_EXPECTED_TYPES = {
    "general.alignment": 4,
    "general.architecture": T_STRING,
    "general.name": T_STRING,
    "tokenizer.ggml.model": T_STRING,
    "tokenizer.ggml.pre": T_STRING,
    "tokenizer.chat_template": T_STRING,
}
# `{arch}.<name>` hyperparameters that are integers; the per-layer ones may be arrays of
# block_count integers.
_INT_HPARAMS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "vocab_size",
    "rope.dimension_count",
    "expert_count",
    "expert_used_count",
    "expert_group_count",
    "expert_group_used_count",
    "nextn_predict_layers",
)
_PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
_PER_LAYER += ("expert_used_count",)
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Tokenizer arrays: key -> element types allowed, and which ones must match the token count.
_TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens": (T_STRING,),
    "tokenizer.ggml.scores": (6, 5),  # llama.cpp takes float32 or int32 scores
    "tokenizer.ggml.token_type": (5,),
    "tokenizer.ggml.merges": (T_STRING,),
}
_PER_TOKEN = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_TOKEN_ID_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask")
    + ("cls", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
    + ("prefix", "suffix", "middle")
)
_NO_TOKENIZER = ("none", "no_vocab", "test")  # no vocabulary, or llama.cpp's test hashing
_TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
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
        return GGML_TYPES[self.type_id][0]


@dataclass(frozen=True)
class Dims:
    """A model's shape as llama.cpp reads it from the header."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    k_len: int  # key head width
    v_len: int  # value head width
    n_vocab: int


def _largest(value: Any) -> int:
    """Per-layer arrays (some models vary head counts by layer) -> the largest value."""
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value or 0)


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

    def dims(self) -> Dims:
        """The hyperparameters as numbers (per-layer arrays: their largest entry)."""
        n_embd = _largest(self.arch_value("embedding_length", 0))
        n_head = _largest(self.arch_value("attention.head_count", 0)) or 1
        n_head_kv = _largest(self.arch_value("attention.head_count_kv", 0)) or n_head
        k_len = _largest(self.arch_value("attention.key_length", 0)) or n_embd // n_head
        v_len = _largest(self.arch_value("attention.value_length", 0)) or k_len
        return Dims(
            n_layer=_largest(self.arch_value("block_count", 0)),
            n_embd=n_embd,
            n_ff=_largest(self.arch_value("feed_forward_length", 0)) or 4 * n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            k_len=k_len,
            v_len=v_len,
            n_vocab=self.vocab_size(),
        )

    @property
    def head_dims(self) -> tuple[int, int]:
        """Key and value head widths (what a quantized KV cache's blocks must divide)."""
        d = self.dims()
        return (d.k_len, d.v_len)

    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and tokens:
            return len(tokens)
        n = self.arch_value("vocab_size")
        if isinstance(n, int) and n > 0:
            return n
        for t in self.tensors:  # the embedding matrix is [n_embd, n_vocab]
            if t.name == "token_embd.weight" and len(t.shape) == 2:
                return int(t.shape[1])
        return 32000

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
    """Bounds-checked reads from the file's start; every failure names offset and field.

    The header is read with pread into memory as far as it is parsed (growing geometrically),
    not memory-mapped: a file truncated by someone else while we read it must give an error,
    not a SIGBUS.
    """

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.buf = b""  # the file's first len(buf) bytes
        self.size = size
        # Metadata and tensor infos must lie in the first MAX_HEADER_BYTES of the file.
        self.end = min(size, MAX_HEADER_BYTES)
        self.pos = 0
        self.field = "header"
        self.elements = 0  # array elements read so far (MAX_TOTAL_ELEMENTS)
        self.key_at: dict[str, int] = {}  # where each key/value pair starts

    def fail_key(self, key: str, message: str) -> None:
        """Fail on a key/value pair checked after parsing: name the key and where it lies."""
        self.field = key
        self.fail(message, offset=self.key_at.get(key, self.pos))

    def fail(self, message: str, offset: int | None = None, hint: str | None = None):
        raise InvalidModelFile(
            self.path,
            message,
            offset=self.pos if offset is None else offset,
            field=self.field,
            hint=hint,
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            if self.pos + n <= self.size:
                self.fail(f"{what} would take the header past the limit of {self.end} bytes")
            self.fail(
                f"{what} needs {n} bytes but only {self.size - self.pos} remain "
                "(file truncated or length corrupt)"
            )
        if self.pos + n > len(self.buf):
            self.fill(self.pos + n)

    def fill(self, upto: int) -> None:
        """Read the file up to `upto` (<= self.end), ahead in doubling steps."""
        want = min(max(upto, 2 * len(self.buf), 1 << 20), self.end)
        parts = [self.buf]
        have = len(self.buf)
        while have < want:
            chunk = os.pread(self.fd, want - have, have)
            if not chunk:
                self.fail(f"the file ends at byte {have}: it shrank while being read")
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

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

    def raw_string(self, what: str, max_len: int) -> bytes:
        start = self.pos
        n = self.u64(f"{what} length")
        if n > max_len:
            self.fail(f"{what} length {n} exceeds the limit of {max_len} bytes", offset=start)
        return self.take(n, what)

    def name(self, what: str, max_len: int) -> str:
        """A key or tensor name: non-empty UTF-8 without NUL or other control characters
        (llama.cpp compares names as C strings, so "a\\0b" would be looked up as "a")."""
        start = self.pos
        raw = self.raw_string(what, max_len)
        if not raw:
            self.fail(f"empty {what}", offset=start)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} {raw[:40]!r} is not valid UTF-8", offset=start)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            self.fail(f"{what} {text[:40]!r} contains control characters", offset=start)
        return text


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at `path`.

    Raises `InvalidModelFile` for anything llama.cpp could trip over: wrong magic or version,
    counts or lengths that run past the end of the file or over the limits, unknown value or
    tensor types, bad alignment, duplicate keys or tensor names, bad tensor shapes, offsets that
    are unaligned, out of the file or overlapping, malformed tokenizer arrays or token ids,
    missing or inconsistent architecture keys.
    """
    spath = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; checked to be a file below.
        fd = os.open(
            spath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        )
    except FileNotFoundError:
        raise InvalidModelFile(spath, "file not found") from None
    except IsADirectoryError:
        raise InvalidModelFile(spath, "is a directory, not a .gguf file") from None
    except OSError as exc:
        raise InvalidModelFile(spath, f"cannot read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidModelFile(spath, "is a directory, not a .gguf file")
        raise InvalidModelFile(spath, "is not a regular file (a pipe or a device?)")
    size = st.st_size
    try:
        if size < 24:
            raise InvalidModelFile(
                spath, f"file is {size} bytes, too short for a GGUF header", offset=0, field="magic"
            )
        return _parse(_Cursor(spath, fd, size))
    except OSError as exc:  # an I/O error while reading
        raise InvalidModelFile(spath, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _parse(cur: _Cursor) -> GGUFHeader:
    path, size = cur.path, cur.size
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
    if n_kv > min(MAX_KV, (cur.end - cur.pos) // 14):
        cur.fail(f"key/value count {n_kv} cannot fit in a {size}-byte file", offset=16)
    if n_tensors > min(MAX_TENSORS, (cur.end - cur.pos) // 33):
        cur.field = "tensor_count"
        cur.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file", offset=8)

    metadata, value_types, raw_types = _read_key_values(cur, n_kv)
    _check_metadata(cur, metadata, raw_types)
    _check_hparams(cur, metadata, raw_types)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))

    tensors, offset_at = _read_tensor_infos(cur, n_tensors, alignment)
    cur.field = "tensor data"
    if n_tensors == 0:
        cur.fail("the file holds no tensors (a vocabulary-only file is not a model)")
    data_offset = -(-cur.pos // alignment) * alignment
    _check_layout(cur, tensors, offset_at, alignment, data_offset)
    header = GGUFHeader(
        path=path,
        version=version,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
    )
    # What a well-formed file must also be for llama.cpp not to abort (heads, rotary dims,
    # tensor types by role, special tokens); a tensor's type field lies just before its offset.
    model_check.check(header, cur.key_at, [at - 4 for at in offset_at])
    return header


def _read_key_values(
    cur: _Cursor, n_kv: int
) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    """The key/value pairs: values, their type names, and the raw GGUF type ids."""
    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    raw_types: dict[str, int] = {}
    for i in range(n_kv):
        cur.field = f"key #{i}"
        key_at = cur.pos
        key = cur.name("key", MAX_KEY_BYTES)
        if key in metadata:
            cur.fail(f"duplicate key {key!r}", offset=key_at)
        cur.field = key
        vtype = cur.u32("value type")
        if vtype not in _TYPE_NAMES:
            cur.fail(f"unknown value type {vtype}", offset=cur.pos - 4)
        value, elem = _read_value(cur, vtype, key)
        metadata[key] = value
        cur.key_at[key] = key_at
        raw_types[key] = vtype
        value_types[key] = _TYPE_NAMES[vtype] if elem is None else f"array[{_TYPE_NAMES[elem]}]"
        if elem is not None:
            raw_types[key + "[]"] = elem

    return metadata, value_types, raw_types


def _read_tensor_infos(
    cur: _Cursor, n_tensors: int, alignment: int
) -> tuple[list[TensorInfo], list[int]]:
    """The tensor infos, and where each one's data offset field lies (for error messages)."""
    tensors: list[TensorInfo] = []
    offset_at: list[int] = []  # where each tensor's data offset field lies
    names: set[str] = set()
    for i in range(n_tensors):
        cur.field = f"tensor #{i}"
        at = cur.pos
        name = cur.name("tensor name", MAX_NAME_BYTES)
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
                cur.fail(f"dimension {d} is 0", offset=cur.pos - 8 * (n_dims - d))
            n_el *= dim
            if n_el >= 1 << 62:  # ggml uses int64 element counts; keep well clear of overflow
                cur.fail(f"element count of shape {dims} overflows")
        type_at = cur.pos
        type_id = cur.u32("tensor type")
        if type_id not in GGML_TYPES:
            cur.fail(f"unknown tensor type {type_id}", offset=type_at)
        type_name, block, type_size = GGML_TYPES[type_id]
        if dims[0] % block:
            cur.fail(
                f"first dimension {dims[0]} is not a multiple of {type_name}'s block size {block}"
            )
        offset = cur.u64("data offset")
        if offset % alignment:
            cur.fail(
                f"data offset {offset} is not a multiple of the alignment {alignment}",
                offset=cur.pos - 8,
            )
        tensors.append(TensorInfo(name, dims, type_id, offset, n_el, n_el // block * type_size))
        offset_at.append(cur.pos - 8)

    return tensors, offset_at


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, int | None]:
    """Read one value of type `vtype`; returns (value, element type for arrays)."""
    if vtype in _SCALARS:
        return cur.scalar(vtype, "value"), None
    if vtype == T_STRING:
        raw = cur.raw_string("string value", MAX_STRING_BYTES)
        # llama.cpp treats strings as bytes; keep undecodable ones, but visibly.
        return raw.decode("utf-8", errors="replace"), None
    # array
    elem = cur.u32("array element type")
    if elem not in _TYPE_NAMES or elem == T_ARRAY:
        # Nested arrays exist in the spec but no model uses them and llama.cpp rejects them.
        cur.fail(f"unsupported array element type {elem}", offset=cur.pos - 4)
    count_at = cur.pos
    count = cur.u64("array length")
    remaining = cur.end - cur.pos
    min_size = 8 if elem == T_STRING else _SCALARS[elem][2]
    if count * min_size > remaining:
        cur.fail(f"array length {count} cannot fit in the {remaining} bytes left", offset=count_at)
    limit = MAX_ARRAY_LEN if key.startswith("tokenizer.") else MAX_OTHER_ARRAY_LEN
    if count > limit or cur.elements + count > MAX_TOTAL_ELEMENTS:
        cur.fail(
            f"array length {count} exceeds the limit of {limit} elements for this key and "
            f"{MAX_TOTAL_ELEMENTS} in all arrays",
            offset=count_at,
        )
    cur.elements += count
    if elem == T_STRING:
        return _read_strings(cur, count, key == "tokenizer.ggml.tokens"), elem
    nbytes = count * _SCALARS[elem][2]
    arr = np.frombuffer(cur.take(nbytes, "array data"), dtype=_NUMPY[elem])
    if elem == 7:
        arr = arr.astype(bool)
    return arr.tolist(), elem


def _read_strings(cur: _Cursor, count: int, unique: bool) -> list[str]:
    """An array of strings (undecodable bytes shown as U+FFFD). For the vocabulary, also refuse
    duplicates the way llama.cpp sees them (as C strings, an empty token renamed "[EMPTY_i]"):
    its vocab loader asserts that every token is distinct and aborts the process otherwise."""
    out: list[str] = []
    undecodable: list[tuple[int, bytes]] = []  # compared by their bytes, not their display
    buf, pos = cur.buf, cur.pos
    have = len(buf)
    unpack = struct.unpack_from
    append = out.append
    for i in range(count):
        if pos + 8 > have:  # past what is read so far, or past the end
            cur.pos = pos
            cur.need(8, f"string #{i} of the array")
            buf, have = cur.buf, len(cur.buf)
        (n,) = unpack("<Q", buf, pos)
        pos += 8
        if pos + n > have:
            cur.pos = pos - 8
            cur.need(n + 8, f"string #{i} of the array")
            buf, have = cur.buf, len(cur.buf)
        raw = buf[pos : pos + n]
        try:
            append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            append(raw.decode("utf-8", "replace"))
            undecodable.append((i, raw))
        pos += n
    if unique:
        # Valid UTF-8 decodes one to one, so strings compare like their bytes; the few that
        # don't decode take a form (surrogate escapes) no valid string has.
        keys = out
        if undecodable:
            keys = list(out)
            for i, raw in undecodable:
                keys[i] = raw.decode("utf-8", "surrogateescape")
        if len(set(keys)) != count or "" in keys or "\0" in "".join(keys):
            _refuse_duplicate_tokens(cur, keys)
    cur.pos = pos
    return out


def _refuse_duplicate_tokens(cur: _Cursor, keys: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        c_str = key.split("\0", 1)[0] or f"[EMPTY_{i}]"
        first = seen.setdefault(c_str, i)
        if first != i:
            shown = c_str.encode("utf-8", "surrogateescape")[:40]
            cur.fail(
                f"token #{i} {shown!r} duplicates token #{first} "
                "(llama.cpp would abort loading this vocabulary)",
                offset=cur.pos,
            )


def _check_metadata(cur: _Cursor, md: dict[str, Any], types: dict[str, int]) -> None:
    for key, expected in _EXPECTED_TYPES.items():
        if key in md and types[key] != expected:
            cur.fail_key(
                key, f"must be of type {_TYPE_NAMES[expected]}, not {_TYPE_NAMES[types[key]]}"
            )
    if "general.alignment" in md:
        align = md["general.alignment"]
        if align == 0 or align & (align - 1):
            cur.fail_key("general.alignment", f"alignment {align} is not a power of two")
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        cur.fail_key("general.architecture", "missing general.architecture")
    for name in _REQUIRED_ARCH_KEYS:
        key = f"{arch}.{name}"
        if key not in md:
            cur.fail_key(key, f"missing {key} (required for architecture {arch!r})")
    for key, allowed in _TOKENIZER_ARRAYS.items():
        if key in md and (types[key] != T_ARRAY or types.get(key + "[]") not in allowed):
            names = " or ".join(_TYPE_NAMES[a] for a in allowed)
            cur.fail_key(key, f"must be an array of {names}, not {_describe(key, types)}")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_tokens = len(tokens)
        if n_tokens == 0:
            cur.fail_key("tokenizer.ggml.tokens", "empty vocabulary")
        for key in _PER_TOKEN:
            if key in md and len(md[key]) != n_tokens:
                cur.fail_key(key, f"has {len(md[key])} entries for {n_tokens} tokens")
        for key in _TOKEN_ID_KEYS:
            if key not in md:
                continue
            value = md[key]
            if value == -1 and types[key] in (5, 11):  # "none", as some converters write
                continue
            if types[key] not in _INT_TYPES:
                cur.fail_key(key, f"a token id must be an integer, not {_describe(key, types)}")
            if not 0 <= value < n_tokens:
                cur.fail_key(key, f"token id {value} is outside the vocabulary of {n_tokens}")
        _check_tokenizer(cur, md, tokens)


def _check_tokenizer(cur: _Cursor, md: dict[str, Any], tokens: list[str]) -> None:
    """What llama.cpp's tokenizers assume of a vocabulary and abort (or let a C++ exception
    escape, which terminates the process) at the first tokenize or detokenize when it is not so:
    a tokenizer at all; "byte" tokens spelled <0xXX>; an SPM vocabulary with a token for every
    byte (its byte fallback looks them up unchecked)."""
    model = md.get("tokenizer.ggml.model")
    if model in _NO_TOKENIZER:
        cur.fail_key("tokenizer.ggml.model", f"tokenizer model {model!r} can't tokenize text")
    token_type = md.get("tokenizer.ggml.token_type") or []
    for i in [i for i, t in enumerate(token_type) if t == _TOKEN_TYPE_BYTE]:
        if model == "bert" or not _BYTE_TOKEN.fullmatch(tokens[i]):
            cur.fail_key(
                "tokenizer.ggml.token_type",
                f"token #{i} {tokens[i][:20]!r} is typed as a byte but is not spelled <0xXX>",
            )
    if model == "llama":
        have = set(tokens)
        missing = [
            b
            for b in range(256)
            if f"<0x{b:02X}>" not in have and not (0 < b < 128 and chr(b) in have)
        ]
        if missing:
            cur.fail_key(
                "tokenizer.ggml.tokens",
                f"SPM vocabulary without byte tokens for {len(missing)} byte values "
                f"(first: <0x{missing[0]:02X}>)",
            )


def _describe(key: str, types: dict[str, int]) -> str:
    vtype = types[key]
    if vtype == T_ARRAY:
        return f"an array of {_TYPE_NAMES[types[key + '[]']]}"
    return _TYPE_NAMES[vtype]


def _check_hparams(cur: _Cursor, md: dict[str, Any], types: dict[str, int]) -> None:
    """Hyperparameters: integers where llama.cpp and our own code expect integers, and the
    relations that llama.cpp asserts (aborting the process) instead of reporting."""
    arch = md["general.architecture"]

    def fail(name: str, message: str) -> None:
        cur.fail_key(f"{arch}.{name}", message)

    values: dict[str, int] = {}  # scalar value, or the largest entry of a per-layer array
    for name in _INT_HPARAMS:
        key = f"{arch}.{name}"
        if key not in md:
            continue
        vtype, value = types[key], md[key]
        if vtype == T_ARRAY and name in _PER_LAYER and types[key + "[]"] in _INT_TYPES:
            items = value
        elif vtype in _INT_TYPES:
            items = [value]
        else:
            fail(name, f"must be an unsigned integer, not {_describe(key, types)}")
        if not items or any(not 0 <= v < 1 << 31 for v in items):
            fail(name, f"value {str(value)[:60]} is out of range (0..2^31)")
        values[name] = max(items)

    n_layer = values["block_count"]
    if not 1 <= n_layer <= MAX_LAYERS:
        fail("block_count", f"block_count {n_layer} not in 1..{MAX_LAYERS}")
    if values.get("embedding_length", 0) == 0:
        fail("embedding_length", "embedding_length must be positive")
    for name in _PER_LAYER:
        key = f"{arch}.{name}"
        if types.get(key) == T_ARRAY and len(md[key]) != n_layer:
            fail(name, f"has {len(md[key])} entries for {n_layer} layers")
    if values.get("nextn_predict_layers", 0) > n_layer:
        fail("nextn_predict_layers", "more prediction layers than layers")

    # Experts, as llama.cpp's load_hparams asserts them.
    n_expert = values.get("expert_count", 0)
    used = values.get("expert_used_count", 0)
    groups = values.get("expert_group_count", 0)
    group_used = values.get("expert_group_used_count", 0)
    if n_expert > MAX_EXPERTS:
        fail("expert_count", f"expert_count {n_expert} exceeds {MAX_EXPERTS}")
    if used > n_expert:
        fail("expert_used_count", f"uses {used} experts of {n_expert}")
    if n_expert > 0:
        if used == 0:
            fail("expert_used_count", f"{n_expert} experts but none used")
        if groups >= n_expert:
            fail("expert_group_count", f"{groups} expert groups for {n_expert} experts")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            fail("expert_group_count", f"inconsistent expert groups ({groups}, {group_used})")
    elif groups:
        fail("expert_group_count", "expert groups without experts")

    # Norm epsilons: ggml's norm kernels assert eps >= 0 in the middle of a decode.
    for key in md:
        if key.startswith(f"{arch}.") and key.endswith("epsilon"):
            value = md[key]
            if types[key] not in (6, 12) or not (math.isfinite(value) and value >= 0):
                cur.fail_key(key, f"must be a finite float >= 0, got {str(value)[:40]}")

    # Rope: the scaling type must be one llama.cpp knows, and ggml's rope needs an even number
    # of rotated dimensions, at most the head size.
    key = f"{arch}.rope.scaling.type"
    if key in md:
        if types[key] != T_STRING or md[key] not in _ROPE_SCALING_TYPES:
            fail("rope.scaling.type", f"unknown rope scaling type {str(md[key])[:40]!r}")
    n_rot = values.get("rope.dimension_count")
    n_head = md.get(f"{arch}.attention.head_count")
    head_dim = values.get("attention.key_length")
    if head_dim is None and isinstance(n_head, int) and n_head > 0:
        head_dim = values["embedding_length"] // n_head
    if n_rot is not None and (n_rot % 2 or (head_dim is not None and n_rot > head_dim)):
        fail("rope.dimension_count", f"{n_rot} rotary dimensions for heads of {head_dim}")


def _check_layout(
    cur: _Cursor, tensors: list[TensorInfo], offset_at: list[int], alignment: int, data_offset: int
) -> None:
    """Tensor data as llama.cpp requires it: in header order, each tensor starting where the
    previous one ends (padded to the alignment), and inside the file. Errors point at the
    tensor's offset field."""
    expected = 0
    prev: TensorInfo | None = None
    for t, at in zip(tensors, offset_at, strict=True):
        cur.field = f"tensor {t.name!r}"
        if t.offset != expected:
            if t.offset < expected and prev is not None:
                problem = f"overlaps tensor {prev.name!r}"
            elif t.offset < expected:
                problem = "starts before the data section"
            else:
                problem = f"leaves a gap of {t.offset - expected} bytes after the previous tensor"
            cur.fail(
                f"data offset {t.offset} {problem} (expected {expected}: tensors must be "
                "stored in header order, back to back)",
                offset=at,
            )
        end = data_offset + t.offset + t.n_bytes
        if end > cur.size:
            cur.fail(
                f"{t.n_bytes} bytes at data offset {t.offset} run past the end of the file "
                f"({max(cur.size - data_offset, 0)} data bytes; truncated?)",
                offset=at,
            )
        expected = -(-(t.offset + t.n_bytes) // alignment) * alignment
        prev = t
