"""Embedding ondevice in apps: async streams for asyncio, callbacks for GUI toolkits, loading in
the background, and live numbers for a status bar.

Generation and loading always run on a worker thread, so an app's own loop (asyncio's, or a
toolkit's: Tk, Qt, GTK) never waits for llama.cpp:

    async for chunk in model.astream("Hello", max_tokens=64):      # asyncio
        print(chunk.text, end="")

    handle = model.start("Hello", on_token=q.put, on_done=q.put)  # Tk, Qt, GTK
    handle.cancel()                                                # from any thread

    job = ondevice.load_async("demo", on_progress=q.put)           # a progress bar, not a freeze
    model = job.get()

Threads. Callbacks (`on_token`, `on_done`, `on_error`, `on_progress` of `load_async`) are called
on the worker thread, in order: every `on_token` before the one `on_done` or `on_error`. A GUI
toolkit must not be touched from that thread; hand the value to the UI thread instead:

  Tk   put it on a `queue.Queue` and drain the queue with `root.after(...)` polling
       (examples/tk_chat.py does exactly this).
  Qt   emit a signal (queued connections cross threads), or
       `QMetaObject.invokeMethod(obj, "slot", Qt.QueuedConnection, ...)`.
  GTK  `GLib.idle_add(func, value)` runs func on the main loop.

`astream()` and `aload()` need no such care: their values arrive on the event loop.

Cancelling. Every stream gets a `threading.Event` passed as `cancel=` to the source's `stream()`;
`Handle.cancel()`, `AsyncStream.cancel()` or cancelling the task that iterates an `AsyncStream`
sets it, and `Model.stream` checks it before every token: the reply ends within one token with
finish_reason "cancelled" (delivered to `on_done`, not `on_error`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ondevice import stats as _stats
from ondevice.errors import UsageError
from ondevice.results import Chunk, Result
from ondevice.stats import Stats

log = logging.getLogger(__name__)


class Streamable(Protocol):
    """Anything with the streaming primitive's shape: `Model`, `Conversation`."""

    def stream(self, prompt: Any, /, **kwargs: Any) -> Iterator[Chunk]: ...


# --- one generation on a worker thread ---------------------------------------------------------

# Workers still running, so that interpreter exit can stop them first: a daemon thread still
# inside llama.cpp while the interpreter frees the model would crash the process at exit.
_running: dict[threading.Thread, threading.Event] = {}
_running_lock = threading.Lock()


def _spawn(target: Callable[[], None], name: str, cancel: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            target()
        finally:
            with _running_lock:
                _running.pop(thread, None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _running_lock:
        _running[thread] = cancel
    thread.start()
    return thread


@atexit.register
def _stop_workers(timeout: float = 5.0) -> None:
    with _running_lock:
        workers = list(_running.items())
    for _, cancel in workers:
        cancel.set()
    deadline = time.monotonic() + timeout
    for thread, _ in workers:
        thread.join(max(0.0, deadline - time.monotonic()))


class _Progress:
    """Counters the worker updates and any thread may read (plain attribute writes)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.chunks = 0
        self.text_parts: list[str] = []
        self.t_start = time.perf_counter()
        self.t_first = 0.0
        self.t_last = 0.0
        self.tokens_at_cancel: int | None = None

    def add(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        n = len(chunk.tokens)
        if n and not self.tokens:
            self.t_first = now
        self.tokens += n
        self.chunks += 1
        if chunk.text:
            self.text_parts.append(chunk.text)
        self.t_last = now

    @property
    def tokens_per_s(self) -> float:
        """Streaming rate so far: tokens after the first over the time since the first."""
        span = self.t_last - self.t_first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


def _drive(
    source: Streamable,
    prompt: Any,
    kwargs: dict[str, Any],
    cancel: threading.Event,
    progress: _Progress,
    on_chunk: Callable[[Chunk], Any],
) -> Result:
    """Iterate `source.stream()` to the end on this thread; return the whole reply."""
    gen = source.stream(prompt, cancel=cancel, **kwargs)
    tokens: list[int] = []
    final: Stats | None = None
    try:
        for chunk in gen:
            progress.add(chunk)
            tokens.extend(chunk.tokens)
            if chunk.stats is not None:
                final = chunk.stats
            on_chunk(chunk)
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()  # releases the model's lock at once if we leave early (a callback raised)
    if final is None:  # a source that ended without a final chunk
        final = Stats(finish_reason="cancelled" if cancel.is_set() else "stop")
        final.completion_tokens = len(tokens)
    return Result("".join(progress.text_parts), tokens, final)


def _take_cancel(kwargs: dict[str, Any]) -> threading.Event:
    """The caller's own `cancel=` event if it gave one (we set it too), else a new one."""
    event = kwargs.pop("cancel", None)
    if event is None:
        return threading.Event()
    if not isinstance(event, threading.Event):
        raise UsageError("cancel must be a threading.Event", hint="or call handle.cancel()")
    return event


# --- callbacks: Handle -------------------------------------------------------------------------


class Handle:
    """A job on a worker thread: `cancel()` it from any thread, `wait()` for it, `get()` its
    result. `done`, `result` and `error` can be read at any time without blocking."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.result: Any = None
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _launch(self, target: Callable[[], None]) -> None:
        self._thread = _spawn(target, self.name, self._cancel)

    def cancel(self) -> None:
        """Ask the job to stop (returns at once; `wait()` to know it has)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called."""
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        """True once the job ended and its last callback returned."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (callbacks included); False on timeout."""
        if self._thread is threading.current_thread():
            raise UsageError(
                "wait() called from the job's own callback would wait forever",
                hint="return from the callback instead",
            )
        return self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """Wait, then return the result or raise the job's error (TimeoutError on timeout)."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        state = "done" if self.done else ("cancelling" if self.cancelled else "running")
        return f"<{type(self).__name__} {self.name} {state}>"


class GenerationHandle(Handle):
    """A reply streaming on a worker thread (from `Model.start()` / `ondevice.app.start()`).

    While it runs: `tokens`, `text` and `tokens_per_s` report progress (cheap, lock-free).
    When done: `result` is the whole `Result` (finish_reason "cancelled" after `cancel()`), or
    `error` holds what went wrong.
    """

    def __init__(self, name: str, cancel: threading.Event) -> None:
        super().__init__(name)
        self._cancel = cancel
        self._progress = _Progress()

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._progress.tokens_at_cancel = self._progress.tokens
        self._cancel.set()

    @property
    def tokens(self) -> int:
        return self._progress.tokens

    @property
    def text(self) -> str:
        return "".join(self._progress.text_parts)

    @property
    def tokens_per_s(self) -> float:
        return self._progress.tokens_per_s

    @property
    def tokens_at_cancel(self) -> int | None:
        """Tokens that had reached this handle when `cancel()` was first called."""
        return self._progress.tokens_at_cancel


def start(
    source: Streamable,
    prompt: Any,
    *,
    on_token: Callable[[str], Any] | None = None,
    on_done: Callable[[Result], Any] | None = None,
    on_error: Callable[[BaseException], Any] | None = None,
    **kwargs: Any,
) -> GenerationHandle:
    """Stream a reply on a worker thread and report it through callbacks; return at once.

    `source` is a `Model` or anything with its `stream(prompt, cancel=..., **kwargs)` (a
    `Conversation`); `kwargs` go to that `stream()` (max_tokens, stop, sampling keywords).

    on_token(text)   each new piece of text, as it streams.
    on_done(result)  once, after the last on_token: the whole `Result` (its stats included;
                     finish_reason "cancelled" after `handle.cancel()`).
    on_error(exc)    instead of on_done when the stream raised (a bad argument, a prompt too
                     long for the context, a closed model) or a callback raised. Without
                     on_error the error is logged and kept in `handle.error`.

    All three run on the worker thread (see this module's docstring for handing them to a UI
    thread). A second `start()` on the same model waits for the first reply to end.
    """
    cancel = _take_cancel(kwargs)
    handle = GenerationHandle(f"ondevice-start-{id(cancel):x}", cancel)
    progress = handle._progress

    def on_chunk(chunk: Chunk) -> None:
        if chunk.text and on_token is not None:
            on_token(chunk.text)

    def work() -> None:
        try:
            handle.result = _drive(source, prompt, kwargs, cancel, progress, on_chunk)
        except BaseException as exc:  # noqa: BLE001 - delivered to on_error, never lost
            cancel.set()
            handle.error = exc
            deliver_error(handle, exc, on_error)
        else:
            if on_done is not None:
                try:
                    on_done(handle.result)
                except Exception:  # noqa: BLE001 - the reply is complete; keep the app alive
                    log.exception("on_done callback failed")
        finally:
            handle._done.set()

    handle._launch(work)
    return handle


def deliver_error(handle: Handle, exc: BaseException, on_error: Callable | None) -> None:
    if on_error is None:
        log.error("%s failed: %s", handle.name, exc, exc_info=exc)
        return
    try:
        on_error(exc)
    except Exception:  # noqa: BLE001
        log.exception("on_error callback failed")


# --- asyncio: AsyncStream ----------------------------------------------------------------------

_CHUNK, _END, _ERROR = "chunk", "end", "error"


class AsyncStream:
    """An async iterator of `Chunk`s whose generation runs on a worker thread.

        async for chunk in model.astream("Hello"):
            ...

    The event loop only ever waits on a queue; it is never blocked by llama.cpp. Cancelling
    the task that iterates it, `cancel()`, or leaving an `async with` block early stops the
    generation within one token. After the end, `result` holds the whole `Result`.
    Iterate it once, from one event loop.
    """

    def __init__(self, source: Streamable, prompt: Any, kwargs: dict[str, Any]) -> None:
        self._source = source
        self._prompt = prompt
        self._kwargs = kwargs
        self._cancel = _take_cancel(kwargs)
        self._progress = _Progress()
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None
        self._ended: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._exhausted = False
        self.result: Result | None = None
        self.error: BaseException | None = None

    # The worker refers to the queue, loop and counters, not to `self`: an abandoned stream
    # is collected, and its __del__ cancels the generation.
    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        ended = asyncio.Event()
        self._queue, self._ended = queue, ended
        cancel, progress, finished = self._cancel, self._progress, self._finished
        source, prompt, kwargs = self._source, self._prompt, self._kwargs
        box: dict[str, Any] = {}
        self._box = box

        def post(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        def work() -> None:
            try:
                box["result"] = _drive(
                    source, prompt, kwargs, cancel, progress, lambda c: post((_CHUNK, c))
                )
                post((_END, None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming task
                box["error"] = exc
                post((_ERROR, exc))
            finally:
                finished.set()
                try:
                    loop.call_soon_threadsafe(ended.set)
                except RuntimeError:
                    pass

        self._thread = _spawn(work, "ondevice-astream", cancel)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._thread is None:
            self._start()
        if self._exhausted:
            raise StopAsyncIteration
        assert self._queue is not None
        try:
            kind, value = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()  # the consuming task was cancelled: stop generating
            raise
        if kind == _CHUNK:
            return value
        self._exhausted = True
        self.result = self._box.get("result")
        if kind == _ERROR:
            self.error = value
            raise value
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the generation (within one token); iteration then ends normally."""
        if not self._cancel.is_set():
            self._progress.tokens_at_cancel = self._progress.tokens
        self._cancel.set()

    @property
    def tokens(self) -> int:
        """Tokens generated so far (the worker may be ahead of the consumer)."""
        return self._progress.tokens

    @property
    def tokens_at_cancel(self) -> int | None:
        """Tokens generated when the stream was first cancelled (None if it never was)."""
        return self._progress.tokens_at_cancel

    @property
    def tokens_per_s(self) -> float:
        return self._progress.tokens_per_s

    @property
    def done(self) -> bool:
        """True once the worker thread has finished (the model is free again)."""
        return self._finished.is_set()

    async def wait(self) -> Result | None:
        """Wait (without blocking the loop) until the worker has finished; return the result."""
        if self._ended is not None:
            await self._ended.wait()
            self.result = self._box.get("result")
            self.error = self.error or self._box.get("error")
        return self.result

    def join(self, timeout: float | None = None) -> bool:
        """Block this thread until the worker has finished (for code outside the loop)."""
        return self._finished.wait(timeout) if self._thread is not None else True

    async def aclose(self) -> None:
        """Cancel if still running and wait until the model is free again."""
        self.cancel()
        await self.wait()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._cancel.set()


def astream(source: Streamable, prompt: Any, /, **kwargs: Any) -> AsyncStream:
    """`source.stream(prompt, **kwargs)` as an async iterator run on a worker thread.

    Works for a `Model` and for anything with the same `stream(prompt, cancel=..., ...)`
    (a `Conversation`). Nothing starts until the first `async for` step.
    """
    return AsyncStream(source, prompt, dict(kwargs))


# --- loading in the background (ondevice.load_async runs these on a worker thread) -----------


class LoadHandle(Handle):
    """A model loading on a worker thread (from `ondevice.load_async()`).

    `progress` is the latest fraction 0..1 llama.cpp reported. When done, `result` is the
    `Model`, or `error` holds why it failed. llama.cpp's load can't be interrupted: after
    `cancel()` the load runs to its end, the model is closed at once, and `error` is
    `Cancelled`.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.progress = 0.0


# --- live numbers for a status bar -------------------------------------------------------------


@dataclass
class LiveStats:
    """What a status bar shows, read without waiting for the model (see `Model.stats()`).

    generating      whether a generation holds the model right now.
    last            the last finished reply's `Stats` (None before the first).
    rss_bytes       the process's resident memory now (psutil).
    peak_rss_bytes  its high-water mark since the model was loaded (Linux) or started.
    model_bytes     tensor data of the model; kv_bytes: the KV cache for the whole context.
    kv_tokens       positions of the context in use (the cached conversation), of n_ctx.
    """

    generating: bool
    last: Stats | None
    rss_bytes: int
    peak_rss_bytes: int
    model_bytes: int
    kv_bytes: int
    kv_tokens: int
    n_ctx: int

    def summary(self) -> str:
        mib = 1024 * 1024
        speed = f"{self.last.generation_tps:.1f} tok/s" if self.last else "– tok/s"
        return (
            f"{speed} · RSS {self.rss_bytes / mib:.0f} MiB · model {self.model_bytes / mib:.0f}"
            f" MiB · KV {self.kv_bytes / mib:.0f} MiB · context {self.kv_tokens}/{self.n_ctx}"
        )


def live_stats(model: Any) -> LiveStats:
    """Cheap enough for every 100 ms: reads cached values and psutil, never the model's lock
    (which a running generation holds). `model` is an `ondevice.Model`."""
    return LiveStats(
        generating=model.busy,
        last=model.last_stats,
        rss_bytes=_stats.rss_bytes(),
        peak_rss_bytes=_stats.peak_rss_bytes(),
        model_bytes=model.model_bytes,
        kv_bytes=model.kv_bytes,
        kv_tokens=model.kv_tokens,  # a moment's value while a generation runs
        n_ctx=model.n_ctx,
    )


__all__ = [
    "AsyncStream",
    "GenerationHandle",
    "Handle",
    "LiveStats",
    "LoadHandle",
    "astream",
    "live_stats",
    "start",
]
