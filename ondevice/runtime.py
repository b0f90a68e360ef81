"""The runtime: `load()` a GGUF into a `Model` and stream text from it with measured `Stats`.

`Model.stream()` is the single streaming primitive: `generate()`, chat, the REPL and the
benchmarks all loop over it. It evaluates only the prompt tokens that are not already in the KV
cache (the longest common prefix with the previous call stays), samples with llama.cpp's native
sampler chain, and holds back text that could be the start of a stop string so no partial stop
string ever reaches the caller.

One `Model` is safe to share between threads: calls are serialized by a lock (llama.cpp's
context is not thread-safe). `cancel()` or a `threading.Event` stops a generation within one
token and leaves the model usable.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice import backends, engine, models, stats
from ondevice.errors import ContextOverflow, ModelClosed, ModelLoadError, OndeviceError, UsageError
from ondevice.gguf_check import GGUFHeader, read_header
from ondevice.stats import Stats

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096


@dataclass
class Chunk:
    """One piece of a streamed reply.

    text           new text since the previous chunk (may be "" on the final chunk).
    tokens         ids of the tokens sampled since the previous chunk (a token can end in the
                   middle of a UTF-8 character, so text and tokens need not line up 1:1).
    finish_reason  None while streaming; "stop", "length" or "cancelled" on the last chunk.
    stats          None while streaming; the reply's `Stats` on the last chunk.
    """

    text: str
    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    stats: Stats | None = None


@dataclass
class Result:
    """A whole reply: its text, the ids of the generated tokens, and its `Stats`."""

    text: str
    tokens: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


_SAMPLING_KEYS = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "seed",
}


class Model:
    """A loaded GGUF model. Create with `ondevice.load()`; use as a context manager.

    Attributes:
      path      the GGUF file it runs.
      metadata  the GGUF key/values (validated before llama.cpp saw the file).
      header    the parsed header (tensor list, sizes).
      n_ctx     context length in tokens.
      threads   threads used for generation.
      backend   the device that runs it ("CPU" or a GPU's name).
    """

    def __init__(
        self,
        path: Path,
        header: GGUFHeader,
        eng: engine.Engine,
        placement: backends.Placement,
        load_s: float,
        threads: int,
    ) -> None:
        self.path = path
        self.header = header
        self.metadata: dict[str, Any] = header.metadata
        self._engine: engine.Engine | None = eng
        self.placement = placement
        self.backend = placement.device
        self.load_s = load_s
        self.threads = threads
        self.n_ctx = eng.n_ctx
        self.notes: list[str] = list(eng.notes)
        # The load settings in force and where each came from (argument/tuned/default).
        self.settings: dict[str, Any] = {}
        self.settings_source: dict[str, str] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._cancel = threading.Event()
        self._close_pending = False
        # Tokens whose keys and values are in the KV cache, in order (sequence 0).
        self._cached: list[int] = []
        self._kv_bytes = eng.kv_bytes(
            header.arch_value("attention.key_length"), header.arch_value("attention.value_length")
        )
        self.last_stats: Stats | None = None

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's model and context. Idempotent.

        A generation in progress is cancelled first. If a stream is suspended in the middle
        (its consumer stopped iterating without closing it), the memory is freed when that
        stream is closed or garbage-collected, so close() never blocks on it.
        """
        if self._engine is None:
            return
        self._cancel.set()
        if self._lock.acquire(timeout=2.0):
            try:
                self._free()
            finally:
                self._lock.release()
        else:
            self._close_pending = True

    def _free(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def closed(self) -> bool:
        return self._engine is None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._engine is not None and not self._lock.locked():
                self._engine.close()
                self._engine = None
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}, backend={self.backend!r}"
        return f"<ondevice.Model {self.path.name} {state}>"

    # --- facts ----------------------------------------------------------------------------
    @property
    def model_bytes(self) -> int:
        return self.header.tensor_bytes

    @property
    def kv_bytes(self) -> int:
        return self._kv_bytes

    @property
    def architecture(self) -> str:
        return self.header.architecture

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def engine(self) -> engine.Engine:
        """The low-level engine (for quality measurements and benchmarks). Not thread-safe:
        hold `model.lock()` while using it."""
        if self._engine is None:
            raise ModelClosed("the model is closed", hint="load it again with ondevice.load()")
        return self._engine

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        with self.lock():
            return self.engine.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self.lock():
            return self.engine.detokenize(tokens)

    # --- concurrency ----------------------------------------------------------------------
    def lock(self) -> _ModelLock:
        """Context manager that holds the model for exclusive use by this thread."""
        return _ModelLock(self)

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread) within one token."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the KV cache (the next call evaluates its whole prompt)."""
        with self.lock():
            self.engine.kv_clear()
            self._cached = []

    # --- generation -----------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        add_special: bool = True,
        **sampling: Any,
    ) -> Iterator[Chunk]:
        """Stream the completion of `prompt` (text, or token ids) as `Chunk`s.

        Sampling keywords: temperature (<= 0: greedy), top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed. `stop` strings end the reply and are not returned; `max_tokens`
        caps the reply (it also ends when the context is full: finish_reason "length").
        `cancel` (or `Model.cancel()`) ends it with finish_reason "cancelled".
        Raises ContextOverflow when the prompt itself does not fit the context.
        """
        params = _sampling(sampling)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        return self._stream(prompt, max_tokens, stops, cancel, add_special, params)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Result:
        """The whole completion at once: loops over `stream()`."""
        parts: list[str] = []
        tokens: list[int] = []
        final = Stats()
        for chunk in self.stream(prompt, **kwargs):
            parts.append(chunk.text)
            tokens.extend(chunk.tokens)
            if chunk.stats is not None:
                final = chunk.stats
        return Result("".join(parts), tokens, final)

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Iterator[Chunk]:
        """Stream the reply to OpenAI-style messages in the model's chat format, like stream().

        Keywords: chat_format, max_tokens, stop, cancel and the sampling parameters
        (see `ondevice.conversation.chat`)."""
        from ondevice.conversation import chat

        return chat(self, messages, **kwargs)

    def conversation(self, system: str | None = None, **kwargs: Any) -> Any:
        """A `Conversation` that keeps the history and reuses the KV cache between turns.

        Keywords: chat_format, max_tokens, stop and sampling defaults for every turn
        (see `ondevice.conversation.Conversation`)."""
        from ondevice.conversation import Conversation

        return Conversation(self, system, **kwargs)

    # --- for apps (ondevice.app): worker threads, never blocking the caller's loop ----------
    def astream(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """`stream()` as an async iterator run on a worker thread (`ondevice.app.astream`);
        cancelling the consuming task stops the generation within one token."""
        from ondevice import app

        return app.astream(self, prompt, **kwargs)

    def start(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """Stream on a worker thread with callbacks on_token/on_done/on_error; returns a
        Handle (cancel(), wait(timeout)) at once (`ondevice.app.start`)."""
        from ondevice import app

        return app.start(self, prompt, **kwargs)

    def stats(self) -> Any:
        """Live numbers for a status bar (last reply's Stats, RSS now, model and KV bytes),
        cheap and lock-free even while a generation runs (`ondevice.app.live_stats`)."""
        from ondevice import app

        return app.live_stats(self)

    def _stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int,
        stops: list[str],
        cancel: threading.Event | None,
        add_special: bool,
        params: engine.SamplingParams,
    ) -> Iterator[Chunk]:
        t_call = time.perf_counter()
        with self.lock():
            eng = self.engine
            self._cancel.clear()
            cancelled = (
                self._cancel.is_set
                if cancel is None
                else (lambda: cancel.is_set() or self._cancel.is_set())
            )
            tokens = (
                eng.tokenize(prompt, add_special=add_special)
                if isinstance(prompt, str)
                else list(prompt)
            )
            if not tokens:
                raise UsageError("the prompt is empty")
            if len(tokens) >= eng.n_ctx:
                raise ContextOverflow(
                    f"the prompt is {len(tokens)} tokens but the context holds {eng.n_ctx}",
                    hint="shorten the prompt or load the model with a larger n_ctx (--ctx)",
                )
            st = Stats(
                prompt_tokens=len(tokens),
                load_s=self.load_s,
                model_bytes=self.model_bytes,
                kv_bytes=self._kv_bytes,
                backend=self.backend,
                threads=self.threads,
                n_ctx=eng.n_ctx,
                notes=list(self.notes),
            )
            sampler = engine.Sampler(params)
            try:
                for chunk in self._run(
                    eng, tokens, sampler, max_tokens, stops, cancelled, st, t_call
                ):
                    if chunk.finish_reason is not None:
                        final = chunk
                        break
                    yield chunk
            finally:
                sampler.close()
        # The last chunk is handed out after the model is released, so a consumer that stops
        # iterating once it has the stats doesn't keep the model locked.
        yield final

    def _run(
        self,
        eng: engine.Engine,
        tokens: list[int],
        sampler: engine.Sampler,
        max_tokens: int,
        stops: list[str],
        cancelled: Callable[[], bool],
        st: Stats,
        t_call: float,
    ) -> Iterator[Chunk]:
        # 1. Reuse the KV cache for the longest common prefix; evaluate the rest.
        common = _common_prefix(self._cached, tokens)
        if common == len(tokens):
            common -= 1  # the last prompt token must be evaluated to get its logits
        if common < len(self._cached):
            if not eng.kv_keep(common):
                eng.kv_clear()
                common = 0
            del self._cached[common:]
        todo = tokens[common:]
        st.prompt_eval_tokens = len(todo)
        t0 = time.perf_counter()
        # Until decode returns, the cache holds an unknown part of `todo`: forget it on error.
        self._cached = self._cached[:common]
        try:
            finished = eng.decode(todo, should_stop=cancelled)
        except BaseException:
            eng.kv_clear()
            self._cached = []
            raise
        if not finished:
            eng.kv_clear()
            self._cached = []
            st.finish_reason = "cancelled"
            self._finish(st, t_call)
            yield Chunk("", (), "cancelled", st)
            return
        self._cached.extend(todo)
        t1 = time.perf_counter()
        st.prompt_tps = len(todo) / (t1 - t0) if t1 > t0 else 0.0
        sampler.accept(tokens)

        # 2. Sample, detokenize, check stops, evaluate; one token per turn of the loop.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold_back = max((len(s) for s in stops), default=0) - 1
        pending = ""  # decoded text not yet emitted (could start a stop string)
        new_tokens: list[int] = []
        n_generated = 0
        t_first = t_last = 0.0
        finish = "length"
        room = eng.n_ctx - len(self._cached)  # positions left in the context
        limit = min(max_tokens, room) if max_tokens >= 0 else room
        while n_generated < limit:
            if cancelled():
                finish = "cancelled"
                break
            tok = eng.sample(sampler)
            n_generated += 1
            t_last = time.perf_counter()
            if n_generated == 1:
                t_first = t_last
                st.ttft_s = t_first - t_call
            if eng.is_eog(tok):
                finish = "stop"
                break
            new_tokens.append(tok)
            pending += decoder.decode(eng.piece(tok))
            if stops:
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending = pending[:cut]
                    finish = "stop"
                    break
                safe = _safe_prefix(pending, stops, hold_back)
            else:
                safe = len(pending)
            if safe:
                yield Chunk(pending[:safe], tuple(new_tokens))
                pending = pending[safe:]
                new_tokens = []
            if n_generated >= limit:
                break
            eng.decode_one(tok)
            self._cached.append(tok)
        pending += decoder.decode(b"", final=True)
        if finish == "length" and max_tokens >= 0 and n_generated < max_tokens:
            st.notes.append("the context is full")
        st.completion_tokens = n_generated
        if n_generated > 1 and t_last > t_first:
            st.generation_tps = (n_generated - 1) / (t_last - t_first)
        st.finish_reason = finish
        self._finish(st, t_call)
        yield Chunk(pending, tuple(new_tokens), finish, st)

    def _finish(self, st: Stats, t_call: float) -> None:
        st.total_s = time.perf_counter() - t_call
        st.rss_bytes = stats.rss_bytes()
        st.peak_rss_bytes = stats.peak_rss_bytes()
        self.last_stats = st


class _ModelLock:
    """Serializes use of one Model across threads; refuses re-entry from the same thread
    (a stream still open while another call starts would otherwise deadlock)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __enter__(self) -> Model:
        m = self.model
        if m._owner == threading.get_ident():
            raise UsageError(
                "this model is already generating in this thread",
                hint="finish or close the open stream before starting another",
            )
        m._lock.acquire()
        if m._engine is None:
            m._lock.release()
            raise ModelClosed("the model is closed", hint="load it again with ondevice.load()")
        m._owner = threading.get_ident()
        return m

    def __exit__(self, *exc: object) -> None:
        m = self.model
        m._owner = None
        if m._close_pending:
            m._free()
        m._lock.release()


def _sampling(kwargs: dict[str, Any]) -> engine.SamplingParams:
    unknown = set(kwargs) - _SAMPLING_KEYS
    if unknown:
        raise UsageError(
            f"unknown sampling parameter(s): {', '.join(sorted(unknown))}",
            hint=f"use {', '.join(sorted(_SAMPLING_KEYS))}",
        )
    params = engine.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    if params.top_p <= 0 or params.top_p > 1:
        raise UsageError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.min_p < 0 or params.min_p >= 1:
        raise UsageError(f"min_p must be in [0, 1), got {params.min_p}")
    return params


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _safe_prefix(text: str, stops: list[str], hold_back: int) -> int:
    """How much of `text` can be emitted: all but a tail that could begin a stop string."""
    n = len(text)
    for k in range(min(hold_back, n), 0, -1):
        tail = text[n - k :]
        if any(s.startswith(tail) for s in stops):
            return n - k
    return n


def load(
    model: str | os.PathLike[str],
    *,
    backend: str = "auto",
    n_ctx: int | None = None,
    threads: int | str = "auto",
    gpu_layers: int | str = "auto",
    flash_attn: str = "auto",
    use_mmap: bool | None = None,
    n_batch: int | None = None,
    n_ubatch: int | None = None,
    kv_type: str | None = None,
    repack: bool | None = None,
    tune: bool | str = True,
    on_progress: Callable[[float], Any] | None = None,
    no_fallback: bool = False,
    force: bool = False,
) -> Model:
    """Load a model: a path to a .gguf file, `demo`, or a name from the local store.

    n_ctx        context length in tokens (default: 4096, or the model's trained context if
                 smaller).
    backend      "auto" (Metal on Apple Silicon, else a GPU if present, else CPU), "cpu",
                 "metal", "vulkan", "vulkan:N".
    threads      "auto" (the performance cores) or a number.
    gpu_layers   layers to offload when a GPU backend is chosen ("auto" = all that fit the
                 device's free memory).
    flash_attn   "auto" (llama.cpp decides per device), "on" or "off".
    use_mmap     map the file (pages can be shared and dropped) instead of reading it.
    kv_type      KV cache element type: f16 (default), bf16, f32, q8_0, q4_0 (where the model
                 allows it).
    n_batch, n_ubatch  prompt tokens per llama_decode call / per compute pass (2048 / 512).
    repack       llama.cpp's weight repacking (default on; forced off on AMX builds).
    tune         True: settings left unset (None, or "auto" for threads and flash_attn) come
                 from the stored `ondevice tune` result for this model and device (the chat
                 workload's, else the newest); a workload name picks that one; False ignores
                 tunings. Model.settings / settings_source (and a note in Stats.notes) say
                 which settings are in force and where they came from.
    on_progress  called with a fraction 0..1 while the weights load (from this thread);
                 returning False cancels the load (ModelLoadError).
    no_fallback  when the GPU has no usable device or loading on it fails, raise instead of
                 running on the CPU (the fallback is noted in Model.notes and Stats.notes).
    force        load even when ondevice.fit predicts the model will not fit the available
                 memory (otherwise DoesNotFit is raised before llama.cpp allocates anything).

    The file is validated before llama.cpp sees it: a malformed file raises InvalidModelFile
    instead of crashing the process.
    """
    t0 = time.perf_counter()
    path = models.resolve(model)
    header = read_header(path)
    from ondevice import tune_store as tuning

    asked = {"flash_attn": flash_attn, "repack": repack, "use_mmap": use_mmap}
    asked.update(n_batch=n_batch, n_ubatch=n_ubatch, threads=threads, kv_type=kv_type)
    chosen, sources, tune_note = tuning.settings_in_force(path, tune, backend, asked)
    flash_attn, repack, use_mmap = chosen["flash_attn"], chosen["repack"], chosen["use_mmap"]
    n_batch, n_ubatch, kv_type = chosen["n_batch"], chosen["n_ubatch"], chosen["kv_type"]
    n_threads = _threads(chosen["threads"])
    trained = int(header.arch_value("context_length", 0) or 0)
    ctx = n_ctx if n_ctx is not None else (min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX)
    if ctx < 8:
        raise UsageError(f"n_ctx must be at least 8 tokens, got {ctx}")
    if kv_type not in engine.KV_TYPES:
        raise UsageError(
            f"unknown KV cache type {kv_type!r}", hint=f"use one of {', '.join(engine.KV_TYPES)}"
        )
    if flash_attn not in engine.FLASH_ATTN:
        raise UsageError(f"flash_attn must be auto, on or off, not {flash_attn!r}")
    placement = backends.choose(
        backend,
        gpu_layers,
        header=header,
        n_ctx=ctx,
        kv_type=kv_type,
        n_ubatch=min(n_ubatch, n_batch),
        fallback=not no_fallback,
    )
    attention = backends.attention_settings(
        header.architecture, placement, flash_attn, kv_type, backends.head_dims(header)
    )
    if not force and placement.n_gpu_layers == 0:
        from ondevice import fit

        fit.check_fits(
            header,
            ctx,
            kv_type,
            min(n_ubatch, n_batch),
            use_mmap=use_mmap,
            flash_attn=attention.flash_attn != "off",
        )
    config = engine.EngineConfig(
        n_ctx=ctx,
        n_batch=n_batch,
        n_ubatch=min(n_ubatch, n_batch),
        threads=n_threads,
        threads_batch=n_threads,
        n_gpu_layers=placement.n_gpu_layers,
        main_gpu=placement.main_gpu,
        devices=backends.engine_devices(placement),
        flash_attn=attention.flash_attn,
        offload_kqv=attention.offload_kqv,
        use_mmap=use_mmap,
        use_extra_bufts=repack,
        type_k=kv_type,
        type_v=kv_type,
    )
    stats.reset_peak_rss()
    progress = None
    cancelled: list[bool] = []  # a cancelled load is not a GPU failure: no CPU retry
    if on_progress is not None:

        def progress(value: float) -> bool:
            try:
                # Returning False (not None) from on_progress cancels the load.
                go_on = on_progress(value) is not False
                if not go_on:
                    cancelled.append(True)
                return go_on
            except Exception:  # noqa: BLE001 - a UI callback must not abort the load
                log.exception("on_progress callback failed")
            return True

    try:
        eng = engine.Engine(str(path), config, progress)
    except OndeviceError as exc:
        if not placement.on_gpu or cancelled:
            raise
        if no_fallback:
            raise ModelLoadError(
                f"loading on {placement.device} failed: {exc.message}",
                hint="drop --no-fallback to run on the CPU instead, or use --backend cpu",
            ) from exc
        # The GPU refused the model (out of device memory, a driver error): run on the CPU.
        note = f"loading on {placement.device} failed ({exc.message}); ran on the CPU instead"
        log.warning("%s", note)
        placement = backends.CPU.with_note(note)
        attention = backends.attention_settings(
            header.architecture, placement, flash_attn, kv_type, backends.head_dims(header)
        )
        config.n_gpu_layers, config.devices = 0, []
        config.flash_attn = attention.flash_attn
        eng = engine.Engine(str(path), config, progress)
    if placement.on_gpu:
        _warm_up(eng)
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %s in %.2fs (n_ctx=%d, threads=%d, %s)",
        path.name,
        load_s,
        eng.n_ctx,
        n_threads,
        placement.device,
    )
    m = Model(path, header, eng, placement, load_s, n_threads)
    offloaded = backends.offloaded_layers(eng.load_log)
    m.backend = backends.describe(placement, offloaded)
    if offloaded and offloaded[0] == offloaded[1]:
        # Every layer is on the GPU: the CPU's weight repacking had nothing to repack.
        m.notes = [n for n in m.notes if not n.startswith("weight repacking off")]
    m.notes.extend([*placement.notes, *attention.notes])
    m.settings = dict(chosen)
    m.settings.update(flash_attn=attention.flash_attn, threads=n_threads, n_ubatch=config.n_ubatch)
    m.settings["repack"] = eng.config.use_extra_bufts
    m.settings_source = dict(sources)
    if repack is not False and not eng.config.use_extra_bufts:
        m.settings_source["repack"] = "device (AMX build)"
    if tune_note:
        m.notes.append(tune_note)
    return m


def _warm_up(eng: engine.Engine) -> None:
    """Evaluate one token and forget it. GPU backends (Vulkan, Metal) compile their pipelines
    on first use; on an H200 that made a tiny model's first prompt run at 120 tok/s instead of
    thousands. Done here, it counts as load time instead of the first reply's TTFT (llama.cpp's
    own tools warm up the same way)."""
    try:
        eng.decode([eng.bos if eng.bos >= 0 else 0])
        eng.synchronize()
    except OndeviceError as exc:  # the first real decode will report it properly
        log.warning("warm-up decode failed: %s", exc)
    finally:
        eng.kv_clear()


def _threads(threads: int | str) -> int:
    if threads == "auto":
        from ondevice.system import auto_threads

        return auto_threads()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise UsageError(f"threads must be a number or 'auto', not {threads!r}") from None
    if n < 1:
        raise UsageError(f"threads must be at least 1, got {n}")
    return n
