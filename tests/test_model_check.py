"""The files of issue 20 that a GGUF parser accepts and that still killed the host: each class
(tests/gguf_corpus.py `hostile_cases`) is refused by the Python rules (ondevice.model_check) with
one InvalidModelFile naming the field and offset, is shown to kill raw llama.cpp in a child
process, and is caught by the first-load probe (ondevice.probe) when the Python rule is switched
off: defence in depth, each layer proven on real files and real processes.

Also here: the tensor-type table is what llama.cpp's source says, files with a small
general.alignment load without mmap, the real demo model with one byte changed, and a seeded
fuzzer over the classes' knobs through `ondevice run` (4 cases by default, 200 with -m slow).
The default run proves one file per class in raw llama.cpp; -m slow proves every file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType as V
from gguf_corpus import TinySpec, build_tiny_llama, demo_norm_as_i32, hostile_cases

import ondevice
from ondevice import model_check, probe, tensor_roles
from ondevice._native.engine import EngineConfig
from ondevice.errors import InvalidModelFile
from ondevice.gguf_header import read_header

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
CASES = {c.name: c for c in hostile_cases()}
REFUSED = [n for n, c in CASES.items() if c.klass != "alignment"]
ALIGNED_OUT = [n for n, c in CASES.items() if c.klass == "alignment"]
SIGNALS = {"abort": -6, "segv": -11}
# One file per class in the default run (a child process each), every file with -m slow.
FIRST_OF_CLASS = {c.klass: n for n, c in reversed(CASES.items())}.values()
RAW_CASES = [n if n in FIRST_OF_CLASS else pytest.param(n, marks=pytest.mark.slow) for n in REFUSED]


@pytest.fixture
def unchecked(monkeypatch):
    """The Python rules switched off in this process: to get a header of a file they refuse,
    and show what the next layer does with it."""
    monkeypatch.setattr(model_check, "check", lambda *a, **k: None)


# --- layer 1: the Python rules ------------------------------------------------------------------


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_file_is_refused_before_llama_cpp(name, tmp_path):
    case = CASES[name]
    path = case.build(tmp_path / f"{name}.gguf")
    with pytest.raises(InvalidModelFile) as info:
        read_header(path)
    exc = info.value
    assert case.expect in f"{exc.field} {exc.message}", exc.one_line()
    assert exc.field and exc.offset and 0 < exc.offset < path.stat().st_size, exc.one_line()
    assert "\n" not in exc.one_line()
    # the field's offset points at the key or tensor it names
    raw = path.read_bytes()
    named = exc.field.removeprefix("tensor ").strip("'").encode()
    assert named in raw[max(0, exc.offset - 80) : exc.offset + 80], (exc.field, exc.offset)


def test_load_refuses_without_starting_a_child(tmp_path, monkeypatch):
    path = CASES["KV_HEADS_NOT_DIVIDING"].build(tmp_path / "bad.gguf")
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("probe started"))
    with pytest.raises(InvalidModelFile, match="do not divide"):
        ondevice.load(path, n_ctx=64, threads=1)


def test_cli_info_and_run_give_one_error_line(tmp_path, cli_env):
    for name in ("MATRIX_I32", "NORM_I32", "BERT_VOCAB_TOO_SMALL"):
        path = CASES[name].build(tmp_path / f"{name}.gguf")
        for args in (["info", str(path)], ["run", str(path), "hi", "-n", "2", "--threads", "1"]):
            proc = subprocess.run(
                [PYTHON, "-m", "ondevice", *args], capture_output=True, text=True, env=cli_env,
                timeout=120,
            )  # fmt: skip
            assert proc.returncode == 1, (name, args[0], proc.stderr[-800:])
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
            assert "invalid GGUF file" in lines[0] and "Traceback" not in proc.stderr


# --- layer 2: what raw llama.cpp does, and the probe that stands in for a missed rule ----------


@pytest.mark.parametrize("name", RAW_CASES)
def test_raw_llama_cpp_dies_and_the_probe_reports_it(name, tmp_path, unchecked):
    """The rule is needed (raw llama.cpp dies on the file), and if it were missing the probe
    would refuse the file with llama.cpp's last line instead of the host dying."""
    case = CASES[name]
    path = case.build(tmp_path / f"{name}.gguf")
    outcome = probe.run_probe(path, read_header(path), _cpu_config())
    assert outcome.status == "crashed", (outcome.status, outcome.detail, outcome.log_tail[-3:])
    assert outcome.returncode == SIGNALS[case.raw], outcome.detail
    if case.raw == "abort":
        # llama.cpp's own last words: "ggml.c:5515: GGML_ASSERT(...) failed", "ops.cpp:5422: fatal error"
        assert re.search(r"\w\.(c|cpp):\d+: |what\(\)", outcome.detail), outcome.detail


def test_a_missed_rule_becomes_an_error_in_a_real_host_process(tmp_path, cli_env):
    """End to end in a host process whose Python rules are off: load() gets InvalidModelFile
    from the probe, for an abort and a segfault, and the host lives on."""
    files = [CASES[n].build(tmp_path / f"{n}.gguf") for n in ("KV_HEADS_ARRAY_ZERO", "MATRIX_F64")]
    code = (
        "import sys, ondevice\nfrom ondevice import model_check\n"
        "model_check.check = lambda *a, **k: None\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        ondevice.load(p, n_ctx=64, threads=1)\n"
        "    except ondevice.InvalidModelFile as e:\n        print('REFUSED', e.one_line())\n"
        "print('ALIVE')\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", code, *map(str, files)], capture_output=True, text=True, env=cli_env,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ALIVE" and len(lines) == 3, proc.stdout
    assert "crashed (SIGABRT)" in lines[0] and "GGML_ASSERT" in lines[0], lines[0]
    assert "crashed (SIGSEGV)" in lines[1], lines[1]
    assert all("in a test process" in line for line in lines[:2])


# --- alignment: read without mmap -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALIGNED_OUT)
def test_small_alignment_loads_without_mmap(name, tmp_path):
    case = CASES[name]
    path = case.build(tmp_path / f"{name}.gguf")
    header = read_header(path)
    assert header.alignment == case.spec.alignment and not model_check.mmap_aligned(header)
    with ondevice.load(path, n_ctx=64, threads=1, use_mmap=True) as m:
        assert m.settings["use_mmap"] is False
        assert any("without mmap" in n for n in m.notes), m.notes
        assert m.generate("hello", max_tokens=2, temperature=0).stats.completion_tokens >= 1


def test_small_alignment_mapped_kills_raw_llama_cpp(tmp_path):
    """Why it is read without mmap: mapped, ggml aborts ("buffer pointer must be aligned")."""
    for name in ALIGNED_OUT:
        path = CASES[name].build(tmp_path / f"{name}.gguf")
        mapped = dataclasses.replace(_cpu_config(), use_mmap=True)
        outcome = probe.run_probe(path, read_header(path), mapped)
        assert outcome.returncode == -6 and "must be aligned" in outcome.detail, outcome.detail


# --- the real demo model with one byte changed ------------------------------------------------


def test_one_byte_in_the_demo_model(demo_path, tmp_path, monkeypatch):
    path = demo_norm_as_i32(demo_path, tmp_path / "demo-i32.gguf")
    with pytest.raises(InvalidModelFile, match="I32") as info:
        read_header(path)
    assert info.value.field == "tensor 'blk.0.attn_norm.weight'"
    monkeypatch.setattr(model_check, "check", lambda *a, **k: None)
    outcome = probe.run_probe(path, read_header(path), _cpu_config())
    assert outcome.status == "crashed" and outcome.returncode == -6, outcome.detail


# --- the table of allowed types ---------------------------------------------------------------


def test_tensor_roles_are_llama_cpps():
    """The committed table is what scripts/gen_tensor_roles.py derives from the llama.cpp
    source the binding was built from (skipped where that source isn't unpacked)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_tensor_roles
    finally:
        sys.path.pop(0)
    src = gen_tensor_roles.default_source()
    if not (src / "src" / "llama-arch.cpp").is_file():
        pytest.skip(f"no llama.cpp source at {src} (benchmarks/build_llama_tools.sh unpacks it)")
    assert src.name == tensor_roles.LLAMA_CPP_SOURCE
    assert gen_tensor_roles.render(src) == (ROOT / "ondevice" / "tensor_roles.py").read_text()


def test_every_real_file_we_make_passes(demo_path, tmp_path):
    """The rules refuse nothing real: the demo, the tiny model in every float/quantized layout
    the builders make, tied embeddings, biases, and a BERT vocabulary with its ids."""
    read_header(demo_path)
    specs = [
        TinySpec(),
        TinySpec(float_only=True),
        TinySpec(tensors={"output.weight": None}),
        TinySpec(extra_tensors={"blk.0.attn_q.bias": (64,)}),
        TinySpec(types={"token_embd.weight": Q.BF16, "blk.0.attn_q.weight": Q.Q4_K}, n_embd=256),
        TinySpec(kv={"llama.attention.head_count_kv": ([2, 2], V.ARRAY, V.UINT32)}),
        TinySpec(extra_tensors={"rope_freqs.weight": (8,)}),
    ]
    for i, spec in enumerate(specs):
        read_header(build_tiny_llama(tmp_path / f"ok{i}.gguf", spec))


def test_zero_kv_heads_pass_where_llama_cpp_gives_them_a_meaning(tmp_path):
    """A 0 in head_count_kv marks a recurrent layer in the hybrid architectures (jamba, lfm2,
    ...): refused for llama, accepted for those."""
    from ondevice.gguf_header import GGUFHeader

    def header(arch: str) -> GGUFHeader:
        md = {
            "general.architecture": arch,
            f"{arch}.block_count": 2,
            f"{arch}.embedding_length": 64,
            f"{arch}.attention.head_count": 4,
            f"{arch}.attention.head_count_kv": [2, 0],
        }
        return GGUFHeader("x.gguf", 3, md, {}, [], 32, 0, 0)

    assert "jamba" in tensor_roles.ZERO_HEAD_ARCHS and "llama" not in tensor_roles.ZERO_HEAD_ARCHS
    model_check.check_heads(header("jamba"), model_check._Where(header("jamba"), {}, []))
    with pytest.raises(InvalidModelFile, match="0 KV heads"):
        model_check.check_heads(header("llama"), model_check._Where(header("llama"), {}, []))


def _cpu_config() -> EngineConfig:
    return EngineConfig(threads=1, threads_batch=1, use_extra_bufts=False, flash_attn="off")


# --- a fuzzer over the classes' knobs -----------------------------------------------------------

FUZZ_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q8_1, Q.I8, Q.I16, Q.I32, Q.I64, Q.F64]
FUZZ_TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight",
                "blk.0.attn_norm.weight", "output_norm.weight", "output.weight"]  # fmt: skip


def fuzz_spec(seed: int) -> tuple[TinySpec, str]:
    """A tiny llama with a random mix of the knobs the classes turn."""
    rng = random.Random(seed)
    kv: dict = {}
    spec = TinySpec(seed=seed)
    what = []
    if rng.random() < 0.4:
        h, kvh = rng.choice([(4, 1), (4, 2), (4, 3), (4, 4), (4, 8), (2, 2), (8, 3)])
        spec = dataclasses.replace(spec, n_head=h, n_head_kv=kvh)
        what.append(f"heads {h}/{kvh}")
    if rng.random() < 0.2:
        arr = [rng.choice([0, 1, 2]) for _ in range(spec.n_layer)]
        kv["llama.attention.head_count_kv"] = (arr, V.ARRAY, V.UINT32)
        what.append(f"kv heads {arr}")
    if rng.random() < 0.2:
        kv["llama.rope.dimension_count"] = None
        spec = dataclasses.replace(spec, n_embd=rng.choice([36, 40, 44]), float_only=True)
        what.append(f"embd {spec.n_embd}, no rope key")
    types = {}
    for _ in range(rng.choice([0, 1, 1, 2])):
        name, qtype = rng.choice(FUZZ_TENSORS), rng.choice(FUZZ_TYPES)
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q8_1) and spec.n_embd % 32:
            continue
        types[name] = qtype
        what.append(f"{name} {qtype.name}")
    if rng.random() < 0.2:
        spec = dataclasses.replace(spec, alignment=rng.choice([1, 2, 4, 8, 16, 64]))
        what.append(f"alignment {spec.alignment}")
    spec = dataclasses.replace(spec, kv=kv, types=types)
    return spec, ", ".join(what) or "unchanged"


def _fuzz_one(seed: int, tmp_path: Path, env: dict[str, str]) -> tuple[str, str]:
    spec, what = fuzz_spec(seed)
    path = tmp_path / f"fuzz{seed}.gguf"
    try:
        build_tiny_llama(path, spec)
    except (ValueError, AssertionError) as exc:  # a combination gguf-py can't write
        return "not built", f"{what}: {exc}"
    proc = subprocess.run(
        [PYTHON, "-m", "ondevice", "run", str(path), "hello", "-n", "2", "--threads", "1",
         "--temperature", "0", "--ctx", "64"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    err = proc.stderr.strip()
    if proc.returncode == 0:
        return "ran", what
    last = err.splitlines()[-1] if err else ""
    if proc.returncode != 1 or "Traceback" in err or not last.startswith("error: "):
        return "CRASH", f"{what}: rc={proc.returncode} {err[-400:]!r}"
    if "in a test process" in last:
        return "refused by the probe", what
    if "invalid GGUF file (field" in last:
        return "refused by the rules", what
    return "clean llama.cpp error", what


@pytest.mark.parametrize(
    "seeds", [range(4), pytest.param(range(200), marks=pytest.mark.slow, id="200")]
)
def test_fuzzed_hostile_files_never_kill_the_cli(seeds, tmp_path, cli_env):
    outcomes = [(s, *_fuzz_one(s, tmp_path, cli_env)) for s in seeds]
    counts = Counter(kind for _, kind, _ in outcomes)
    print(f"hostile fuzz: {len(outcomes)} files, {json.dumps(dict(sorted(counts.items())))}")
    crashes = [f"seed {s}: {d}" for s, kind, d in outcomes if kind == "CRASH"]
    assert not crashes, "\n".join(crashes)
    for f in tmp_path.glob("fuzz*.gguf"):
        os.unlink(f)
