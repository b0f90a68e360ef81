"""Memory prediction (ondevice.fit, `ondevice fit`, the check in `load()`) against what llama.cpp
really allocates for the demo model, and on full-size Phi-2-shaped headers.

The Phi-2-shaped files here are real GGUF headers with sparse data (the file claims 1.7 GB but
occupies a few KB on disk): `fit` reads the header alone, so that is all it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

import ondevice
from ondevice import bench, fit
from ondevice.errors import DoesNotFit, UsageError
from ondevice.gguf_header import read_header

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def phi2_header_file(path: Path, qtype: str = "Q4_K_M", n_layer: int = 32) -> Path:
    """A Phi-2-shaped GGUF (2560 hidden, 32 heads of 80, FFN 10240, vocab 51200) whose tensor
    data is a sparse hole: a real header for 1.7 GB of weights in a few KB of disk."""
    Q = GGMLQuantizationType
    main = {"Q4_K_M": Q.Q4_K, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}[qtype]
    e, f, v = 2560, 10240, 51200
    w = GGUFWriter(None, "phi2")
    w.add_context_length(2048)
    w.add_embedding_length(e)
    w.add_feed_forward_length(f)
    w.add_block_count(n_layer)
    w.add_head_count(32)
    w.add_head_count_kv(32)
    w.add_rope_dimension_count(32)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(v)])
    w.add_token_merges([f"t{i} t{i + 1}" for i in range(50000)])
    specs = [("token_embd.weight", (v, e), main)]
    for i in range(n_layer):
        b = f"blk.{i}."
        down = Q.Q6_K if qtype == "Q4_K_M" and i % 2 == 0 else main
        specs += [
            (b + "attn_norm.weight", (e,), Q.F32),
            (b + "attn_norm.bias", (e,), Q.F32),
            (b + "attn_qkv.weight", (3 * e, e), main),
            (b + "attn_qkv.bias", (3 * e,), Q.F32),
            (b + "attn_output.weight", (e, e), main),
            (b + "attn_output.bias", (e,), Q.F32),
            (b + "ffn_up.weight", (f, e), main),
            (b + "ffn_up.bias", (f,), Q.F32),
            (b + "ffn_down.weight", (e, f), down),
            (b + "ffn_down.bias", (e,), Q.F32),
        ]
    specs += [
        ("output_norm.weight", (e,), Q.F32),
        ("output_norm.bias", (e,), Q.F32),
        ("output.weight", (v, e), Q.Q6_K if qtype == "Q4_K_M" else main),
        ("output.bias", (v,), Q.F32),
    ]
    total = 0
    for name, shape, t in specs:
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        if t == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t)
        total += nbytes + 64  # alignment padding
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fh = w.fout[0]
    fh.flush()
    fh.truncate(fh.tell() + total)
    w.close()
    return path


@pytest.fixture(scope="module")
def phi2_q4km(tmp_path_factory) -> Path:
    return phi2_header_file(tmp_path_factory.mktemp("phi2") / "phi2-q4km.gguf")


@pytest.fixture(scope="module")
def demo_header(demo_path):
    return read_header(demo_path)


# --- against llama.cpp, for the real demo model ------------------------------------------------
@pytest.mark.parametrize("n_ctx, kv", [(512, "f16"), (2048, "q8_0"), (300, "f16")])
def test_kv_bytes_equal_llama_cpp_buffers(demo_path, demo_header, n_ctx, kv):
    with bench.native_log_lines() as lines:
        m = ondevice.load(demo_path, n_ctx=n_ctx, threads=1, kv_type=kv)
    with m:
        logged = bench.buffer_sizes(lines)
        predicted = fit.kv_cache_bytes(demo_header, n_ctx, kv)
        # llama.cpp prints MiB with two decimals; the model's own arithmetic is exact.
        assert abs(logged["KV"] - predicted) <= 0.01 * MiB
        assert m.kv_bytes == predicted
        assert m.n_ctx == fit.padded_ctx(n_ctx)
        # The reserved compute buffer is what llama.cpp logs, within 10%.
        assert logged["compute"] == pytest.approx(
            fit.compute_reserved_bytes(demo_header, n_ctx), rel=0.10
        )


def test_prediction_within_10_percent_of_measured_peak(demo_path):
    """The fit benchmark's own measurement, in a fresh process: load, fill the context, read
    the peak RSS; the prediction must be within 10% (the goal in benchmarks/RESULTS.md)."""
    args = json.dumps([str(demo_path), 512, "f16", 2])
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fit_accuracy.py"), "--child", args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    pred = fit.predict(read_header(demo_path), 512, "f16", repack=got["repack"])
    assert got["prompt_tokens"] == 512 - 24
    assert got["llama_buffers"]["KV"] == pytest.approx(pred.kv_bytes, abs=0.01 * MiB)
    assert pred.predicted_peak_bytes == pytest.approx(got["peak_rss_bytes"], rel=0.10)
    # The mapped model file is file-backed memory, the rest anonymous.
    assert got["filled"]["file_bytes"] >= 0.9 * pred.weights_bytes


# --- Phi-2-shaped headers ------------------------------------------------------------------------
def test_phi2_kv_cache_is_320_kib_per_token_and_not_quantizable(phi2_q4km):
    h = read_header(phi2_q4km)
    assert fit.kv_cache_bytes(h, 2048, "f16") == 640 * MiB
    assert fit.kv_cache_bytes(h, 1, "f16") == 256 * 320 * 1024  # one cell pads to 256
    problem = fit.kv_type_problem(h, "q8_0")
    assert problem and "80" in problem
    assert fit.kv_type_problem(h, "f16") is None
    with pytest.raises(UsageError, match="80"):
        fit.fit_report(h, 8 * 10**9, 2048, "q8_0")


def test_repacking_counts_the_repacked_matrices_twice_with_mmap(phi2_q4km):
    h = read_header(phi2_q4km)
    plain = fit.predict(h, 2048, repack=False)
    packed = fit.predict(h, 2048, repack=True, repack_family="x86_avx2")
    read_in = fit.predict(h, 2048, repack=True, repack_family="x86_avx2", use_mmap=False)
    q4k = sum(
        t.n_bytes
        for t in h.tensors
        if t.type_name == "Q4_K" and not t.name.startswith("token_embd")
    )
    assert packed.repack_bytes == q4k  # Q6_K is not repacked on x86, token_embd never
    assert packed.predicted_peak_bytes == plain.predicted_peak_bytes + q4k
    assert read_in.repack_bytes == 0 and read_in.file_backed_bytes == 0
    assert plain.file_backed_bytes == h.tensor_bytes
    # ARM's dotprod kernels repack Q6_K too.
    assert fit.repackable_bytes(h, "arm_dotprod") > q4k


def test_max_context_is_the_boundary(phi2_q4km):
    h = read_header(phi2_q4km)
    ram = 2 * 1024**3 + 300 * MiB
    best = fit.max_context(h, ram, "f16")
    assert 0 < best < 2048
    assert fit.predict(h, best).predicted_peak_bytes <= ram
    assert fit.predict(h, best + 256).predicted_peak_bytes > ram
    assert fit.max_context(h, 100 * MiB) == 0


def test_quant_options_get_smaller(phi2_q4km):
    h = read_header(phi2_q4km)
    opts = fit.quant_options(h, 3 * 10**9, 2048)
    peaks = [o["predicted_peak_bytes"] for o in opts]
    assert peaks == sorted(peaks, reverse=True)
    assert [o["type"] for o in opts if not o["fits"]][:2] == ["F16", "Q8_0"]


@pytest.mark.parametrize(
    "text, expected",
    [("4GB", 4 * 10**9), ("3.5GiB", int(3.5 * 1024**3)), ("512 MiB", 512 * MiB), ("1000", 1000)],
)
def test_parse_bytes(text, expected):
    assert fit.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 parsecs", "", "-1GB", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UsageError):
        fit.parse_bytes(text)


# --- load() refuses what cannot fit ------------------------------------------------------------
def test_load_refuses_a_context_larger_than_memory(demo_path):
    # 4 million tokens of f16 KV cache is ~86 GiB: refused before llama.cpp allocates it.
    with pytest.raises(DoesNotFit, match="available") as err:
        ondevice.load(demo_path, n_ctx=4_000_000, threads=1)
    assert "--force" in err.value.one_line()
    assert "n_ctx" in err.value.one_line()


def test_check_fits_uses_the_same_prediction(demo_header):
    pred = fit.check_fits(demo_header, 2048, available=10**10)
    assert pred.predicted_peak_bytes == fit.predict(demo_header, 2048).predicted_peak_bytes
    with pytest.raises(DoesNotFit):
        fit.check_fits(demo_header, 2048, available=50 * MiB)


# --- the CLI ------------------------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ondevice", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_fit_json(cli_env, demo_header):
    out = run_cli("fit", "demo", "--ram", "4GB", "--ctx", "2048", "--json", env=cli_env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in (
        "weights_bytes",
        "kv_bytes",
        "compute_bytes",
        "overhead_bytes",
        "predicted_peak_bytes",
        "ram_bytes",
        "fits",
        "file_backed_bytes",
        "anon_bytes",
        "max_ctx",
    ):
        assert key in data
    assert data["fits"] is True and data["ram_bytes"] == 4 * 10**9
    assert data["kv_bytes"] == fit.kv_cache_bytes(demo_header, 2048)
    assert data["predicted_peak_bytes"] == (
        data["weights_bytes"]
        + data["repack_bytes"]
        + data["kv_bytes"]
        + data["compute_bytes"]
        + data["overhead_bytes"]
    )


def test_cli_fit_says_what_would_fit(cli_env, phi2_q4km):
    # Repacking off, whatever this machine's default: with it, a second copy of the Q4_K
    # matrices leaves no context that fits 2.2 GB (the sizes below assume one copy).
    args = ["--ctx", "2048", "--no-repack"]
    out = run_cli("fit", str(phi2_q4km), "--ram", "2.2GB", *args, env=cli_env)
    assert out.returncode == 1, out.stderr
    assert "Does not fit" in out.stdout
    assert "context of" in out.stdout
    assert "Quantized to Q2_K" in out.stdout  # the only preset that leaves room at 2048
    assert "head size 80" in out.stdout  # no quantized KV cache for Phi-2
    ok = run_cli("fit", str(phi2_q4km), "--ram", "4GB", *args, env=cli_env)
    assert ok.returncode == 0 and "Fits in" in ok.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ram", "lots"], "cannot read 'lots'"),
        (["--ram", "4GB", "--kv", "q8_0"], "head size 80"),
        (["--ram", "4GB", "--kv", "q9"], "unknown KV cache type"),
    ],
)
def test_cli_fit_bad_input(cli_env, phi2_q4km, args, needle):
    out = run_cli("fit", str(phi2_q4km), *args, env=cli_env)
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and needle in out.stderr
    assert "Traceback" not in out.stderr
