"""The first load of a model file this machine has not run before happens in a child process.

A Python validator (ondevice.gguf_header, ondevice.model_check) will never know every way
llama.cpp can abort, so before the host process loads a file it has not seen pass, a child
(`ondevice._native.probe_worker`, the same interpreter and the same ondevice) loads it, decodes
a prompt and a few sampled tokens, detokenizes every token and tokenizes the special ones,
under resource limits (address space, CPU time, no core file). If the child dies (SIGABRT from
a GGML_ASSERT, SIGSEGV from a missing kernel, std::terminate, a limit), the file is refused
with `InvalidModelFile` naming llama.cpp's last log line, and the host never loads it. If
llama.cpp refuses the file cleanly, the host is left to get that same clean error itself.

A file that passed is remembered in the config dir (`checked-models/<sha256>.json`), by its
size, modification time and the sha256 of its header (metadata + tensor infos), for this
llama-cpp-python version; a later load costs one read of the header, no child. The header is
what the checks and llama.cpp's decisions depend on; the tensor data can give garbage text but
is not what llama.cpp aborts on (SECURITY.md).

Who calls it: `ondevice.load()` (unless `trust=True`), and `pull`, `convert` and `quantize` on
the files they write (their metadata comes from untrusted input: a hub repo, a config.json, the
quantizer's source file), so the first `run` of them is free.

The child runs on the CPU with the settings the load will use (mmap, repacking, flash
attention, KV types), a small context, and at most 4 threads; a GPU backend's own aborts are
not covered. It dies with its parent (PR_SET_PDEATHSIG on Linux, a pipe it watches elsewhere).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ondevice
from ondevice import model_check, paths, policy, processes, system
from ondevice._native import binding
from ondevice.errors import InvalidModelFile, OndeviceError
from ondevice.gguf_header import GGUFHeader, read_header

if TYPE_CHECKING:
    from ondevice._native.engine import EngineConfig

log = logging.getLogger(__name__)

CHECKED_DIR = "checked-models"
PROBE_VERSION = 1  # bump when the child exercises more: every file is checked again
PROBE_N_CTX = 256
PROBE_MAX_THREADS = 4
# The demo model's header (sha256 of its first data_offset bytes) -> file size. The wheel's
# RECORD pins the file's bytes at install; tests/test_probe.py shows it passes the probe.
KNOWN_GOOD = {"cd2d87a25589b59f222688858608478fd7ed55b0cefdc3e96076591029713ce4": 98362432}
EXIT_OK, EXIT_REFUSED, EXIT_OURS, EXIT_ORPHANED = 0, 1, 2, 3
_GIB = 1 << 30


@dataclass(frozen=True)
class Identity:
    """What a remembered pass is valid for: this file's size, mtime and header, this engine."""

    size: int
    mtime_ns: int
    header_sha256: str
    engine: str

    @property
    def key(self) -> str:
        text = json.dumps([PROBE_VERSION, *dataclasses.astuple(self)])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Outcome:
    """What the child did: "passed", "refused" (llama.cpp's clean error) or "crashed"."""

    status: str
    seconds: float
    detail: str = ""
    returncode: int | None = None
    log_tail: list[str] = dataclasses.field(default_factory=list)


def identity(path: str | os.PathLike[str], header: GGUFHeader) -> Identity:
    """The file's identity, reading only its header (to hash it)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.sha256()
        left = header.data_offset
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return Identity(st.st_size, st.st_mtime_ns, digest.hexdigest(), binding.version())


def _entry_path(ident: Identity) -> Path:
    return paths.config_dir() / CHECKED_DIR / f"{ident.key}.json"


def known_good(ident: Identity) -> bool:
    """Whether the file passed before on this machine (or is the demo model we ship)."""
    if KNOWN_GOOD.get(ident.header_sha256) == ident.size:
        return True
    try:
        with open(_entry_path(ident), "rb") as f:
            raw = f.read(1 << 16)  # an entry is ~300 bytes; anything else is not one of ours
        entry = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(entry, dict) and entry.get("identity") == dataclasses.asdict(ident)


def remember(ident: Identity, path: str | os.PathLike[str], seconds: float) -> None:
    """Record a pass (atomically; a failure to write only costs a probe next time)."""
    entry = {
        "identity": dataclasses.asdict(ident),
        "path": str(path),
        "seconds": round(seconds, 3),
        "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ondevice": ondevice.__version__,
    }
    target = _entry_path(ident)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text(target, json.dumps(entry, indent=1) + "\n")
    except (OSError, OndeviceError) as exc:
        log.warning("could not remember that %s passed its check: %s", path, exc)


def ensure_safe(
    path: str | os.PathLike[str],
    header: GGUFHeader,
    config: EngineConfig | None = None,
    *,
    shown: str | os.PathLike[str] | None = None,
    error: type[OndeviceError] | None = None,
) -> bool:
    """Refuse a file llama.cpp crashes on, proving it in a child process unless it passed
    before. Returns True when a child ran now. `shown`: the name to put in messages (a file
    written under a temporary name); `error`: the error type to raise instead of
    InvalidModelFile (a converter raises ConversionError)."""
    ident = identity(path, header)
    if known_good(ident):
        return False
    outcome = run_probe(path, header, config)
    if outcome.status == "passed":
        remember(ident, shown or path, outcome.seconds)
        log.info("first-load check of %s passed in %.2fs", shown or path, outcome.seconds)
    elif outcome.status == "refused":
        log.info("llama.cpp refuses %s cleanly: %s", shown or path, outcome.detail)
    else:
        _raise(shown or path, outcome, error)
    return True


def check_written(
    path: str | os.PathLike[str],
    *,
    shown: str | os.PathLike[str] | None = None,
    error: type[OndeviceError] | None = None,
) -> None:
    """A file ondevice has just written (pull, convert, quantize): validated and probed with
    the default settings, so that it is refused now and its first load is free."""
    try:
        header = read_header(path)
    except InvalidModelFile as exc:
        if error is None or issubclass(error, InvalidModelFile):
            raise
        raise error(f"{shown or path}: {exc.message}", hint=exc.hint) from None
    ensure_safe(path, header, None, shown=shown, error=error)


def _raise(path: Any, outcome: Outcome, error: type[OndeviceError] | None) -> None:
    message = f"llama.cpp {outcome.detail} when this file was loaded in a test process"
    hint = "the file was not loaded into this process; SECURITY.md says how to report it"
    if error is None or issubclass(error, InvalidModelFile):
        raise InvalidModelFile(str(path), message, hint=hint)
    raise error(f"{path}: {message}", hint=hint)


# --- the child process ---------------------------------------------------------------------
def probe_config(header: GGUFHeader, config: EngineConfig | None) -> dict[str, Any]:
    """The load's settings on the CPU with a small context (the defaults when none given)."""
    if config is None:
        from ondevice._native.engine import EngineConfig  # numpy and ctypes: only when needed

        threads = system.auto_threads()
        config = EngineConfig(
            threads=threads,
            threads_batch=threads,
            use_mmap=model_check.mmap_aligned(header),
            use_extra_bufts=policy.repack_here(system.cpu_features())[0],
            flash_attn="off",
        )
    cfg = dataclasses.asdict(config)
    threads = max(1, min(int(cfg["threads"]), PROBE_MAX_THREADS))
    n_ubatch = max(1, min(int(cfg["n_ubatch"]), PROBE_N_CTX))
    cfg.update(
        n_ctx=PROBE_N_CTX, n_batch=n_ubatch, n_ubatch=n_ubatch, threads=threads,
        threads_batch=threads, n_gpu_layers=0, devices=[], n_seq_max=1,
    )  # fmt: skip
    if cfg["flash_attn"] == "auto":
        cfg["flash_attn"] = "on" if policy.flash_attn_on_cpu(cfg["type_k"]) else "off"
    return cfg


def special_ids(header: GGUFHeader) -> list[int]:
    """Tokens that are not plain text (control, user-defined, unknown, unused, byte) and the
    ids the special-token keys name."""
    md = header.metadata
    ids = {i for i, t in enumerate(md.get("tokenizer.ggml.token_type") or []) if t != 1}
    for key, value in md.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    return sorted(ids)


def limits(header: GGUFHeader) -> tuple[int, int, float]:
    """(address space bytes, CPU seconds, wall seconds) for the child: room for the mapped file,
    a repacked copy and the runtime, and time to read the file on a slow disk."""
    gib = header.file_size / _GIB
    address_space = int(4 * _GIB + 3 * header.file_size)
    return address_space, int(120 + 60 * gib), 300.0 + 120.0 * gib


def child_env() -> dict[str, str]:
    """`processes.child_env()` (the child dies with us and runs our ondevice) and llama.cpp's
    settings for a quiet, lean load."""
    env = processes.child_env()
    policy.set_omp_wait(env)  # as load() does: idle threads soon sleep
    env["GGML_NO_BACKTRACE"] = "1"  # ggml would attach gdb to print a backtrace on abort
    env.setdefault("MALLOC_ARENA_MAX", "2")  # glibc: per-thread arenas inflate address space
    return env


def run_probe(
    path: str | os.PathLike[str], header: GGUFHeader, config: EngineConfig | None = None
) -> Outcome:
    """Load the file in a child process and say how that went (nothing remembered)."""
    address_space, cpu_seconds, wall_seconds = limits(header)
    job = {
        "path": os.fspath(path),
        "config": probe_config(header, config),
        "special_ids": special_ids(header),
        "parent": os.getpid(),
        "address_space": address_space,
        "cpu_seconds": cpu_seconds,
    }
    t0 = time.perf_counter()
    proc = _start_child()
    tail: deque[str] = deque(maxlen=200)
    out: list[bytes] = []
    readers = [
        threading.Thread(target=_read_lines, args=(proc.stderr, tail), daemon=True),
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        proc.stdin.flush()
        rc = proc.wait(timeout=wall_seconds)
    except subprocess.TimeoutExpired:
        processes.kill(proc, "probe child")
        rc = None
    except BaseException:  # Ctrl-C, or the parent's own error: the child goes too
        processes.kill(proc, "probe child")
        raise
    finally:
        _close(proc.stdin)
    for r in readers:
        r.join(timeout=5)
    seconds = time.perf_counter() - t0
    result = _parse_result(b"".join(out))
    return _outcome(rc, result, list(tail), seconds, wall_seconds, address_space)


def _start_child() -> subprocess.Popen:
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        # Its own session: a terminal's Ctrl-C reaches only us, and we decide to kill it.
        kwargs["start_new_session"] = True
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    return subprocess.Popen(
        [sys.executable, "-m", "ondevice._native.probe_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        **kwargs,
    )


def _read_lines(stream: Any, tail: deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line.strip():
            tail.append(line)
    stream.close()


def _parse_result(raw: bytes) -> dict[str, Any]:
    try:
        result = json.loads(raw.decode("utf-8", errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return result if isinstance(result, dict) else {}


def _outcome(
    rc: int | None,
    result: dict[str, Any],
    tail: list[str],
    seconds: float,
    wall_seconds: float,
    address_space: int,
) -> Outcome:
    if rc == EXIT_OK and result.get("ok"):
        log.debug("probe child: %s", result)
        return Outcome("passed", seconds, json.dumps(result.get("times", {})), rc, tail)
    if rc == EXIT_REFUSED:
        return Outcome("refused", seconds, str(result.get("error", "")), rc, tail)
    if rc is None:
        what = f"did not finish within {wall_seconds:.0f} s"
    elif rc < 0:
        what = f"crashed ({_signal_name(-rc)})"
    elif rc == EXIT_OURS:
        what = f"misbehaved ({result.get('error', 'no detail')})"
    else:
        what = f"ended with exit status {rc}"
    reason = last_reason(tail)
    if reason and "alloc" in reason.lower():
        reason += f" (the test process may use {address_space / _GIB:.1f} GiB of address space)"
    detail = f"{what}: {reason}" if reason else what
    return Outcome("crashed", seconds, detail, rc, tail)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_reason(lines: list[str]) -> str:
    """llama.cpp's most telling last line: an assertion, an exception's what(), an error."""
    markers = ("GGML_ASSERT", "GGML_ABORT", "what():", "terminate called", "error", "failed")
    for line in reversed(lines):
        if any(m in line for m in markers):
            return _short(line)
    return _short(lines[-1]) if lines else ""


def _short(line: str) -> str:
    """A source path shortened to its file name: ".../ggml/src/ggml.c:5515: GGML_ASSERT(...)"
    -> "ggml.c:5515: GGML_ASSERT(...)"."""
    line = line.strip()
    head, sep, rest = line.partition(": ")
    if sep and "/" in head and ":" in head:
        line = f"{head.rsplit('/', 1)[-1]}: {rest}"
    return line[:300]


def _close(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass
