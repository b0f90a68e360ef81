"""Running untrusted pure-Python work (a JSON-schema conversion, a template render) within a time
and memory bound.

The work runs on a helper thread while the caller watches the clock and the process's RSS; on a
breach an exception is raised inside the helper (CPython's PyThreadState_SetAsyncExc, delivered
between two bytecodes) and `Exceeded` here. A single C-level operation can't be interrupted that
way, so callers also bound the sizes that feed such operations before calling.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ondevice import stats

log = logging.getLogger(__name__)
T = TypeVar("T")


class Exceeded(Exception):
    """The work took too long or grew the process by too much; `reason` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _Aborted(BaseException):
    """Raised inside the helper thread to stop it (a BaseException: the work can't catch it)."""


def run_bounded(
    fn: Callable[[], T],
    *,
    timeout_s: float,
    max_rss_growth: int,
    name: str = "ondevice-bounded",
    poll_s: float = 0.01,
    shown_s: float | None = None,
) -> T:
    """`fn()` on a helper thread; its result, or its exception re-raised here, or `Exceeded`
    (whose reason names `shown_s` as the limit when given, e.g. a budget shared by steps)."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    rss0 = stats.rss_bytes()
    deadline = time.monotonic() + timeout_s
    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    worker.join(poll_s)
    while worker.is_alive():
        reason = None
        if time.monotonic() > deadline:
            reason = f"took longer than {shown_s or timeout_s:g} s"
        elif stats.rss_bytes() - rss0 > max_rss_growth:
            reason = f"used more than {max_rss_growth // (1024 * 1024)} MiB of memory"
        if reason:
            interrupt(worker)
            worker.join(0.5)
            raise Exceeded(reason)
        worker.join(poll_s)
    if "error" in result:
        err = result["error"]
        if isinstance(err, _Aborted):
            raise Exceeded("stopped")
        raise err
    return result["value"]


def interrupt(thread: threading.Thread) -> None:
    """Raise `_Aborted` inside `thread` at its next bytecode."""
    if thread.ident is None:
        return
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(_Aborted)
    )
    if n > 1:  # "if it returns a number greater than one, you're in trouble": undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)
    log.warning("stopped %s", thread.name)
