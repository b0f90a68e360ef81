"""Predicts a model's peak memory from its GGUF header alone: weights + KV cache + compute + overhead.

Used by `ondevice info`, `ondevice fit` and `load()` (which refuses a model that cannot fit the
available memory). Each term is the arithmetic llama.cpp itself uses to size its buffers:
  weights   the tensor data (with mmap the pages are file-backed but still resident);
  kv        n_ctx × layers × (K row + V row) bytes, for the chosen cache type;
  compute   llama.cpp's scheduler buffer, dominated by the logits of one micro-batch and the
            attention scores of one micro-batch against the whole context;
  overhead  the Python interpreter, the binding and llama.cpp's own allocations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ondevice.gguf_check import GGUFHeader

# Measured RSS of a Python process with ondevice and llama.cpp imported and no model loaded.
RUNTIME_OVERHEAD_BYTES = 120 * 1024 * 1024

KV_TYPE_SIZES = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}


@dataclass
class Prediction:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    n_ctx: int
    kv_type: str

    @property
    def predicted_peak_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["predicted_peak_bytes"] = self.predicted_peak_bytes
        return out


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, kv_type: str = "f16") -> int:
    """Bytes of the KV cache for n_ctx tokens: layers × n_ctx × (K + V row bytes)."""
    n_layer = int(header.arch_value("block_count", 0))
    n_embd = int(header.arch_value("embedding_length", 0))
    n_head = _first(header.arch_value("attention.head_count", 1))
    n_head_kv = _first(header.arch_value("attention.head_count_kv", n_head))
    k_len = int(header.arch_value("attention.key_length", n_embd // max(n_head, 1)))
    v_len = int(header.arch_value("attention.value_length", k_len))
    block, size = KV_TYPE_SIZES[kv_type]
    row_k = k_len * n_head_kv // block * size
    row_v = v_len * n_head_kv // block * size
    return n_ctx * n_layer * (row_k + row_v)


def compute_bytes(header: GGUFHeader, n_ctx: int, n_ubatch: int = 512) -> int:
    """llama.cpp's compute buffer for one micro-batch: logits plus attention scores and the
    widest activations (an estimate of the scheduler's reservation)."""
    n_embd = int(header.arch_value("embedding_length", 0))
    n_ff = _first(header.arch_value("feed_forward_length", 4 * n_embd))
    n_head = _first(header.arch_value("attention.head_count", 1))
    n_vocab = len(header.metadata.get("tokenizer.ggml.tokens", ())) or 32000
    logits = n_ubatch * n_vocab * 4
    scores = n_ubatch * n_ctx * n_head * 4
    acts = n_ubatch * (3 * n_embd + 2 * n_ff) * 4
    return logits + scores + acts


def predict(
    header: GGUFHeader, n_ctx: int, kv_type: str = "f16", n_ubatch: int = 512
) -> Prediction:
    return Prediction(
        weights_bytes=header.tensor_bytes,
        kv_bytes=kv_cache_bytes(header, n_ctx, kv_type),
        compute_bytes=compute_bytes(header, n_ctx, n_ubatch),
        overhead_bytes=RUNTIME_OVERHEAD_BYTES,
        n_ctx=n_ctx,
        kv_type=kv_type,
    )


def _first(value: Any) -> int:
    """Per-layer arrays (some models vary head counts by layer) → the largest value."""
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value)
