"""Processes that never outlive their parent, and signals that end a command cleanly.

ondevice runs llama.cpp's quantizer and its first-load checks in child processes, so that an
abort in C++ kills the child, not the caller. Such a child must die with its parent whatever
kills the parent (SIGKILL included), or it keeps writing a file nobody will use:

  - on Linux, `prctl(PR_SET_PDEATHSIG, SIGKILL)` has the kernel kill it;
  - everywhere, the parent keeps the child's stdin open and the child watches it: end of file
    means the parent is gone (the kernel closes a dead process's pipes).

`terminate_on_signals()` turns SIGTERM and SIGHUP into the `Terminated` exception in the main
thread, so `finally` blocks and temporary-file cleanup run exactly as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_ENV = "ONDEVICE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a BaseException, like KeyboardInterrupt: library code that
    catches Exception must not swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM and SIGHUP raise `Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]

    def raise_terminated(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    old = {}
    for sig in wanted:
        try:
            old[sig] = signal.signal(sig, raise_terminated)
        except (OSError, ValueError):  # not allowed here (embedded interpreter)
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, handler)


def child_env() -> dict[str, str]:
    """The environment for one of our Python children (`python -m ondevice...`): it dies with
    us (it reads our pid from it) and imports the same ondevice as we did — a checkout on
    sys.path included, and never an `ondevice/` folder in the current directory, which
    `python -m` would otherwise put first (PYTHONSAFEPATH, Python 3.11+)."""
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONSAFEPATH"] = "1"
    return env


def die_with_parent(watch: int | None = None) -> None:
    """Called first thing in a child process: die when the parent does.

    `watch` is the file descriptor of the pipe from the parent (the child's stdin after its
    job was read): a thread waits for its end and exits the process then. It reads the raw
    descriptor, not a Python file object, whose lock would stall interpreter shutdown."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError) as exc:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", exc)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(3)  # the parent died before we could ask to die with it
    if watch is not None:

        def wait_for_eof() -> None:
            try:
                while os.read(watch, 4096):
                    pass
            except OSError:
                pass
            os._exit(3)

        threading.Thread(target=wait_for_eof, name="ondevice-parent-watch", daemon=True).start()


def kill(proc: subprocess.Popen, what: str = "child") -> None:
    """SIGKILL `proc` if it still runs and reap it, so no zombie or orphan is left."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a child that ignores SIGKILL
        log.warning("%s %d did not exit", what, proc.pid)
