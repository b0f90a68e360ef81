"""Llama, Mistral, Qwen2 and Phi-3 conversion proved against transformers: tiny random
checkpoints covering each architecture's variants are converted to f32, and llama.cpp's
logits, greedy continuations and token ids compared with the HF model's and tokenizer's."""

from __future__ import annotations

import json
import random

import gguf
import numpy as np
import pytest
from family_fixtures import COMBINING, MULTILINGUAL, Tiny, build
from ondevice.convert import SUPPORTED, convert
from oracle import hf_greedy, hf_logits, llama_greedy, llama_logits, load_f32, relative_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

_rng = random.Random(0)
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [round(_rng.uniform(1.0, 1.5), 4) for _ in range(8)],
    "long_factor": [round(_rng.uniform(1.0, 6.0), 4) for _ in range(8)],
}
LONGROPE_PARTIAL = {  # Phi-4-mini: 3/4 of head_dim 16 rotary -> 6 factors
    "rope_type": "longrope",
    "short_factor": [round(_rng.uniform(1.0, 1.5), 4) for _ in range(6)],
    "long_factor": [round(_rng.uniform(1.0, 6.0), 4) for _ in range(6)],
}
LONG = dict(original_max_position_embeddings=256, max_position_embeddings=1024)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
}  # fmt: skip

# name -> (family, tokenizer, options). Together: GQA 2:1, 4:1, 3:1 and MQA and none; tied and
# untied embeddings; rope default, llama3, linear and LongRoPE (partial rotary too); q/k/v
# biases (Qwen2) and Llama's attention_bias; fused (Phi-3) and separate projections; an
# explicit head_dim (Mistral); f32, f16, bf16 weights and a sharded checkpoint; and six
# tokenizers: Llama-3, Qwen2, SmolLM and Phi-4-mini BPE, Llama-2 and Phi-3 SentencePiece.
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama3-gqa-tied-bf16": ("llama", "llama3", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE,
        rope_theta=500000.0, dtype="bfloat16")),
    "llama2-spm-sharded-f16": ("llama", "llama2", dict(dtype="float16", shards=2)),
    "mistral-gqa-head-dim": ("mistral", "llama2", dict(
        hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        sliding_window=4096, num_hidden_layers=3)),
    "smollm-mqa-linear-bias": ("llama", "smollm", dict(
        num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=100000.0)),
    "qwen2-gqa-tied": ("qwen2", "qwen2", dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen2-untied-bf16": ("qwen2", "qwen2", dict(
        num_key_value_heads=4, dtype="bfloat16", tie_word_embeddings=False)),
    "phi3-spm": ("phi3", "phi3", dict(sliding_window=2047, original_max_position_embeddings=256)),
    "phi3-longrope": ("phi3", "phi3", dict(
        num_key_value_heads=2, rope_scaling=LONGROPE, **LONG)),
    "phi4-mini-partial-tied": ("phi3", "gpt4o", dict(
        num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        rope_scaling=LONGROPE_PARTIAL, **LONG)),
}  # fmt: skip
# LongRoPE: llama.cpp pads its context to a multiple of 256, so the original context is 256
LONG_CONTEXT = {"phi3-longrope", "phi4-mini-partial-tied"}

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n  # 12345 café\n"
LONG_PROMPT = " ".join(MULTILINGUAL)  # > 256 tokens: LongRoPE's long factors
N_GREEDY = 32
TOLERANCE = {"f32": 1e-3, "f16": 3e-3, "q8_0": 5e-2}  # of the logit scale, as for Phi-2

TOKENIZER_STRINGS = MULTILINGUAL + [
    "Hello world",
    "def f(x):\n    return x ** 2\n",
    "class A:\n\tdef b(self):\n\t\tpass\n",
    "    four spaces, then eight:        and 40:" + " " * 40 + "end",
    "\t\t\t tabs \t and\n\n\n\nnewlines  \n  ",
    "1234567890 3.14159 1e-5 0xFF",
    "It's we'll they're I'd you've",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
]
# special tokens written as text, per tokenizer
SPECIAL_TEXTS = {
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>",
    "qwen2": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "smollm": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "gpt4o": "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    "llama2": "<s>[INST] Hi there [/INST] Hello</s> again",
    "phi3": "<|user|>\nHi there <|end|>\n<|assistant|>  \n Sure<|end|>\n<|endoftext|> x",
}
BY_TOKENIZER = {"llama3": "llama3-gqa-tied-bf16", "llama2": "llama2-spm-sharded-f16",
                "smollm": "smollm-mqa-linear-bias", "qwen2": "qwen2-gqa-tied",
                "phi3": "phi3-spm", "gpt4o": "phi4-mini-partial-tied"}  # fmt: skip


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("tiny-families")
    out = {}
    for name, (family, tokenizer, opts) in CONFIGS.items():
        out[name] = build(root / name, family, tokenizer=tokenizer, **opts)
    return out


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """convert each (config, outtype) once per session."""
    root = tmp_path_factory.mktemp("converted-families")
    cache: dict = {}

    def get(name: str, outtype: str = "f32"):
        if (name, outtype) not in cache:
            cache[name, outtype] = convert(
                tiny[name].path, root / f"{name}-{outtype}.gguf", outtype=outtype
            )
        return cache[name, outtype]

    return get


@pytest.fixture(scope="session")
def hf_tokenizers(tiny):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(t.path) for name, t in tiny.items()}


def prompt_ids(hf_tokenizers, name: str) -> list[int]:
    text = LONG_PROMPT if name in LONG_CONTEXT else PROMPT
    ids = hf_tokenizers[name](text).input_ids
    assert (len(ids) > 256) == (name in LONG_CONTEXT), len(ids)
    return ids


def n_ctx(name: str) -> int:
    return 512 if name in LONG_CONTEXT else 256


def fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return (
        {name: f.contents() for name, f in reader.fields.items()},
        {t.name: t for t in reader.tensors},
    )


def test_families_are_registered():
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"):
        assert name in SUPPORTED


@pytest.mark.parametrize("name", CONFIGS)
def test_f32_logits_and_greedy_match_transformers(name, tiny, converted, hf_tokenizers):
    model = tiny[name].model
    ids = prompt_ids(hf_tokenizers, name)
    expected = hf_logits(model, ids)
    hf_continuation = hf_greedy(model, ids, N_GREEDY)
    with load_f32(converted(name), n_ctx(name)) as m:
        got = llama_logits(m, ids)
        continuation = llama_greedy(m, ids, N_GREEDY)
    assert got.shape == expected.shape
    rel, scale = relative_diff(got, expected)
    print(f"{name} f32: max |diff| / scale = {rel:.2e} (scale {scale:.1f})")
    assert rel <= TOLERANCE["f32"]
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert continuation == hf_continuation


@pytest.mark.parametrize("name", sorted(LONG_CONTEXT))
def test_longrope_short_factors_within_the_original_context(name, tiny, converted, hf_tokenizers):
    """Below original_max_position_embeddings both use the short factors: llama.cpp when its
    context is no longer than that, transformers when the sequence is."""
    model = tiny[name].model
    ids = hf_tokenizers[name](PROMPT).input_ids[:24]
    expected = hf_logits(model, ids)
    hf_continuation = hf_greedy(model, ids, N_GREEDY)
    with load_f32(converted(name), n_ctx=256) as m:
        got = llama_logits(m, ids)
        continuation = llama_greedy(m, ids, N_GREEDY)
    rel, _ = relative_diff(got, expected)
    assert rel <= TOLERANCE["f32"]
    assert continuation == hf_continuation
    # and the long factors differ enough that mixing them up would show
    with load_f32(converted(name), n_ctx=512) as m:
        assert relative_diff(llama_logits(m, ids), expected)[0] > 10 * TOLERANCE["f32"]


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", ["llama3-gqa-tied-bf16", "phi3-longrope", "qwen2-gqa-tied"])
def test_lower_precision_tracks_transformers(name, outtype, tiny, converted, hf_tokenizers):
    model = tiny[name].model
    ids = prompt_ids(hf_tokenizers, name)
    expected = hf_logits(model, ids)
    with load_f32(converted(name, outtype), n_ctx(name)) as m:
        got = llama_logits(m, ids)
    rel, _ = relative_diff(got, expected)
    print(f"{name} {outtype}: max |diff| / scale = {rel:.2e}")
    assert rel <= TOLERANCE[outtype]
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("style", ["llama3", "qwen2", "smollm", "gpt4o"])
def test_bpe_token_ids_match_hf(style, converted, hf_tokenizers):
    name = BY_TOKENIZER[style]
    hf = hf_tokenizers[name]
    differ = []
    with load_f32(converted(name)) as m:
        eng = m
        for text in TOKENIZER_STRINGS:
            want = hf(text, add_special_tokens=False).input_ids
            if eng.tokenize(text, add_special=False, parse_special=False) != want:
                differ.append(text)
                continue
            # BOS as the tokenizer adds it (Llama 3 yes, the others no)
            assert eng.tokenize(text, add_special=True, parse_special=False) == hf(text).input_ids
            ids = eng.tokenize(text, add_special=False, parse_special=False)
            assert eng.detokenize(ids) == text
        special = SPECIAL_TEXTS[style]
        want = hf(special, add_special_tokens=False).input_ids
        assert eng.tokenize(special, add_special=False, parse_special=True) == want
    # a limitation of llama.cpp's gpt-4o pre-tokenizer, not of the conversion
    assert differ == ([COMBINING] if style == "gpt4o" else [])


@pytest.mark.parametrize("style", ["llama2", "phi3"])
def test_sentencepiece_token_ids(style, tiny, converted, hf_tokenizers):
    """llama.cpp tokenizes as sentencepiece does, and as the tokenizer.json the released
    models ship (read by the tokenizers library) does, special tokens included. transformers 5's
    AutoTokenizer may rebuild a Llama tokenizer with `Metaspace` pre-tokenization (as for the
    Llama 2 layout here): then it differs where the text starts with a space, before which it
    puts no second "▁"; nowhere else."""
    import sentencepiece
    from tokenizers import Tokenizer

    name = BY_TOKENIZER[style]
    folder = tiny[name].path
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = hf_tokenizers[name]
    differ = []
    with load_f32(converted(name)) as m:
        eng = m
        for text in TOKENIZER_STRINGS:
            got = eng.tokenize(text, add_special=False, parse_special=False)
            assert got == sp.encode(text), text
            assert got == fast.encode(text, add_special_tokens=False).ids, text
            if got != hf(text, add_special_tokens=False).input_ids:
                differ.append(text)
            with_bos = eng.tokenize(text, add_special=True, parse_special=False)
            assert with_bos == fast.encode(text).ids, text  # Llama 2 adds BOS, Phi-3 doesn't
            # pieces as llama.cpp gives them: with the space sentencepiece put before the text
            assert eng.detokenize(got) == (" " + text if text else "")
        special = SPECIAL_TEXTS[style]
        got = eng.tokenize(special, add_special=False, parse_special=True)
        assert got == fast.encode(special, add_special_tokens=False).ids
    print(f"{style}: transformers' AutoTokenizer differs on {len(differ)} strings")
    assert all(t[:1].isspace() for t in differ), differ


def test_metadata(tiny, converted):
    f, t = fields(converted("llama3-gqa-tied-bf16"))
    assert f["general.architecture"] == "llama"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.add_bos_token"] is True
    tokens = f["tokenizer.ggml.tokens"]
    assert tokens[f["tokenizer.ggml.bos_token_id"]] == "<|begin_of_text|>"
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|eot_id|>"
    assert "output.weight" not in t  # tied: llama.cpp uses token_embd
    assert "<|start_header_id|>" in f["tokenizer.chat_template"]
    assert f["llama.rope.freq_base"] == pytest.approx(500000.0)
    # the frequency factors are transformers' own llama3 scaling: default / scaled inv_freq
    model = tiny["llama3-gqa-tied-bf16"].model
    head_dim = 16
    default = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled = model.model.rotary_emb.inv_freq.double()
    np.testing.assert_allclose(t["rope_freqs.weight"].data, (default / scaled).numpy(), rtol=1e-5)

    f, t = fields(converted("mistral-gqa-head-dim"))
    assert f["llama.attention.key_length"] == f["llama.attention.value_length"] == 16
    assert list(t["blk.0.attn_q.weight"].shape) == [96, 128]  # GGML order: (in, out)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"]
    assert "output.weight" in t and "llama.attention.sliding_window" not in f

    f, t = fields(converted("qwen2-gqa-tied"))
    assert f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "blk.1.attn_k.bias" in t and "output.weight" not in t
    assert f["tokenizer.ggml.tokens"][f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"

    f, t = fields(converted("smollm-mqa-linear-bias"))
    assert f["tokenizer.ggml.pre"] == "smollm" and f["tokenizer.ggml.add_bos_token"] is False
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0
    assert "blk.0.attn_output.bias" in t

    f, t = fields(converted("phi4-mini-partial-tied"))
    assert f["general.architecture"] == "phi3" and f["tokenizer.ggml.pre"] == "gpt-4o"
    assert f["phi3.rope.dimension_count"] == 12  # 3/4 of 16
    assert list(t["rope_factors_long.weight"].shape) == [6]
    np.testing.assert_array_equal(
        t["rope_factors_short.weight"].data, np.float32(LONGROPE_PARTIAL["short_factor"])
    )
    assert f["phi3.rope.scaling.original_context_length"] == 256
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(
        (1 + np.log(1024 / 256) / np.log(256)) ** 0.5
    )
    assert list(t["blk.0.ffn_up.weight"].shape) == [64, 320]  # gate and up, fused
    assert "phi3" not in f["general.name"].replace(" ", "").lower()  # not Phi-3's tokenizer


def test_phi3_tokenizer_gets_llama_cpps_phi3_rule(tiny, converted, tmp_path):
    """llama.cpp strips the whitespace after Phi-3's special tokens only for models whose
    general.name says phi3: a Phi-3 tokenizer in a folder named otherwise gets the marker."""
    import shutil

    folder = shutil.copytree(tiny["phi3-spm"].path, tmp_path / "my-finetune")
    f, _ = fields(convert(folder, tmp_path / "ft.gguf", outtype="f32"))
    assert f["general.name"] == "my-finetune (phi3)"
    f, _ = fields(converted("phi3-spm"))
    assert f["general.name"] == "phi3-spm"
    assert f["tokenizer.ggml.tokens"][f["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>"


def test_q_and_k_rows_are_permuted_only_for_llama(tiny, converted):
    """The Q/K reordering is what the logits tests prove; here: it is a permutation of the
    checkpoint's rows (for every outtype's copy path) and applied to Llama only."""
    from ondevice.convert.base import rotary_row_order
    from safetensors.numpy import load_file

    src = load_file(tiny["mistral-gqa-head-dim"].path / "model.safetensors")
    _, t = fields(converted("mistral-gqa-head-dim"))
    q = src["model.layers.0.self_attn.q_proj.weight"]
    k = src["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(t["blk.0.attn_q.weight"].data, q[rotary_row_order(128, 8)])
    np.testing.assert_array_equal(t["blk.0.attn_k.weight"].data, k[rotary_row_order(32, 2)])
    assert not np.array_equal(t["blk.0.attn_q.weight"].data, q)
    src = load_file(tiny["qwen2-gqa-tied"].path / "model.safetensors")
    _, t = fields(converted("qwen2-gqa-tied"))
    np.testing.assert_array_equal(
        t["blk.0.attn_q.weight"].data, src["model.layers.0.self_attn.q_proj.weight"]
    )


def test_llama3_rope_factors_are_the_reference_converters_bytes():
    """llama.cpp's convert_hf_to_gguf.py computes them with torch float32 arithmetic; ours
    (numpy, no torch at convert time) gives the same bytes over a grid of configs."""
    import math

    from ondevice.convert.llama import llama3_rope_factors

    def reference(base, dim, rope):  # the algorithm of llama.cpp's LlamaModel, in torch
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, old = rope["factor"], rope["original_max_position_embeddings"]
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        out = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                out.append(1)
            elif wavelen > old / low:
                out.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(out, dtype=torch.float32).numpy()

    ropes = [
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},  # Llama 3.2
        {"factor": 8.0, "original_max_position_embeddings": 8192},  # Llama 3.1
        {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 32},
    ]  # fmt: skip
    for base in (500000.0, 10000.0, 100000.0, 12345.0):
        for dim in (16, 64, 80, 128):
            for rope in ropes:
                got = llama3_rope_factors(base, dim, rope)
                assert got.tobytes() == reference(base, dim, rope).tobytes(), (base, dim, rope)


def test_chat_uses_the_models_template_and_stops_at_its_end_token(converted):
    """`chat` picks the converted file's own template, and its end-of-turn token ends a reply
    (llama.cpp marks <|eot_id|>, <|im_end|>, <|end|> as end-of-generation)."""
    from ondevice import chat_formats

    for name, end in [
        ("llama3-gqa-tied-bf16", "<|eot_id|>"),
        ("qwen2-gqa-tied", "<|im_end|>"),
        ("smollm-mqa-linear-bias", "<|im_end|>"),
        ("phi3-spm", "<|end|>"),
        ("phi4-mini-partial-tied", "<|end|>"),
    ]:
        with load_f32(converted(name)) as m:
            fmt = chat_formats.for_model(m)
            assert fmt.source == "gguf", name
            prompt = fmt.render([{"role": "user", "content": "Hi"}])
            assert end in prompt or name == "llama3-gqa-tied-bf16" and "<|eot_id|>" in prompt
            (token,) = m.tokenize(end, add_special=False, parse_special=True)
            assert m.is_eog(token), (name, end)


def test_sharded_f16_checkpoint_copies_bytes(tiny, converted):
    """f16 → f16 matrices are the checkpoint's bytes (Q/K in llama.cpp's row order)."""
    from ondevice.convert.base import rotary_row_order
    from safetensors.numpy import load_file

    folder = tiny["llama2-spm-sharded-f16"].path
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    src = {}
    for shard in sorted(set(index["weight_map"].values())):
        src.update(load_file(folder / shard))
    _, t = fields(converted("llama2-spm-sharded-f16", "f16"))
    assert (
        t["blk.1.ffn_down.weight"].data.tobytes()
        == src["model.layers.1.mlp.down_proj.weight"].tobytes()
    )
    q = src["model.layers.1.self_attn.q_proj.weight"][rotary_row_order(64, 4)]
    assert t["blk.1.attn_q.weight"].data.tobytes() == q.tobytes()
