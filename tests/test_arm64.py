"""ondevice on aarch64, for real: the ARM llama.cpp libraries under qemu's user-mode emulation.

Runs only inside the emulated environment that scripts/arm64-check.sh prepares (marker
`arm64`, excluded by default):

    scripts/arm64-check.sh --test                      # everything, as CI runs it
    source ~/.cache/ondevice-arm64/env-dotprod.sh && python -m pytest -m arm64 tests/test_arm64.py

Elsewhere every test here skips, saying so. Nothing is faked: the interpreter, numpy, the
binding and llama.cpp are aarch64 code run by qemu (-cpu cortex-a76 for the dotprod build,
cortex-a710 for i8mm), on the real demo model and its Q4_0 / Q8_0 requantizations. Speed under
qemu means nothing (tens of times slower than a phone), so nothing here measures it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHON

import ondevice

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import arm64_agreement as agree  # noqa: E402

LEVEL = os.environ.get("ONDEVICE_ARM64_LEVEL", "")
REFERENCE = os.environ.get("ONDEVICE_ARM64_REFERENCE")
MODELS = Path(os.environ.get("ONDEVICE_ARM64_MODELS", "/nonexistent"))
REPORT = os.environ.get("ONDEVICE_ARM64_REPORT")
QEMU_CPU = os.environ.get("QEMU_CPU", "")
TIMEOUT = 900  # one emulated CLI run: interpreter start, imports, a model load, a few tokens

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(
        platform.machine() != "aarch64",
        reason="needs aarch64: run scripts/arm64-check.sh --test (qemu user-mode emulation)",
    ),
]


def cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=TIMEOUT,
    )


def need_reference() -> None:
    if not REFERENCE or not Path(REFERENCE).is_file():
        pytest.skip("no x86 reference: scripts/arm64-check.sh --test makes one")


def report(quant: str, row: dict) -> None:
    """Add one quant type's figures to this level's JSON report (for the RESULTS table)."""
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(level=LEVEL, qemu_cpu=QEMU_CPU)
    data.setdefault("quants", {})[quant] = row
    path.write_text(json.dumps(data, indent=2, default=float))


# --- the machine as ondevice sees it -----------------------------------------------------------
def test_cli_system_reports_the_arm_features_and_repacking(cli_env):
    out = cli("system", "--json", env=cli_env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["machine"] == "aarch64"
    feats = set(info["cpu_features"])
    assert {"asimd", "asimddp", "asimdhp"} <= feats, feats  # NEON, dotprod, fp16 arithmetic
    build = info["llama_cpp_system_info"]
    assert "NEON = 1" in build and "DOTPROD = 1" in build, build
    if QEMU_CPU == "cortex-a710":  # Armv9.0: i8mm and SVE2 (128-bit)
        assert {"i8mm", "sve", "sve2"} <= feats, feats
    if LEVEL == "i8mm":
        assert "MATMUL_INT8 = 1" in build, build
    elif LEVEL == "dotprod":
        assert "MATMUL_INT8 = 1" not in build, build
    # No AMX on ARM, so the x86 AMX rule must leave llama.cpp's repacking on.
    assert info["repack"] is True and info["repack_family"] == "arm_dotprod", info
    human = cli("system", env=cli_env)
    assert "Repack:    on (weight layouts for arm_dotprod)" in human.stdout, human.stdout
    assert "asimddp" in human.stdout


def test_load_and_greedy_generation(demo_path):
    with ondevice.load(demo_path, n_ctx=256, threads=2) as m:
        result = m.generate("The capital of France is", max_tokens=4, temperature=0)
        assert m.config.use_extra_bufts  # repacking on, as on a phone
    assert result.text.startswith(" Paris"), result.text
    assert result.stats.completion_tokens == 4


# --- same answers as x86 -----------------------------------------------------------------------
@pytest.mark.parametrize("quant", agree.QUANTS)
def test_agreement_with_x86(quant):
    """Next-token logits, top-1 and greedy text on aarch64 vs x86 for the same file, judged
    against the distance between two correct x86 CPU kernels measured on the spot (see
    scripts/arm64_agreement.py). Q4_0 and Q8_0 are repacked on ARM (llama.cpp's interleaved
    NEON/dotprod/i8mm layouts), Q4_1's matrices are not (only the tied Q8_0 embedding of the
    output layer is): both code paths are compared. The ARM run is also measured with
    repacking off (two correct ARM kernels), and the fit planner's repacked bytes are checked
    against the CPU_REPACK buffers llama.cpp reported at load."""
    from ondevice import fit, policy, system
    from ondevice.gguf_header import read_header

    need_reference()
    ref, meta = agree.load_reference(Path(REFERENCE), quant)
    path = agree.model_path(quant, MODELS)
    arm = agree.measure(path)
    result = agree.compare(ref, arm, meta["floor"])
    row = {**result, "repack": arm["repack"], "repack_bytes": arm["repack_bytes"]}
    row.update(x86_cpu=meta["cpu"], x86_greedy=meta["greedy_text"], arm_greedy=arm["greedy_text"])

    repackable = fit.repackable_bytes(
        read_header(path), policy.repack_family(system.cpu_features())
    )
    assert arm["repack"], "repacking must stay on for ARM builds"
    # Every file has a Q8_0 token_embd used (tied) by the output layer: repacked on ARM even
    # in the Q4_1 demo, whose Q4_1 matrices have no ARM layout.
    assert arm["repack_bytes"] > 0, "llama.cpp repacked nothing"
    if quant != "Q4_1":  # there only the embedding's copy is repacked
        off = agree.measure(path, greedy=False, repack=False)
        spread = agree.compare(off, arm, meta["floor"])
        row["arm_repack_on_vs_off_kl"] = spread["mean_kl"]
        assert off["repack_bytes"] == 0
        assert not spread["problems"], spread
    row["fit_repack_bytes"] = repackable
    report(quant, row)
    # The log rounds each buffer to 0.01 MiB.
    assert abs(repackable - arm["repack_bytes"]) <= 0.02 * 2**20, (repackable, arm["repack_bytes"])
    print(f"\n{quant} on {LEVEL} ({QEMU_CPU}): {json.dumps(row, default=float)}")
    assert not result["problems"], result


# --- the CLI, end to end -----------------------------------------------------------------------
def test_cli_fit_counts_the_repacked_copy(cli_env):
    need_reference()
    out = cli("fit", str(agree.model_path("Q4_0", MODELS)), "--ctx", "2048", "--json", env=cli_env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    data = json.loads(text)
    pred = data.get("prediction", data)
    assert pred["repack"] is True and pred["repack_bytes"] > 0, data


def test_cli_bench_phone_profile_saves_a_record(cli_env, tmp_path):
    saved = tmp_path / "runs.jsonl"
    args = ("bench", "demo", "--profile", "phone-6gb", "-p", "32", "-n", "8", "-r", "1")
    out = cli(*args, "--save", str(saved), "--label", "qemu", env=cli_env)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    tests = {r["test"] for r in records}
    assert {"pp32", "tg8"} <= tests, tests
    for r in records:
        assert r["profile"] == "phone-6gb" and r["within_budget"] is True, r
        assert r["repack"] is True and r["kv_type"] == "q8_0" and r["n_ctx"] == 2048, r
        assert 1 <= r["threads"] <= 4 and "(aarch64, " in r["machine"], r
    assert all(r["tps_mean"] > 0 for r in records if r["test"] in ("pp32", "tg8")), records
    again = cli("bench", "--compare", str(saved), env=cli_env)
    assert again.returncode == 0 and "tg8" in again.stdout, again.stderr


def test_cli_chat_piped(cli_env):
    out = cli("chat", "demo", "-n", "8", env=cli_env, stdin="What is the capital of France?\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), out.stderr
    assert "Traceback" not in out.stderr


def test_cli_run_json(cli_env):
    args = ("run", "demo", "The capital of France is", "-n", "3", "--temperature", "0", "--json")
    out = cli(*args, env=cli_env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"].startswith(" Paris") and data["stats"]["backend"] == "CPU", data


# --- the quantizer and the KV-cache reuse path ---------------------------------------------------
def test_quantizer_on_arm_matches_x86(tmp_path):
    """llama.cpp's quantizer (in ondevice's child process) run on aarch64 from the same F16
    file: the Q4_0 it writes loads and greedy-decodes as the x86 one does."""
    from ondevice.quantize import quantize

    need_reference()
    f16 = MODELS / "demo-f16.gguf"
    mine = tmp_path / "demo-q4_0-arm.gguf"
    result = quantize(f16, mine, "Q4_0")
    assert mine.is_file() and result is not None
    x86_file = agree.model_path("Q4_0", MODELS)
    same_bytes = mine.read_bytes() == x86_file.read_bytes()
    print(f"\nARM-quantized Q4_0 byte-identical to x86's: {same_bytes}")
    report("quantizer", {"q4_0_byte_identical_to_x86": same_bytes})
    ref, meta = agree.load_reference(Path(REFERENCE), "Q4_0")
    if not same_bytes:
        # Rounding may differ in the last bit of a scale (fused multiply-add on ARM); the file
        # must still give x86's answers within the same bounds.
        result = agree.compare(ref, agree.measure(mine, greedy=False), meta["floor"])
        assert not result["problems"], result


def test_kv_cache_is_reused_between_chat_turns(demo_path):
    from ondevice.conversation import Conversation

    with ondevice.load(demo_path, n_ctx=512, threads=2) as m:
        chat = Conversation(m)
        first = chat.send("Name a colour.", max_tokens=4, temperature=0)
        second = chat.send("Name another one.", max_tokens=4, temperature=0)
    s1, s2 = first.stats, second.stats
    assert s1.prompt_eval_tokens == s1.prompt_tokens
    # Turn 2 evaluates only what turn 1 did not leave in the cache.
    assert s2.prompt_eval_tokens < s2.prompt_tokens - s1.prompt_tokens, (s1, s2)


# --- llama.cpp's own kernel test, so a kernel bug is told apart from ours -----------------------
def test_llama_cpp_quantize_fns_kernels():
    """llama.cpp's test-quantize-fns on this level's libggml-cpu: every type's NEON/dotprod
    (/i8mm) quantize, dequantize and dot-product kernels against the scalar reference. It is
    an aarch64 binary, so it runs through qemu like the interpreter does."""
    bin_dir = os.environ.get("ONDEVICE_ARM64_BIN")
    qemu = os.environ.get("ONDEVICE_ARM64_QEMU")
    if not bin_dir or not qemu:
        pytest.skip("run through scripts/arm64-check.sh (it sets ONDEVICE_ARM64_BIN/_QEMU)")
    out = subprocess.run(
        [qemu, str(Path(bin_dir) / "test-quantize-fns"), "-v"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 tests failed" in out.stdout and "FAILED" not in out.stdout
    assert "Testing q4_0" in out.stdout and "Testing q8_0" in out.stdout
