"""Tiny random checkpoints of the Llama family (Llama, Mistral, Qwen2, Phi-3) for tests: real
transformers models saved with save_pretrained, and small real tokenizers in the layouts the
released models use:

- byte-level BPE trained with `tokenizers`, in the Llama-3, Qwen2, SmolLM and Phi-4-mini
  (GPT-4o) styles: the pre-tokenizer, special tokens, BOS handling, tokenizer class and chat
  template of each;
- SentencePiece BPE with byte fallback trained with `sentencepiece`, as Llama 2 / TinyLlama /
  Mistral ship it (tokenizer.model plus the legacy tokenizer.json transformers 4 wrote), and
  as Phi-3 does (its added <|user|>/<|end|>/... tokens strip the whitespace after them).

    from family_fixtures import build
    tiny = build(tmp_path / "m", "llama", tokenizer="llama3", num_key_value_heads=2)

torch, transformers, tokenizers and sentencepiece are imported only when something is built.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2_fixtures import TRAINING_TEXT

MULTILINGUAL = [
    "Le café est très bon, mais la crème brûlée est meilleure. Où est la gare ?",
    "Привет, как дела? Сегодня хорошая погода. Български език и нещо още.",
    "日本語のテキストです。東京は大きな都市です。我想在apple工作。한국어 문장입니다.",
    "emoji 🙂🚀🦙 ✅ 😶\u200d🌫️ and symbols ½ ≤ ∞ → ∑ ∫ € £ ¥ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Numbers: 3 33 333 3333 33333 3.14159 1e-5 0xFF 1,000,000 and dates 2024-12-31.",
    "Straße, naïve, façade, jalapeño, Ελληνικά γράμματα, עברית, العربية",
    "हिन्दी और संस्कृत, កាន់តែពិសេស",  # combining marks (see COMBINING)
    "    four spaces\tand a tab\n\n\nnewlines   and   runs  of   spaces  ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea?",
]
TEXT = TRAINING_TEXT + MULTILINGUAL
# Devanagari and Khmer vowel signs are combining marks (\p{M}); Phi-4-mini's pre-tokenizer
# keeps them in words, llama.cpp's gpt-4o one (written without \p{M}) splits them off.
COMBINING = MULTILINGUAL[6]

# Chat templates in the style of the released ones (kept short).
TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
        "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
        "{% else %}{{ eos_token }}{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] "
        "+ ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
}

# Byte-level BPE styles: pre-tokenizer, specials (before or after the trained vocabulary), BOS
# and EOS tokens, tokenizer class, template, whether merges are ignored for whole-word tokens.
BPE_STYLES: dict[str, dict[str, Any]] = {
    "llama3": dict(
        split="llama3", front=[],
        back=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", cls="PreTrainedTokenizerFast",
        template="llama3", ignore_merges=True,
    ),
    "qwen2": dict(
        split="qwen2", front=[], back=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", cls="Qwen2Tokenizer", template="chatml",
        nfc=True,
    ),
    "smollm": dict(
        split="digits", front=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"],
        back=[], bos="<|im_start|>", eos="<|im_end|>", unk="<|endoftext|>",
        cls="GPT2Tokenizer", template="chatml",
    ),
    "gpt4o": dict(  # Phi-4-mini
        split="gpt4o", front=[],
        back=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", cls="GPT2Tokenizer",
        template="phi3",
    ),
}  # fmt: skip

PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


@dataclass
class Tiny:
    """A built checkpoint: its folder and the in-memory HF model it holds (f32, eval mode)."""

    path: Path
    model: Any
    tokenizer: str  # the style name
    spm: bool  # a SentencePiece tokenizer (tokenizer.model)


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}

DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def build(
    directory: str | Path,
    family: str,
    *,
    tokenizer: str,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    **config: Any,
) -> Tiny:
    """A checkpoint folder of `family` (llama, mistral, qwen2, phi3) with a `tokenizer`
    (llama3, qwen2, smollm, gpt4o: BPE; llama2, phi3: SentencePiece). Other keyword arguments
    go to the transformers config (over DEFAULTS); vocab_size is the tokenizer's, rounded up
    to a multiple of 64 (so the embedding has padding rows, as released models do)."""
    import torch
    import transformers

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    spm = tokenizer in ("llama2", "phi3")
    n_tokens, ids = (write_spm_tokenizer if spm else write_bpe_tokenizer)(path, tokenizer)
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    vocab_size = -(-n_tokens // 64) * 64 + 64
    cfg = config_cls(**{**DEFAULTS, "vocab_size": vocab_size, **ids, **config})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize(model, seed)
    torch_dtype = getattr(torch, dtype)
    if torch_dtype != torch.float32:
        with torch.no_grad():  # the oracle holds exactly the values saved
            for p in model.parameters():
                p.copy_(p.to(torch_dtype).float())
    max_shard = "50GB"
    if shards > 1:
        total = (
            sum(p.numel() for p in model.parameters())
            * torch.empty((), dtype=torch_dtype).element_size()
        )
        max_shard = max(1, total // shards + 1)
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # rotary inv_freq stays f32
    model.to(torch_dtype).save_pretrained(path, max_shard_size=max_shard)
    model.float()
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    (path / "generation_config.json").unlink(missing_ok=True)  # not a file we read
    if shards > 1:
        assert (path / "model.safetensors.index.json").is_file(), "checkpoint did not shard"
    return Tiny(path, model, tokenizer, spm)


def randomize(model: Any, seed: int) -> None:
    """Values that exercise every tensor (HF's init has unit norms and zero biases): a
    converter that dropped a bias, swapped two norms or mis-ordered Q/K rows changes logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                gain = 3.0 if name.startswith("lm_head") else 1.0
                p.copy_(gain * noise / p.shape[1] ** 0.5)


# -- byte-level BPE --------------------------------------------------------------------------


def write_bpe_tokenizer(path: Path, style: str, vocab_size: int = 700) -> tuple[int, dict]:
    """Train a BPE in `style` (see BPE_STYLES) and save it as the released models lay it out;
    returns (number of tokens, the config's bos/eos/pad ids)."""
    from ondevice.convert import pretokenizer as pt
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    s = BPE_STYLES[style]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=s["split"] == "digits")
    if s["split"] == "digits":
        first = pre_tokenizers.Digits(individual_digits=True)
    else:
        regex = {"llama3": pt.LLAMA3_REGEX, "qwen2": pt.QWEN2_REGEX, "gpt4o": pt.GPT4O_REGEX}
        first = pre_tokenizers.Split(Regex(regex[s["split"]]), behavior="isolated", invert=False)
    tok = Tokenizer(models.BPE(ignore_merges=s.get("ignore_merges", False)))
    tok.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    if s.get("nfc"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=s["front"],
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in s["back"]])
    if s["bos"] and style == "llama3":
        bos_id = tok.token_to_id(s["bos"])
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{s['bos']} $A",
                    pair=f"{s['bos']} $A:0 {s['bos']}:1 $B:1",
                    special_tokens=[(s["bos"], bos_id)],
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path / "tokenizer.json"))
    names = {"bos": s["bos"], "eos": s["eos"], "pad": s.get("pad"), "unk": s.get("unk")}
    tok_config = {
        "tokenizer_class": s["cls"],
        "add_prefix_space": False,
        "model_max_length": 131072,
        "chat_template": TEMPLATES[s["template"]],
        **{f"{role}_token": text for role, text in names.items()},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False))
    ids = {f"{role}_token_id": tok.token_to_id(t) if t else None for role, t in names.items()}
    del ids["unk_token_id"]
    if style == "qwen2":  # Qwen2.5's config names <|endoftext|> as BOS, which it never adds
        ids["bos_token_id"] = tok.token_to_id("<|endoftext|>")
    return tok.get_vocab_size(with_added_tokens=True), ids


# -- SentencePiece ---------------------------------------------------------------------------


def train_sentencepiece(path: Path, vocab_size: int = 800) -> None:
    """tokenizer.model: a BPE with byte fallback and Llama 2's normalization settings."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(buf.getvalue())


def write_spm_tokenizer(path: Path, style: str) -> tuple[int, dict]:
    """tokenizer.model plus tokenizer.json / tokenizer_config.json as Llama 2 ("llama2") or
    Phi-3 ("phi3") ship them; returns (number of tokens, the config's bos/eos ids)."""
    from transformers import AutoTokenizer

    train_sentencepiece(path)
    # transformers converts tokenizer.model into a tokenizer.json (needs protobuf) ...
    staging = path / "_staging"
    staging.mkdir()
    shutil.copy(path / "tokenizer.model", staging)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (staging / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, **specials}
        )
    )
    AutoTokenizer.from_pretrained(staging).save_pretrained(staging)
    data = json.loads((staging / "tokenizer.json").read_text())
    shutil.rmtree(staging)
    # ... laid out as the released Llama 2 / TinyLlama / Mistral / Phi-3 files are (transformers 4)
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    data["pre_tokenizer"] = None
    n_base = len(data["model"]["vocab"])
    decoder = {}
    for tok in data["added_tokens"]:
        tok.update(special=True, normalized=False, rstrip=False, lstrip=False)
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": TEMPLATES["llama2"],
        **specials,
    }
    if style == "phi3":
        # Phi-3's added tokens: special; all but <|endoftext|> strip the whitespace after them
        for i, text in enumerate(PHI3_ADDED):
            strip = text != "<|endoftext|>"
            entry = {"id": n_base + i, "content": text, "single_word": False, "lstrip": False,
                     "rstrip": strip, "normalized": False, "special": True}  # fmt: skip
            data["added_tokens"].append(entry)
            decoder[str(n_base + i)] = {k: v for k, v in entry.items() if k != "id"}
        for tok in data["added_tokens"]:
            if tok["content"] == "</s>":
                tok["rstrip"] = True
        data["post_processor"] = None  # no BOS, as add_bos_token says
        config.update(
            add_bos_token=False, eos_token="<|endoftext|>", chat_template=TEMPLATES["phi3"],
            added_tokens_decoder=decoder, pad_token="<|endoftext|>",
        )  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    n_tokens = n_base + (len(PHI3_ADDED) if style == "phi3" else 0)
    eos = n_base if style == "phi3" else 2
    return n_tokens, {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": None}
