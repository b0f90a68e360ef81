"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) → llama.cpp's `qwen2` architecture.

A member of the Llama family (see `LlamaFamily`) with biases on the q, k and v projections and,
on the small models, tied embeddings. llama.cpp's qwen2 graph uses the NEOX rotary layout, the
one transformers uses, so no rows are reordered. `use_sliding_window` (off in every released
Qwen2/2.5 config) is refused: llama.cpp's qwen2 graph has no sliding window.
"""

from __future__ import annotations

import gguf
from ondevice.convert.base import HParams, register
from ondevice.convert.llama import LlamaFamily


@register("Qwen2ForCausalLM")
class Qwen2(LlamaFamily):
    model_arch = gguf.MODEL_ARCH.QWEN2
    qkv_bias = True

    def read_variant(self, hp: HParams) -> None:
        hp.require(
            not hp.get("use_sliding_window", default=False),
            "use_sliding_window (llama.cpp's qwen2 attends to the whole context)",
        )
        hp.require(not self.explicit_head_dim, "head_dim other than hidden_size / heads")
