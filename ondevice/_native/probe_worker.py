"""The child process of the first-load check (ondevice.probe): `python -m ondevice._native.probe_worker`.

It does with a model file what the host would do first, so that if llama.cpp aborts on the file
(GGML_ASSERT, a NULL kernel, an uncaught C++ exception) this process dies, not the app: load the
model, tokenize with the special tokens added, decode a prompt in one batch and a few sampled
tokens one by one, detokenize every token of the vocabulary (special ones both ways), tokenize
the special tokens' own text. It reads one JSON job line from stdin, writes llama.cpp's log to
stderr line by line (the parent names the last lines when this process dies) and one JSON
result line to stdout. Exit status: 0 passed, 1 llama.cpp refused the file cleanly (the host
would get the same error), 2 anything else that went wrong (token ids outside the vocabulary, a
Python error), 3 the parent went away.

It dies with its parent: on Linux through PR_SET_PDEATHSIG; everywhere because it watches stdin,
which the parent holds open until it has the result. Resource limits (address space, CPU time,
no core file) are set with `resource` where it exists, imported here only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from ondevice import processes
from ondevice._native.engine import Engine, EngineConfig, Sampler
from ondevice.errors import OndeviceError, UsageError
from ondevice.settings import SamplingParams

SAMPLE_TEXT = "Hi, world!\n\tÀ 中 🙂"
DECODE_STEPS = 2
PROMPT_TOKENS = 4  # decoded as one batch (the batch path); more only costs time
EXIT_OK, EXIT_REFUSED, EXIT_OURS, EXIT_ORPHANED = 0, 1, 2, 3


def set_limits(address_space: int, cpu_seconds: int) -> None:
    """Bound what a hostile file can make llama.cpp take (Windows has no `resource`)."""
    try:
        import resource
    except ImportError:
        return
    wanted = [
        (getattr(resource, "RLIMIT_AS", None), address_space),
        (getattr(resource, "RLIMIT_CPU", None), cpu_seconds),
        (getattr(resource, "RLIMIT_CORE", None), 0),  # an abort must not write a core file
    ]
    for which, limit in wanted:
        if which is None or limit is None:
            continue
        try:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(which, (limit, hard))
        except (ValueError, OSError):  # macOS refuses some RLIMIT_AS values
            pass


def route_log_to_stderr() -> None:
    """llama.cpp's log (through ondevice's log callback) to stderr as it comes, so the parent
    has the last line before a crash."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    native = logging.getLogger("ondevice.llama_cpp")
    native.addHandler(handler)
    native.setLevel(logging.DEBUG)
    native.propagate = False


def exercise(job: dict) -> dict:
    """What a first load does with the file, and more of the vocabulary than it would."""
    t0 = time.perf_counter()
    eng = Engine(job["path"], EngineConfig(**job["config"]))
    times = {"load": time.perf_counter() - t0}
    try:
        n_vocab = eng.n_vocab
        tokens = eng.tokenize(SAMPLE_TEXT, add_special=True, parse_special=True)
        eng.check_tokens(tokens)
        eng.decode(tokens[:PROMPT_TOKENS] or [0])
        sampler = Sampler(SamplingParams(temperature=0.0), n_vocab)
        try:
            for _ in range(DECODE_STEPS):
                token = eng.sample(sampler)
                eng.check_tokens([token])
                eng.is_eog(token)
                eng.decode_one(token)
        finally:
            sampler.close()
        times["decode"] = time.perf_counter() - t0 - times["load"]
        special = [t for t in job.get("special_ids", []) if 0 <= t < n_vocab]
        detokenize_all(eng, range(n_vocab), special=True)
        texts = [eng.piece(t, special=True) for t in special]
        for t in special:
            eng.piece(t, special=False)
        eng.tokenize(b"".join(texts), add_special=False, parse_special=True)
    finally:
        eng.close()
    seconds = time.perf_counter() - t0
    times["vocab"] = seconds - times["load"] - times["decode"]
    times = {k: round(v, 3) for k, v in times.items()}
    return {"ok": True, "n_vocab": n_vocab, "seconds": round(seconds, 3), "times": times}


def detokenize_all(eng: Engine, ids: Sequence[int], *, special: bool) -> int:
    """Every token's text in one llama_detokenize call (token_to_piece for each inside
    llama.cpp; one ctypes call per token would cost 0.2 s for a 50k vocabulary)."""
    L = eng._L
    tokens = (L.llama_token * len(ids))(*ids)
    size = max(16 * len(ids), 4096)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_detokenize(eng.vocab, tokens, len(ids), buf, size, False, special)
        if n >= 0:
            return n
        size = -n  # the text needs more room: once more with exactly that
    raise UsageError(f"llama_detokenize wanted a buffer of {size} bytes twice")


def main() -> int:
    job = json.loads(sys.stdin.buffer.readline() or b"{}")
    # Dies with the parent (PR_SET_PDEATHSIG; the end of stdin, which the parent keeps open).
    processes.die_with_parent(watch=sys.stdin.fileno())
    set_limits(int(job.get("address_space", 0)) or None, int(job.get("cpu_seconds", 0)) or None)
    route_log_to_stderr()
    try:
        result = exercise(job)
    except UsageError as exc:  # llama.cpp made token ids outside its own vocabulary
        result, status = {"ok": False, "error": exc.message}, EXIT_OURS
    except OndeviceError as exc:  # llama.cpp said no: a clean error, the host gets the same
        result = {"ok": False, "error": exc.one_line(), "kind": type(exc).__name__}
        status = EXIT_REFUSED
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        result, status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, EXIT_OURS
    else:
        status = EXIT_OK
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: llama.cpp's threads need no goodbye
