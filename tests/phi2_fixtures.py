"""Tiny random Phi-2 checkpoints for tests: real `PhiForCausalLM` weights saved by transformers,
with a small real byte-level BPE tokenizer, in any of Phi-2's checkpoint and config layouts.

    from phi2_fixtures import make_tiny_phi2
    folder = make_tiny_phi2(tmp_path / "phi", hidden_size=96, num_attention_heads=6)

torch, transformers and tokenizers are imported only when a checkpoint is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Enough text for a few hundred merges over code, prose, digits and non-ASCII.
TRAINING_TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Model:\n\tdef __init__(self, hidden_size=2560):\n\t\tself.hidden_size = hidden_size\n",
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll convert 51200 tokens!",
    "Instruct: Write a poem about the sea.\nOutput: The sea is wide, the sea is deep.",
    "for i in range(10):\n    print(i * 3.14159, 'done')  # comment\n",
    "Ünïcödé: café, naïve, Straße, Привет мир, 日本語のテキスト, emoji 🙂🚀, ½ ≤ ∞",
    "    indented    with    spaces\t\tand\ttabs\n\n\n",
    '1234567890 0.5 42 3e-5 0x1F 1_000_000 [1, 2, 3] {"key": "value"}',
    "Alice: Hello, how are you?\nBob: I'm fine, thanks. And you?\n",
]

EOS = "<|endoftext|>"
# CodeGen / Phi-2 add runs of 31..2 spaces and 9..2 tabs as (non-special) whole tokens.
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]

TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "partial_rotary_factor": 0.4,
}


@dataclass
class TinyPhi2:
    """A built checkpoint: its folder, and the in-memory HF model it holds (f32, eval mode)."""

    path: Path
    model: Any
    n_tokens: int  # real tokenizer entries (the rest of vocab_size is padding)


def make_tiny_phi2(directory: str | Path, **config: Any) -> Path:
    """Build a tiny random Phi-2 checkpoint folder; see `build_tiny_phi2` for the options."""
    return build_tiny_phi2(directory, **config).path


def build_tiny_phi2(
    directory: str | Path,
    *,
    layout: str = "current",
    config_layout: str = "nested",
    shards: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer_files: str = "both",
    **config: Any,
) -> TinyPhi2:
    """Build a checkpoint folder.

    layout: "current" (model.layers.N.self_attn.q_proj ...) or "original" (transformer.h.N.mixer.Wqkv).
    config_layout: "nested" (transformers 5: rope_parameters), "toplevel" (microsoft/phi-2's
    config.json) or "original" (n_embd, n_head, n_layer, rotary_dim, n_inner).
    shards: > 1 writes model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
    dtype: "float32", "float16" or "bfloat16" for the saved weights (the returned model holds
    the same values, rounded, in f32).
    tokenizer_files: "both" (tokenizer.json and vocab.json/merges.txt), "json" or "vocab".
    Other keyword arguments override `TINY_DEFAULTS` in the PhiConfig.
    """
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens, eos_id = write_tokenizer(path, files=tokenizer_files)
    cfg = PhiConfig(**{**TINY_DEFAULTS, **config}, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(seed)
    model = PhiForCausalLM(cfg).eval()
    _randomize(model, seed)
    torch_dtype = getattr(torch, dtype)
    if torch_dtype != torch.float32:
        with torch.no_grad():  # the oracle holds exactly the values saved
            for p in model.parameters():
                p.copy_(p.to(torch_dtype).float())

    if layout == "current":
        max_shard = _shard_size(model, shards, torch_dtype)
        model.to(torch_dtype).save_pretrained(path, max_shard_size=max_shard)
        model.float()
        (path / "generation_config.json").unlink(missing_ok=True)  # not a file we read
    elif layout == "original":
        _save_original_layout(model, path, torch_dtype, shards)
    else:
        raise ValueError(layout)
    _write_config(path, model.config, config_layout)
    if shards > 1:
        assert (path / "model.safetensors.index.json").is_file(), "checkpoint did not shard"
    return TinyPhi2(path, model, n_tokens)


def write_tokenizer(path: Path, *, files: str = "both", vocab_size: int = 400) -> tuple[int, int]:
    """Train a byte-level BPE on TRAINING_TEXT and save it as Phi-2's tokenizer files are laid
    out; returns (number of tokens, id of <|endoftext|>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tok.add_tokens([AddedToken(w, normalized=True, special=False) for w in WHITESPACE_TOKENS])
    eos_id = tok.token_to_id(EOS)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)

    if files in ("both", "json"):
        tok.save(str(path / "tokenizer.json"))
    if files in ("both", "vocab"):
        tok.model.save(str(path))  # vocab.json, merges.txt
        vocab = json.loads((path / "vocab.json").read_text())
        vocab[EOS] = eos_id  # GPT-2's vocab.json holds <|endoftext|> itself
        (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        added = {w: tok.token_to_id(w) for w in WHITESPACE_TOKENS}
        (path / "added_tokens.json").write_text(json.dumps(added))
    decoder = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "rstrip": False, "single_word": False,
            "normalized": t != EOS, "special": t == EOS,
        }
        for t in [EOS, *WHITESPACE_TOKENS]
    }  # fmt: skip
    tok_config = {
        "tokenizer_class": "CodeGenTokenizer",
        "add_prefix_space": False,
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "model_max_length": 2048,
        "added_tokens_decoder": decoder,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS})
    )
    return n_tokens, eos_id


def _randomize(model: Any, seed: int) -> None:
    """Replace HF's init (zero biases, unit norms, tiny weights) with values that exercise every
    tensor: a converter that dropped a bias or swapped two norms must change the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                gain = 3.0 if name.startswith("lm_head") else 1.0
                p.copy_(gain * noise / p.shape[1] ** 0.5)


def _shard_size(model: Any, shards: int, dtype: Any) -> str | int:
    if shards <= 1:
        return "50GB"
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters()) * itemsize
    return max(1, total // shards + 1)


def _save_original_layout(model: Any, path: Path, dtype: Any, shards: int) -> None:
    """The first Phi-2 release's names: fused Wqkv = cat(q, k, v), lm_head.ln / lm_head.linear."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"]}
    for i in range(model.config.num_hidden_layers):
        src, dst = f"model.layers.{i}", f"transformer.h.{i}"
        for part in ("weight", "bias"):
            out[f"{dst}.ln.{part}"] = sd[f"{src}.input_layernorm.{part}"]
            out[f"{dst}.mixer.Wqkv.{part}"] = torch.cat(
                [sd[f"{src}.self_attn.{p}_proj.{part}"] for p in "qkv"], dim=0
            ).contiguous()
            out[f"{dst}.mixer.out_proj.{part}"] = sd[f"{src}.self_attn.dense.{part}"]
            out[f"{dst}.mlp.fc1.{part}"] = sd[f"{src}.mlp.fc1.{part}"]
            out[f"{dst}.mlp.fc2.{part}"] = sd[f"{src}.mlp.fc2.{part}"]
    for part in ("weight", "bias"):
        out[f"lm_head.ln.{part}"] = sd[f"model.final_layernorm.{part}"]
        out[f"lm_head.linear.{part}"] = sd[f"lm_head.{part}"]
    if shards <= 1:
        save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(out)
    weight_map = {}
    for s in range(shards):
        shard_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: out[n] for n in names[s::shards]}
        save_file(part, str(path / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard_name))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in out.values())},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(path: Path, cfg: Any, layout: str) -> None:
    data = (
        json.loads((path / "config.json").read_text())
        if (path / "config.json").is_file()
        else cfg.to_dict()
    )
    data["architectures"] = ["PhiForCausalLM"]
    rope = data.pop("rope_parameters", None) or {
        "partial_rotary_factor": cfg.partial_rotary_factor, "rope_theta": cfg.rope_theta,
    }  # fmt: skip
    if layout == "nested":
        data["rope_parameters"] = rope
    elif layout == "toplevel":  # as microsoft/phi-2's config.json has it
        data["partial_rotary_factor"] = rope["partial_rotary_factor"]
        data["rope_theta"] = rope["rope_theta"]
        data["rope_scaling"] = None
    elif layout == "original":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        data = {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi-msft",
            "activation_function": "gelu_new",
            "n_embd": cfg.hidden_size,
            "n_head": cfg.num_attention_heads,
            "n_head_kv": None,
            "n_inner": None
            if cfg.intermediate_size == 4 * cfg.hidden_size
            else cfg.intermediate_size,
            "n_layer": cfg.num_hidden_layers,
            "n_positions": cfg.max_position_embeddings,
            "rotary_dim": int(head_dim * rope["partial_rotary_factor"]),
            "layer_norm_epsilon": cfg.layer_norm_eps,
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
        }
    else:
        raise ValueError(layout)
    (path / "config.json").write_text(json.dumps(data, indent=2))
