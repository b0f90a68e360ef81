"""A llama-architecture GGUF turned back into a Hugging Face model folder, for proving the
converter on trained weights (the demo model is the one real model the test machines have).

    folder = gguf_to_hf(demo_path, tmp_path / "smollm2-hf")

Writes config.json (LlamaForCausalLM), model.safetensors (every tensor dequantized to f32 with
gguf-py, Q and K rows put back in transformers' order: the inverse of the converter's
`rotary_row_order`), tokenizer.json rebuilt from the GGUF's vocabulary and merges with the
`tokenizers` library (byte-level BPE with the pre-tokenizer the GGUF names), and
tokenizer_config.json with the special tokens and chat template. Only what a SmolLM2-style
file has is supported; anything else raises ValueError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from ondevice.convert.base import rotary_row_order

# GGUF tensor name -> Hugging Face name (the llama layout)
_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf(path: Path, folder: Path) -> Path:
    reader = gguf.GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    if kv["general.architecture"] != "llama" or kv["tokenizer.ggml.model"] != "gpt2":
        raise ValueError("only llama-architecture GGUFs with a byte-level BPE vocabulary")
    folder.mkdir(parents=True, exist_ok=True)
    n_head, n_kv = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(t.shape)])  # GGML order -> numpy
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if match:
            block, kind = match.groups()
            name = f"model.layers.{block}.{_NAMES[kind]}.weight"
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(kind)
            if heads:  # undo the converter's row order: back to transformers' halves layout
                values = values[np.argsort(rotary_row_order(values.shape[0], heads))]
        else:
            name = _NAMES[t.name.removesuffix(".weight")] + ".weight"
        tensors[name] = np.ascontiguousarray(values)
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokens = kv["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": kv["llama.embedding_length"],
        "intermediate_size": kv["llama.feed_forward_length"],
        "num_hidden_layers": kv["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": kv["llama.rope.dimension_count"],
        "max_position_embeddings": kv["llama.context_length"],
        "rms_norm_eps": kv["llama.attention.layer_norm_rms_epsilon"],  # llama.cpp's f32 value
        "rope_theta": kv["llama.rope.freq_base"],
        "rope_scaling": None,
        "vocab_size": len(tokens),
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
        "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
        "pad_token_id": kv.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder, kv)
    return folder


def _write_tokenizer(folder: Path, kv: dict) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if kv["tokenizer.ggml.pre"] != "smollm":
        raise ValueError(f"pre-tokenizer {kv['tokenizer.ggml.pre']} is not rebuilt here")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    names = {
        "bos_token": tokens[kv["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[kv["tokenizer.ggml.eos_token_id"]],
        "unk_token": tokens[kv["tokenizer.ggml.unknown_token_id"]],
        "pad_token": tokens[kv["tokenizer.ggml.padding_token_id"]],
    }
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "model_max_length": kv["llama.context_length"],
        "chat_template": kv["tokenizer.chat_template"],
        **names,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
