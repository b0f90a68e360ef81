"""The converter on trained weights and a real 49k-token vocabulary: the demo model (SmolLM2-135M,
a Llama-architecture model) turned back into a Hugging Face folder (tests/gguf_to_hf.py), run in
transformers, converted with `ondevice convert`, and llama.cpp's logits on real text
(tests/data/alice-ch1.txt) compared with transformers'. The default run uses the text's first
512 tokens; `-m slow` adds the whole chapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_to_hf import gguf_to_hf
from ondevice.convert import pretokenizer
from oracle import hf_greedy, hf_logits, llama_greedy, llama_logits, load_f32, relative_diff

import ondevice

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = (Path(__file__).parent / "data" / "alice-ch1.txt").read_text(encoding="utf-8")
WINDOW = 512  # tokens compared by default
N_GREEDY = 64
TOLERANCE = 1e-3  # of the logit scale


@pytest.fixture(scope="module")
def hf_folder(demo_path, tmp_path_factory) -> Path:
    return gguf_to_hf(demo_path, tmp_path_factory.mktemp("smollm2-hf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def converted(hf_folder, tmp_path_factory, cli_env_module) -> Path:
    """The folder converted by the CLI, as a user would."""
    out = tmp_path_factory.mktemp("smollm2-gguf") / "smollm2-f32.gguf"
    cmd = [sys.executable, "-m", "ondevice", "convert", str(hf_folder), "-o", str(out)]
    result = subprocess.run(
        [*cmd, "--outtype", "f32"], env=cli_env_module, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def cli_env_module(tmp_path_factory) -> dict[str, str]:
    import os

    return {**os.environ, "ONDEVICE_HOME": str(tmp_path_factory.mktemp("home")), "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_folder)


def test_rebuilt_tokenizer_is_identified_by_llama_cpps_hash(hf_folder, converted, demo_path):
    """The rebuilt tokenizer.json hashes like the released SmolLM tokenizer in llama.cpp's table
    (so the pre-tokenizer is identified the reference way), and the converted vocabulary is
    the demo file's, token for token."""
    digest = pretokenizer.probe_hash((hf_folder / "tokenizer.json").read_text())
    assert pretokenizer.KNOWN_HASHES[digest] == "smollm"
    ours = {k: f.contents() for k, f in gguf.GGUFReader(converted).fields.items()}
    demo = {k: f.contents() for k, f in gguf.GGUFReader(demo_path).fields.items()}
    for key in (
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "llama.rope.dimension_count",
        "llama.attention.head_count_kv",
    ):
        assert ours[key] == demo[key], key


def test_whole_text_tokenizes_as_transformers_and_the_original(
    converted, demo_path, hf_tokenizer, hf_folder
):
    from tokenizers import Tokenizer

    want = hf_tokenizer(TEXT, add_special_tokens=False).input_ids
    fast = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    assert fast.encode(TEXT, add_special_tokens=False).ids == want
    with load_f32(converted) as m:
        assert m.tokenize(TEXT, add_special=False, parse_special=False) == want
    with ondevice.load(demo_path, n_ctx=256, threads=2, tune=False) as m:
        assert m.tokenize(TEXT, add_special=False, parse_special=False) == want
    assert len(want) > 2000


def compare_logits(converted, hf_model, ids: list[int], n_ctx: int) -> float:
    expected = hf_logits(hf_model, ids)
    with load_f32(converted, n_ctx=n_ctx) as m:
        got = llama_logits(m, ids)
    rel, scale = relative_diff(got, expected)
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    print(
        f"{len(ids)} tokens: max |diff| / scale = {rel:.2e} (scale {scale:.1f}), top-1 {agree:.4f}"
    )
    assert rel <= TOLERANCE
    # argmax may flip only where transformers itself has a near-tie
    top2 = np.sort(expected, axis=-1)[:, -2:]
    flips = got.argmax(-1) != expected.argmax(-1)
    assert (top2[flips, 1] - top2[flips, 0] <= 2 * TOLERANCE * scale).all()
    return rel


def test_logits_on_real_text(converted, hf_model, hf_tokenizer):
    ids = hf_tokenizer(TEXT, add_special_tokens=False).input_ids[:WINDOW]
    compare_logits(converted, hf_model, ids, n_ctx=WINDOW)


def test_greedy_64_tokens_identical(converted, hf_model, hf_tokenizer):
    ids = hf_tokenizer(TEXT[:400], add_special_tokens=False).input_ids
    expected = hf_greedy(hf_model, ids, N_GREEDY)
    with load_f32(converted, n_ctx=256) as m:
        got = llama_greedy(m, ids, N_GREEDY)
    print("greedy:", repr(hf_tokenizer.decode(expected)))
    assert got == expected


@pytest.mark.slow
def test_logits_on_the_whole_chapter(converted, hf_model, hf_tokenizer):
    ids = hf_tokenizer(TEXT, add_special_tokens=False).input_ids
    compare_logits(converted, hf_model, ids, n_ctx=4096)
