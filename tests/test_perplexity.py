"""Perplexity, KL divergence and top-1 agreement (ondevice.quantize.quality, `ondevice perplexity`)
on the real demo model and the public-domain text in tests/data, checked against llama.cpp's own
llama-perplexity where it has been built (benchmarks/build_llama_tools.sh)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ondevice.quantize.quality import ReferenceLogits, evaluate, read_text

import ondevice
from ondevice.errors import UsageError
from ondevice.logits import log_softmax

PYTHON = sys.executable  # the same interpreter and package as pytest

TEXT_FILE = Path(__file__).parent / "data" / "alice-ch1.txt"
CTX = 64
CHUNKS = 6


def _llama_perplexity() -> Path | None:
    import llama_cpp

    cache = Path(os.environ.get("ONDEVICE_BENCH_CACHE", Path.home() / ".cache/ondevice-bench"))
    exe = cache / f"llama.cpp-{llama_cpp.__version__}" / "build" / "bin" / "llama-perplexity"
    return exe if exe.is_file() else None


@pytest.fixture(scope="module")
def text() -> str:
    return read_text(TEXT_FILE)


@pytest.fixture(scope="module")
def short_text(demo_model, text) -> str:
    """The start of the test text: CHUNKS windows of CTX tokens and a bit (keeps tests fast)."""
    toks = demo_model.tokenize(text, add_special=True, parse_special=False)
    return demo_model.detokenize(toks[: CHUNKS * CTX + 10])


@pytest.fixture(scope="module")
def short_text_file(tmp_path_factory, short_text) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "short.txt"
    path.write_text(short_text + "\n", encoding="utf-8")
    return path


def test_read_text_drops_one_trailing_newline(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("caf\u00e9\n\n".encode())
    assert read_text(p) == "caf\u00e9\n"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_text(p)


def test_perplexity_by_hand_on_one_window(demo_model, text):
    """The scored positions and the NLL of one window, recomputed here from the raw logits."""
    res = evaluate(demo_model, text, ctx=CTX, max_chunks=1)
    toks = demo_model.tokenize(text, add_special=True, parse_special=False)[:CTX]
    logits = demo_model.score(toks).astype(np.float64)
    nll = 0.0
    for j in range(CTX // 2, CTX - 1):  # positions ctx/2 .. ctx-2 predict the next token
        row = logits[j]
        nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[toks[j + 1]]
    assert res.tokens == CTX - 1 - CTX // 2
    assert res.chunks == 1
    assert math.isclose(res.perplexity, math.exp(nll / res.tokens), rel_tol=1e-6)


def test_log_softmax_matches_definition():
    x = np.array([[1.0, 2.0, 3.0], [-50.0, 0.0, 50.0]], dtype=np.float32)
    ls = log_softmax(x)
    assert np.allclose(np.exp(ls).sum(axis=1), 1.0)
    assert np.allclose(ls[0], x[0] - np.log(np.exp(x[0]).sum()))


def test_model_against_itself_has_zero_divergence(demo_path, short_text):
    ref = ReferenceLogits(demo_path, short_text, ctx=CTX, threads=2)
    res = evaluate(demo_path, short_text, ctx=CTX, reference=ref, threads=2, max_chunks=3)
    assert res.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0


def test_cli_json_with_reference(demo_path, demo_f16_path, short_text_file, cli_env):
    proc = subprocess.run(
        [PYTHON, "-m", "ondevice", "perplexity", str(demo_path), str(short_text_file)]
        + ["--ctx", str(CTX), "--reference", str(demo_f16_path), "-t", "2", "--json"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"perplexity", "kl_divergence", "top1_agreement", "tokens", "ctx"} <= set(data)
    assert data["ctx"] == CTX
    assert data["tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    # The F16 file holds the Q4_1 model's own decoded values: nearly the same distributions.
    assert 0 < data["kl_divergence"] < 0.02
    assert data["top1_agreement"] > 0.9
    assert 5 < data["perplexity"] < 200


def test_cli_text_too_short(demo_path, tmp_path, cli_env):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    proc = subprocess.run(
        [PYTHON, "-m", "ondevice", "perplexity", str(demo_path), str(short), "--ctx", "64"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: the text is ")
    assert "--ctx" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_logits_of_another_text_are_refused(demo_model, short_text):
    ref = ReferenceLogits(demo_model, short_text, ctx=CTX)
    with pytest.raises(UsageError, match="another text, ctx or chunks"):
        evaluate(demo_model, short_text[:-200], ctx=CTX, reference=ref)
    with pytest.raises(UsageError, match="another text, ctx or chunks"):
        evaluate(demo_model, short_text, ctx=CTX // 2, reference=ref)


@pytest.mark.skipif(_llama_perplexity() is None, reason="llama-perplexity not built")
def test_agrees_with_llama_perplexity(demo_path, short_text_file):
    """Same file, same model, same ctx and threads: within 0.5% of llama.cpp's own tool."""
    proc = subprocess.run(
        [str(_llama_perplexity()), "-m", str(demo_path), "-f", str(short_text_file)]
        # flash attention off on both: what ondevice's "auto" means on the CPU (it moves PPL ~0.5%)
        + ["-c", str(CTX), "-t", "2", "--no-repack", "-fa", "off"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = float(re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stderr + proc.stdout)[1])
    with ondevice.load(demo_path, n_ctx=CTX, threads=2) as m:
        ours = evaluate(m, read_text(short_text_file), ctx=CTX).perplexity
    assert ours == pytest.approx(theirs, rel=0.005)
