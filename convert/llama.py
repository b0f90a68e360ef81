"""Llama (`LlamaForCausalLM`, `MistralForCausalLM`) → llama.cpp's `llama` architecture, and the
decoder family Qwen2 and Phi-3 share with it (`LlamaFamily`).

The family: pre-norm RMSNorm blocks, rotary attention with grouped KV heads, a SwiGLU MLP, tied
or untied embeddings, `rope_theta` and `rope_scaling`. Llama-2/3.x, Mistral 7B, SmolLM2 and
TinyLlama are this class. What differs between them is in the config (GQA ratio, head_dim,
rope scaling, tied embeddings) and the tokenizer (SentencePiece or byte-level BPE).

Llama-specific: llama.cpp's `llama` graph uses the original Llama rotary layout (neighbouring
pairs), so Q and K rows are reordered (`rotary_row_order`); `rope_scaling` of type `llama3`
becomes llama.cpp's per-dimension frequency factors (`rope_freqs`), and `linear` its linear
scaling. Mistral's `sliding_window` is not written: llama.cpp's `llama` graph attends to the
whole context, as transformers does below the window (4096 tokens for Mistral v0.1).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import gguf
import numpy as np
from ondevice.convert.base import Architecture, HParams, Shapes, register

logger = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR


class LlamaFamily(Architecture):
    """Config reading, hyperparameters and tensor shapes shared by Llama, Qwen2 and Phi-3."""

    # rope_scaling types this architecture converts (None: no scaling)
    rope_types: ClassVar[tuple[str | None, ...]] = (None, "default")
    qkv_bias: ClassVar[bool] = False  # Qwen2: q/k/v always have biases

    def read_config(self, hp: HParams) -> None:
        self.hidden = hp.int("hidden_size")
        self.n_head = hp.int("num_attention_heads")
        self.n_kv = hp.int("num_key_value_heads", default=self.n_head)
        self.n_blocks = hp.int("num_hidden_layers")
        self.vocab_size = hp.int("vocab_size")
        self.ffn = hp.int("intermediate_size")
        self.n_ctx = hp.int("max_position_embeddings")
        self.eps = hp.float("rms_norm_eps", default=1e-6)
        self.rope_theta = hp.float("rope_theta", default=10000.0)
        hp.require(self.n_head % self.n_kv == 0, "head count not a multiple of the KV head count")
        head_dim = hp.get("head_dim", default=None)
        if head_dim is None:
            hp.require(self.hidden % self.n_head == 0, "hidden size not a multiple of heads")
            head_dim = self.hidden // self.n_head
        self.head_dim = hp.int("head_dim", default=head_dim)
        self.explicit_head_dim = self.head_dim != self.hidden // self.n_head
        self.n_rot = self.head_dim
        act = hp.get("hidden_act", default="silu")
        hp.require(act == "silu", f"activation {act} (llama.cpp's graph uses SiLU)")
        self.attn_bias = bool(hp.get("attention_bias", default=False)) or self.qkv_bias
        hp.require(not hp.get("mlp_bias", default=False), "mlp_bias")
        self.tied = bool(hp.get("tie_word_embeddings", default=False))
        if self.tied:  # llama.cpp falls back to token_embd when there is no output tensor
            self.optional = frozenset({T.OUTPUT})
        self.rope = self._rope_scaling(hp)
        self.read_variant(hp)

    def read_variant(self, hp: HParams) -> None:
        """What a member of the family adds to the config."""

    def _rope_scaling(self, hp: HParams) -> dict[str, Any]:
        scaling = hp.config.get("rope_scaling")
        nested = hp.config.get("rope_parameters")
        params = (
            scaling if isinstance(scaling, dict) else nested if isinstance(nested, dict) else {}
        )
        kind = params.get("rope_type", params.get("type"))
        if kind not in self.rope_types:
            supported = ", ".join(str(k) for k in self.rope_types if k and k != "default")
            hp.require(False, f"rope scaling {kind!r} (supported: {supported or 'none'})")
        return {**params, "rope_type": None if kind == "default" else kind}

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.hidden)
        w.add_feed_forward_length(self.ffn)
        w.add_block_count(self.n_blocks)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv)
        w.add_layer_norm_rms_eps(self.eps)
        w.add_rope_freq_base(self.rope_theta)
        w.add_rope_dimension_count(self.n_rot)
        w.add_vocab_size(self.vocab_size)
        if self.explicit_head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if self.rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(self.rope["factor"]))

    def shapes(self) -> Shapes:
        h, f, v = self.hidden, self.ffn, self.vocab_size
        q, kv = self.n_head * self.head_dim, self.n_kv * self.head_dim
        bias = self.attn_bias
        return {
            T.TOKEN_EMBD: ((v, h), None),
            T.ATTN_NORM: ((h,), None),
            T.ATTN_Q: ((q, h), (q,) if bias else None),
            T.ATTN_K: ((kv, h), (kv,) if bias else None),
            T.ATTN_V: ((kv, h), (kv,) if bias else None),
            T.ATTN_OUT: ((h, q), (h,) if bias and not self.qkv_bias else None),
            T.FFN_NORM: ((h,), None),
            T.FFN_GATE: ((f, h), None),
            T.FFN_UP: ((f, h), None),
            T.FFN_DOWN: ((h, f), None),
            T.OUTPUT_NORM: ((h,), None),
            T.OUTPUT: ((v, h), None),
        }


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(LlamaFamily):
    model_arch = gguf.MODEL_ARCH.LLAMA
    rope_types = (None, "default", "llama3", "linear")

    def read_variant(self, hp: HParams) -> None:
        window = hp.get("sliding_window", default=None)
        if window:
            logger.info(
                "sliding_window %s is not written: llama.cpp's llama graph attends to the whole "
                "context (the same as transformers for prompts shorter than the window)",
                window,
            )
        if self.rope["rope_type"] == "llama3":
            for key in ("factor", "original_max_position_embeddings"):
                hp.require(key in self.rope, f"llama3 rope scaling without {key}")

    def permuted_heads(self, kind: gguf.MODEL_TENSOR) -> int | None:
        return {T.ATTN_Q: self.n_head, T.ATTN_K: self.n_kv}.get(kind)

    def extra_tensors(self) -> dict[str, np.ndarray]:
        if self.rope["rope_type"] != "llama3":
            return {}
        return {
            gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight": llama3_rope_factors(
                self.rope_theta, self.head_dim, self.rope
            )
        }


def llama3_rope_factors(theta: float, head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's rope scaling as llama.cpp applies it: one divisor per frequency.

    Frequencies with a wavelength shorter than original_context / high_freq_factor stay,
    longer than original_context / low_freq_factor are divided by `factor`, and those between
    are blended (transformers' `_compute_llama3_parameters`). Computed in float32 with the
    reference converter's operations (`x / tensor` in torch is `x * (1 / tensor)`), so the
    bytes are the same.
    """
    one = np.float32(1.0)
    factor = np.float32(rope["factor"])
    low = np.float32(rope.get("low_freq_factor", 1.0))
    high = np.float32(rope.get("high_freq_factor", 4.0))
    old_ctx = rope["original_max_position_embeddings"]
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # float64 power rounded once: what torch computes for `float ** float32 tensor`
    freqs = one / np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    wavelen = (one / freqs) * np.float32(2 * math.pi)
    smooth = ((one / wavelen) * np.float32(old_ctx) - low) / (high - low)
    blended = one / ((one - smooth) / factor + smooth)
    out = np.where(wavelen < np.float32(old_ctx / float(high)), one, blended)
    return np.where(wavelen > np.float32(old_ctx / float(low)), factor, out).astype(np.float32)
