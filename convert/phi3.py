"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`) → llama.cpp's `phi3` architecture.

A member of the Llama family (see `LlamaFamily`) whose checkpoints fuse q/k/v into `qkv_proj`
and gate/up into `gate_up_proj`; llama.cpp loads both fused, as they are (its phi3 graph splits
the gate and up halves itself). Partial rotary embeddings (Phi-4-mini: 3/4 of each head) and
LongRoPE (the 128k variants: `short_factor` / `long_factor`) are written as llama.cpp expects:
the rotary dimension count and its `rope_factors_short` / `rope_factors_long` tensors with the
attention factor. llama.cpp picks the long factors when the context it is given is longer
than `original_max_position_embeddings`, transformers when the sequence is.
The sliding window of Phi-3-mini (2047) is not written: llama.cpp's phi3 graph disables it.
"""

from __future__ import annotations

import logging
import math

import gguf
import numpy as np
from ondevice.convert.base import HParams, Shapes, register
from ondevice.convert.llama import LlamaFamily

logger = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR


@register("Phi3ForCausalLM")
class Phi3(LlamaFamily):
    model_arch = gguf.MODEL_ARCH.PHI3
    rope_types = (None, "default", "longrope", "su")
    alternatives = (frozenset({T.ATTN_QKV}), frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}))

    def read_variant(self, hp: HParams) -> None:
        hp.require(not self.explicit_head_dim, "head_dim other than hidden_size / heads")
        factor = hp.float("partial_rotary_factor", default=1.0)
        # transformers: int(head_dim * factor); llama.cpp's converter: int(factor * hidden) // heads
        self.n_rot = int(self.head_dim * factor)
        hp.require(
            0 < self.n_rot <= self.head_dim and self.n_rot % 2 == 0, f"rotary dims {self.n_rot}"
        )
        self.orig_ctx = hp.int("original_max_position_embeddings", default=self.n_ctx)
        if hp.get("sliding_window", default=None):
            logger.info("sliding_window is not written: llama.cpp's phi3 graph disables it")
        self.long_factor = self.short_factor = None
        if self.rope["rope_type"] in ("longrope", "su"):
            long, short = self.rope.get("long_factor"), self.rope.get("short_factor")
            for name, values in (("long_factor", long), ("short_factor", short)):
                hp.require(
                    isinstance(values, list)
                    and len(values) == self.n_rot // 2
                    and all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in values
                    ),
                    f"LongRoPE {name} must be {self.n_rot // 2} numbers (half the rotary dims)",
                )
            self.long_factor = np.asarray(long, dtype=np.float32)
            self.short_factor = np.asarray(short, dtype=np.float32)
            scale = self.n_ctx / self.orig_ctx
            default = math.sqrt(1 + math.log(scale) / math.log(self.orig_ctx)) if scale > 1 else 1.0
            self.attn_factor = float(self.rope.get("attention_factor") or default)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_rope_scaling_orig_ctx_len(self.orig_ctx)
        if self.long_factor is not None:
            w.add_rope_scaling_attn_factors(self.attn_factor)

    def shapes(self) -> Shapes:
        shapes = super().shapes()
        h, f, kv = self.hidden, self.ffn, self.n_kv * self.head_dim
        del shapes[T.FFN_GATE]
        shapes[T.FFN_UP] = ((2 * f, h), None)  # gate_up_proj: gate rows, then up rows
        shapes[T.ATTN_QKV] = ((h + 2 * kv, h), None)
        return shapes

    def extra_tensors(self) -> dict[str, np.ndarray]:
        if self.long_factor is None:
            return {}
        return {
            gguf.TENSOR_NAMES[T.ROPE_FACTORS_LONG] + ".weight": self.long_factor,
            gguf.TENSOR_NAMES[T.ROPE_FACTORS_SHORT] + ".weight": self.short_factor,
        }
