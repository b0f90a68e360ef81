"""The model-level rules a well-formed GGUF must also keep, or llama.cpp 0.3.36 aborts the process
(GGML_ASSERT, a NULL kernel call) instead of returning an error: head arithmetic, rotary
dimensions, the ggml type of each tensor role, the special tokens each tokenizer needs.

`ondevice.gguf_header.read_header` runs `check()` on every header it has parsed, so `info`,
`fit`, `load`, `pull` and `quantize` all refuse such a file with one `InvalidModelFile` naming
the key or tensor and its byte offset. Each rule was shown to abort raw llama.cpp with a file
built for it (tests/test_model_check.py). What a Python check can't foresee is caught by the
first-load probe in a child process (ondevice.probe).

The tensor-type table (ondevice.tensor_roles) is generated from llama.cpp's source by
scripts/gen_tensor_roles.py; the head and tokenizer rules cite the source lines they mirror.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ondevice.errors import InvalidModelFile
from ondevice.tensor_roles import OP_TYPES, PER_LAYER_KV_ARCHS, ROLE_OPS, ZERO_HEAD_ARCHS

if TYPE_CHECKING:
    from ondevice.gguf_header import GGUFHeader

# ggml's TENSOR_ALIGNMENT: a memory-mapped tensor's address must be a multiple of it
# (ggml-backend.cpp asserts "buffer pointer must be aligned").
MMAP_ALIGNMENT = 32
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
_NULL = -1  # LLAMA_TOKEN_NULL

# llama-vocab.cpp llama_vocab::impl::load: each tokenizer model's default special token ids
# (used when the file has no key; a default outside the vocabulary is disabled) and whether it
# adds BOS / EOS by default. The tokenizer then asserts (aborts) that a token it must add
# exists: SPM/UGM/BPE the BOS when add_bos and the EOS when add_eos, WPM (bert) always the
# BOS ([CLS]) and the separator ([SEP]).
_TOKENIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"bos": 1, "eos": 2, "add_bos": True, "add_eos": False},
    "bert": {"bos": 101, "eos": _NULL, "seperator": 102, "always": ("bos", "seperator")},
    "gpt2": {"bos": 11, "eos": 11, "add_bos": False, "add_eos": False},
    "t5": {"bos": _NULL, "eos": 1, "add_bos": False, "add_eos": True},
    "plamo2": {"bos": 1, "eos": 2, "add_bos": False, "add_eos": False},
    # gemma4 turns add_bos on even over the file's own flag
    "gemma4": {"bos": _NULL, "eos": _NULL, "add_bos": True, "add_eos": False, "force_bos": True},
}
_TOKENIZER_DEFAULTS["hybriddna"] = _TOKENIZER_DEFAULTS["whitespace"] = _TOKENIZER_DEFAULTS["gpt2"]
# BPE pre-tokenizers for which llama.cpp turns add_bos on before reading the file's own flag
# (llama-vocab.cpp: the llama3 family, tekken, chameleon).
_ADD_BOS_PRE = (
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano tekken "
    "chameleon"
).split()
_BOS_DISABLED_PRE = ("chatglm-bpe", "glm4", "glm5")


def check(
    header: GGUFHeader,
    key_at: Mapping[str, int] | None = None,
    type_at: Sequence[int] | None = None,
) -> None:
    """Refuse what aborts llama.cpp. `key_at` (key -> offset of its key/value pair) and
    `type_at` (tensor index -> offset of its type field) place the error in the file."""
    where = _Where(header, key_at or {}, type_at or [])
    check_heads(header, where)
    check_rope(header, where)
    check_tensor_types(header, where)
    check_special_tokens(header, where)


class _Where:
    """Raises InvalidModelFile at a key or a tensor of the file."""

    def __init__(self, header: GGUFHeader, key_at: Mapping[str, int], type_at: Sequence[int]):
        self.header, self.key_at, self.type_at = header, key_at, type_at

    def key(self, key: str, message: str) -> None:
        raise InvalidModelFile(self.header.path, message, offset=self.key_at.get(key, 0), field=key)

    def tensor(self, index: int, message: str) -> None:
        t = self.header.tensors[index]
        offset = self.type_at[index] if index < len(self.type_at) else 0
        raise InvalidModelFile(self.header.path, message, offset=offset, field=f"tensor {t.name!r}")


def _per_layer(value: Any, n_layer: int) -> list[int] | None:
    """A scalar or per-layer hyperparameter as one value per layer (None if absent)."""
    if value is None:
        return None
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)] * n_layer


def check_heads(header: GGUFHeader, where: _Where) -> None:
    """Attention heads per layer: the KV heads must divide the query heads (ggml_mul_mat and
    ggml_flash_attn_ext assert it for grouped-query attention), and a 0 in a per-layer KV head
    array is only meaningful to the architectures in ZERO_HEAD_ARCHS (recurrent or
    attention-free layers); llama asserts on it. (A scalar 0 llama.cpp refuses by itself.) And
    outside PER_LAYER_KV_ARCHS the per-layer KV head counts must all be layer 0's: llama.cpp
    creates those architectures' K/V tensors with layer 0's count (LLAMA_LOAD_LOCALS) and
    builds the graph with each layer's own, so a varying array passes the tensor shape check
    and aborts at the first decode."""
    arch = header.architecture
    n_layer = int(header.arch_value("block_count", 0) or 0)
    key_h, key_kv = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
    heads = _per_layer(header.metadata.get(key_h), n_layer)
    kv_heads = _per_layer(header.metadata.get(key_kv), n_layer) or heads
    if heads is None or kv_heads is None:
        return  # no attention heads: llama.cpp's non-transformer path
    raw = header.metadata.get(key_kv)
    if isinstance(raw, list) and 0 in raw and arch not in ZERO_HEAD_ARCHS:
        where.key(key_kv, f"layer {raw.index(0)} has 0 KV heads, which {arch!r} can't run")
    if isinstance(raw, list) and raw and arch not in PER_LAYER_KV_ARCHS:
        counts = [v for v in raw if v or arch not in ZERO_HEAD_ARCHS]
        odd = next((i for i, v in enumerate(raw) if v in counts and v != counts[0]), None)
        if odd is not None:
            where.key(
                key_kv,
                f"layer {odd} has {raw[odd]} KV heads, layer 0 {counts[0]}: {arch!r} sizes every "
                "layer's K/V projections by layer 0 (its graph would not match them)",
            )
    for il, (h, kv) in enumerate(zip(heads, kv_heads, strict=False)):
        if h > 0 and kv > 0 and h % kv:
            key = key_kv if key_kv in header.metadata else key_h
            where.key(
                key,
                f"layer {il}: {kv} KV heads do not divide {h} query heads "
                "(grouped-query attention needs a whole number of query heads per KV head)",
            )


def check_rope(header: GGUFHeader, where: _Where) -> None:
    """Rotary dimensions as llama.cpp computes them: `rope.dimension_count`, or when the key is
    absent the key head size (`attention.key_length`, else embedding_length / head_count of
    layer 0), must be even (ggml_rope asserts n_dims % 2 == 0 in the first decode)."""
    arch = header.architecture
    md = header.metadata
    heads = md.get(f"{arch}.attention.head_count")
    n_head = int(heads[0] if isinstance(heads, list) and heads else heads or 0)
    if n_head <= 0:
        return  # llama.cpp sets no rotary dimensions without heads
    key = f"{arch}.rope.dimension_count"
    if key in md:
        return  # its parity and size are checked with the other hyperparameters
    head = md.get(f"{arch}.attention.key_length")
    head_dim = (
        int(head) if isinstance(head, int) else int(header.arch_value("embedding_length")) // n_head
    )
    if head_dim % 2:
        where.key(
            f"{arch}.attention.head_count",
            f"heads of {head_dim} dimensions and no {key}: the rotary embedding would rotate an "
            "odd number of dimensions",
        )


def role_ops(name: str) -> tuple[str, ...] | None:
    """The ggml ops llama.cpp uses a tensor in, by its name (None for a name it doesn't know)."""
    base, _, suffix = name.rpartition(".")
    template = _NUMBER.sub("%d", base)
    ops = ROLE_OPS.get(template)
    if ops is None:
        return None
    if suffix == "bias":  # llama-model-loader.cpp: a bias is always added
        return tuple("ADD_ID" if op == "MUL_MAT_ID" else "ADD" for op in ops.split())
    if suffix != "weight":
        return None
    return tuple(ops.split())


def allowed_types(ops: Sequence[str]) -> frozenset[str] | None:
    """The types a tensor used in any of `ops` may have (None: no rule for these ops)."""
    sets = [OP_TYPES[op] for op in ops if op in OP_TYPES]
    if not sets or len(sets) < len(ops):
        return None  # a role with an op we have no rule for: llama.cpp and the probe decide
    return frozenset().union(*sets)


def check_tensor_types(header: GGUFHeader, where: _Where) -> None:
    """Each weight's ggml type must be one the CPU backend computes its role with
    (ondevice.tensor_roles). A token embedding without a separate output matrix is also the
    output matrix (llama.cpp duplicates it), so it must suit a matrix product too."""
    names = {t.name for t in header.tensors}
    tied = "output.weight" not in names
    for i, t in enumerate(header.tensors):
        ops = role_ops(t.name)
        if ops is None:
            continue
        if tied and t.name == "token_embd.weight":
            _check_type(where, i, t.type_name, ("GET_ROWS",))
            _check_type(where, i, t.type_name, ("MUL_MAT",), tied=True)
            continue
        _check_type(where, i, t.type_name, ops)


def _check_type(where: _Where, index: int, type_name: str, ops: Sequence[str], tied=False) -> None:
    allowed = allowed_types(ops)
    if allowed is None or type_name in allowed:
        return
    what = " / ".join(_ROLE_WORDS.get(op, op) for op in ops)
    if tied:
        what = "the output matrix (no output.weight: the embedding is reused)"
    shown = ", ".join(sorted(allowed)) if len(allowed) <= 3 else f"{len(allowed)} other types"
    where.tensor(
        index,
        f"type {type_name} can't be computed as {what} by llama.cpp's CPU backend "
        f"(it would crash at the first decode; allowed: {shown})",
    )


_ROLE_WORDS = {
    "MUL_MAT": "a matrix",
    "MUL_MAT_ID": "an expert matrix",
    "GET_ROWS": "an embedding",
    "MUL": "a norm or scale weight (multiplied in)",
    "ADD": "a bias (added in)",
    "ADD_ID": "an expert bias (added in)",
    "DIV": "a divisor",
    "ROPE": "rotary frequency factors",
}


def check_special_tokens(header: GGUFHeader, where: _Where) -> None:
    """The special tokens the tokenizer adds to every prompt must exist: llama.cpp asserts it
    at the first tokenize (a BERT vocabulary smaller than its default [CLS]=101 / [SEP]=102
    ids, a llama vocabulary with add_bos and no BOS, ...)."""
    md = header.metadata
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    defaults = _TOKENIZER_DEFAULTS.get(model) if isinstance(model, str) else None
    if defaults is None or not isinstance(tokens, list):
        return
    n_vocab = len(tokens)
    pre = md.get("tokenizer.ggml.pre")

    def effective(name: str) -> int:
        default = defaults.get(name, _NULL)
        if name == "bos" and pre in _BOS_DISABLED_PRE:
            default = _NULL
        if not 0 <= default < n_vocab:
            default = _NULL  # llama.cpp disables a default outside the vocabulary
        value = md.get(f"tokenizer.ggml.{name}_token_id")
        return value if isinstance(value, int) and 0 <= value < n_vocab else default

    needed = list(defaults.get("always", ()))
    add_bos = md.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = defaults.get("add_bos", False) or pre in _ADD_BOS_PRE
    add_bos = add_bos or defaults.get("force_bos", False)
    add_eos = md.get("tokenizer.ggml.add_eos_token", defaults.get("add_eos", False))
    if "always" not in defaults:
        needed += ["bos"] * bool(add_bos) + ["eos"] * bool(add_eos)
    for name in needed:
        if effective(name) == _NULL:
            key = f"tokenizer.ggml.{name}_token_id"
            default = defaults.get(name, _NULL)
            why = f"its default id {default} is outside" if default >= 0 else "there is no id in"
            where.key(
                key if key in md else "tokenizer.ggml.model",
                f"the {model!r} tokenizer adds a {name} token to every prompt, but {why} "
                f"the vocabulary of {n_vocab} tokens (llama.cpp would abort at the first "
                "tokenize)",
            )


def mmap_aligned(header: GGUFHeader) -> bool:
    """Whether every tensor would lie at an address aligned for ggml when the file is mapped
    (general.alignment 1, 2, 4, 8 or 16 can break it; llama.cpp then aborts with "buffer
    pointer must be aligned"). Files that aren't are read without mmap (ondevice.policy)."""
    base = header.data_offset
    return all((base + t.offset) % MMAP_ALIGNMENT == 0 for t in header.tensors)
