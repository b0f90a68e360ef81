"""Hostile conditions for the commands that write files: killed at random moments, disk full.

`ondevice convert`, `ondevice quantize` and `ondevice pull` (against the loopback hub, which
converts and quantizes too) are interrupted in real subprocesses at seeded random moments:
SIGKILL to the command's process (what the OOM killer or `kill -9` does) and SIGINT to its
process group (what Ctrl-C in a terminal does). Half of the moments are uniform over a normal
run's duration, half fall after the command has started writing its output. After each:
- no output file and no store entry unless complete (byte-identical to a normal run's output);
- after SIGINT nothing at all is left behind (no temp file, no work folder);
- the next run succeeds (and, for pull, clears what a killed pull left).
What SIGKILL leaves behind (temp files, child processes that outlive their parent) is counted
and printed with `-s`; a temp file that the next successful run still leaves is an expected
failure where it is a known gap (convert, quantize) and a failure elsewhere. The default run
interrupts each command once; the slow one 20 times with each signal.

Disk full: `ulimit -f` (RLIMIT_FSIZE, inherited by the quantizer's own worker) makes writes past
a size fail with EFBIG; with the slow marker a small tmpfs (root only) fills up mid-write
(ENOSPC). Either way: a clear error that says so, nothing left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from gguf_corpus import TinySpec, build_tiny_llama

from ondevice.gguf_header import read_header

PYTHON = sys.executable
# Phi-2's shape in miniature (as test_pull.py): a 13 MiB checkpoint, f16 GGUF ~7 MB.
TINY_PHI2 = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "partial_rotary_factor": 0.5,
}
REPO = "tiny-org/phi-2"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Job:
    """A command to interrupt, and how to tell what it left."""

    name: str
    args: list[str]
    env: dict[str, str]
    outputs: Callable[[], list[Path]]  # finished files it may have produced
    temps: Callable[[], list[Path]]  # temp files / folders it may have left
    reset: Callable[[], None]  # remove outputs so that the next run has work to do
    writing: Callable[[], bool]  # has it started writing its output?
    reference: str = ""  # sha256 of a normal run's output
    seconds: float = 0.0  # a normal run's duration
    write_seconds: float = 0.0  # how long its output is being written (a temp file exists)
    kills: int = 0
    stale: list[str] = field(default_factory=list)  # temp files a successful rerun left alone
    mid_write: int = 0  # signals that arrived while the output was being written
    leftovers: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    def run(self, shell_limits: str = "", **kwargs) -> subprocess.CompletedProcess:
        # Limits go through the shell (`ulimit`), not a preexec_fn: the fake hub's server
        # thread may be running in this process.
        prefix = ["/bin/sh", "-c", f'{shell_limits} && exec "$0" "$@"'] if shell_limits else []
        return subprocess.run(
            [*prefix, PYTHON, "-m", "ondevice", *self.args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            **kwargs,
        )

    def check_outputs_complete(self) -> None:
        for out in self.outputs():
            assert sha256(out) == self.reference, f"{out} is incomplete or different"


def calibrate(job: Job) -> Job:
    """A normal run: its output (the reference), its duration, and how long it writes."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "ondevice", *job.args],
        env=job.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.perf_counter()
    started = None
    while proc.poll() is None:
        if started is None and job.writing():
            started = time.perf_counter()
        time.sleep(0.002)
    job.seconds = time.perf_counter() - t0
    job.write_seconds = time.perf_counter() - started if started else job.seconds
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    proc.stderr.close()
    (out,) = job.outputs()
    read_header(out)
    job.reference = sha256(out)
    job.reset()
    assert job.outputs() == [] and job.temps() == []
    return job


def interrupt(job: Job, sig: signal.Signals, rng: random.Random, after_write_starts: bool) -> str:
    """Start the command, signal it at a random moment, wait for it; returns a description."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "ondevice", *job.args],
        env=job.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    t0 = time.perf_counter()
    if after_write_starts:
        while proc.poll() is None and not job.writing() and time.perf_counter() - t0 < 120:
            time.sleep(0.005)
        delay = rng.uniform(0, job.write_seconds)  # inside the write, as far as timing goes
    else:
        delay = rng.uniform(0.1, job.seconds)
    deadline = time.perf_counter() + delay
    while proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    at = time.perf_counter() - t0
    descendants = []
    job.kills += 1
    if proc.poll() is None:
        job.mid_write += job.writing()
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        try:
            if sig == signal.SIGKILL:
                os.kill(proc.pid, sig)
            else:
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=300)
    err = err.decode(errors="replace")
    if sig in CLEAN_SIGNALS:
        # interrupted (130; 128+N for SIGTERM/SIGHUP), died of the signal before the CLI was
        # set up, or finished anyway
        assert proc.returncode in (128 + sig, -sig, 0), (proc.returncode, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
    # Children (the quantizer's worker) that outlived a killed parent: note them, let them
    # finish (they write only to their own temp file), and stop them if they don't. The
    # kernel kills the worker as its parent dies (PR_SET_PDEATHSIG), which takes a moment to
    # be seen: a child still running half a second later is an orphan.
    for child in descendants:
        with contextlib.suppress(psutil.TimeoutExpired, psutil.NoSuchProcess):
            child.wait(timeout=0.5)
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            job.orphans.append(f"{job.name}: pid {child.pid} {' '.join(child.cmdline()[-2:])}")
            try:
                child.wait(timeout=60)
            except psutil.TimeoutExpired:
                child.kill()
    return f"{sig.name} at {at:.2f}s (rc {proc.returncode})"


def exercise(job: Job, seeds: range, signals: tuple[signal.Signals, ...]) -> None:
    for seed in seeds:
        for sig in signals:
            rng = random.Random(seed * 100 + sig)
            what = interrupt(job, sig, rng, after_write_starts=seed % 2 == 1)
            # 1. nothing incomplete is visible
            job.check_outputs_complete()
            left = job.temps()
            if sig in CLEAN_SIGNALS:
                assert left == [], f"{job.name} {what}: left {left}"
            else:
                job.leftovers += [f"{job.name} {what}: {p.name}" for p in left]
            if job.outputs():  # it finished before the signal: complete, checked above
                job.reset()
            # 2. the next run succeeds and produces the complete output
            proc = job.run()
            assert proc.returncode == 0, f"{job.name} after {what}: {proc.stderr[-2000:]}"
            assert len(job.outputs()) == 1
            job.check_outputs_complete()
            # 3. what a killed run left behind, still there after a successful run
            job.stale += [f"{job.name} {what}: {p.name}" for p in job.temps()]
            job.reset()


def report(job: Job) -> None:
    print(
        f"\n{job.name}: normal run {job.seconds:.1f}s (writing {job.write_seconds:.2f}s); "
        f"{job.kills} signals, {job.mid_write} while writing; after SIGKILL "
        f"{len(job.leftovers)} leftover temp file(s), {len(job.orphans)} orphaned child(ren)"
    )
    print(f"    still there after the next successful run: {len(job.stale)}")
    for line in (job.leftovers + job.orphans)[:6]:
        print("   ", line)


def _clean_partials(folder: Path) -> None:
    for p in folder.glob(".*.partial"):
        p.unlink()


# --- the jobs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi2_folder(tmp_path_factory) -> Path:
    from phi2_fixtures import make_tiny_phi2

    return make_tiny_phi2(tmp_path_factory.mktemp("faults-phi2") / "phi-2", **TINY_PHI2)


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(NO_COLOR="1", ONDEVICE_HOME=str(tmp_path_factory.mktemp("faults-home")))
    return env


@pytest.fixture(scope="module")
def convert_job(phi2_folder, base_env, tmp_path_factory) -> Job:
    out_dir = tmp_path_factory.mktemp("convert-out")
    out = out_dir / "phi2.gguf"

    def reset() -> None:
        out.unlink(missing_ok=True)
        _clean_partials(out_dir)

    return calibrate(
        Job(
            "convert",
            ["convert", str(phi2_folder), "-o", str(out), "--outtype", "f16"],
            base_env,
            outputs=lambda: [out] if out.exists() else [],
            temps=lambda: sorted(out_dir.glob(".*.partial")),
            reset=reset,
            writing=lambda: any(out_dir.glob(".*.partial")),
        )
    )


@pytest.fixture(scope="module")
def quantize_src(tmp_path_factory) -> Path:
    spec = TinySpec(n_embd=256, n_head=4, n_head_kv=2, n_ff=1024, n_layer=4, float_only=True)
    return build_tiny_llama(tmp_path_factory.mktemp("quantize-src") / "f16.gguf", spec)


@pytest.fixture(scope="module")
def quantize_job(quantize_src, base_env, tmp_path_factory) -> Job:
    out_dir = tmp_path_factory.mktemp("quantize-out")
    out = out_dir / "q4km.gguf"

    def reset() -> None:
        out.unlink(missing_ok=True)
        _clean_partials(out_dir)

    return calibrate(
        Job(
            "quantize",
            ["quantize", str(quantize_src), str(out), "--type", "Q4_K_M", "-t", "1"],
            base_env,
            outputs=lambda: [out] if out.exists() else [],
            temps=lambda: sorted(out_dir.glob(".*.partial")),
            reset=reset,
            writing=lambda: any(out_dir.glob(".*.partial")),
        )
    )


@pytest.fixture(scope="module")
def hub():
    from fake_hub import FakeHub

    with FakeHub() as h:
        yield h


@pytest.fixture(scope="module")
def pull_job(phi2_folder, hub, base_env, tmp_path_factory) -> Job:
    hub.add_folder(REPO, phi2_folder)
    home = tmp_path_factory.mktemp("pull-home")
    hf_home = tmp_path_factory.mktemp("pull-hf")
    env = {**base_env, "ONDEVICE_HOME": str(home), "HF_ENDPOINT": hub.url}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    models = home / "models"
    runs = [0]

    def outputs() -> list[Path]:
        # a store entry is a manifest naming a GGUF; a GGUF without one is not an entry, but
        # must still be complete if it is there
        return sorted(models.rglob("*.gguf")) if models.is_dir() else []

    def temps() -> list[Path]:
        tmp = home / "tmp"
        found = sorted(tmp.iterdir()) if tmp.is_dir() else []
        return found + (sorted(models.rglob(".*.tmp")) if models.is_dir() else [])

    def reset() -> None:
        shutil.rmtree(models, ignore_errors=True)
        runs[0] += 1
        if runs[0] % 3 == 0:  # now and then start from an empty download cache too
            shutil.rmtree(hf_home, ignore_errors=True)
            hf_home.mkdir()

    def writing() -> bool:
        tmp = home / "tmp"
        return tmp.is_dir() and any(tmp.rglob("*.partial"))

    job = Job("pull", ["pull", REPO, "--quant", "Q4_K_M"], env, outputs, temps, reset, writing)
    calibrate(job)
    shutil.rmtree(hf_home, ignore_errors=True)
    hf_home.mkdir()
    return job


def _check_store_entries(job: Job) -> None:
    """Every store entry's manifest describes its complete file."""
    import json

    home = Path(job.env["ONDEVICE_HOME"])
    for manifest in (home / "models").rglob("*.json") if (home / "models").is_dir() else []:
        data = json.loads(manifest.read_text())
        gguf = manifest.with_name(data["file"])
        assert gguf.exists() and sha256(gguf) == data["sha256"] == job.reference


# --- kills ---------------------------------------------------------------------------------------

SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals a command handles: it cleans up and exits 130 / 128+N, leaving nothing behind.
CLEAN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.mark.parametrize(
    "name, sig",
    [
        ("convert", signal.SIGKILL),
        ("quantize", signal.SIGINT),
        ("quantize", signal.SIGTERM),
        ("quantize", signal.SIGHUP),
        ("quantize", signal.SIGKILL),
    ],
)
def test_killed_then_rerun(name, sig, request):
    """The default run: one signal each, after the output was started. The quantizer's
    worker dies with its parent (no orphan), and what a SIGKILLed run left is removed by the
    next run that writes to the folder."""
    job = request.getfixturevalue(f"{name}_job")
    exercise(job, range(1, 2), (sig,))
    report(job)
    assert job.orphans == []
    assert job.stale == []


def test_killed_pull_then_rerun(pull_job):
    exercise(pull_job, range(1, 2), (signal.SIGINT,))
    _check_store_entries(pull_job)
    report(pull_job)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convert", "quantize", "pull"])
def test_killed_at_20_random_moments(name, request):
    job = request.getfixturevalue(f"{name}_job")
    exercise(job, range(20), SIGNALS)
    if name == "pull":
        _check_store_entries(job)
    report(job)
    # Everything above is required, and: a temp file that a SIGKILLed run left is removed by
    # the next successful run, and no child outlives its parent.
    assert job.stale == []
    assert job.orphans == []


# --- disk full ------------------------------------------------------------------------------------


QUANTIZE_DISK_FULL = pytest.mark.xfail(
    strict=True,
    reason="ondevice.quantize passes on llama.cpp's 'basic_ios::clear: iostream error', which "
    "does not say the disk is full (issue 5A)",
)


def assert_disk_full_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    words = ("File too large", "No space", "disk is full", "disk space")
    assert any(w in proc.stderr for w in words), proc.stderr


@pytest.mark.parametrize(
    "name",
    ["convert", pytest.param("quantize", marks=[QUANTIZE_DISK_FULL, pytest.mark.slow])],
)
def test_file_size_limit_is_a_clear_error_and_leaves_nothing(name, request):
    job = request.getfixturevalue(f"{name}_job")
    proc = job.run(shell_limits="ulimit -f 2048")  # 1 MiB (512-byte blocks); outputs: 4-7 MB
    try:
        assert job.outputs() == [] and job.temps() == []
        assert_disk_full_error(proc)
    finally:
        job.reset()
    # and with the limit gone, it works
    assert job.run().returncode == 0
    job.check_outputs_complete()
    job.reset()


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 48 MiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convert", pytest.param("quantize", marks=QUANTIZE_DISK_FULL)])
def test_disk_filling_up_during_the_write(name, request, small_disk):
    """The disk fills up (another program's file) after the output was started: ENOSPC."""
    job = request.getfixturevalue(f"{name}_job")
    out = small_disk / "out.gguf"
    args = [a if not a.endswith(".gguf") or a == job.args[1] else str(out) for a in job.args]
    proc = subprocess.Popen(
        [PYTHON, "-m", "ondevice", *args],
        env=job.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.perf_counter()
    while proc.poll() is None and not any(small_disk.glob(".*.partial")):
        assert time.perf_counter() - t0 < 120
        time.sleep(0.002)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # take every byte that is left, at once
        end = 0
        while (free := shutil.disk_usage(small_disk).free) > 4096:
            try:
                os.posix_fallocate(f.fileno(), end, free)
                end += free
            except OSError:
                os.posix_fallocate(f.fileno(), end, free // 2) if free > 8192 else None
                end += free // 2
    _, err = proc.communicate(timeout=300)
    filler.unlink()
    left = [p.name for p in small_disk.iterdir()]
    assert left == [], left
    assert_disk_full_error(subprocess.CompletedProcess(args, proc.returncode, "", err))
