"""Phi-2 conversion proved against transformers: tiny random checkpoints in every layout are
converted and llama.cpp's logits, greedy continuations and token ids compared with the HF
model's and tokenizer's."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from ondevice.convert import SUPPORTED, convert
from phi2_fixtures import EOS, WHITESPACE_TOKENS, TinyPhi2, build_tiny_phi2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

# name -> build_tiny_phi2 options. Together: two hidden sizes and head counts, rotary factor
# 0.4 and 0.5, intermediate_size != 4 * hidden, all three config layouts, a sharded checkpoint
# of each layout, GQA, f32/f16/bf16 weights, both tokenizer file sets, a non-default rope_theta.
CONFIGS: dict[str, dict] = {
    "base": {},
    "toplevel-sharded": dict(
        hidden_size=96, num_attention_heads=6, num_hidden_layers=3, partial_rotary_factor=0.5,
        intermediate_size=320, config_layout="toplevel", shards=3, rope_theta=20000.0,
    ),
    "gqa-bf16-vocabfiles": dict(
        num_attention_heads=8, num_key_value_heads=2, partial_rotary_factor=0.5,
        intermediate_size=96, dtype="bfloat16", tokenizer_files="vocab",
    ),
    "original-f16-sharded": dict(
        layout="original", config_layout="original", hidden_size=80, num_attention_heads=5,
        intermediate_size=320, dtype="float16", shards=2,
    ),
}  # fmt: skip

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n  # 12345 café\n"
N_GREEDY = 32

# Relative to the logit scale (max |logit|): f32 must be exact up to float reordering; the
# others are bounded by their rounding (measured here: f16 ≤ 8e-4, bf16 ≤ 5.3e-3, q8_0 ≤ 1.9e-2).
TOLERANCE = {"f32": 1e-3, "f16": 3e-3, "bf16": 1.5e-2, "q8_0": 5e-2}

TOKENIZER_STRINGS = [
    "Hello world",
    "def f(x):\n    return x ** 2\n",
    "class A:\n\tdef b(self):\n\t\tpass\n",
    "    four spaces, then eight:        and 40:" + " " * 40 + "end",
    "\t\t\t tabs \t and\n\n\n\nnewlines  \n  ",
    "1234567890 3.14159 1e-5 0xFF 1,000,000",
    "café naïve Straße Привет 日本語 한국어 🙂🚀 ½ ≤ ∞ 𝔘𝔫𝔦",
    "It's we'll they're I'd you've",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "Instruct: Write a haiku.\nOutput:",
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, TinyPhi2]:
    root = tmp_path_factory.mktemp("tiny-phi2")
    return {name: build_tiny_phi2(root / name, **opts) for name, opts in CONFIGS.items()}


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """convert each (config, outtype) once per session."""
    root = tmp_path_factory.mktemp("converted")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str) -> Path:
        if (name, outtype) not in cache:
            cache[name, outtype] = convert(
                tiny[name].path, root / f"{name}-{outtype}.gguf", outtype=outtype
            )
        return cache[name, outtype]

    return get


@pytest.fixture(scope="session")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(t.path) for name, t in tiny.items()}


@contextlib.contextmanager
def llama(path: Path, n_ctx: int = 256):
    """llama.cpp on the file, with logits for every position.

    Weight repacking is off: on AMX-capable VMs this build's AMX kernels die with SIGILL (see
    ondevice._native.binding.amx_compiled), and repacking changes kernels, not what is computed.
    """
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)
    finally:
        lib.llama_model_default_params = original
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own incremental decoding (KV cache), greedy."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def prompt_ids(hf_tokenizer, name: str) -> list[int]:
    return hf_tokenizer[name](PROMPT, add_special_tokens=False).input_ids


def test_phi2_is_registered():
    assert "PhiForCausalLM" in SUPPORTED


@pytest.mark.parametrize("name", CONFIGS)
def test_f32_logits_and_greedy_match_transformers(
    name, tiny, converted, hf_tokenizer, record_property
):
    model = tiny[name].model
    ids = prompt_ids(hf_tokenizer, name)
    expected = hf_logits(model, ids)
    hf_continuation = hf_greedy(model, ids, N_GREEDY)
    with llama(converted(name, "f32")) as llm:
        got = llama_logits(llm, ids)
        continuation = llama_greedy(llm, ids, N_GREEDY)
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    rel = float(np.abs(got - expected).max()) / scale
    record_property("max_rel_logit_diff", rel)
    print(
        f"{name} f32: max |diff| / scale = {rel:.2e} (scale {scale:.1f}), greedy identical: {continuation == hf_continuation}"
    )
    assert rel <= TOLERANCE["f32"]
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert continuation == hf_continuation


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", CONFIGS)
def test_lower_precision_tracks_transformers(name, outtype, tiny, converted, hf_tokenizer):
    """Logits within the stated tolerance, and greedy agreement along HF's continuation: at
    every position llama.cpp picks HF's token, or one HF scores within the tolerance of it
    (a near-tie that rounding may legitimately flip)."""
    model = tiny[name].model
    ids = prompt_ids(hf_tokenizer, name)
    sequence = ids + hf_greedy(model, ids, N_GREEDY)
    expected = hf_logits(model, sequence)
    with llama(converted(name, outtype)) as llm:
        got = llama_logits(llm, sequence)
    scale = float(np.abs(expected).max())
    tol = TOLERANCE[outtype] * scale
    rel = float(np.abs(got - expected).max()) / scale
    print(f"{name} {outtype}: max |diff| / scale = {rel:.2e}")
    assert rel <= TOLERANCE[outtype]
    positions = np.arange(len(ids) - 1, len(sequence))
    hf_pick = expected[positions].argmax(-1)
    our_pick = got[positions].argmax(-1)
    gap = expected[positions, hf_pick] - expected[positions, our_pick]
    assert (gap <= 2 * tol).all(), (
        f"greedy disagrees beyond rounding at {np.flatnonzero(gap > 2 * tol)}"
    )
    assert (hf_pick == our_pick).mean() >= 0.9


@pytest.mark.parametrize(
    "name", ["base", "gqa-bf16-vocabfiles"]
)  # tokenizer.json; vocab.json + merges.txt
def test_token_ids_match_hf_tokenizer(name, converted, hf_tokenizer):
    hf = hf_tokenizer[name]
    with llama(converted(name, "f32")) as llm:
        for text in TOKENIZER_STRINGS:
            want = hf(text, add_special_tokens=False).input_ids
            got = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert got == want, text
        # special tokens are parsed only on request, as HF always does for its added specials
        text = f"one{EOS}two"
        want = hf(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
        # and the text round-trips
        for text in TOKENIZER_STRINGS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert llm.detokenize(ids).decode() == text


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def test_metadata_and_tokenizer_entries(tiny, converted):
    t = tiny["toplevel-sharded"]
    cfg = t.model.config
    fields, tensors = _fields(converted("toplevel-sharded", "q8_0"))
    assert fields["general.architecture"] == "phi2"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["phi2.feed_forward_length"] == 320 != 4 * cfg.hidden_size  # from the config
    assert fields["phi2.embedding_length"] == 96
    assert fields["phi2.block_count"] == 3
    assert fields["phi2.attention.head_count"] == fields["phi2.attention.head_count_kv"] == 6
    assert fields["phi2.rope.dimension_count"] == 8  # head_dim 16 * 0.5
    assert fields["phi2.rope.freq_base"] == pytest.approx(20000.0)
    assert fields["phi2.context_length"] == cfg.max_position_embeddings
    assert fields["phi2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "phi-2"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size > t.n_tokens
    eos = tokens.index(EOS)
    for key in (gguf.Keys.Tokenizer.BOS_ID, gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.UNK_ID):
        assert fields[key] == eos
    assert types[eos] == gguf.TokenType.CONTROL
    assert all(types[tokens.index(w)] == gguf.TokenType.USER_DEFINED for w in WHITESPACE_TOKENS)
    assert tokens[t.n_tokens] == f"[PAD{t.n_tokens}]"
    assert set(types[t.n_tokens :]) == {gguf.TokenType.UNUSED}
    merges = json.loads((t.path / "tokenizer.json").read_text())["model"]["merges"]
    assert len(fields["tokenizer.ggml.merges"]) == len(merges)
    # matrices take the outtype, norms and biases stay f32
    for name, tensor in tensors.items():
        want = (
            gguf.GGMLQuantizationType.Q8_0
            if name.endswith(".weight") and len(tensor.shape) == 2
            else gguf.GGMLQuantizationType.F32
        )
        assert tensor.tensor_type == want, name
    assert "blk.2.attn_q.weight" in tensors and "blk.0.attn_qkv.weight" not in tensors


def test_original_layout_keeps_fused_qkv(converted):
    _, tensors = _fields(converted("original-f16-sharded", "f32"))
    assert "blk.0.attn_qkv.weight" in tensors and "blk.0.attn_q.weight" not in tensors
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [80, 240]  # GGML order: (in, out)


def test_same_dtype_is_copied_bytes_for_bytes(tiny, converted):
    """f16 → f16 and bf16 → bf16 matrices are the checkpoint's bytes; norms become f32."""
    from safetensors import safe_open

    for name, outtype, np_dtype in [
        ("original-f16-sharded", "f16", np.float16),
        ("gqa-bf16-vocabfiles", "bf16", np.uint16),
    ]:
        _, tensors = _fields(converted(name, outtype))
        folder = tiny[name].path
        src = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    src[key] = (
                        tensor.view(torch.int16).numpy().view(np_dtype)
                        if tensor.dtype == torch.bfloat16
                        else tensor.numpy()
                    )
        key = (
            "transformer.h.1.mlp.fc2.weight"
            if "original" in name
            else "model.layers.1.mlp.fc2.weight"
        )
        got = tensors["blk.1.ffn_down.weight"].data
        assert got.tobytes() == src[key].tobytes()
        norm_key = (
            "transformer.h.0.ln.weight"
            if "original" in name
            else "model.layers.0.input_layernorm.weight"
        )
        norm = tensors["blk.0.attn_norm.weight"]
        assert norm.tensor_type == gguf.GGMLQuantizationType.F32
        expected = (
            src[norm_key].astype(np.float32)
            if np_dtype == np.float16
            else (src[norm_key].astype(np.uint32) << 16).view(np.float32)
        )
        np.testing.assert_array_equal(norm.data, expected)


def test_q8_0_is_bit_exact_with_gguf_quants(tiny, converted):
    """Chunked, threaded quantization gives the bytes of quantizing the whole tensor at once."""
    sd = tiny["base"].model.state_dict()
    _, tensors = _fields(converted("base", "q8_0"))
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.fc2.weight"),
    ]:
        want = gguf.quants.quantize(sd[hf_name].numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert tensors[gguf_name].data.tobytes() == want.tobytes()


def test_numpy_fallback_quantizer_gives_the_same_file(tiny, tmp_path, monkeypatch):
    """Without llama.cpp's ggml library, gguf-py's quantizer writes the same bytes."""
    from ondevice.convert import quants

    from ondevice._native import ggml_quants

    engine = convert(tiny["base"].path, tmp_path / "engine.gguf", outtype="q8_0")
    monkeypatch.setenv("ONDEVICE_CONVERT_QUANTIZER", "numpy")
    ggml_quants.forget()
    try:
        assert not quants.engine_available()
        fallback = convert(tiny["base"].path, tmp_path / "numpy.gguf", outtype="q8_0")
    finally:
        monkeypatch.delenv("ONDEVICE_CONVERT_QUANTIZER")
        ggml_quants.forget()
    assert engine.read_bytes() == fallback.read_bytes()


def test_chunking_does_not_change_the_result(tiny, tmp_path, monkeypatch):
    """Force tiny chunks (many per tensor, several in flight) and compare with the default."""
    import ondevice.convert.base as base

    whole = convert(tiny["base"].path, tmp_path / "whole.gguf", outtype="q8_0")
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 100)
    chunked = convert(tiny["base"].path, tmp_path / "chunked.gguf", outtype="q8_0")
    assert whole.read_bytes() == chunked.read_bytes()


def test_cli_convert(tiny, tmp_path):
    from ondevice.cli import main

    out = tmp_path / "cli.gguf"
    runner = CliRunner()
    result = runner.invoke(
        main, ["convert", str(tiny["base"].path), "-o", str(out), "--outtype", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    before = out.read_bytes()
    result = runner.invoke(main, ["convert", str(tiny["base"].path), "-o", str(out)])
    assert result.exit_code == 1
    assert (
        "error:" in result.output
        and "already exists" in result.output
        and "Traceback" not in result.output
    )
    assert out.read_bytes() == before
    result = runner.invoke(
        main, ["convert", str(tiny["base"].path), "-o", str(out), "--force", "--outtype", "f16"]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.gguf"]  # no temporary left


def test_progress_bar_only_when_asked(tiny, tmp_path, capsys):
    convert(tiny["base"].path, tmp_path / "quiet.gguf", outtype="f32")  # stderr is not a tty
    assert "converting" not in capsys.readouterr().err
    convert(tiny["base"].path, tmp_path / "bar.gguf", outtype="f32", progress=True)
    err = capsys.readouterr().err
    assert "converting" in err and "tensor 33/33" in err
