"""`ondevice.load()`: from what the user names to a running `Model`, one step per function.

  1. resolve     a path, `demo` or a store name -> the GGUF file (ondevice.locate)
  2. validate    the header, in Python, before llama.cpp sees the file (ondevice.gguf_header)
  3. settings    arguments, else a stored tuning, else the defaults (ondevice.tune_store,
                 ondevice.settings), each checked
  4. placement   CPU or a GPU and how many layers (ondevice.backends)
  5. policy      flash attention, the KV type's fit with the heads, weight repacking (the AMX
                 rule), all from ondevice.policy
  6. memory      refuse a model that can't fit before anything is allocated (ondevice.fit)
  7. engine      llama.cpp loads the model and makes the context; a GPU that refuses it falls
                 back to the CPU (unless no_fallback)
  8. warm-up     GPU backends compile their pipelines now, not in the first reply

`load_async()` and `aload()` run the same on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondevice import app, backends, fit, locate, policy, speculate, stats, system, tune_store
from ondevice import draft as draft_mod
from ondevice._native import binding
from ondevice._native.engine import Engine, EngineConfig
from ondevice.errors import (
    Cancelled,
    LoadCancelled,
    ModelLoadError,
    ModelNotFound,
    OndeviceError,
    UsageError,
)
from ondevice.gguf_header import GGUFHeader, read_header
from ondevice.model_check import mmap_aligned
from ondevice.probe import ensure_safe
from ondevice.runtime import Model
from ondevice.settings import check_load

log = logging.getLogger(__name__)


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
    parallel: int = 1,
    speculative: str | os.PathLike[str] = "auto",
    omp_passive: bool = True,
    reset_peak_rss: bool = True,
    trust: bool = False,
) -> Model:
    """Load a model: a path to a .gguf file, `demo`, or a name from the local store.

    n_ctx        context length in tokens (default: 4096, or the model's trained context if
                 smaller).
    backend      "auto" (Metal on Apple Silicon, else a GPU if present, else CPU), "cpu",
                 "metal", "vulkan", "vulkan:N".
    threads      "auto" (the performance cores) or a number.
    gpu_layers   layers to offload when a GPU backend is chosen ("auto" = all that fit the
                 device's free memory).
    flash_attn   "auto" (llama.cpp decides on a GPU; off on the CPU unless the KV cache is
                 quantized), "on" or "off".
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
    speculative  "auto" (draft tokens by prompt lookup and verify them in one decode, only
                 while it pays: ondevice.speculate), "lookup" (whenever a lookup matches),
                 "off"; or a draft model (a .gguf path or a store name: a smaller model
                 with the same vocabulary, loaded beside this one, ondevice.draft), which
                 makes "draft" the default; stream(speculative=...) overrides it per call.
    parallel     sequences the context holds at once, each with n_ctx tokens of its own (the
                 KV cache is `parallel` times larger): for batched generation
                 (`Model.generate_many`, `ondevice.batch`, `ondevice serve --parallel`).

    Two process-wide settings, which an app can decline:
    omp_passive     give llama.cpp's OpenMP threads a short spin before they sleep
                    (GOMP_SPINCOUNT=300, unless the environment sets OMP_WAIT_POLICY or
                    GOMP_SPINCOUNT) before its OpenMP runtime loads: idle threads soon stop
                    spinning on cores a UI or another process needs, without paying a sleep
                    and wake-up at every barrier (ondevice.policy says what each is worth).
                    It has no effect once llama.cpp was loaded in the process.
    reset_peak_rss  reset the kernel's peak-RSS mark (Linux), so Stats.peak_rss_bytes covers
                    this model only, not what the process did before.

    The file is validated before llama.cpp sees it: a malformed file raises InvalidModelFile
    instead of crashing the process. The first load of a file this machine has not run before
    happens in a child process first (ondevice.probe: about 1 s for a 100 MB model, about one
    more load of a larger one; remembered afterwards), so a file llama.cpp aborts on raises InvalidModelFile instead of killing this
    one. A file whose tensors would be misaligned in memory is read without mmap.
    trust        skip that child-process check: for files you made or vetted yourself. It
                 risks the whole process: a file llama.cpp aborts on (SIGABRT, SIGSEGV) then
                 takes this process, and everything in it, down with it.
    """
    t0 = time.perf_counter()
    draft_ref = _draft_ref(speculative)
    if omp_passive:
        policy.set_omp_wait()
    path = locate.resolve(model)
    header = read_header(path)
    asked = dict(
        flash_attn=flash_attn, repack=repack, use_mmap=use_mmap, n_batch=n_batch,
        n_ubatch=n_ubatch, threads=threads, kv_type=kv_type,
    )  # fmt: skip
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 256:
        raise UsageError(f"parallel must be from 1 to 256 sequences, got {parallel!r}")
    plan = _plan(path, header, asked, n_ctx, tune, backend, gpu_layers, no_fallback)
    if parallel > 1:
        plan.config.n_seq_max = parallel
        plan.config.n_ctx *= parallel  # llama.cpp splits the context between the sequences
    if plan.config.use_mmap and not mmap_aligned(header):
        plan.config.use_mmap = plan.settings["use_mmap"] = False  # mapped, ggml would abort
        plan.notes.append(policy.UNALIGNED_NOTE)
    if not force and plan.placement.n_gpu_layers == 0:
        _check_memory(header, plan)
    if not trust:
        ensure_safe(path, header, plan.config)  # a first load: in a child process
    if reset_peak_rss:
        stats.reset_peak_rss()
    eng, plan = _open_engine(path, header, plan, _progress(on_progress), no_fallback)
    if plan.placement.on_gpu:
        _warm_up(eng)
    m = _model(path, header, eng, plan, time.perf_counter() - t0)
    m.speculative = str(speculative)
    if draft_ref is not None:
        try:
            _attach_draft(m, draft_ref, backend, gpu_layers, tune, no_fallback, force, trust)
        except BaseException:
            m.close()
            raise
        m.load_s = time.perf_counter() - t0
    return m


def _draft_ref(speculative: Any) -> str | os.PathLike[str] | None:
    """The draft model `speculative` names, or None for one of prompt lookup's modes."""
    if isinstance(speculative, str) and speculative in speculate.MODES:
        return None
    if isinstance(speculative, os.PathLike) or (
        isinstance(speculative, str) and speculative and speculative not in speculate.DRAFT_MODES
    ):
        return speculative
    raise UsageError(
        f"speculative must be one of {', '.join(speculate.MODES)} or a draft model's path, "
        f"not {speculative!r}"
    )


def _attach_draft(
    m: Model,
    ref: str | os.PathLike[str],
    backend: str,
    gpu_layers: int | str,
    tune: bool | str,
    no_fallback: bool,
    force: bool,
    trust: bool,
) -> None:
    """Load the draft model beside `m` (its context as long as one of m's sequences, the same
    threads and device), check that it shares m's vocabulary, and make "draft" the default."""
    eng = m._live_engine()
    with _about_the_draft():
        draft_path = locate.resolve(ref)
        tokens = read_header(draft_path).metadata.get("tokenizer.ggml.tokens") or []
    target_tokens = m.header.metadata.get("tokenizer.ggml.tokens") or []
    draft_mod.check_vocab_tables(target_tokens, tokens, draft_path.name)  # before its weights
    with _about_the_draft():
        draft = load(
            draft_path, backend=backend, n_ctx=eng.n_ctx, threads=m.threads, gpu_layers=gpu_layers,
            tune=tune, no_fallback=no_fallback, force=force, trust=trust,
            speculative="off", omp_passive=False, reset_peak_rss=False,
        )  # fmt: skip
    try:
        draft_mod.check_compatible(eng, draft._live_engine(), draft.path.name)
    except BaseException:
        draft.close()
        raise
    m.draft, m._drafter = draft, draft_mod.Drafter(draft._live_engine())
    m.speculative = speculate.DRAFT
    m.notes.append(f"speculative decoding drafts with {draft.path.name}")
    log.info("draft model %s loaded beside %s", draft.path.name, m.path.name)


@contextlib.contextmanager
def _about_the_draft() -> Iterator[None]:
    """An error loading the draft model, saying it is about the draft, not the model."""
    try:
        yield
    except OndeviceError as exc:
        exc.message = f"the draft model: {exc.message}"
        if isinstance(exc, ModelNotFound):  # perhaps a mode misspelt
            exc.hint = f"{exc.hint or ''}; speculative is auto, lookup, off or a draft model"
        exc.args = (f"{exc.message} ({exc.hint})" if exc.hint else exc.message,)
        raise


@dataclass
class _Plan:
    """Everything decided before llama.cpp is called."""

    config: EngineConfig
    placement: backends.Placement
    settings: dict[str, Any]
    sources: dict[str, str]
    notes: list[str] = field(default_factory=list)
    flash_attn_asked: str = "auto"
    repack_asked: bool | None = None


def _plan(
    path: Path,
    header: GGUFHeader,
    asked: dict[str, Any],
    n_ctx: int | None,
    tune: bool | str,
    backend: str,
    gpu_layers: int | str,
    no_fallback: bool,
) -> _Plan:
    """Steps 3-5: the settings, the placement and the policy's decisions, in an EngineConfig."""
    for name in ("flash_attn", "use_mmap", "n_batch", "n_ubatch", "kv_type", "repack"):
        check_load(name, asked[name])
    chosen, sources, tune_note = tune_store.settings_in_force(path, tune, backend, asked)
    n_threads = resolve_threads(chosen["threads"])
    ctx = check_load("n_ctx", n_ctx) or policy.default_ctx(
        int(header.arch_value("context_length", 0) or 0)
    )
    kv_type, n_ubatch = chosen["kv_type"], min(chosen["n_ubatch"], chosen["n_batch"])
    check_load("kv_type", kv_type)
    placement = backends.choose(
        backend, gpu_layers, header=header, n_ctx=ctx, kv_type=kv_type, n_ubatch=n_ubatch,
        fallback=not no_fallback,
    )  # fmt: skip
    attention = backends.attention_settings(
        header.architecture, placement, chosen["flash_attn"], kv_type, header.head_dims
    )
    notes = [*placement.notes, *attention.notes]
    repack = bool(chosen["repack"])
    if repack:
        allowed, why = policy.repack_allowed(binding.amx_compiled())
        if not allowed:
            repack = False
            sources["repack"] = "device (AMX build)"
            notes.insert(0, why)
            log.info("%s", why)
    config = EngineConfig(
        n_ctx=ctx, n_batch=chosen["n_batch"], n_ubatch=n_ubatch, threads=n_threads,
        threads_batch=n_threads, n_gpu_layers=placement.n_gpu_layers,
        main_gpu=placement.main_gpu, devices=backends.engine_devices(placement),
        flash_attn=attention.flash_attn, offload_kqv=attention.offload_kqv,
        use_mmap=chosen["use_mmap"], use_extra_bufts=repack, type_k=kv_type, type_v=kv_type,
    )  # fmt: skip
    settings = dict(chosen, flash_attn=attention.flash_attn, threads=n_threads)
    settings.update(n_ubatch=n_ubatch, repack=repack)
    if tune_note:
        notes.append(tune_note)
    return _Plan(config, placement, settings, sources, notes, chosen["flash_attn"], repack)


def _check_memory(header: GGUFHeader, plan: _Plan) -> None:
    """Step 6: DoesNotFit before llama.cpp allocates anything (with repacking as it will be)."""
    c = plan.config
    fit.check_fits(
        header,
        c.n_ctx,
        c.type_k,
        c.n_ubatch,
        use_mmap=c.use_mmap,
        flash_attn=c.flash_attn != "off",
        repack=c.use_extra_bufts,
        repack_family=policy.repack_family(system.cpu_features()),
    )


def _progress(on_progress: Callable[[float], Any] | None) -> Callable[[float], bool] | None:
    if on_progress is None:
        return None

    def progress(value: float) -> bool:
        try:
            # Returning False (not None) from on_progress cancels the load.
            return on_progress(value) is not False
        except Exception:  # noqa: BLE001 - a UI callback must not abort the load
            log.exception("on_progress callback failed")
        return True

    return progress


def _open_engine(
    path: Path,
    header: GGUFHeader,
    plan: _Plan,
    progress: Callable[[float], bool] | None,
    no_fallback: bool,
) -> tuple[Engine, _Plan]:
    """Step 7: llama.cpp loads the file; a GPU that refuses it falls back to the CPU."""
    try:
        return Engine(str(path), plan.config, progress), plan
    except OndeviceError as exc:
        if not plan.placement.on_gpu or isinstance(exc, LoadCancelled):
            raise
        if no_fallback:
            raise ModelLoadError(
                f"loading on {plan.placement.device} failed: {exc.message}",
                hint="drop --no-fallback to run on the CPU instead, or use --backend cpu",
            ) from exc
        # The GPU refused the model (out of device memory, a driver error): run on the CPU.
        note = f"loading on {plan.placement.device} failed ({exc.message}); ran on the CPU instead"
        log.warning("%s", note)
        placement = backends.CPU.with_note(note)
        attention = backends.attention_settings(
            header.architecture,
            placement,
            plan.flash_attn_asked,
            plan.config.type_k,
            header.head_dims,
        )
        plan.config.n_gpu_layers, plan.config.devices = 0, []
        plan.config.flash_attn = attention.flash_attn
        plan.settings["flash_attn"] = attention.flash_attn
        plan.placement = placement
        plan.notes = [n for n in plan.notes if n not in attention.notes] + [note]
        plan.notes += list(attention.notes)
        return Engine(str(path), plan.config, progress), plan


def _warm_up(eng: Engine) -> None:
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


def _model(path: Path, header: GGUFHeader, eng: Engine, plan: _Plan, load_s: float) -> Model:
    """Step 9: the Model, with where it runs and which settings are in force."""
    kv_bytes = fit.kv_cache_bytes(header, plan.config.n_ctx, plan.config.type_k)
    m = Model(path, header, eng, plan.placement, load_s, plan.config.threads, kv_bytes)
    m.device = backends.describe(plan.placement, m.offloaded)
    notes = list(plan.notes)
    if m.offloaded and m.offloaded[0] == m.offloaded[1]:
        # Every layer is on the GPU: the CPU's weight repacking had nothing to repack.
        notes = [n for n in notes if n != policy.AMX_NOTE]
    m.notes = notes
    m.settings = plan.settings
    m.settings_source = plan.sources
    log.info(
        "loaded %s in %.2fs (n_ctx=%d, threads=%d, %s)",
        path.name, load_s, eng.n_ctx, plan.config.threads, m.device,
    )  # fmt: skip
    return m


def resolve_threads(threads: int | str) -> int:
    """A `threads` argument as a count: "auto" is the performance cores."""
    if threads == "auto":
        return system.auto_threads()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise UsageError(f"threads must be a number or 'auto', not {threads!r}") from None
    if not 1 <= n <= 4096:
        raise UsageError(f"threads must be from 1 to 4096, got {n}")
    return n


# --- in the background -------------------------------------------------------------------------
def load_async(
    model: Any,
    *,
    on_progress: Callable[[float], Any] | None = None,
    on_done: Callable[[Model], Any] | None = None,
    on_error: Callable[[BaseException], Any] | None = None,
    **load_kwargs: Any,
) -> app.LoadHandle:
    """`ondevice.load(model, **load_kwargs)` on a worker thread; returns a `LoadHandle` at once.

    on_progress(fraction)  as llama.cpp loads the weights (0..1, rising).
    on_done(model)         the loaded `Model` (also `handle.result` / `handle.get()`).
    on_error(exc)          a missing or invalid file, not enough memory, or `Cancelled`.
    All run on the worker thread.
    """
    handle = app.LoadHandle(f"ondevice-load-{id(load_kwargs):x}")

    def progress(value: float) -> None:
        handle.progress = value
        if on_progress is not None:
            on_progress(value)

    def work() -> None:
        try:
            m = load(model, on_progress=progress, **load_kwargs)
            if handle.cancelled:
                m.close()
                raise Cancelled("the load was cancelled")
            handle.result = m
        except BaseException as exc:  # noqa: BLE001 - delivered to on_error
            handle.error = exc
            app.deliver_error(handle, exc, on_error)
        else:
            if on_done is not None:
                try:
                    on_done(m)
                except Exception:  # noqa: BLE001
                    log.exception("on_done callback failed")
        finally:
            handle._done.set()

    handle._launch(work)
    return handle


async def aload(
    model: Any, *, on_progress: Callable[[float], Any] | None = None, **load_kwargs: Any
) -> Model:
    """`ondevice.load()` for asyncio: the load runs on a worker thread and `on_progress` is
    called on the event loop. Cancelling the awaiting task closes the model once llama.cpp
    has finished loading it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Model] = loop.create_future()

    def progress(value: float) -> None:
        if on_progress is not None:
            loop.call_soon_threadsafe(on_progress, value)

    def finish(set_it: Callable[[Any], None], value: Any) -> None:
        def apply() -> None:
            if not done.cancelled():
                set_it(value)
            elif isinstance(value, Model):
                value.close()  # nobody is waiting for it any more

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:  # loop closed
            if isinstance(value, Model):
                value.close()

    handle = load_async(
        model,
        on_progress=progress,
        on_done=lambda m: finish(done.set_result, m),
        on_error=lambda e: finish(done.set_exception, e),
        **load_kwargs,
    )
    try:
        return await done
    except asyncio.CancelledError:
        handle.cancel()
        raise
