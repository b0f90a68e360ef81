"""GGUF pre-validation (ondevice.gguf_header) against a corpus of corrupt files.

Every corrupt file is a valid file with one thing changed (tests/gguf_corpus.py): the tiny llama
model built with gguf-py's GGUFWriter, and the real demo model. Each class of llama.cpp's
tests/test-gguf.cpp is there, plus truncations at a dozen points, tokenizer and architecture
classes, and well-formed files that are broken models. Every one must end in one typed
`InvalidModelFile` naming the field and the offset (or, for a broken model that llama.cpp
reports cleanly, in `ModelLoadError`), never in a crash; the valid files must load.

The files llama.cpp aborts on are proven to abort it (raw llama.cpp in a subprocess, slow
marker), so each check that guards one is known to be needed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_corpus import KV, Layout, TinySpec, build_tiny_llama, header_cases, model_cases

import ondevice
from ondevice import gguf_header
from ondevice.cli import main as cli_main
from ondevice.errors import InvalidModelFile
from ondevice.gguf_header import read_header

PYTHON = sys.executable
MODEL_CASES = {c.name: c for c in model_cases()}
RUN_ARGS = ["The capital of France is", "-n", "4", "--temperature", "0", "--threads", "1"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def sources(tiny, demo_path) -> dict[str, Path]:
    return {"tiny": tiny, "demo": demo_path}


def ondevice_cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, what: str = "") -> None:
    """Exit status 1 (not a signal), one `error:` line, no traceback."""
    assert proc.returncode == 1, f"{what}: rc={proc.returncode}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr


# --- the valid files --------------------------------------------------------------------------


def test_tiny_model_is_valid_and_loads(tiny):
    h = read_header(tiny)
    assert h.architecture == "llama" and h.version == 3
    assert len(h.tensors) == 21 and h.type_counts() == {"F16": 9, "F32": 5, "Q8_0": 7}
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 335
    assert h.data_offset + h.tensor_bytes <= h.file_size
    with ondevice.load(tiny, n_ctx=64, threads=1) as m:
        r = m.generate("The capital of France is", max_tokens=4, temperature=0)
        assert r.stats.completion_tokens >= 1
        assert m.n_vocab == 335


def test_demo_model_is_valid(demo_path):
    h = read_header(demo_path)
    assert h.architecture == "llama" and len(h.tensors) == 272
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(h.metadata["tokenizer.ggml.merges"]) == 48900
    # llama.cpp's layout: back to back in header order, the last one ending inside the file
    last = h.tensors[-1]
    assert h.data_offset + last.offset + last.n_bytes <= h.file_size
    assert h.tensor_bytes == sum(t.n_bytes for t in h.tensors)


# --- the corrupt-file corpus --------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, every",
    [("tiny", 1), ("demo", 4), pytest.param("demo", 1, marks=pytest.mark.slow, id="demo-all")],
)
def test_corrupt_files_are_refused_with_field_and_offset(source, every, sources, tmp_path):
    """Every class on the tiny model; on the demo model every 4th class by default (each costs
    a parse of its 1.8 MB header), all of them with the slow marker."""
    valid = sources[source]
    cases = header_cases(Layout.read(valid))
    assert len(cases) >= 70
    cases = cases[::every]
    problems = []
    for case in cases:
        # The demo's tensor data is never read by the check: a sparse tail stands in for it.
        path = case.write(tmp_path / "bad.gguf", valid, sparse=source == "demo")
        try:
            read_header(path)
        except InvalidModelFile as exc:
            text = f"{exc.field} {exc.message}".lower()
            if case.expect.lower() not in text:
                problems.append(f"{case.name}: {exc.field!r} {exc.message!r} lacks {case.expect!r}")
            if exc.field is None or exc.offset is None or not 0 <= exc.offset <= case.size:
                problems.append(f"{case.name}: field {exc.field!r} offset {exc.offset!r}")
            if "\n" in exc.one_line() or not exc.one_line().startswith(str(path)):
                problems.append(f"{case.name}: message {exc.one_line()!r}")
        except Exception as exc:  # noqa: BLE001 - the point: nothing but InvalidModelFile
            problems.append(f"{case.name}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{case.name}: accepted")
    print(f"{source}: {len(cases)} corrupt files, {len(cases) - len(problems)} clean errors")
    assert problems == []


def test_cli_info_refuses_every_corrupt_file(tiny, tmp_path):
    """`ondevice info` in-process (llama.cpp never sees these files): exit 1, one error line."""
    runner = CliRunner()
    for case in header_cases(Layout.read(tiny)):
        path = case.write(tmp_path / f"{case.name.lower()}.gguf", tiny)
        result = runner.invoke(cli_main, ["info", str(path)])
        assert result.exit_code == 1, (case.name, result.output)
        assert result.output.startswith("error: ") and "invalid GGUF file" in result.output
        assert result.output.count("\n") == 1, result.output


@pytest.mark.parametrize(
    "name",
    ["KV_ARRAY_3M_ELEMENTS", "TENSORS_OVERLAPPING"],
)
def test_cli_run_and_info_in_subprocesses(name, tiny, tmp_path, cli_env):
    case = next(c for c in header_cases(Layout.read(tiny)) if c.name == name)
    path = case.write(tmp_path / "bad.gguf", tiny)
    assert_clean_error(ondevice_cli("info", str(path), env=cli_env), f"info {name}")
    assert_clean_error(ondevice_cli("run", str(path), *RUN_ARGS, env=cli_env), f"run {name}")


def test_non_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    cases = {
        tmp_path: "is a directory",
        fifo: "not a regular file",
        Path("/dev/zero"): "not a regular file",
        empty: "too short",
        tmp_path / "missing.gguf": "file not found",
    }
    for path, words in cases.items():
        with pytest.raises(InvalidModelFile, match=words):
            read_header(path)


def test_file_shrinking_while_read_is_an_error_not_sigbus(demo_path, tmp_path, monkeypatch):
    """The header is read with pread, not mapped: a file cut short under us is an error (a
    mapped read past the new end would kill the process with SIGBUS)."""
    lay = Layout.read(demo_path)
    assert lay.data_start > 1 << 20  # longer than the first read, so a second read happens
    copy = tmp_path / "shrinking.gguf"
    with open(copy, "wb") as f:
        f.write(lay.data)
        f.truncate(lay.size)
    first_fill = gguf_header._Cursor.fill
    calls = []

    def fill_then_truncate(self, upto):
        first_fill(self, upto)
        if not calls:
            os.truncate(copy, len(self.buf))  # someone else cuts the file short
        calls.append(upto)

    monkeypatch.setattr(gguf_header._Cursor, "fill", fill_then_truncate)
    with pytest.raises(InvalidModelFile, match="shrank while being read|truncated"):
        read_header(copy)


# --- bounds: time and memory of a hostile header ------------------------------------------------


def _with_array(
    tiny: Path, out: Path, elem_type: int, count: int, payload: bytes, key: str = "evil.array"
) -> Path:
    """The tiny model with one more key: an array of `count` elements of `elem_type`."""
    lay = Layout.read(tiny)
    raw = struct.pack("<IQ", elem_type, count) + payload
    head, start, end = lay.serialize(lay.kvs + [KV(key.encode(), 9, raw, 0, 0, 0)])
    out.write_bytes(head + tiny.read_bytes()[start:end])
    return out


def test_gguf_py_killer_is_refused_cheaply(tiny, tmp_path):
    """gguf 0.19.0's reader took 22 s and 2.75 GB on a 3 MB file claiming a 3-million element
    array. Ours refuses it from the count alone, allocating next to nothing."""
    import tracemalloc

    path = _with_array(tiny, tmp_path / "killer.gguf", 0, 3_000_000, b"\x01" * 3_000_000)
    assert 3_000_000 < path.stat().st_size < 3_500_000
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelFile, match="exceeds the limit") as info:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.field == "evil.array"
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.slow
def test_largest_accepted_header_stays_bounded(tiny, tmp_path):
    """A header at the limits (arrays of 2-byte strings, the most Python objects per byte)
    parses in bounded memory: measured in a fresh process (reported in the test output)."""
    n = gguf_header.MAX_ARRAY_LEN
    payload = b"".join(
        struct.pack("<Q", 2) + bytes([65 + i % 26, 65 + i // 26 % 26]) for i in range(n)
    )
    path = _with_array(tiny, tmp_path / "big.gguf", 8, n, payload, key="tokenizer.ggml.extra")
    code = (
        "import sys, time, psutil\n"
        "from ondevice.gguf_header import read_header\n"
        "rss0 = psutil.Process().memory_info().rss\n"
        "t = time.perf_counter(); h = read_header(sys.argv[1]); dt = time.perf_counter() - t\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "peak = int(hwm.split()[1]) * 1024\n"
        "print(len(h.metadata['tokenizer.ggml.extra']), dt, rss0 / 2**20, peak / 2**20)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count, seconds, before_mib, peak_mib = proc.stdout.split()
    print(
        f"{n} strings, {path.stat().st_size / 2**20:.0f} MiB file: {float(seconds):.2f} s, "
        f"peak RSS {float(peak_mib):.0f} MiB ({float(before_mib):.0f} MiB before reading)"
    )
    assert int(count) == n
    assert float(peak_mib) - float(before_mib) < 512


# --- well-formed files that are broken models -------------------------------------------------


@pytest.mark.parametrize("name", [n for n, c in MODEL_CASES.items() if c.refused_by == "header"])
def test_broken_model_refused_by_the_header_check(name, tmp_path):
    case = MODEL_CASES[name]
    path = build_tiny_llama(tmp_path / "broken.gguf", case.spec)
    with pytest.raises(InvalidModelFile) as info:
        read_header(path)
    assert case.expect in f"{info.value.field} {info.value.message}"
    assert info.value.offset is not None


@pytest.mark.parametrize("name", [n for n, c in MODEL_CASES.items() if c.refused_by == "llama"])
def test_broken_model_refused_by_llama_cpp_cleanly(name, tmp_path, cli_env):
    """These pass the header check; llama.cpp itself reports them, and we pass that on."""
    case = MODEL_CASES[name]
    path = build_tiny_llama(tmp_path / "broken.gguf", case.spec)
    read_header(path)
    proc = ondevice_cli("run", str(path), *RUN_ARGS, env=cli_env)
    assert_clean_error(proc, name)
    # llama.cpp's reason, not its generic "failed to load model"
    assert "llama.cpp could not load" in proc.stderr and case.expect in proc.stderr, proc.stderr


RAW_PROBE = """
import sys
from ondevice._native.engine import Engine, EngineConfig
from ondevice.errors import OndeviceError
try:
    eng = Engine(sys.argv[1], EngineConfig(n_ctx=64, threads=1, threads_batch=1))
    eng.decode(eng.tokenize("hello world"))
except OndeviceError as exc:
    print(exc)
    sys.exit(1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_raw_llama_cpp_on_broken_models(name, tmp_path):
    """What llama.cpp does with each broken model when nothing checks it first: where it
    aborts the process, our header check is what stands between the file and a crash."""
    case = MODEL_CASES[name]
    path = build_tiny_llama(tmp_path / "broken.gguf", case.spec)
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # no gdb backtrace on abort
    proc = subprocess.run(
        [PYTHON, "-c", RAW_PROBE, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    outcome = {0: "load", 1: "error", -6: "abort"}.get(proc.returncode, proc.returncode)
    assert outcome == case.raw, proc.stderr[-1000:]


def test_every_abort_class_is_guarded():
    """Each broken model that aborts raw llama.cpp is refused before llama.cpp sees it."""
    aborting = [c for c in MODEL_CASES.values() if c.raw == "abort"]
    assert len(aborting) >= 5
    assert all(c.refused_by == "header" for c in aborting)


def test_norm_epsilon_that_aborts_a_decode_is_refused(tiny, tmp_path):
    """Found by the fuzzer: llama.cpp loads a model whose rms-norm epsilon is negative or NaN,
    then GGML_ASSERT(eps >= 0) kills the process at the first decode."""
    lay = Layout.read(tiny)
    kv = lay.kv("llama.attention.layer_norm_rms_epsilon")
    for value in (-1.0, float("nan"), float("inf")):
        head, start, end = lay.patched(kv.value_at, "<f", value)
        path = tmp_path / "eps.gguf"
        path.write_bytes(head + tiny.read_bytes()[start:end])
        with pytest.raises(InvalidModelFile, match="finite float >= 0") as info:
            read_header(path)
        assert info.value.offset == kv.at


def test_spec_knobs_build_loadable_variants(tmp_path):
    """The builder's float-only variant (the quantizer's input in test_faults) is valid."""
    path = build_tiny_llama(tmp_path / "f16.gguf", TinySpec(float_only=True))
    h = read_header(path)
    assert set(h.type_counts()) == {"F16", "F32"}
