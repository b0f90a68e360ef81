"""Phi-2 (`PhiForCausalLM`) → llama.cpp's `phi2` architecture.

Reads all three config layouts (microsoft/phi-2's, transformers 5's nested `rope_parameters`,
the original release's n_embd/n_head/rotary_dim) and both checkpoint layouts (separate
q/k/v_proj, or the original fused `mixer.Wqkv`, which llama.cpp loads as `attn_qkv` as is).
"""

from __future__ import annotations

import gguf
from ondevice.convert.base import Architecture, HParams, Shapes, register

T = gguf.MODEL_TENSOR


@register("PhiForCausalLM")
class Phi2(Architecture):
    model_arch = gguf.MODEL_ARCH.PHI2
    pre_names = {"gpt-2": "phi-2"}  # GPT-2's splitting; llama.cpp's name for it with Phi-2
    add_bos = False
    alternatives = (frozenset({T.ATTN_QKV}), frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}))

    def read_config(self, hp: HParams) -> None:
        self.hidden = hp.int("hidden_size", "n_embd")
        self.n_head = hp.int("num_attention_heads", "n_head")
        self.n_kv = hp.int("num_key_value_heads", "n_head_kv", default=self.n_head)
        self.n_blocks = hp.int("num_hidden_layers", "n_layer")
        self.vocab_size = hp.int("vocab_size")
        # The config's own value: llama.cpp's converter writes 4 * hidden, wrong for other sizes.
        self.ffn = hp.int("intermediate_size", "n_inner", default=4 * self.hidden)
        self.n_ctx = hp.int("max_position_embeddings", "n_positions")
        self.eps = hp.float("layer_norm_eps", "layer_norm_epsilon", default=1e-5)
        self.rope_theta = hp.float("rope_theta", default=10000.0)
        hp.require(self.hidden % self.n_head == 0, "hidden size not a multiple of the head count")
        hp.require(self.n_head % self.n_kv == 0, "head count not a multiple of the KV head count")
        self.head_dim = self.hidden // self.n_head
        # transformers: rotary_ndims = int(head_dim * partial_rotary_factor) (default 0.5)
        factor = hp.float("partial_rotary_factor", default=0.5)
        self.n_rot = hp.int("rotary_dim", default=int(self.head_dim * factor))
        hp.require(self.n_rot <= self.head_dim and self.n_rot % 2 == 0, f"rotary dims {self.n_rot}")
        act = hp.get("hidden_act", "activation_function", default="gelu_new")
        hp.require(
            act in ("gelu_new", "gelu_pytorch_tanh"),
            f"activation {act} (llama.cpp's phi2 uses tanh GELU)",
        )
        hp.require(not hp.get("qk_layernorm", default=False), "qk_layernorm")
        rope_type = hp.get("rope_type", default="default")
        scaling = hp.config.get("rope_scaling")
        hp.require(rope_type == "default" and not scaling, f"rope scaling {scaling or rope_type}")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.hidden)
        w.add_feed_forward_length(self.ffn)
        w.add_block_count(self.n_blocks)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv)
        w.add_layer_norm_eps(self.eps)
        w.add_rope_dimension_count(self.n_rot)
        w.add_rope_freq_base(self.rope_theta)

    def shapes(self) -> Shapes:
        h, f, v, kv = self.hidden, self.ffn, self.vocab_size, self.n_kv * self.head_dim
        return {
            T.TOKEN_EMBD: ((v, h), None),
            T.ATTN_NORM: ((h,), (h,)),
            T.ATTN_QKV: ((h + 2 * kv, h), (h + 2 * kv,)),
            T.ATTN_Q: ((h, h), (h,)),
            T.ATTN_K: ((kv, h), (kv,)),
            T.ATTN_V: ((kv, h), (kv,)),
            T.ATTN_OUT: ((h, h), (h,)),
            T.FFN_UP: ((f, h), (f,)),
            T.FFN_DOWN: ((h, f), (h,)),
            T.OUTPUT_NORM: ((h,), (h,)),
            T.OUTPUT: ((v, h), (v,)),
        }
