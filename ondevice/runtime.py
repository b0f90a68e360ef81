"""`Model`: a loaded GGUF model that owns its llama.cpp context and KV cache, and streams text.

`Model.stream()` is the single streaming primitive (its loop is `ondevice.generation`):
`generate()`, chat, the REPL and the benchmarks all loop over it. It evaluates only the prompt
tokens that are not already in the KV cache and samples with llama.cpp's native sampler chain.

The Model is the only owner of the engine: tools that need raw evaluation (benchmarks, the
tuner, quality measurements) use `Model.raw()`, which hands out the engine under the model's
lock and forgets the cached prefix on exit, or `Model.score()` for every position's logits. So
the record of what the cache holds can't go stale by convention.

One `Model` is safe to share between threads: calls are serialized by a lock (llama.cpp's
context is not thread-safe). `cancel()` or a `threading.Event` stops a generation within one
token and leaves the model usable; after `close()` returns nothing runs any more, and callers
still waiting for the model get `ModelClosed`. Load one with `ondevice.load()` (ondevice.loader).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ondevice import app, batch, constrain, conversation, speculate
from ondevice._native.engine import Batch, Engine, EngineConfig, Sampler
from ondevice._native.grammar import Grammar
from ondevice._native.log import offloaded_layers
from ondevice.draft import Drafter
from ondevice.errors import ContextOverflow, ModelClosed, UsageError
from ondevice.generation import Request, TokenCache, Trigger, stream_tokens
from ondevice.gguf_header import GGUFHeader
from ondevice.results import Chunk, Result
from ondevice.settings import MAX_TOKENS, sampling_params
from ondevice.stats import Stats


class Model:
    """A loaded GGUF model. Create with `ondevice.load()`; use as a context manager.

    Attributes:
      path      the GGUF file it runs.
      metadata  the GGUF key/values (validated before llama.cpp saw the file).
      header    the parsed header (tensor list, sizes).
      n_ctx     context length in tokens.
      threads   threads used for generation.
      device    where it runs, for people: "CPU", or a GPU's name and how many layers it holds.
      placement the backend family and device chosen (ondevice.backends.Placement).
      settings  the load settings in force; settings_source says where each came from
                (argument / tuned / default / device).
    """

    def __init__(
        self,
        path: Path,
        header: GGUFHeader,
        eng: Engine,
        placement: Any,
        load_s: float,
        threads: int,
        kv_bytes: int,
    ) -> None:
        self.path = path
        self.header = header
        self.metadata: dict[str, Any] = header.metadata
        self._engine: Engine | None = eng
        self.placement = placement
        self.device: str = placement.device
        self.load_s = load_s
        self.threads = threads
        self.n_ctx = eng.n_ctx
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {}
        self.settings_source: dict[str, str] = {}
        # Facts read once, so they can be asked without the lock while a generation runs.
        self.n_vocab: int = eng.n_vocab
        self.bos: int = eng.bos
        self.eos: int = eng.eos
        self.add_bos: bool = eng.add_bos
        self.description: str = eng.describe()
        self.load_log: list[str] = list(eng.load_log)
        self.offloaded: tuple[int, int] | None = offloaded_layers(self.load_log)
        self._kv_bytes = kv_bytes
        self._lock = threading.Lock()
        # Tokenizing reads only the vocabulary, which llama.cpp never changes: it needs no turn
        # at the model (so an HTTP thread can tokenize while the scheduler decodes), only that
        # close() doesn't free the vocabulary under it.
        self._vocab_lock = threading.Lock()
        self._owner: int | None = None
        self._cancel = threading.Event()
        self._closing = False
        self._close_pending = False
        self._cache = TokenCache()
        self.last_stats: Stats | None = None
        self.speculative = "auto"  # the load's default for stream(speculative=None)
        self._policies: dict[str, speculate.Policy] = {}
        self._spec_batch: Batch | None = None
        # The draft model of speculative="draft" (load(speculative="x.gguf")), owned by this one.
        self.draft: Model | None = None
        self._drafter: Drafter | None = None

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's model and context. Idempotent.

        A generation in progress is cancelled first; callers waiting for the model get
        ModelClosed. If a stream is suspended in the middle (its consumer stopped iterating
        without closing it), the memory is freed when that stream is closed or garbage-
        collected, so close() never blocks on it for more than a moment.
        """
        if self.draft is not None:
            self.draft.close()
        if self._engine is None:
            return
        self._closing = True
        self._cancel.set()
        if self._lock.acquire(timeout=2.0):
            try:
                self._free()
            finally:
                self._lock.release()
        else:
            self._close_pending = True

    def _free(self) -> None:
        with self._vocab_lock:  # no tokenization may be running on another thread
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    @property
    def closed(self) -> bool:
        return self._engine is None or self._closing

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
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}, device={self.device!r}"
        return f"<ondevice.Model {self.path.name} {state}>"

    # --- facts ----------------------------------------------------------------------------
    @property
    def model_bytes(self) -> int:
        return self.header.tensor_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache allocated for the whole context (all layers, K and V)."""
        return self._kv_bytes

    @property
    def architecture(self) -> str:
        return self.header.architecture

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def config(self) -> EngineConfig:
        """A copy of the engine's configuration as it was loaded (flash_attn, use_extra_bufts
        for repacking, the KV types, threads, n_ubatch, ...)."""
        return replace(self._live_engine().config)

    @property
    def backend(self) -> str:
        """Deprecated: the same display string as `device` (`placement.backend` is the
        backend family)."""
        warnings.warn("Model.backend is now Model.device", DeprecationWarning, stacklevel=2)
        return self.device

    @property
    def busy(self) -> bool:
        """Whether a generation (or a tool with `raw()`) holds the model right now."""
        return self._lock.locked()

    @property
    def kv_tokens(self) -> int:
        """Positions of the context the model's record says are in use (lock-free: a moment's
        value while a generation runs)."""
        return len(self._cache.tokens)

    def kv_used(self) -> int:
        """Positions in the KV cache, as llama.cpp counts them."""
        with self.lock():
            return self._live_engine().kv_used()

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise ModelClosed("the model is closed", hint="load it again with ondevice.load()")
        return self._engine

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(
        self, text: str | bytes, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text` (a str, or UTF-8 bytes). `parse_special` turns written control
        tokens (`<|im_start|>`) into their ids; pass False for untrusted text."""
        data = _utf8(text)
        with self._vocab():
            return self._live_engine().tokenize(
                data, add_special=add_special, parse_special=parse_special
            )

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of token ids; UsageError for an id outside the vocabulary."""
        with self._vocab():
            return self._live_engine().detokenize(list(tokens), special=special)

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (end of text, end of turn...)."""
        with self._vocab():
            eng = self._live_engine()
            eng.check_tokens([token])
            return eng.is_eog(token)

    def token_bytes(self, tokens: Sequence[int], *, special: bool = True) -> list[bytes]:
        """Each token's bytes (a token may hold part of a UTF-8 character)."""
        with self._vocab():
            eng = self._live_engine()
            eng.check_tokens(tokens)
            return [self._piece(eng, t, special) for t in tokens]

    @contextlib.contextmanager
    def _vocab(self) -> Iterator[None]:
        with self._vocab_lock:
            if self.closed:
                raise ModelClosed("the model is closed", hint="load it again with ondevice.load()")
            yield

    @staticmethod
    def _piece(eng: Engine, token: int, special: bool) -> bytes:
        # The engine's shared piece buffer belongs to the generating thread: use a fresh one.
        return eng.piece_copy(token, special)

    # --- concurrency and the KV cache ----------------------------------------------------
    def lock(self) -> _ModelLock:
        """Context manager that holds the model for exclusive use by this thread."""
        return _ModelLock(self)

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread) within one token."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the KV cache (the next call evaluates its whole prompt)."""
        with self.lock():
            self._cache.invalidate(self._live_engine())

    @contextlib.contextmanager
    def raw(self) -> Iterator[Engine]:
        """The low-level engine for tools that drive llama.cpp themselves (benchmarks, the
        tuner, quality measurements), under the model's lock. The KV cache is cleared on exit
        and the model forgets what it held, so the next stream() evaluates its whole prompt."""
        with self.lock():
            eng = self._live_engine()
            try:
                yield eng
            finally:
                self._cache.invalidate(eng if self._engine is not None else None)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Every position's logits ([len(tokens), n_vocab], float32) for `tokens` evaluated from
        an empty cache (perplexity, KL divergence, agreement checks)."""
        with self.raw() as eng:
            eng.check_tokens(tokens)
            eng.kv_clear()
            return eng.decode_all_logits(list(tokens))

    @property
    def engine(self) -> Engine:
        """Deprecated: use `raw()` (or `score()`). Handing the engine out forgets the cached
        prefix, since whoever uses it may change the cache."""
        warnings.warn(
            "Model.engine is deprecated; use `with model.raw() as engine:`",
            DeprecationWarning,
            stacklevel=2,
        )
        eng = self._live_engine()
        self._cache.tokens.clear()
        eng.kv_clear()
        return eng

    # --- generation -----------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        add_special: bool = True,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        speculative: str | None = None,
        lazy_grammar: tuple[str, str] | None = None,
        **sampling: Any,
    ) -> Iterator[Chunk]:
        """Stream the completion of `prompt` (text, or token ids) as `Chunk`s.

        Sampling keywords (ondevice.settings.SAMPLING): temperature (<= 0: greedy), top_k,
        top_p, min_p, repeat_penalty, repeat_last_n, seed. `stop` strings end the reply and
        are not returned; `max_tokens` caps the reply (it also ends when the context is full:
        finish_reason "length"). `cancel` (or `Model.cancel()`) ends it with finish_reason
        "cancelled". Raises ContextOverflow when the prompt itself does not fit the context.

        Constrained output (ondevice.constrain), at most one of: `grammar` (GBNF text),
        `json_schema` (a dict), `response_format` in OpenAI's shape ({"type": "json_object"},
        {"type": "json_schema", "json_schema": {"schema": ...}}). The reply then always matches;
        `Result.json` parses it (and refuses a reply cut by max_tokens). A bad grammar or
        schema is a UsageError before any token is generated.

        `speculative` ("auto", "lookup", "off"; default: the load's) drafts tokens by prompt
        lookup and verifies them in one batched decode (ondevice.speculate): the same text,
        faster where the reply repeats spans of the prompt. "draft" drafts with the draft
        model the load was given (load(speculative="x.gguf"), ondevice.draft) while that
        pays, "draft-always" at every step. Not combined with a grammar.

        `lazy_grammar=(trigger, gbnf)`: free text until `trigger` appears (tool calls: the
        format's opening tag), then the GBNF, which starts with the trigger, constrains the
        rest; a trigger that isn't followed by a valid start is left as text.
        """
        params = sampling_params(sampling)
        constraint = constrain.from_request(grammar, json_schema, response_format)
        spec = self._speculation(self.speculative if speculative is None else speculative)
        if lazy_grammar is not None:
            if constraint is not None:
                raise UsageError("lazy_grammar can't be combined with another constraint")
            trigger, gbnf = lazy_grammar
            constraint = constrain.Constraint(gbnf, "lazy", trigger=trigger)
        max_tokens = MAX_TOKENS.validate(max_tokens)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        if isinstance(prompt, str):
            prompt = _utf8(prompt).decode("utf-8")
        return self._stream(
            prompt, max_tokens, stops, cancel, add_special, params, constraint, spec
        )

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

    def generate_many(self, prompts: Sequence[str | Sequence[int]], **kwargs: Any) -> list[Result]:
        """A reply to each prompt, generated together: every step is one llama_decode for all
        of them (continuous batching, `ondevice.batch`), on the `parallel` sequences the model
        was loaded with (`ondevice.load(..., parallel=N)`; with 1, one after another).
        Keywords as for `stream()` (max_tokens, stop, sampling, grammar/json_schema)."""
        return batch.generate_many(self, prompts, **kwargs)

    def _stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int,
        stops: list[str],
        cancel: threading.Event | None,
        add_special: bool,
        params: Any,
        constraint: constrain.Constraint | None = None,
        spec: speculate.Policy | None = None,
    ) -> Iterator[Chunk]:
        t_call = time.perf_counter()
        with self.lock():
            eng = self._live_engine()
            self._cancel.clear()
            own = self._cancel
            cancelled = own.is_set if cancel is None else (lambda: cancel.is_set() or own.is_set())
            tokens = self._prompt_tokens(eng, prompt, add_special)
            st = Stats(
                prompt_tokens=len(tokens),
                load_s=self.load_s,
                model_bytes=self.model_bytes,
                kv_bytes=self._kv_bytes,
                backend=self.device,
                threads=self.threads,
                n_ctx=eng.n_ctx,
                notes=list(self.notes),
            )
            sampler = Sampler(params, self.n_vocab)
            req = Request(tokens, sampler, max_tokens, stops, cancelled)
            if spec is not None and constraint is None and req.trigger is None:
                if self._spec_batch is None:
                    self._spec_batch = Batch(speculate.DRAFT_LENGTHS[-1] + 1)
                req.speculation, req.batch = spec, self._spec_batch
                if spec.mode in speculate.DRAFT_MODES:
                    req.drafter = self._drafter
            if constraint is not None and constraint.trigger:
                grammar = Grammar(eng.vocab, self.n_vocab, constraint.gbnf)
                req.trigger = Trigger(constraint.trigger, grammar, constraint.trigger_end)
                st.constraint = "lazy"
            elif constraint is not None:
                req.grammar = self._grammar(eng, constraint, st)
                req.grammar_first = params.repeat_penalty != 1.0
            try:
                for chunk in stream_tokens(eng, self._cache, req, st, t_call):
                    if chunk.finish_reason is not None:
                        final = chunk
                        self.last_stats = st
                        break
                    yield chunk
            finally:
                sampler.close()
                if req.grammar is not None:
                    req.grammar.close()
                if req.trigger is not None:
                    req.trigger.grammar.close()
        # The last chunk is handed out after the model is released, so a consumer that stops
        # iterating once it has the stats doesn't keep the model locked.
        yield final

    def _speculation(self, mode: Any) -> speculate.Policy | None:
        """The drafting policy for `mode` (kept across calls: it carries the measured decode
        costs and recent acceptance), or None for "off". "draft" (or the draft model's own
        path) needs a model loaded with one."""
        if self.draft is not None and mode in (str(self.draft.path), self.draft.path):
            mode = speculate.DRAFT
        if mode in speculate.DRAFT_MODES and self._drafter is None:
            raise UsageError(
                f"speculative={mode!r} needs a draft model: load(model, speculative='draft.gguf')"
            )
        if mode not in (*speculate.MODES, *speculate.DRAFT_MODES):
            extra = ", draft, draft-always" if self.draft is not None else ""
            raise UsageError(
                f"speculative must be one of {', '.join(speculate.MODES)}{extra}, not {mode!r}",
                hint="a draft model is chosen when loading: load(model, speculative='x.gguf')",
            )
        if mode == "off":
            return None
        if mode not in self._policies:
            self._policies[mode] = speculate.Policy(mode)
        return self._policies[mode]

    def _grammar(self, eng: Engine, constraint: constrain.Constraint, st: Stats) -> Grammar:
        st.constraint = constraint.kind
        st.grammar_compile_s = constraint.compile_s
        grammar = Grammar(eng.vocab, self.n_vocab, constraint.gbnf)
        if not grammar.can_start():
            grammar.close()
            raise UsageError("the grammar can't match anything: it allows no first token")
        return grammar

    def _prompt_tokens(self, eng: Engine, prompt: str | Sequence[int], add_special: bool):
        if isinstance(prompt, str):
            tokens = eng.tokenize(prompt, add_special=add_special)
            if not tokens:
                why = "the prompt is empty" if not prompt else "the prompt tokenizes to nothing"
                raise UsageError(why)
        else:
            tokens = list(prompt)
            if not tokens:
                raise UsageError("the prompt is empty")
            eng.check_tokens(tokens)
        if len(tokens) >= eng.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens but the context holds {eng.n_ctx}",
                hint="shorten the prompt or load the model with a larger n_ctx (--ctx)",
            )
        return tokens

    # --- conveniences over the layers built on the primitive ---------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Iterator[Chunk]:
        """Stream the reply to OpenAI-style messages in the model's chat format, like stream().

        Keywords: chat_format, tools, documents, allow_control_tokens, max_tokens, stop, cancel
        and the sampling parameters (see `ondevice.conversation.chat`)."""
        return conversation.chat(self, messages, **kwargs)

    def conversation(self, system: str | None = None, **kwargs: Any) -> conversation.Conversation:
        """A `Conversation` that keeps the history and reuses the KV cache between turns.

        Keywords: chat_format, tools, documents, allow_control_tokens, max_tokens, stop and
        sampling defaults for every turn (see `ondevice.conversation.Conversation`)."""
        return conversation.Conversation(self, system, **kwargs)

    def astream(self, prompt: str | Sequence[int], **kwargs: Any) -> app.AsyncStream:
        """`stream()` as an async iterator run on a worker thread (`ondevice.app.astream`);
        cancelling the consuming task stops the generation within one token."""
        return app.astream(self, prompt, **kwargs)

    def start(self, prompt: str | Sequence[int], **kwargs: Any) -> app.GenerationHandle:
        """Stream on a worker thread with callbacks on_token/on_done/on_error; returns a
        Handle (cancel(), wait(timeout)) at once (`ondevice.app.start`)."""
        return app.start(self, prompt, **kwargs)

    def live_stats(self) -> app.LiveStats:
        """Live numbers for a status bar (last reply's Stats, RSS now, model and KV bytes),
        cheap and lock-free even while a generation runs (`ondevice.app.live_stats`)."""
        return app.live_stats(self)

    def stats(self) -> app.LiveStats:
        """Deprecated name of `live_stats()` (it returns LiveStats, not Stats)."""
        warnings.warn("Model.stats() is now Model.live_stats()", DeprecationWarning, stacklevel=2)
        return self.live_stats()


class _ModelLock:
    """Serializes use of one Model across threads; refuses re-entry from the same thread
    (a stream still open while another call starts would otherwise deadlock), and use after
    close() (a caller that was waiting when close() ran included)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __enter__(self) -> Model:
        m = self.model
        if m._owner == threading.get_ident():
            raise UsageError(
                "this model is already generating in this thread",
                hint="finish or close the open stream before starting another",
            )
        if m.closed:
            raise ModelClosed("the model is closed", hint="load it again with ondevice.load()")
        m._lock.acquire()
        if m.closed:
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


def _utf8(text: str | bytes) -> bytes:
    """Text as UTF-8 bytes; a string with lone surrogates (from a bad decode) is a UsageError,
    not a UnicodeEncodeError traceback."""
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise UsageError(f"expected text, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"the text has an invalid character at position {exc.start} (a lone surrogate)",
            hint="decode input with errors='replace'",
        ) from None
