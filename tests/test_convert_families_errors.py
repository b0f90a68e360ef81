"""What the converter refuses in Llama-family checkpoints, each with one line that says what to
fix, and never a file left behind: a config key missing (named with its file), tensor shapes
that don't fit (the tensor named), a tokenizer whose pre-tokenizer can't be identified (pass
--vocab-pre), a broken or unreadable tokenizer.model, rope scaling llama.cpp doesn't have."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from family_fixtures import build
from ondevice.convert import convert
from safetensors.numpy import load_file, save_file

from ondevice.errors import ConversionError

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine-families")
    return {
        "llama": build(root / "llama", "llama", tokenizer="llama3", num_key_value_heads=2).path,
        "phi3": build(root / "phi3", "phi3", tokenizer="phi3").path,
    }


@pytest.fixture
def llama(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["llama"], tmp_path / "llama"))


@pytest.fixture
def phi3(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["phi3"], tmp_path / "phi3"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def refuse(src: Path, out_dir: Path, match: str, **kwargs) -> ConversionError:
    with pytest.raises(ConversionError, match=match) as info:
        convert(src, out_dir / "out.gguf", outtype="f16", **kwargs)
    assert list(out_dir.iterdir()) == [], "a refused conversion left files behind"
    assert "\n" not in info.value.one_line()
    return info.value


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_tensors(model: Path, fn) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_config_key_names_key_and_file(llama, out_dir):
    edit_json(llama / "config.json", lambda c: c.pop("num_attention_heads"))
    err = refuse(llama, out_dir, "missing num_attention_heads")
    assert str(llama / "config.json") in str(err)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_key_value_heads", 3, "head count not a multiple of the KV head count"),
        ("hidden_act", "gelu", "activation gelu"),
        ("mlp_bias", True, "mlp_bias"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope scaling 'yarn'"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "without original_max_pos"),
        ("num_hidden_layers", "two", "num_hidden_layers must be a positive integer"),
    ],
)
def test_unsupported_config_is_named(llama, out_dir, key, value, match):
    def change(c):
        c[key] = value
        c.pop("rope_parameters", None)

    edit_json(llama / "config.json", change)
    refuse(llama, out_dir, match)


def test_mismatched_shape_names_the_tensor(llama, out_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_tensors(llama, lambda t: t.__setitem__(name, t[name][:16].copy()))
    refuse(
        llama, out_dir, f"tensor {name} has shape \\[16, 64\\], but the config implies \\[32, 64\\]"
    )


def test_untied_model_without_output_matrix(llama, out_dir):
    assert json.loads((llama / "config.json").read_text())["tie_word_embeddings"] is False
    edit_tensors(llama, lambda t: t.pop("lm_head.weight"))
    refuse(llama, out_dir, "lacks 1 tensor.*output.weight")
    edit_json(llama / "config.json", lambda c: c.update(tie_word_embeddings=True))
    convert(llama, out_dir / "tied.gguf", outtype="f32")  # tied: token_embd serves as output


def test_phi3_fused_shapes_and_longrope_factors(phi3, out_dir):
    name = "model.layers.0.mlp.gate_up_proj.weight"
    tensors = load_file(phi3 / "model.safetensors")
    edit_tensors(phi3, lambda t: t.__setitem__(name, t[name][:160].copy()))
    refuse(phi3, out_dir, f"tensor {name} has shape \\[160, 64\\], but the config implies \\[320")
    save_file(tensors, phi3 / "model.safetensors")

    def longrope(c):
        c.pop("rope_parameters", None)
        c["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0]}

    edit_json(phi3 / "config.json", longrope)
    refuse(phi3, out_dir, "LongRoPE long_factor must be 8 numbers")


def unidentifiable(folder: Path) -> None:
    """A pre-tokenizer llama.cpp has no name for: the Llama 3 regex without digit groups."""

    def change(t):
        split = t["pre_tokenizer"]["pretokenizers"][0]
        split["pattern"]["Regex"] = split["pattern"]["Regex"].replace("\\p{N}{1,3}", "\\p{N}{1,4}")

    edit_json(folder / "tokenizer.json", change)


def test_unidentifiable_pre_tokenizer_says_to_pass_vocab_pre(llama, out_dir):
    unidentifiable(llama)
    err = refuse(llama, out_dir, "can't tell which llama.cpp pre-tokenizer")
    assert "--vocab-pre NAME" in err.one_line()
    out = convert(llama, out_dir / "named.gguf", outtype="f32", vocab_pre="llama-bpe")
    import gguf

    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_ignore_merges_must_match_the_name(llama, out_dir):
    """The Llama 3 regex with ignore_merges off is not llama.cpp's llama-bpe (which ignores
    merges for whole-word tokens): refused rather than tokenized differently."""
    edit_json(llama / "tokenizer.json", lambda t: t["model"].update(ignore_merges=False))
    refuse(llama, out_dir, "can't tell which llama.cpp pre-tokenizer")


def test_cli_vocab_pre(llama, out_dir, cli_env):
    unidentifiable(llama)
    out = out_dir / "cli.gguf"
    cmd = [sys.executable, "-m", "ondevice", "convert", str(llama), "-o", str(out)]
    refused = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "--vocab-pre NAME" in refused.stderr
    assert "Traceback" not in refused.stderr and list(out_dir.iterdir()) == []
    ok = subprocess.run(
        [*cmd, "--vocab-pre", "llama-bpe"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()


def test_corrupt_tokenizer_model(phi3, out_dir):
    (phi3 / "tokenizer.model").write_bytes(b"\x0a\x05hello, not a model")
    refuse(phi3, out_dir, "tokenizer.model: not a SentencePiece model")


def test_sentencepiece_missing_says_what_to_install(phi3, out_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    err = refuse(phi3, out_dir, "needs the sentencepiece library")
    assert "ondevice[convert]" in err.one_line()


def test_sentencepiece_style_tokenizer_json_without_model(phi3, out_dir):
    (phi3 / "tokenizer.model").unlink()
    refuse(phi3, out_dir, "SentencePiece-style tokenizer, but the folder has no tokenizer.model")


def test_tokenizer_larger_than_embedding(phi3, out_dir):
    edit_json(phi3 / "config.json", lambda c: c.update(vocab_size=512))
    refuse(phi3, out_dir, "tokenizer has 80[0-9] tokens but the model's embedding has only 512")
