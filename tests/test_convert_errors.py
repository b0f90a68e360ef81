"""What the converter refuses: pickles, corrupt safetensors, unsupported or inconsistent models,
clobbering an existing file; and that every refusal or interruption leaves no output behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import ondevice.convert.base as base
import pytest
from ondevice.convert import convert
from phi2_fixtures import make_tiny_phi2
from safetensors.numpy import load_file, save_file

from ondevice.errors import ConversionError


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """One tiny Phi-2 folder; each test edits its own copy."""
    return make_tiny_phi2(tmp_path_factory.mktemp("pristine") / "phi")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def refuse(src: Path, out_dir: Path, match: str, **kwargs) -> ConversionError:
    """Convert must raise ConversionError matching `match` and leave out_dir empty."""
    with pytest.raises(ConversionError, match=match) as info:
        convert(src, out_dir / "out.gguf", outtype="f16", **kwargs)
    assert list(out_dir.iterdir()) == [], "a refused conversion left files behind"
    # the CLI prints this one line; it must be a sentence, not a repr
    assert "\n" not in info.value.one_line()
    return info.value


def edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_tensors(model: Path, fn) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


# --- safetensors headers ---------------------------------------------------------------


def write_raw_safetensors(
    path: Path, header: object, data: bytes = b"", *, header_len: int | None = None
) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def f32_entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CORRUPT = {
    "shorter than 8 bytes": (b"\x01\x02", None),
    "header too big": (lambda p: write_raw_safetensors(p, {}, header_len=200_000_000)),
    "header past EOF": (lambda p: write_raw_safetensors(p, {}, header_len=4096)),
    "not JSON": (lambda p: write_raw_safetensors(p, b"{not json")),
    "not UTF-8": (lambda p: write_raw_safetensors(p, b'{"a\xff": 1}')),
    "not an object": (lambda p: write_raw_safetensors(p, [1, 2])),
    "duplicate tensor": (lambda p: write_raw_safetensors(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4))),
    "overlapping": (lambda p: write_raw_safetensors(p, {"a": f32_entry([2], 0, 8), "b": f32_entry([2], 4, 12)}, bytes(12))),
    "offset past data": (lambda p: write_raw_safetensors(p, {"a": f32_entry([4], 0, 16)}, bytes(8))),
    "dtype/shape mismatch": (lambda p: write_raw_safetensors(p, {"a": f32_entry([3], 0, 8)}, bytes(8))),
    "unknown dtype": (lambda p: write_raw_safetensors(p, {"a": f32_entry([2], 0, 8, dtype="F128")}, bytes(8))),
    "negative dim": (lambda p: write_raw_safetensors(p, {"a": f32_entry([-2], 0, 8)}, bytes(8))),
    "float offsets": (lambda p: write_raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, bytes(8))),
    "reversed offsets": (lambda p: write_raw_safetensors(p, {"a": f32_entry([0], 8, 0)}, bytes(8))),
    "bad metadata": (lambda p: write_raw_safetensors(p, {"__metadata__": {"format": 1}})),
    "entry not object": (lambda p: write_raw_safetensors(p, {"a": 3})),
}  # fmt: skip

CORRUPT_MESSAGES = {
    "shorter than 8 bytes": "shorter than the 8-byte header",
    "header too big": "header claims",
    "header past EOF": "past the end of the file",
    "not JSON": "not valid JSON",
    "not UTF-8": "not valid JSON",
    "not an object": "not a JSON object",
    "duplicate tensor": "duplicate key",
    "overlapping": "overlap",
    "offset past data": "ends at byte",
    "dtype/shape mismatch": "needs 12 bytes",
    "unknown dtype": "unknown dtype",
    "negative dim": "invalid shape",
    "float offsets": "invalid data_offsets",
    "reversed offsets": "invalid data_offsets",
    "bad metadata": "__metadata__",
    "entry not object": "not an object",
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_safetensors_is_a_clear_error(case, model, out_dir):
    path = model / "model.safetensors"
    make = CORRUPT[case]
    if isinstance(make, tuple):
        path.write_bytes(make[0])
    else:
        make(path)
    err = refuse(model, out_dir, CORRUPT_MESSAGES[case])
    assert "model.safetensors" in str(err) and "not a valid safetensors file" in str(err)


def test_truncated_download_is_refused(model, out_dir):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    refuse(model, out_dir, "ends at byte")


# --- pickles ---------------------------------------------------------------------------


class _Boom:
    """A pickle that, if ever loaded, creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_is_refused_never_loaded(model, out_dir, tmp_path):
    marker = tmp_path / "PICKLE-WAS-LOADED"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    err = refuse(model, out_dir, "only pickle checkpoints")
    assert "pytorch_model.bin" in str(err) and "safetensors" in str(err)
    refuse(model / "pytorch_model.bin", out_dir, "pickle checkpoint")
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(model, out_dir, tmp_path):
    marker = tmp_path / "PICKLE-WAS-LOADED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    convert(model, out_dir / "ok.gguf", outtype="f32")
    assert not marker.exists()


# --- models that don't fit the converter ---------------------------------------------


def test_unsupported_architecture_lists_supported(model, out_dir):
    edit_config(model, architectures=["GemmaForCausalLM"])
    err = refuse(model, out_dir, "unsupported architecture GemmaForCausalLM")
    for name in ("PhiForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Phi3ForCausalLM"):  # fmt: skip
        assert name in str(err)
    edit_config(model, architectures=...)
    refuse(model, out_dir, "none in config.json")


def test_extra_tensor_is_refused(model, out_dir):
    edit_tensors(
        model,
        lambda t: t.__setitem__("model.layers.0.mlp.gate.weight", np.zeros((4, 4), np.float32)),
    )
    refuse(model, out_dir, "don't map .* model.layers.0.mlp.gate.weight")


def test_more_layers_than_config_is_refused(model, out_dir):
    edit_config(model, num_hidden_layers=1)
    refuse(model, out_dir, "don't map .*model.layers.1")


def test_missing_tensor_is_refused(model, out_dir):
    edit_tensors(model, lambda t: t.pop("model.layers.1.mlp.fc2.bias"))
    refuse(model, out_dir, r"lacks 1 tensor\(s\) .*blk.1.ffn_down.bias")


def test_fewer_layers_than_config_is_refused(model, out_dir):
    edit_config(model, num_hidden_layers=3)
    refuse(model, out_dir, "lacks .*blk.2")


def test_shape_not_matching_config_is_refused(model, out_dir):
    edit_config(model, intermediate_size=256)
    refuse(
        model,
        out_dir,
        r"model.layers.0.mlp.fc1.bias has shape \[192\], but the config implies \[256\]",
    )


def test_vocab_size_mismatch_is_refused(model, out_dir):
    edit_config(model, vocab_size=1024)
    refuse(model, out_dir, "shape")


def test_mixed_fused_and_separate_attention_is_refused(model, out_dir):
    def fuse_layer0(t):
        names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
        for part in ("weight", "bias"):
            t[f"transformer.h.0.mixer.Wqkv.{part}"] = np.concatenate(
                [t.pop(f"{n}.{part}") for n in names]
            )
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"]

    edit_tensors(model, fuse_layer0)
    convert(model, out_dir / "fused-layer0.gguf", outtype="f32")  # per block is fine
    (out_dir / "fused-layer0.gguf").unlink()
    edit_tensors(
        model,
        lambda t: t.__setitem__(
            "model.layers.0.self_attn.q_proj.weight", np.zeros((64, 64), np.float32)
        ),
    )
    refuse(model, out_dir, "both fused and separate")


def test_two_names_for_one_tensor_are_refused(model, out_dir):
    edit_tensors(model, lambda t: t.__setitem__("lm_head.linear.weight", t["lm_head.weight"]))
    refuse(model, out_dir, "both map to output.weight")


def test_integer_weights_are_refused(model, out_dir):
    edit_tensors(
        model, lambda t: t.__setitem__("model.final_layernorm.bias", np.zeros(64, np.int32))
    )
    refuse(model, out_dir, "dtype I32")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "relu"}, "activation relu"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.4}},
            "rope scaling yarn",
        ),
        ({"qk_layernorm": True}, "qk_layernorm"),
        ({"num_attention_heads": 5}, "not a multiple of the head count"),
        ({"hidden_size": ...}, "missing hidden_size / n_embd"),
        ({"num_hidden_layers": "2"}, "must be a positive integer"),
    ],
)
def test_unsupported_config_is_refused(change, match, model, out_dir):
    edit_config(model, **change)
    refuse(model, out_dir, match)


def test_broken_config_and_tokenizer(model, out_dir):
    (model / "config.json").write_text("{oops")
    refuse(model, out_dir, "config.json: can't read")
    (model / "config.json").unlink()
    refuse(model, out_dir, "no config.json")


def test_missing_or_unsupported_tokenizer(pristine, model, out_dir):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model / name).unlink()
    refuse(model, out_dir, "has no tokenizer")
    shutil.copy(pristine / "tokenizer.json", model / "tokenizer.json")
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    refuse(model, out_dir, "Lowercase normalizer")
    tok["normalizer"] = None
    tok["pre_tokenizer"]["add_prefix_space"] = True
    (model / "tokenizer.json").write_text(json.dumps(tok))
    refuse(model, out_dir, "pre-tokenizer")
    assert "--vocab-pre" in str(refuse(model, out_dir, "pre-tokenizer").hint)


def test_tokenizer_larger_than_embedding(model, out_dir):
    edit_config(model, vocab_size=400)
    refuse(model, out_dir, "tokenizer has 439 tokens but the model's embedding has only 400")


# --- sharded checkpoints ------------------------------------------------------------------


def shard(model: Path) -> None:
    """Split model.safetensors into two shards plus an index."""
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard_name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, model / shard_name)
        weight_map.update(dict.fromkeys(part, shard_name))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def edit_index(model: Path, fn) -> None:
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_problems_are_refused(model, out_dir):
    shard(model)
    convert(model, out_dir / "sharded.gguf", outtype="f32")
    (out_dir / "sharded.gguf").unlink()

    edit_index(model, lambda m: m.__setitem__("lm_head.bias", "../../etc/passwd.safetensors"))
    refuse(model, out_dir, "invalid shard name")
    edit_index(model, lambda m: m.__setitem__("lm_head.bias", "model-00003-of-00002.safetensors"))
    refuse(model, out_dir, "missing from")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    edit_index(model, lambda m: m.__setitem__("lm_head.bias", shards[1]))  # it is in shard 1
    refuse(model, out_dir, "listed in")
    edit_index(model, lambda m: m.pop("lm_head.bias"))
    refuse(model, out_dir, "doesn't list")
    edit_index(model, lambda m: m.__setitem__("no.such.tensor", "model-00001-of-00002.safetensors"))
    refuse(model, out_dir, "not in its shard")
    (model / "model.safetensors.index.json").write_text("[]")
    refuse(model, out_dir, "no weight_map")


def test_same_tensor_in_two_shards_is_refused(model, out_dir):
    tensors = load_file(model / "model.safetensors")
    save_file({"lm_head.bias": tensors["lm_head.bias"]}, model / "extra.safetensors")
    (model / "model.safetensors").rename(model / "a.safetensors")  # no index: every file is read
    refuse(model, out_dir, "in both")


# --- output handling ----------------------------------------------------------------------


def test_existing_output_needs_force(model, out_dir):
    out = out_dir / "out.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists.*--force"):
        convert(model, out, outtype="f32")
    assert out.read_bytes() == b"precious"
    convert(model, out, outtype="f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in out_dir.iterdir()] == ["out.gguf"]


def test_output_appearing_during_conversion_is_not_clobbered(model, out_dir, monkeypatch):
    out = out_dir / "out.gguf"
    real = base._write_tensor_data

    def racing(*args, **kwargs):
        real(*args, **kwargs)
        out.write_bytes(b"someone else's")

    monkeypatch.setattr(base, "_write_tensor_data", racing)
    with pytest.raises(ConversionError, match="already exists"):
        convert(model, out, outtype="f32")
    assert out.read_bytes() == b"someone else's"
    assert [p.name for p in out_dir.iterdir()] == ["out.gguf"]


def test_bad_output_paths(model, out_dir):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(model, out_dir / "no" / "such" / "dir.gguf")
    with pytest.raises(ConversionError, match="is a folder"):
        convert(model, out_dir)
    with pytest.raises(ConversionError, match="unknown outtype 'q4_k'"):
        convert(model, out_dir / "x.gguf", outtype="q4_k")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["_write_all", "_copy_range"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupt_or_write_failure_leaves_nothing(where, exc, model, out_dir, monkeypatch):
    calls = {"n": 0}
    real = getattr(base, where)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc(28, "No space left on device") if exc is OSError else exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(base, where, failing)
    # f32 → f16 goes through _write_all; f32 → f32 copies with _copy_range
    outtype = "f16" if where == "_write_all" else "f32"
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else ConversionError
    with pytest.raises(expected):
        convert(model, out_dir / "out.gguf", outtype=outtype)
    assert calls["n"] == 5
    assert list(out_dir.iterdir()) == []


def test_unreadable_source_folder(tmp_path, out_dir):
    with pytest.raises(ConversionError, match="no such folder"):
        convert(tmp_path / "nope", out_dir / "x.gguf")
    with pytest.raises(ConversionError, match="revision applies to hub repos"):
        convert(tmp_path, out_dir / "x.gguf", revision="main")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "empty", out_dir / "x.gguf")
    assert list(out_dir.iterdir()) == []


def test_copy_fallbacks_give_the_same_file(model, out_dir, monkeypatch):
    """Without copy_file_range (other OSes, some file systems) the bytes are the same."""
    first = convert(model, out_dir / "a.gguf", outtype="f32").read_bytes()

    def unsupported(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    assert convert(model, out_dir / "b.gguf", outtype="f32").read_bytes() == first
    monkeypatch.setattr(os, "sendfile", unsupported, raising=False)
    assert convert(model, out_dir / "c.gguf", outtype="f32").read_bytes() == first
