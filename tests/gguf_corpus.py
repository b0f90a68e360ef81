"""Builds the GGUF test corpus: a tiny valid llama model, hand-made corrupt files, fuzz mutations.

    from gguf_corpus import build_tiny_llama, header_cases, model_cases, Mutator
    valid = build_tiny_llama(tmp_path / "tiny.gguf")   # gguf-py's GGUFWriter; llama.cpp loads it
    for case in header_cases(Layout.read(valid)):      # one corrupt file per class
        case.write(tmp_path / "bad.gguf", valid)

Everything here is independent of `ondevice.gguf_header` (the code under test): a small trusting
parser (`Layout`) finds where every field of a *valid* file lies, and the corrupt files are that
file with one field changed, so each corrupt file is paired with the valid file it came from.
The classes follow llama.cpp's tests/test-gguf.cpp, plus the model-level ones (tokenizer and
hyperparameters) that pass a GGUF parser but used to abort llama.cpp.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType as V

Src = tuple[bytes, int, int]  # a file's bytes: head, then bytes [start, end) of a source file

# Value types: id -> struct format of a scalar (strings and arrays are variable).
SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B"}
SCALAR_FMT.update({10: "<Q", 11: "<q", 12: "<d"})
T_STRING, T_ARRAY = 8, 9

# --- the tiny valid model -------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["the", "capital", "of", "France", "is", "Paris", "hello", "world", "and", "model"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE tokens are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 256 byte tokens, merges spelling a few words, 3 specials."""
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges: list[str] = []
    seen = set(tokens)
    for word in WORDS:
        for spelled in (word, "Ġ" + word):
            current = spelled[0]
            for ch in spelled[1:]:
                merged = current + ch
                if merged not in seen:
                    merges.append(f"{current} {ch}")
                    tokens.append(merged)
                    seen.add(merged)
                current = merged
    types = [1] * len(tokens)  # normal
    tokens += SPECIALS
    types += [3] * len(SPECIALS)  # control
    return tokens, merges, types


@dataclass
class TinySpec:
    """What build_tiny_llama writes; model_cases() edits a copy to make semantic corruptions."""

    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 2
    n_ff: int = 128
    n_ctx: int = 256
    seed: int = 0
    # key -> (value, value type, array element type); None removes a key the builder writes.
    kv: dict[str, tuple[Any, V, V | None] | None] = field(default_factory=dict)
    # tensor name -> shape override (ggml order reversed, i.e. numpy order) or None to drop.
    tensors: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    extra_tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tokens: list[str] | None = None
    float_only: bool = False  # F16 matrices only (a quantizer input), no Q8_0
    # tensor name -> ggml type to store it as (its data: random values or bytes of that type)
    types: dict[str, Q] = field(default_factory=dict)
    alignment: int | None = None  # general.alignment (None: the default 32, not written)


def tiny_tensors(spec: TinySpec, n_vocab: int) -> dict[str, tuple[tuple[int, ...], Q]]:
    """Tensor name -> (numpy shape, ggml type) of a llama model of the spec's size."""
    e, ff = spec.n_embd, spec.n_ff
    kv = e // spec.n_head * spec.n_head_kv
    out: dict[str, tuple[tuple[int, ...], Q]] = {
        "token_embd.weight": ((n_vocab, e), Q.F16),
        "output_norm.weight": ((e,), Q.F32),
        "output.weight": ((n_vocab, e), Q.Q8_0),
    }
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = ((e,), Q.F32)
        out[p + "attn_q.weight"] = ((e, e), Q.Q8_0)
        out[p + "attn_k.weight"] = ((kv, e), Q.Q8_0)
        out[p + "attn_v.weight"] = ((kv, e), Q.F16)
        out[p + "attn_output.weight"] = ((e, e), Q.Q8_0)
        out[p + "ffn_norm.weight"] = ((e,), Q.F32)
        out[p + "ffn_gate.weight"] = ((ff, e), Q.F16)
        out[p + "ffn_up.weight"] = ((ff, e), Q.F16)
        out[p + "ffn_down.weight"] = ((e, ff), Q.F16)
    return out


def build_tiny_llama(path: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny random llama model (2 layers, hidden 64, ~300 tokens, F32/F16/Q8_0 tensors)
    with gguf-py's GGUFWriter; llama.cpp loads it and generates (random) text in milliseconds."""
    spec = spec or TinySpec()
    path = Path(path)
    tokens, merges, types = tiny_vocab()
    if spec.tokens is not None:
        tokens = spec.tokens
        types = (types + [1] * len(tokens))[: len(tokens)]
    n_vocab = len(tokens)
    eos = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else 0
    kv: dict[str, tuple[Any, V, V | None]] = {
        "general.name": ("tiny-llama", V.STRING, None),
        "llama.context_length": (spec.n_ctx, V.UINT32, None),
        "llama.embedding_length": (spec.n_embd, V.UINT32, None),
        "llama.block_count": (spec.n_layer, V.UINT32, None),
        "llama.feed_forward_length": (spec.n_ff, V.UINT32, None),
        "llama.attention.head_count": (spec.n_head, V.UINT32, None),
        "llama.attention.head_count_kv": (spec.n_head_kv, V.UINT32, None),
        "llama.rope.dimension_count": (spec.n_embd // spec.n_head, V.UINT32, None),
        "llama.rope.freq_base": (10000.0, V.FLOAT32, None),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32, None),
        "llama.vocab_size": (n_vocab, V.UINT32, None),
        "general.file_type": (1 if spec.float_only else 7, V.UINT32, None),  # F16 or Q8_0
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": ("gpt-2", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (eos, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (eos, V.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL, None),
        "tokenizer.chat_template": (CHATML, V.STRING, None),
        "general.quantization_version": (2, V.UINT32, None),
    }
    for key, value in spec.kv.items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = value
    w = GGUFWriter(path, "llama")
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(spec.seed)
    shapes = tiny_tensors(spec, n_vocab)
    for name, override in spec.tensors.items():
        if override is None:
            shapes.pop(name, None)
        else:
            shapes[name] = (override, shapes.get(name, (override, Q.F32))[1])
    for name, shape in spec.extra_tensors.items():
        shapes[name] = (shape, Q.F32)
    if spec.alignment is not None:
        w.add_custom_alignment(spec.alignment)
    for name, (shape, qtype) in shapes.items():
        if spec.float_only and qtype == Q.Q8_0:
            qtype = Q.F16
        if name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name in spec.types:
            _add_typed(w, name, data, spec.types[name], rng)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif qtype == Q.Q8_0:
            from gguf.quants import quantize

            w.add_tensor(name, quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_PLAIN = {Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}


def _add_typed(w: GGUFWriter, name: str, data: np.ndarray, qtype: Q, rng: Any) -> None:
    """A tensor stored as `qtype`, whatever its role: plain types get the values converted
    (integers: small ones), block types random bytes of the right size."""
    from gguf.constants import GGML_QUANT_SIZES

    if qtype == Q.F32:
        w.add_tensor(name, data)
    elif qtype == Q.F16:
        w.add_tensor(name, data.astype(np.float16))
    elif qtype in _PLAIN:
        dtype = _PLAIN[qtype]
        values = data if qtype == Q.F64 else np.round(data * 20)
        w.add_tensor(name, values.astype(dtype))
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        row = data.shape[-1] // block * size
        raw = rng.integers(0, 256, (*data.shape[:-1], row), dtype=np.uint8)
        w.add_tensor(name, raw, raw_dtype=qtype)


# --- a trusting layout parser for valid files -------------------------------------------------


@dataclass
class KV:
    key: bytes
    vtype: int
    raw: bytes  # the encoded value (after the type field)
    at: int  # offset of the key length field
    type_at: int
    value_at: int
    sub: int | None = None  # array element type
    count: int | None = None


@dataclass
class TI:
    name: bytes
    dims: list[int]
    ttype: int
    offset: int
    at: int  # offset of the name length field


@dataclass
class Field:
    """One numeric field of a file, for targeted mutation."""

    offset: int
    size: int  # 4 or 8 (u32/u64 fields), or 1/2 for small scalars
    kind: str  # e.g. "key length", "value type", "array length", "dim", "tensor type"
    label: str
    signed: bool = False
    is_float: bool = False


@dataclass
class Layout:
    """Where everything in a valid GGUF file lies (parsed without checks: valid input only)."""

    data: bytes
    version: int
    kvs: list[KV]
    tensors: list[TI]
    alignment: int
    infos_end: int  # offset just past the last tensor info
    data_start: int
    fields: list[Field]
    size: int  # of the whole file; `data` holds only its first data_start bytes

    @classmethod
    def read(cls, path: str | Path) -> Layout:
        """Parse a valid file's header, reading only as much of the file as it takes."""
        size = os.path.getsize(path)
        n = 1 << 20
        with open(path, "rb") as f:
            while True:
                f.seek(0)
                head = f.read(n)
                try:
                    return cls.parse(head, size)
                except (struct.error, IndexError, ValueError):
                    if n >= size:
                        raise
                    n *= 4

    @classmethod
    def parse(cls, data: bytes, size: int | None = None) -> Layout:
        size = len(data) if size is None else size
        fields: list[Field] = []
        pos = 0

        def num(fmt: str, kind: str, label: str, record: bool = True) -> int:
            nonlocal pos
            size = struct.calcsize(fmt)
            (value,) = struct.unpack_from(fmt, data, pos)
            if record:
                fields.append(
                    Field(
                        pos, size, kind, label, signed=fmt[-1].islower(), is_float=fmt[-1] in "fd"
                    )
                )
            pos += size
            return value

        def string(kind: str, label: str) -> bytes:
            nonlocal pos
            n = num("<Q", kind, label)
            out = data[pos : pos + n]
            pos += n
            return out

        assert data[:4] == b"GGUF", "Layout parses valid files only"
        pos = 4
        version = num("<I", "version", "version")
        n_tensors = num("<Q", "tensor count", "tensor count")
        n_kv = num("<Q", "kv count", "kv count")
        kvs: list[KV] = []
        alignment = 32
        for i in range(n_kv):
            at = pos
            key = string("key length", f"key #{i}")
            label = key.decode(errors="replace")
            type_at = pos
            vtype = num("<I", "value type", label)
            value_at = pos
            sub = count = None
            if vtype == T_STRING:
                string("string length", label)
            elif vtype == T_ARRAY:
                sub = num("<I", "array type", label)
                count = num("<Q", "array length", label)
                if sub == T_STRING:
                    for j in range(count):
                        # Only the first few element lengths: enough targets, fewer fields.
                        n = num("<Q", "element length", f"{label}[{j}]", record=j < 64)
                        pos += n
                else:
                    pos += count * struct.calcsize(SCALAR_FMT[sub])
            else:
                value = num(SCALAR_FMT[vtype], "scalar", label)
                if label == "general.alignment":
                    alignment = value
            kvs.append(KV(key, vtype, data[value_at:pos], at, type_at, value_at, sub, count))
        tensors: list[TI] = []
        for i in range(n_tensors):
            at = pos
            name = string("name length", f"tensor #{i}")
            label = name.decode(errors="replace")
            n_dims = num("<I", "dim count", label)
            dims = [num("<Q", "dim", f"{label} dim {d}") for d in range(n_dims)]
            ttype = num("<I", "tensor type", label)
            offset = num("<Q", "tensor offset", label)
            tensors.append(TI(name, dims, ttype, offset, at))
        infos_end = pos
        data_start = -(-pos // alignment) * alignment
        if data_start > len(data):
            raise ValueError("need more of the file")
        head = data[:data_start]
        return cls(head, version, kvs, tensors, alignment, infos_end, data_start, fields, size)

    def kv(self, key: str) -> KV:
        for item in self.kvs:
            if item.key == key.encode():
                return item
        raise KeyError(key)

    def tensor(self, name: str) -> TI:
        for item in self.tensors:
            if item.name == name.encode():
                return item
        raise KeyError(name)

    def serialize(
        self,
        kvs: list[KV] | None = None,
        tensors: list[TI] | None = None,
        *,
        n_kv: int | None = None,
        n_tensors: int | None = None,
        alignment: int | None = None,
        blob: bytes | None = None,
    ) -> Src:
        """Re-assemble a file from (possibly edited) parts; the data section is the original's
        (by reference) unless `blob` replaces it."""
        kvs = self.kvs if kvs is None else kvs
        tensors = self.tensors if tensors is None else tensors
        out = bytearray(b"GGUF")
        out += struct.pack(
            "<IQQ",
            self.version,
            len(tensors) if n_tensors is None else n_tensors,
            len(kvs) if n_kv is None else n_kv,
        )
        for kv in kvs:
            out += struct.pack("<Q", len(kv.key)) + kv.key + struct.pack("<I", kv.vtype) + kv.raw
        for t in tensors:
            out += struct.pack("<Q", len(t.name)) + t.name + struct.pack("<I", len(t.dims))
            out += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.ttype, t.offset)
        align = alignment or self.alignment
        out += b"\0" * (-len(out) % align)
        if blob is not None:
            return bytes(out) + blob, 0, 0
        return bytes(out), self.data_start, self.size

    def patched(self, offset: int, fmt: str, value: Any) -> Src:
        """The file with one field (inside the header) overwritten."""
        head = bytearray(self.data)
        struct.pack_into(fmt, head, offset, value)
        return bytes(head), self.data_start, self.size

    def truncated(self, cut: int) -> Src:
        if cut <= self.data_start:
            return self.data[:cut], 0, 0
        return self.data, self.data_start, cut


def encode(vtype: int, value: Any, sub: int | None = None) -> bytes:
    """The encoded bytes of a value of type `vtype` (for KV.raw)."""
    if vtype in SCALAR_FMT:
        return struct.pack(SCALAR_FMT[vtype], value)
    if vtype == T_STRING:
        raw = value if isinstance(value, bytes) else value.encode()
        return struct.pack("<Q", len(raw)) + raw
    assert sub is not None
    return struct.pack("<IQ", sub, len(value)) + b"".join(encode(sub, v) for v in value)


# --- hand-made corrupt files --------------------------------------------------------------------


@dataclass
class Case:
    """One corrupt file: its class (llama.cpp's test-gguf.cpp name where there is one), its
    bytes, and a word the error's field or message must contain.

    The bytes are `head` followed by bytes [start, end) of the valid source file, so a corrupt
    copy of a 98 MB model costs its header in memory, not the whole file.
    """

    name: str
    src: Src
    expect: str

    @property
    def size(self) -> int:
        head, start, end = self.src
        return len(head) + end - start

    def write(self, path: Path, source: Path, *, sparse: bool = False) -> Path:
        """Write the file. `sparse`: leave the tail a hole of zeros instead of copying it
        (enough for header checks, which never read tensor data)."""
        head, start, end = self.src
        with open(path, "wb") as out:
            out.write(head)
            if end > start and sparse:
                out.truncate(len(head) + end - start)
            elif end > start:
                with open(source, "rb") as inp:
                    inp.seek(start)
                    shutil.copyfileobj(_Limited(inp, end - start), out, 1 << 20)
        return path

    def data(self, source: Path) -> bytes:
        head, start, end = self.src
        with open(source, "rb") as f:
            f.seek(start)
            return head + f.read(end - start)


class _Limited:
    def __init__(self, f: Any, n: int) -> None:
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        out = self.f.read(size)
        self.n -= len(out)
        return out


def header_cases(lay: Layout) -> list[Case]:
    """Corrupt variants of a valid file (tiny llama or the demo model), one per class.

    Each must be refused by the header check; none may reach llama.cpp.
    """
    size = lay.size
    cases: list[Case] = []

    def add(name: str, src: Src, expect: str) -> None:
        cases.append(Case(name, src, expect))

    def with_kv(key: str, vtype: int, raw: bytes) -> Src:
        kvs = [replace(k, vtype=vtype, raw=raw) if k.key == key.encode() else k for k in lay.kvs]
        return lay.serialize(kvs)

    def with_tensor(i: int, **changes: Any) -> Src:
        ts = [replace(t, **changes) if j == i else t for j, t in enumerate(lay.tensors)]
        return lay.serialize(tensors=ts)

    tok = lay.kv("tokenizer.ggml.tokens")
    n_tok = tok.count or 0
    first = lay.tensors[0]
    second = lay.tensors[1]
    # header (test-gguf.cpp: HEADER_*)
    add("HEADER_BAD_MAGIC", (b"FUGG" + lay.data[4:], lay.data_start, size), "magic")
    add("HEADER_BAD_VERSION_0", lay.patched(4, "<I", 0), "version")
    add("HEADER_BAD_VERSION_1", lay.patched(4, "<I", 1), "version")
    add("HEADER_BAD_VERSION_FUTURE", lay.patched(4, "<I", 4), "version")
    add("HEADER_BAD_VERSION_ENDIAN", lay.patched(4, "<I", 3 << 24), "version")
    add("HEADER_BAD_N_TENSORS", lay.patched(8, "<Q", 2**64 - 1), "tensor_count")
    add("HEADER_BAD_N_KV", lay.patched(16, "<Q", 2**64 - 1), "kv_count")
    add("HEADER_N_KV_PLUS_ONE", lay.patched(16, "<Q", len(lay.kvs) + 1), "")
    add("HEADER_N_TENSORS_PLUS_ONE", lay.patched(8, "<Q", len(lay.tensors) + 1), "")
    add("HEADER_EMPTY", (b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 8, 0, 0), "architecture")
    add("HEADER_NO_TENSORS", lay.serialize(tensors=[], blob=b""), "tensor")
    # key/value pairs (KV_*)
    name_kv = lay.kv("general.name")
    add("KV_BAD_KEY_SIZE", lay.patched(name_kv.at, "<Q", 2**64 - 1), "key")
    add("KV_KEY_SIZE_PAST_END", lay.patched(name_kv.at, "<Q", size), "key")
    add(
        "KV_EMPTY_KEY",
        lay.serialize([replace(k, key=b"") if k is name_kv else k for k in lay.kvs]),
        "key",
    )
    add("KV_BAD_TYPE", lay.patched(name_kv.type_at, "<I", 13), "general.name")
    add("KV_BAD_TYPE_NEGATIVE", lay.patched(name_kv.type_at, "<I", 2**32 - 1), "general.name")
    add("KV_BAD_STRING_SIZE", lay.patched(name_kv.value_at, "<Q", 2**63), "general.name")
    add("KV_STRING_PAST_END", lay.patched(name_kv.value_at, "<Q", size), "general.name")
    add("KV_DUPLICATE_KEY", lay.serialize(lay.kvs + [name_kv]), "duplicate")
    add("KV_BAD_ARRAY_TYPE", lay.patched(tok.value_at, "<I", 13), "tokenizer.ggml.tokens")
    add("KV_NESTED_ARRAY", lay.patched(tok.value_at, "<I", T_ARRAY), "tokenizer.ggml.tokens")
    add("KV_HUGE_ARRAY", lay.patched(tok.value_at + 4, "<Q", 2**62), "tokenizer.ggml.tokens")
    # gguf-py's reader spends seconds and gigabytes on this one (3 M elements in a small file).
    add(
        "KV_ARRAY_3M_ELEMENTS",
        lay.patched(tok.value_at + 4, "<Q", 3_000_000),
        "tokenizer.ggml.tokens",
    )
    align_kv = KV(b"general.alignment", 4, encode(4, 13), 0, 0, 0)
    add("KV_BAD_ALIGN", lay.serialize(lay.kvs + [align_kv]), "general.alignment")
    add(
        "KV_ALIGN_ZERO",
        lay.serialize(lay.kvs + [replace(align_kv, raw=encode(4, 0))]),
        "general.alignment",
    )
    add(
        "KV_WRONG_TYPE_ALIGN",
        lay.serialize(lay.kvs + [replace(align_kv, vtype=5, raw=encode(5, 32))]),
        "general.alignment",
    )
    add(
        "KV_ALIGN_U64",
        lay.serialize(lay.kvs + [replace(align_kv, vtype=10, raw=encode(10, 32))]),
        "general.alignment",
    )
    # tensor infos (TENSORS_*)
    add("TENSORS_BAD_NAME_SIZE", lay.patched(first.at, "<Q", 2**64 - 1), "tensor")
    add("TENSORS_NAME_TOO_LONG", with_tensor(0, name=b"t" * 64), "tensor")
    add("TENSORS_EMPTY_NAME", with_tensor(0, name=b""), "tensor")
    add("TENSORS_BAD_N_DIMS", with_tensor(0, dims=first.dims + [1, 1, 1]), "dimension count")
    add("TENSORS_ZERO_N_DIMS", with_tensor(0, dims=[]), "dimension count")
    add("TENSORS_BAD_SHAPE", with_tensor(0, dims=[2**64 - 1] * len(first.dims)), "")
    add("TENSORS_ZERO_DIM", with_tensor(0, dims=[first.dims[0], 0]), "dimension")
    add("TENSORS_NE_TOO_BIG", with_tensor(0, dims=[4 * (2**31 - 1)] * 2), "")
    add("TENSORS_NBYTES_PAD_WRAP", with_tensor(0, ttype=0, dims=[4, 2**30 - 1, 2**30 + 1]), "")
    add("TENSORS_NBYTES_TOO_BIG", with_tensor(0, ttype=27, dims=[2**21, 2**21, 2**20]), "")
    add("TENSORS_BAD_TYPE", with_tensor(0, ttype=43), "tensor type")
    add("TENSORS_REMOVED_TYPE", with_tensor(0, ttype=4), "tensor type")  # Q4_2, removed
    add("TENSORS_REPACKED_TYPE", with_tensor(0, ttype=31), "tensor type")  # Q4_0_4_4
    add("TENSORS_BLOCK_MISMATCH", with_tensor(0, ttype=8, dims=[48] + first.dims[1:]), "block")
    add("TENSORS_BAD_OFFSET", with_tensor(1, offset=2**64 - 1), "")
    add("TENSORS_UNALIGNED_OFFSET", with_tensor(1, offset=second.offset + 1), "offset")
    add("TENSORS_OVERLAPPING", with_tensor(1, offset=first.offset), "")
    add("TENSORS_OUT_OF_ORDER", lay.serialize(tensors=[second, first] + lay.tensors[2:]), "")
    add("TENSORS_DUPLICATE_NAME", with_tensor(1, name=first.name), "duplicate")
    add(
        "TENSORS_INCONSISTENT_ALIGN",
        lay.serialize(lay.kvs + [replace(align_kv, raw=encode(4, 4096))]),
        "offset",
    )
    # data (DATA_*)
    add("DATA_NOT_ENOUGH_DATA", lay.truncated(size - 1), "")
    add("DATA_EMPTY", lay.truncated(lay.data_start), "")
    # tokenizer
    add(
        "TOKENS_WRONG_ELEMENT_TYPE",
        with_kv("tokenizer.ggml.tokens", 9, encode(9, [1] * n_tok, 5)),
        "tokenizer.ggml.tokens",
    )
    add(
        "TOKENS_EMPTY_ARRAY",
        with_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 0)),
        "tokenizer.ggml.tokens",
    )
    add(
        "TOKEN_TYPE_SHORT",
        with_kv("tokenizer.ggml.token_type", 9, encode(9, [1] * (n_tok - 1), 5)),
        "token_type",
    )
    add(
        "TOKEN_TYPE_WRONG_TYPE",
        with_kv("tokenizer.ggml.token_type", 9, encode(9, [1.0] * n_tok, 6)),
        "token_type",
    )
    add("MERGES_WRONG_TYPE", with_kv("tokenizer.ggml.merges", 9, encode(9, [1, 2], 4)), "merges")
    add(
        "BOS_OUT_OF_RANGE",
        with_kv("tokenizer.ggml.bos_token_id", 4, encode(4, n_tok + 7)),
        "bos_token_id",
    )
    add(
        "EOS_OUT_OF_RANGE",
        with_kv("tokenizer.ggml.eos_token_id", 4, encode(4, 2**32 - 1)),
        "eos_token_id",
    )
    add("EOS_WRONG_TYPE", with_kv("tokenizer.ggml.eos_token_id", 8, encode(8, "2")), "eos_token_id")
    # architecture keys
    add(
        "ARCH_MISSING",
        lay.serialize([k for k in lay.kvs if k.key != b"general.architecture"]),
        "general.architecture",
    )
    add("ARCH_WRONG_TYPE", with_kv("general.architecture", 4, encode(4, 1)), "general.architecture")
    add(
        "ARCH_BLOCK_COUNT_MISSING",
        lay.serialize([k for k in lay.kvs if not k.key.endswith(b".block_count")]),
        "block_count",
    )
    add(
        "ARCH_CONTEXT_LENGTH_STRING",
        with_kv(_arch_key(lay, "context_length"), 8, encode(8, "4096")),
        "context_length",
    )
    # truncation at a dozen points: inside each part of the header and of the data
    points = {
        "magic": 2,
        "version": 6,
        "tensor_count": 12,
        "kv_count": 20,
        "key": name_kv.at + 10,
        "value_type": name_kv.type_at + 2,
        "string_value": name_kv.value_at + 9,
        "token_array": tok.value_at + 12 + 100,
        "tensor_name": first.at + 9,
        "tensor_dims": first.at + 8 + len(first.name) + 4 + 3,
        "tensor_offset": lay.infos_end - 3,
        "padding": lay.infos_end + (1 if lay.data_start > lay.infos_end else 0),
        "first_tensor_data": lay.data_start + 5,
        "last_byte": size - 1,
    }
    for where, cut in points.items():
        add(f"TRUNCATED_IN_{where.upper()}", lay.truncated(cut), "")
    return cases


def _arch_key(lay: Layout, name: str) -> str:
    arch = lay.kv("general.architecture").raw[8:].decode()
    return f"{arch}.{name}"


# --- model-level corruptions: a well-formed GGUF that is a broken model --------------------------


@dataclass
class ModelCase:
    """A semantically broken tiny llama. `refused_by` is where it must be stopped: "header"
    (read_header refuses it) or "llama" (llama.cpp returns an error). `raw` is what raw llama.cpp
    does with it when nothing checks it first: "abort" (kills the process), "error" or "load"."""

    name: str
    spec: TinySpec
    refused_by: str
    raw: str
    expect: str = ""


def model_cases() -> list[ModelCase]:
    tokens, _, _ = tiny_vocab()
    dup_tokens = tokens[:]
    dup_tokens[300] = dup_tokens[299]
    nul_tokens = tokens[:]
    # llama.cpp reads tokens as C strings: these two differ only after a NUL, so it sees them
    # as duplicates.
    nul_tokens[300], nul_tokens[301] = "ab\0x", "ab\0y"
    # a well-spelled byte token, in a WordPiece vocabulary (which has no byte tokens)
    byte_tokens, byte_types = tokens[:], tiny_vocab()[2]
    byte_tokens[300], byte_types[300] = "<0x41>", 6

    def kv(key: str, value: Any, vtype: V = V.UINT32) -> TinySpec:
        return TinySpec(kv={key: (value, vtype, None)})

    s = TinySpec
    byte_kv = {
        "tokenizer.ggml.token_type": (byte_types, V.ARRAY, V.INT32),
        "tokenizer.ggml.model": ("bert", V.STRING, None),
    }
    all_bytes = {"tokenizer.ggml.token_type": ([6] * len(tokens), V.ARRAY, V.INT32)}
    table = [
        # name, spec, refused_by, raw llama.cpp, word in our error (or llama.cpp's)
        ("MISSING_TENSOR", s(tensors={"blk.1.ffn_up.weight": None}), "llama", "error", "not found"),
        ("WRONG_SHAPE", s(tensors={"blk.0.attn_k.weight": (64, 64)}), "llama", "error", "shape"),
        ("EXTRA_TENSOR", s(extra_tensors={"blk.0.bogus.weight": (64,)}), "llama", "error",
         "number"),
        ("UNKNOWN_TOKENIZER", kv("tokenizer.ggml.model", "bogus", V.STRING), "llama", "error",
         "tokenizer"),
        ("MISSING_MERGES", s(kv={"tokenizer.ggml.merges": None}), "llama", "error", "merges"),
        ("HEAD_COUNT_ZERO", kv("llama.attention.head_count", 0), "llama", "error", "shape"),
        ("HEAD_COUNT_KV_ZERO", kv("llama.attention.head_count_kv", 0), "llama", "error", "shape"),
        ("UNKNOWN_ARCH", kv("general.architecture", "llamaX", V.STRING), "header", "error",
         "block_count"),
        ("HEADS_NOT_DIVIDING", kv("llama.attention.head_count", 5), "header", "error",
         "dimension_count"),
        ("BOS_OUT_OF_RANGE", kv("tokenizer.ggml.bos_token_id", 10**6), "header", "load",
         "bos_token_id"),
        ("BYTE_TOKENS_MISSPELLED", s(kv=all_bytes), "header", "error", "<0xXX>"),
        ("DUPLICATE_TOKEN", s(tokens=dup_tokens), "header", "abort", "duplicate"),
        ("DUPLICATE_TOKEN_AFTER_NUL", s(tokens=nul_tokens), "header", "abort", "duplicate"),
        ("ROPE_SCALING_UNKNOWN", kv("llama.rope.scaling.type", "bogus", V.STRING), "header",
         "abort", "rope.scaling.type"),
        ("TOO_MANY_LAYERS", kv("llama.block_count", 513), "header", "abort", "block_count"),
        ("EXPERTS_USED_WITHOUT_EXPERTS", kv("llama.expert_used_count", 2), "header", "abort",
         "expert"),
        ("TOKENIZER_NONE", kv("tokenizer.ggml.model", "none", V.STRING), "header", "abort",
         "tokenizer.ggml.model"),
        ("SPM_WITHOUT_BYTE_TOKENS", kv("tokenizer.ggml.model", "llama", V.STRING), "header",
         "abort", "byte tokens"),
        ("BYTE_TOKEN_IN_WORDPIECE", s(tokens=byte_tokens, kv=byte_kv), "header", "abort",
         "<0xXX>"),
    ]  # fmt: skip
    return [ModelCase(*row) for row in table]


# --- issue 20: well-formed files that pass a GGUF parser and still kill llama.cpp -------------


@dataclass
class HostileCase:
    """A tiny llama that a GGUF parser accepts and raw llama.cpp dies on, from one class of the
    second adversarial pass. `raw` is what raw llama.cpp does with it (loaded, a prompt decoded,
    every token detokenized): "abort" (SIGABRT) or "segv" (SIGSEGV). `expect` is a word of the
    error ondevice must give instead (its field or message). Alignment cases are not refused:
    ondevice reads them without mmap (`raw` is what they do mapped)."""

    name: str
    klass: str
    spec: TinySpec
    expect: str
    raw: str

    def build(self, path: Path) -> Path:
        if self.klass == "alignment":
            return build_unaligned(path, self.spec)
        return build_tiny_llama(path, self.spec)


def build_unaligned(path: Path, spec: TinySpec) -> Path:
    """The spec (with a small general.alignment) written so that its tensors do NOT lie at
    32-byte multiples of the file: the model name is lengthened until the data section starts
    off a 32-byte boundary (with alignment 32 the padding would always realign it)."""
    for pad in range(64):
        name = "tiny-llama" + "x" * pad
        kv = {**spec.kv, "general.name": (name, V.STRING, None)}
        build_tiny_llama(path, replace(spec, kv=kv))
        lay = Layout.read(path)
        if any((lay.data_start + t.offset) % 32 for t in lay.tensors):
            return path
    raise AssertionError(f"alignment {spec.alignment} always gives aligned tensors")


BERT_TOKENS = ["[PAD]"] + [f"w{i}" for i in range(40)] + ["[UNK]", "[CLS]", "[SEP]"]


def hostile_cases() -> list[HostileCase]:
    """One file per rule of ondevice.model_check, named after the class in issue 20."""
    big = {"n_embd": 256, "n_ff": 256}  # 256-wide rows: what Q8_K's blocks need
    bert = {
        "tokenizer.ggml.model": ("bert", V.STRING, None),
        "tokenizer.ggml.bos_token_id": None,
        "tokenizer.ggml.eos_token_id": None,
        "tokenizer.ggml.merges": None,
    }
    glm4 = {
        "tokenizer.ggml.pre": ("glm4", V.STRING, None),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL, None),
        "tokenizer.ggml.bos_token_id": None,
    }
    rows: list[tuple[str, str, TinySpec, str, str]] = [
        ("KV_HEADS_NOT_DIVIDING", "heads", TinySpec(n_head=4, n_head_kv=3), "divide", "abort"),
        ("KV_HEADS_OVER_HEADS", "heads", TinySpec(n_head=4, n_head_kv=8), "divide", "abort"),
        ("KV_HEADS_ARRAY_ZERO", "heads",
         TinySpec(kv={"llama.attention.head_count_kv": ([2, 0], V.ARRAY, V.UINT32)}),
         "0 KV heads", "abort"),
        ("KV_HEADS_ARRAY_VARYING", "heads",
         TinySpec(kv={"llama.attention.head_count_kv": ([2, 1], V.ARRAY, V.UINT32)}),
         "layer 0", "abort"),
        ("ODD_HEAD_NO_ROPE_KEY", "rope",
         TinySpec(n_embd=36, float_only=True, kv={"llama.rope.dimension_count": None}),
         "odd number", "abort"),
        ("BERT_VOCAB_TOO_SMALL", "special tokens", TinySpec(tokens=BERT_TOKENS, kv=bert),
         "default id 101", "abort"),
        ("BERT_WITHOUT_SEPARATOR", "special tokens",
         TinySpec(tokens=BERT_TOKENS, kv={**bert, "tokenizer.ggml.bos_token_id":
                                          (42, V.UINT32, None)}),
         "seperator", "abort"),
        ("BPE_ADD_BOS_WITHOUT_BOS", "special tokens", TinySpec(kv=glm4), "bos", "abort"),
    ]  # fmt: skip
    for t in ("Q8_K", "I8", "I16", "I32", "I64", "F64"):
        spec = TinySpec(types={"blk.0.attn_q.weight": Q[t]}, **(big if t == "Q8_K" else {}))
        rows.append((f"MATRIX_{t}", "matrix type", spec, "matrix", "segv"))
    for t in ("I8", "I16", "I32", "Q8_K", "F64"):
        spec = TinySpec(types={"token_embd.weight": Q[t]}, **(big if t == "Q8_K" else {}))
        rows.append((f"EMBEDDING_{t}", "embedding type", spec, "embedding", "abort"))
    for t in ("F16", "BF16", "I32", "Q8_0"):
        spec = TinySpec(types={"blk.0.attn_norm.weight": Q[t]})
        rows.append((f"NORM_{t}", "norm type", spec, "multiplied", "abort"))
    rows.append(
        (
            "OUTPUT_NORM_F16",
            "norm type",
            TinySpec(types={"output_norm.weight": Q.F16}),
            "multiplied",
            "abort",
        )
    )
    rows.append(("BIAS_F16", "bias type", TinySpec(extra_tensors={"blk.0.attn_q.bias": (64,)},
                 types={"blk.0.attn_q.bias": Q.F16}), "added", "abort"))  # fmt: skip
    for t in ("F16", "I32"):
        spec = TinySpec(
            extra_tensors={"rope_freqs.weight": (8,)}, types={"rope_freqs.weight": Q[t]}
        )
        rows.append((f"ROPE_FREQS_{t}", "rope_freqs type", spec, "rotary", "abort"))
    for a in (1, 2, 4, 8):
        rows.append((f"ALIGNMENT_{a}", "alignment", TinySpec(alignment=a), "", "abort"))
    return [HostileCase(*row) for row in rows]


def demo_norm_as_i32(demo: Path, out: Path, *, sparse: bool = False) -> Path:
    """The real demo model with one byte changed: blk.0.attn_norm.weight's type F32 -> I32
    (the same element size, so every offset stays valid)."""
    lay = Layout.read(demo)
    t = lay.tensor("blk.0.attn_norm.weight")
    at = t.at + 8 + len(t.name) + 4 + 8 * len(t.dims)  # name, dim count, dims, then the type
    assert struct.unpack_from("<I", lay.data, at) == (0,)  # F32
    case = Case("DEMO_NORM_F32_TO_I32", lay.patched(at, "<I", 26), "attn_norm")
    return case.write(out, demo, sparse=sparse)


# --- fuzzing ------------------------------------------------------------------------------------

# Names llama.cpp gives meaning to: tokenizer models, architectures, pre-tokenizers, rope types.
NAMES = (
    "llama bert gpt2 t5 rwkv test none no_vocab plamo2 gemma4 hybriddna whitespace "
    "phi2 phi3 gemma gemma2 gemma3 qwen2 qwen3 mamba rwkv6 falcon starcoder mpt bloom deci "
    "default llama3 gpt-2 smollm qwen2 deepseek-llm refact command-r "
    "linear yarn longrope"
).split()
_MEANINGFUL = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre")


class Mutator:
    """Seeded random mutations of a valid file's header region, all the same length as the
    original (so a large model can be patched in place and restored), plus truncations.

    Strategies: set a numeric field (counts, lengths, types, dims, offsets, scalar values) to an
    interesting value; flip bits or overwrite bytes anywhere in the header; shorten the file.
    """

    def __init__(self, lay: Layout) -> None:
        self.lay = lay
        self.size = lay.size
        self.header_end = self.lay.data_start
        self.by_kind: dict[str, list[Field]] = {}
        for f in self.lay.fields:
            self.by_kind.setdefault(f.kind, []).append(f)
        self.kinds = sorted(self.by_kind)
        self.strings = [
            (kv.value_at + 8, len(kv.raw) - 8, kv.key.decode(errors="replace"))
            for kv in lay.kvs
            if kv.vtype == T_STRING and 0 < len(kv.raw) - 8 <= 64
        ]

    def interesting(self, rng: random.Random, f: Field, current: int | float) -> int | float:
        bits = 8 * f.size
        if f.is_float:
            return rng.choice([0.0, -1.0, 1e30, float("inf"), float("nan"), -current, current * 7])
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if f.signed else (0, (1 << bits) - 1)
        choices = [
            0,
            1,
            2,
            3,
            4,
            5,
            7,
            8,
            9,
            13,
            16,
            31,
            32,
            63,
            64,
            255,
            256,
            512,
            513,
            1 << 16,
            self.size,
            self.size - 1,
            self.size + 1,
            hi,
            hi - 1,
            lo,
            -1,
            current + 1,
            current - 1,
            current * 2,
            current // 2,
            current ^ (1 << rng.randrange(bits)),
            rng.randrange(1 << bits),
        ]
        return int(rng.choice(choices))  # the caller wraps it into the field's range

    def mutate(self, rng: random.Random) -> tuple[list[tuple[int, bytes]], int, str]:
        """Return (patches [(offset, new bytes)], new file length, description)."""
        roll = rng.random()
        if roll < 0.1 and self.strings:
            # A string value replaced by a name llama.cpp knows (same length, so the file's
            # layout stays): another tokenizer, architecture, pre-tokenizer or rope type.
            meaningful = [t for t in self.strings if t[2] in _MEANINGFUL or "rope" in t[2]]
            at, n, label = rng.choice(
                meaningful if meaningful and rng.random() < 0.7 else self.strings
            )
            same = [w for w in NAMES if len(w) == n]
            word = (
                rng.choice(same).encode() if same else bytes(rng.choice(b"az_.0") for _ in range(n))
            )
            return [(at, word)], self.size, f"string {label!r} := {word[:40]!r}"
        if roll < 0.55:
            kind = rng.choice(self.kinds)
            f = rng.choice(self.by_kind[kind])
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[f.size]
            if f.is_float:
                fmt = "f" if f.size == 4 else "d"
            elif f.signed:
                fmt = fmt.lower()
            current = struct.unpack_from("<" + fmt, self.lay.data, f.offset)[0]
            value = self.interesting(rng, f, current)
            if not f.is_float:
                bits = 8 * f.size
                value = int(value) % (1 << bits)
                if f.signed and value >= 1 << (bits - 1):
                    value -= 1 << bits
            raw = struct.pack("<" + fmt, value)
            return [(f.offset, raw)], self.size, f"{kind} {f.label!r} @{f.offset} := {value!r}"
        if roll < 0.85:
            n = rng.choice([1, 1, 1, 2, 4, 8])
            patches = []
            for _ in range(n):
                at = rng.randrange(self.header_end)
                old = self.lay.data[at]
                new = old ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
                patches.append((at, bytes([new])))
            where = ", ".join(f"@{a}" for a, _ in patches)
            return patches, self.size, f"{n} byte(s) changed at {where}"
        if roll < 0.95:
            # Overwrite a run with a repeated byte (zeros, 0xff, spaces, NULs in strings).
            at = rng.randrange(self.header_end)
            n = rng.choice([2, 4, 8, 16, 64])
            byte = rng.choice([0x00, 0xFF, 0x20, 0x41, 0x80])
            n = min(n, self.header_end - at)
            return [(at, bytes([byte]) * n)], self.size, f"{n} bytes := {byte:#x} at @{at}"
        cut = rng.choice(
            [rng.randrange(self.header_end), rng.randrange(self.header_end, self.size)]
        )
        return [], cut, f"truncated to {cut} bytes"


class WorkingCopy:
    """A copy of a valid file that mutations are applied to in place and then undone, so that
    fuzzing a 98 MB model costs a few bytes of I/O per case instead of a 98 MB copy."""

    def __init__(self, lay: Layout, source: Path, path: Path) -> None:
        self.lay, self.source, self.path = lay, source, path
        shutil.copyfile(source, path)

    @contextmanager
    def mutated(self, patches: list[tuple[int, bytes]], length: int) -> Iterator[Path]:
        with open(self.path, "r+b") as f:
            for at, raw in patches:
                f.seek(at)
                f.write(raw)
            if length != self.lay.size:
                f.truncate(length)
        try:
            yield self.path
        finally:
            with open(self.path, "r+b") as f:
                for at, raw in patches:
                    f.seek(at)
                    f.write(self.lay.data[at : at + len(raw)])
                if length != self.lay.size:
                    with open(self.source, "rb") as src:
                        src.seek(length)
                        f.seek(length)
                        shutil.copyfileobj(src, f, 1 << 20)
