"""The first-load check (ondevice.probe): a child process loads a file this machine has not run
before, the pass is remembered, and the child never outlives its parent or its limits.

Real files and real processes throughout: the demo model, tiny llamas (tests/gguf_corpus.py),
a FIFO to make a child hang inside llama.cpp, SIGKILL for the parent, the real quantizer and
converter, and `ondevice pull` against the loopback hub (tests/fake_hub.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fake_hub import FakeHub
from gguf_corpus import TinySpec, build_tiny_llama, hostile_cases, model_cases
from phi2_fixtures import make_tiny_phi2

import ondevice
from ondevice import model_check, probe
from ondevice._native import binding
from ondevice._native.engine import EngineConfig
from ondevice.errors import InvalidModelFile, ModelLoadError, UsageError
from ondevice.gguf_header import read_header

PYTHON = sys.executable


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh ONDEVICE_HOME: nothing has been checked on this 'machine' yet."""
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """The probes started in this process (each still runs its real child)."""
    started: list[str] = []
    real = probe.run_probe

    def spy(path, *args, **kwargs):
        started.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(probe, "run_probe", spy)
    return started


@pytest.fixture
def tiny(tmp_path) -> Path:
    return build_tiny_llama(tmp_path / "tiny.gguf")


def entries(home: Path) -> list[dict]:
    folder = home / "config" / probe.CHECKED_DIR
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


# --- remembered passes ----------------------------------------------------------------------------


def test_first_load_probes_once_then_costs_nothing(tiny, home, probes):
    with ondevice.load(tiny, n_ctx=64, threads=1) as m:
        assert m.generate("hello", max_tokens=2).stats.completion_tokens >= 1
    assert probes == [str(tiny)]
    (entry,) = entries(home)
    ident = probe.identity(tiny, read_header(tiny))
    assert entry["identity"] == dataclasses.asdict(ident)
    assert (home / "config" / probe.CHECKED_DIR / f"{ident.key}.json").is_file()
    with ondevice.load(tiny, n_ctx=64, threads=1):
        pass
    assert len(probes) == 1
    # what a later load pays: one read of the header (the tiny model's is 20 kB)
    header = read_header(tiny)
    t0 = time.perf_counter()
    assert probe.ensure_safe(tiny, header) is False
    assert time.perf_counter() - t0 < 0.1


def test_a_changed_file_is_checked_again(tiny, home, probes):
    header = read_header(tiny)
    assert probe.ensure_safe(tiny, header) is True
    assert probe.ensure_safe(tiny, header) is False
    st = tiny.stat()
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert probe.ensure_safe(tiny, header) is True
    data = bytearray(tiny.read_bytes())
    at = data.index(b"tiny-llama")
    data[at : at + 10] = b"tiny-lLama"  # one header byte, still a valid file
    tiny.write_bytes(bytes(data))
    assert probe.ensure_safe(tiny, read_header(tiny)) is True
    assert len(probes) == 3 and len(entries(home)) == 3


def test_another_engine_version_checks_again(tiny, home, probes, monkeypatch):
    header = read_header(tiny)
    probe.ensure_safe(tiny, header)
    monkeypatch.setattr(binding, "version", lambda: "0.0.1")
    assert probe.ensure_safe(tiny, header) is True and len(probes) == 2


def test_a_corrupt_entry_just_means_checking_again(tiny, home, probes):
    header = read_header(tiny)
    probe.ensure_safe(tiny, header)
    for p in (home / "config" / probe.CHECKED_DIR).glob("*.json"):
        p.write_text("[" * 100000)
    assert probe.ensure_safe(tiny, header) is True


def test_trust_skips_the_check(tiny, home, probes):
    with ondevice.load(tiny, n_ctx=64, threads=1, trust=True):
        pass
    assert probes == [] and entries(home) == []


def test_the_demo_model_is_known_and_passes(demo_path, home, probes):
    """The demo's header is pinned in KNOWN_GOOD (so tests and first runs don't pay for it);
    this is the proof that it passes."""
    header = read_header(demo_path)
    ident = probe.identity(demo_path, header)
    assert probe.KNOWN_GOOD[ident.header_sha256] == ident.size == demo_path.stat().st_size
    assert probe.ensure_safe(demo_path, header) is False and probes == []
    outcome = probe.run_probe(demo_path, header)
    assert outcome.status == "passed", outcome.detail
    print(f"demo probe: {outcome.seconds:.2f} s ({outcome.detail})")


def test_a_clean_refusal_is_left_to_the_host(tmp_path, home):
    """llama.cpp refusing a file (here a missing tensor) is not a crash: nothing is
    remembered, and the host's own load gives llama.cpp's reason."""
    case = next(c for c in model_cases() if c.name == "MISSING_TENSOR")
    path = build_tiny_llama(tmp_path / "missing.gguf", case.spec)
    outcome = probe.run_probe(path, read_header(path))
    assert outcome.status == "refused" and "not found" in outcome.detail
    with pytest.raises(ModelLoadError, match="not found"):
        ondevice.load(path, n_ctx=64, threads=1)
    assert entries(home) == []


def test_a_crash_is_refused_and_not_remembered(tmp_path, home, monkeypatch):
    case = next(c for c in hostile_cases() if c.name == "NORM_I32")
    path = case.build(tmp_path / "norm.gguf")
    monkeypatch.setattr(model_check, "check", lambda *a, **k: None)
    with pytest.raises(InvalidModelFile, match=r"crashed \(SIGABRT\)") as info:
        probe.ensure_safe(path, read_header(path), shown="shown-name.gguf")
    assert info.value.path == "shown-name.gguf" and "not loaded into this process" in str(
        info.value
    )
    assert entries(home) == []


# --- the child's life -------------------------------------------------------------------------

HANG_PARENT = """
import dataclasses, json, os, signal, sys, time
from ondevice import probe
from ondevice._native.engine import EngineConfig
proc = probe._start_child()
job = {"path": sys.argv[1], "config": dataclasses.asdict(EngineConfig(threads=1)),
       "parent": os.getpid(), "special_ids": []}
proc.stdin.write(json.dumps(job).encode() + b"\\n")
proc.stdin.flush()
print(proc.pid, flush=True)
time.sleep(1.5)  # the child now waits inside llama.cpp, opening a FIFO nobody writes
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
proc.stdin.close()  # alive, but the pipe closed: as if the parent were gone
print(proc.wait(timeout=30), flush=True)
"""


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["die", "close"])
def test_the_child_dies_with_its_parent(how, tmp_path, cli_env):
    """SIGKILL of the parent (PR_SET_PDEATHSIG on Linux), or the pipe the child watches
    closing (the mechanism everywhere else): the child, stuck in llama.cpp, goes."""
    fifo = tmp_path / "hang.gguf"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [PYTHON, "-c", HANG_PARENT, str(fifo), how], stdout=subprocess.PIPE, text=True,
        env=cli_env,
    )  # fmt: skip
    child = int(proc.stdout.readline())
    try:
        rc = proc.wait(timeout=60)
        out = proc.stdout.read().split()
        if how == "die":
            assert rc == -signal.SIGKILL
        else:
            assert rc == 0 and out == [str(probe.EXIT_ORPHANED)], out
        assert _gone(child, 10), f"child {child} outlived its parent"
    finally:
        if not _gone(child, 0):
            os.kill(child, signal.SIGKILL)


def test_a_child_that_hangs_is_killed_at_the_time_limit(tmp_path, home, monkeypatch):
    fifo = tmp_path / "hang.gguf"
    os.mkfifo(fifo)
    header = read_header(build_tiny_llama(tmp_path / "tiny.gguf"))
    monkeypatch.setattr(probe, "limits", lambda h: (4 << 30, 60, 3.0))
    t0 = time.perf_counter()
    outcome = probe.run_probe(fifo, header)
    assert outcome.status == "crashed" and "did not finish within 3 s" in outcome.detail
    assert time.perf_counter() - t0 < 30


def test_limits_are_set_in_the_child():
    code = (
        "import resource\nfrom ondevice._native.probe_worker import set_limits\n"
        "set_limits(3 << 30, 77)\n"
        "print(*(resource.getrlimit(r)[0] for r in "
        "(resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_CORE)))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(3 << 30), "77", "0"]


def test_the_address_space_limit_holds(demo_path, home, monkeypatch):
    """With too little address space for the demo model, the child fails (here, where it would
    otherwise pass): the limit is real, and a failure under it is never a pass."""
    monkeypatch.setattr(probe, "limits", lambda h: (400 << 20, 60, 120.0))
    outcome = probe.run_probe(demo_path, read_header(demo_path))
    assert outcome.status != "passed", outcome
    print(f"demo under 400 MiB of address space: {outcome.status}: {outcome.detail}")


def test_the_child_runs_our_ondevice(tmp_path):
    """The same package as the parent, even from a checkout not installed (PYTHONPATH), and
    not a decoy `ondevice/` in the current directory (python -m would put it first)."""
    env = probe.child_env()
    (tmp_path / "ondevice").mkdir()
    (tmp_path / "ondevice" / "__init__.py").write_text("raise SystemExit('decoy imported')")
    code = "import ondevice; print(ondevice.__file__)"
    out = subprocess.run(
        [PYTHON, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == ondevice.__file__, out.stderr
    assert env["GGML_NO_BACKTRACE"] == "1"


# --- ids handed to llama.cpp are checked -------------------------------------------------------


def test_out_of_range_ids_are_usage_errors(demo_model):
    n = demo_model.n_vocab
    for bad in ([n + 5], [-3], [2**40], [1, n]):
        with pytest.raises(UsageError, match="not in this model's vocabulary"):
            demo_model.detokenize(bad)
        with pytest.raises(UsageError):
            demo_model.token_bytes(bad)
    with pytest.raises(UsageError):
        demo_model.score([1, n + 5])
    with pytest.raises(UsageError):
        demo_model.generate([1, n + 5], max_tokens=1)
    assert demo_model.detokenize([1, 2]) is not None  # still alive and usable


def test_absurd_thread_counts_are_usage_errors():
    """`--threads 99999999999` used to reach llama.cpp (std::bad_alloc, an abort)."""
    from click.testing import CliRunner

    from ondevice.cli import main as cli_main

    with pytest.raises(UsageError, match="1 to 4096"):
        ondevice.load("demo", threads=99999999999)
    r = CliRunner().invoke(cli_main, ["run", "demo", "hi", "--threads", "99999999999"])
    assert r.exit_code == 2 and "at most 4096" in r.output


# --- files ondevice writes are checked once, when written ----------------------------------------


def test_quantize_output_is_checked_when_written(tmp_path, home, probes):
    from ondevice.quantize import quantize

    src = build_tiny_llama(tmp_path / "f16.gguf", TinySpec(float_only=True))
    out = tmp_path / "q8.gguf"
    quantize(src, out, "Q8_0")
    assert len(probes) == 1 and probes[0].endswith(".partial")  # before it got its name
    assert [e["path"] for e in entries(home)] == [str(out)]
    with ondevice.load(out, n_ctx=64, threads=1):
        pass
    assert len(probes) == 1  # the first load was free


def test_convert_output_is_checked_when_written(tmp_path, home, probes):
    folder = make_tiny_phi2(tmp_path / "phi2")
    from ondevice.convert import convert

    out = convert(folder, tmp_path / "phi2.gguf", outtype="f16")
    assert len(probes) == 1 and [e["path"] for e in entries(home)] == [str(out)]
    with ondevice.load(out, n_ctx=64, threads=1):
        pass
    assert len(probes) == 1


def _pull_env(tmp_path: Path, hub: FakeHub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), NO_COLOR="1")
    env.update(ONDEVICE_HOME=str(tmp_path / "pull-home"), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def test_pull_checks_the_file_once_and_refuses_a_hostile_one(tmp_path):
    good = build_tiny_llama(tmp_path / "good.gguf").read_bytes()
    bad = next(c for c in hostile_cases() if c.name == "EMBEDDING_I32")
    bad_bytes = bad.build(tmp_path / "bad.gguf").read_bytes()
    with FakeHub() as hub:
        hub.add_repo("o/good-GGUF", {"tiny.Q8_0.gguf": good})
        hub.add_repo("o/bad-GGUF", {"tiny.Q8_0.gguf": bad_bytes})
        env = _pull_env(tmp_path, hub)

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [PYTHON, "-m", "ondevice", *args], env=env, capture_output=True, text=True,
                timeout=240,
            )  # fmt: skip

        pulled = cli("pull", "o/good-GGUF", "--quant", "Q8_0")
        assert pulled.returncode == 0, pulled.stderr
        checked = list((Path(env["ONDEVICE_HOME"]) / "config" / probe.CHECKED_DIR).glob("*"))
        assert len(checked) == 1
        refused = cli("pull", "o/bad-GGUF", "--quant", "Q8_0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "embedding" in refused.stderr
    stored = list((Path(env["ONDEVICE_HOME"]) / "models").rglob("*.gguf"))
    assert len(stored) == 1  # the good one only
    shutil.rmtree(tmp_path / "hf", ignore_errors=True)


def test_no_child_is_left_behind_by_this_module():
    mine = psutil.Process()
    workers = [p for p in mine.children(recursive=True) if "probe_worker" in " ".join(p.cmdline())]
    assert workers == []


def test_probe_config_is_the_loads_on_the_cpu(tiny):
    header = read_header(tiny)
    asked = EngineConfig(n_ctx=8192, threads=16, n_gpu_layers=99, devices=[1], type_k="q8_0",
                         type_v="q8_0", flash_attn="auto", use_mmap=False)  # fmt: skip
    cfg = probe.probe_config(header, asked)
    assert cfg["n_ctx"] == probe.PROBE_N_CTX and cfg["threads"] == probe.PROBE_MAX_THREADS
    assert cfg["n_gpu_layers"] == 0 and cfg["devices"] == []
    assert cfg["type_k"] == "q8_0" and cfg["flash_attn"] == "on" and cfg["use_mmap"] is False
