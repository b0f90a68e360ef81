"""llama.cpp's log, routed to Python logging, and every parser of its log lines.

llama.cpp reports some facts only in its log (how many layers went to the GPU, the size of each
buffer, whether "auto" flash attention came out on, why a load failed). The lines are kept in a
small ring buffer and parsed here, in one place, so a change of wording in a llama.cpp release
touches this file only.

The log callback runs inside llama.cpp's C code. An exception raised in it (Ctrl-C arrives as
KeyboardInterrupt in whatever Python code runs next, and during a load that is this callback,
at its very first line) would be printed and swallowed by ctypes ("Exception ignored on calling
ctypes callback") and the load would go on. So during a load `interrupts_deferred()` replaces the
SIGINT handler with one that only records the interrupt; the load's progress callback then
stops llama.cpp, and the engine raises KeyboardInterrupt once the native call has returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import signal
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

native = logging.getLogger("ondevice.llama_cpp")

_recent: deque[str] = deque(maxlen=400)
_partial = [""]
_interrupted = threading.Event()
_callback: Any = None  # the ctypes callback object; must outlive every call into llama.cpp


def install(L: Any) -> None:
    """Make llama.cpp log through `_on_log` (once per process, before llama_backend_init)."""
    global _callback

    @L.llama_log_callback
    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        try:
            _partial[0] += text.decode("utf-8", errors="replace")
            while "\n" in _partial[0]:
                line, _partial[0] = _partial[0].split("\n", 1)
                if line.strip():
                    _recent.append(line)
                    native.debug("%s", line)
        except BaseException:  # noqa: BLE001 - Ctrl-C (or anything) must not vanish in ctypes
            _interrupted.set()

    _callback = _on_log
    L.llama_log_set(_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C is recorded (`interrupt_pending()`) instead of raised; it is
    raised as KeyboardInterrupt when the block ends. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)
    if old is not signal.default_int_handler:  # someone else's handler: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, lambda _signum, _frame: _interrupted.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if take_interrupt():
        raise KeyboardInterrupt


def note_interrupt() -> None:
    """Record a Ctrl-C that arrived inside another native callback (the load's progress)."""
    _interrupted.set()


def take_interrupt() -> bool:
    """Whether a Ctrl-C arrived inside a callback since the last call (and forget it)."""
    if _interrupted.is_set():
        _interrupted.clear()
        return True
    return False


def interrupt_pending() -> bool:
    return _interrupted.is_set()


def recent(n: int = 20) -> list[str]:
    """The last `n` lines llama.cpp logged in this process."""
    return list(_recent)[-n:]


def clear() -> None:
    _recent.clear()


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines while the block runs, without printing them."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Keep(logging.DEBUG)
    old_level, old_propagate = native.level, native.propagate
    native.addHandler(handler)
    native.setLevel(logging.DEBUG)
    native.propagate = False
    try:
        yield lines
    finally:
        native.removeHandler(handler)
        native.setLevel(old_level)
        native.propagate = old_propagate


# --- parsers of llama.cpp's log lines -----------------------------------------------------------
def last_error(lines: list[str] | None = None) -> str:
    """The most telling recent line for an error message."""
    lines = recent(200) if lines is None else lines
    # "llama_model_load: error loading model: check_tensor_dims: tensor 'x' not found" says
    # what is wrong; the "failed to load model" line after it does not.
    for line in reversed(lines):
        if "error loading model: " in line:
            return line.split("error loading model: ", 1)[1].strip()
    for line in reversed(lines):
        low = line.lower()
        if "error" in low or "failed" in low or "unknown" in low or "assert" in low:
            return line.strip()
    return "no detail from llama.cpp (run with -vv for its log)"


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def offloaded_layers(lines: list[str]) -> tuple[int, int] | None:
    """(offloaded, total) from the load's line "offloaded 31/31 layers to GPU"."""
    for line in reversed(lines):
        m = _OFFLOADED.search(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


_BUF = re.compile(r"(\w+)\s+(KV|compute|output|model)\s+buffer size\s*=\s*([0-9.]+) MiB")


def buffer_sizes(lines: list[str]) -> dict[str, int]:
    """llama.cpp's "<dev> <what> buffer size = X MiB" lines summed by kind, in bytes:
    {"model": ..., "KV": ..., "compute": ..., "output": ...}."""
    out: dict[str, int] = {}
    for line in lines:
        m = _BUF.search(line)
        if m:
            out[m.group(2)] = out.get(m.group(2), 0) + int(float(m.group(3)) * 1024 * 1024)
    return out


def flash_attn_resolved(lines: list[str], asked: str) -> str:
    """What llama.cpp made of flash_attn "auto" ("on"/"off"), from its context log
    ("Flash Attention enabled", "flash_attn = disabled"); `asked` when it wasn't "auto"."""
    if asked != "auto":
        return asked
    for line in lines:
        low = line.lower()
        if "flash" in low and ("enabled" in low or "disabled" in low or "not supported" in low):
            return "on" if "enabled" in low else "off"
        if "flash_attn" in low and "= disabled" in low:
            return "off"
    return "auto"
