"""Continuous batching: many generations on one model, every step one `llama_decode` holding the
next token of every generating sequence plus a bounded chunk of any newly admitted prompt.

    with ondevice.load("demo", parallel=4) as model:
        results = model.generate_many(["Hi", "Tell me a joke", "2+2="], max_tokens=64)

    sched = Scheduler(model)                 # what `ondevice serve` runs on
    job = sched.submit(tokens, max_tokens=128, on_chunk=callback)
    sched.cancel(job)                        # frees its slot (or queue place) at the next step
    async for chunk in sched.submit_async(tokens, max_tokens=128):   # from asyncio
        ...

A `Scheduler` owns the model's engine (through `Model.raw()`) on one thread for its whole life.
The context holds `parallel` sequences (the load's `parallel=`), each a *slot* with its own
share of the KV cache, native sampler chain, grammar, detokenizer and stop strings. A new job
goes to the free slot whose cached tokens share the longest prefix with its prompt, so a
conversation continued by a client evaluates only its new tokens. Prompts are evaluated in
chunks (`prefill_chunk` tokens a step while others generate), so a long prompt never stalls
the other streams. The per-token work per sequence is what `Model.stream` does for one: one
native sample, one piece, the stop check; the batch is built in place. While only one job is
running, its step also carries a prompt-lookup draft verified in the same decode (the load's
`speculative` setting; `ondevice.speculate` decides when it pays): one client of a server gets
what `Model.stream` gives it, and several share each pass over the weights instead.

While the scheduler holds the model, other threads still tokenize with `Model.tokenize` (it
needs only the vocabulary, not a turn at the model). `submit_async` hands a job's chunks to
an asyncio loop (one `call_soon_threadsafe` per burst of chunks, not per token). A job may have
a wall-time limit (`time_limit_s`): one that runs out while generating ends with finish_reason
"length" and a note; one that runs out while still queued fails with `QueueTimeout`. Cancelled
and expired jobs leave the queue at the next step, so they never hold a queue place.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ondevice import constrain, generation, speculate
from ondevice._native.engine import Batch, Engine, Sampler
from ondevice._native.grammar import Grammar
from ondevice.errors import ContextOverflow, ModelClosed, OndeviceError, UsageError
from ondevice.generation import Trigger
from ondevice.results import Chunk, Result
from ondevice.settings import MAX_TOKENS, sampling_params
from ondevice.stats import Stats

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64
PREFILL_CHUNK = 128  # prompt tokens per step while other sequences generate


class QueueFull(OndeviceError):
    """Every slot is busy and the queue is at its bound; try again later."""


class QueueTimeout(QueueFull):
    """The job's time limit ran out before a slot was free for it; try again later."""


@dataclass
class Job:
    """One generation request and what it has produced so far (read by its submitter)."""

    id: int
    tokens: list[int]
    max_tokens: int
    stops: list[str]
    params: Any
    constraint: constrain.Constraint | None
    on_chunk: Callable[[Chunk], Any] | None
    on_done: Callable[[Job], Any] | None = None  # called once, on the scheduler thread, when done
    lazy: tuple[str, str] | None = None  # (trigger, GBNF): a grammar from the trigger on
    deadline: float | None = None  # perf_counter() time its time limit runs out
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    result: Result | None = None
    error: BaseException | None = None
    slot: int | None = None  # which slot ran it (for tests and /metrics)

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the job is done; its Result, or its error raised."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"job {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class AsyncJob:
    """A Job seen from an asyncio loop: `async for chunk in ajob` (ends after the chunk with a
    finish_reason; raises the job's error), `ajob.cancel()`. Chunks cross from the scheduler
    thread in a deque; the loop is woken with one `call_soon_threadsafe` per burst."""

    def __init__(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        self._sched, self._loop = sched, loop
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._ready = asyncio.Event()
        self._poked = False
        self.job: Job | None = None

    def _on_chunk(self, chunk: Chunk) -> None:  # the scheduler thread
        self._chunks.append(chunk)
        self._poke()

    def _on_done(self, job: Job) -> None:  # the scheduler thread
        self._poke()

    def _poke(self) -> None:
        if self._poked:
            return  # a wake-up is on its way; it will find this chunk too
        self._poked = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody will read this job
            if self.job is not None:
                self.job.cancel.set()

    def _wake(self) -> None:
        self._poked = False
        self._ready.set()

    def cancel(self) -> None:
        """Stop the job (its slot or queue place is freed at the next step)."""
        if self.job is not None:
            self._sched.cancel(self.job)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        job = self.job
        assert job is not None
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                yield chunk
                if chunk.finish_reason is not None:
                    return
            if job.done.is_set() and not self._chunks:
                if job.error is not None:
                    raise job.error
                return
            await self._ready.wait()
            self._ready.clear()


@dataclass
class _Slot:
    """A sequence of the context and the job it runs."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens of this seq in the KV cache
    job: Job | None = None
    sampler: Sampler | None = None
    grammar: Grammar | None = None
    trigger: Trigger | None = None
    prefill: int = 0  # index in job.tokens of the next prompt token to evaluate
    next_token: int | None = None  # sampled, to be evaluated next step
    index: int = -1  # this step: the batch index of the token whose logits we sample
    decoder: Any = None
    pending: str = ""
    parts: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    stats: Stats | None = None
    t_prefill: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    ngrams: speculate.NgramIndex | None = None  # prompt and reply, for drafting (unconstrained)
    draft: list[int] = field(default_factory=list)  # this step: drafted after next_token
    draft_n: int = 0  # the length of the n-gram the draft followed
    shadow: tuple[int, int] | None = None  # an unverified draft's first token, and its n

    @property
    def free(self) -> bool:
        return self.job is None


class Scheduler:
    """Runs submitted jobs on `model`, `model`'s context holding `parallel` sequences.
    `speculative` (default: the model's load setting): while a single job is running, draft
    by prompt lookup and verify the draft in its step's decode, as `Model.stream` does."""

    def __init__(
        self,
        model: Any,
        *,
        max_queue: int = DEFAULT_QUEUE,
        prefill_chunk: int = PREFILL_CHUNK,
        speculative: str | None = None,
    ) -> None:
        mode = getattr(model, "speculative", "off") if speculative is None else speculative
        drafter = getattr(model, "_drafter", None)
        by_draft = mode in speculate.DRAFT_MODES and drafter is not None
        if mode not in speculate.MODES and not by_draft:
            # before the model is taken: nothing to give back
            extra = ", draft (with a draft model loaded)"
            raise UsageError(f"speculative must be one of {', '.join(speculate.MODES)}{extra}")
        self.model = model
        self._raw = model.raw()
        self.eng: Engine = self._raw.__enter__()  # held until close(): the model is ours
        self.eng.kv_clear()
        self.slots = [_Slot(i) for i in range(self.eng.n_seq_max)]
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.batch = Batch(self.eng.n_batch)
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.counters = collections.Counter()  # requests, prompt/generated tokens, decodes
        # Drafting is for a lone sequence: with several generating, the batch already fills
        # the pass over the weights (llama.cpp measured lookup slowing down at 4+ slots).
        self.spec = speculate.Policy(mode) if mode != "off" else None
        self.drafter = drafter if by_draft else None  # else prompt lookup
        self._drafted_s = 0.0  # what this step's draft model draft took
        self._decode_s = 0.0  # what this step's llama_decode took
        self._thread = threading.Thread(target=self._run, name="ondevice-batch", daemon=True)
        self._thread.start()

    # --- the submitter's side (any thread) --------------------------------------------------
    def submit(
        self,
        tokens: Sequence[int],
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        on_chunk: Callable[[Chunk], Any] | None = None,
        grammar: str | None = None,
        json_schema: Any = None,
        response_format: Any = None,
        lazy_grammar: tuple[str, str] | None = None,
        time_limit_s: float | None = None,
        on_done: Callable[[Job], Any] | None = None,
        **sampling: Any,
    ) -> Job:
        """Queue a generation; returns its Job at once. `on_chunk` is called on the scheduler
        thread with each Chunk (the last one carries finish_reason and Stats), `on_done` once
        with the Job when it is done (also when it failed: `job.error`). `time_limit_s` bounds
        the job's wall time from now (see the module docstring)."""
        if time_limit_s is not None and not (
            isinstance(time_limit_s, (int, float)) and time_limit_s > 0
        ):
            raise UsageError(f"time_limit_s must be a number of seconds > 0, not {time_limit_s!r}")
        params = sampling_params(sampling)
        max_tokens = MAX_TOKENS.validate(max_tokens)
        constraint = constrain.from_request(grammar, json_schema, response_format)
        tokens = list(tokens)
        if not tokens:
            raise UsageError("the prompt is empty")
        self.eng.check_tokens(tokens)
        if len(tokens) >= self.eng.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens but a slot's context holds {self.eng.n_ctx}",
                hint="shorten the prompt or start the server with a larger --ctx",
            )
        stops = [s for s in stop if s]
        job = Job(next(self._ids), tokens, max_tokens, stops, params, constraint, on_chunk, on_done)
        if lazy_grammar is not None:
            if constraint is not None:
                raise UsageError("lazy_grammar can't be combined with another constraint")
            job.lazy = (str(lazy_grammar[0]), str(lazy_grammar[1]))
        if time_limit_s is not None:
            job.deadline = job.t_submit + time_limit_s
        with self._cv:
            if self._closed:
                raise ModelClosed("the scheduler is closed")
            busy = sum(not s.free for s in self.slots)
            waiting = sum(not j.cancel.is_set() for j in self._queue)
            if busy == len(self.slots) and waiting >= self.max_queue:
                raise QueueFull(
                    f"all {len(self.slots)} slots are busy and {len(self._queue)} requests wait",
                    hint="retry in a moment",
                )
            self._queue.append(job)
            self.counters["requests"] += 1
            self._cv.notify()
        return job

    def submit_async(
        self, tokens: Sequence[int], *, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> AsyncJob:
        """`submit()` for asyncio: an AsyncJob whose chunks arrive on `loop` (default: the
        running loop; pass it when calling from a worker thread). Keywords as for submit()."""
        ajob = AsyncJob(self, loop or asyncio.get_running_loop())
        ajob.job = self.submit(tokens, on_chunk=ajob._on_chunk, on_done=ajob._on_done, **kwargs)
        return ajob

    def cancel(self, job: Job) -> None:
        """Stop `job` from any thread: a running job ends with finish_reason "cancelled" at the
        next step, a queued one leaves the queue then."""
        with self._cv:
            job.cancel.set()
            self._cv.notify()

    def metrics(self) -> dict[str, int]:
        """Busy slots, queue length, KV cells in use, and the counters (a moment's values)."""
        with self._cv:
            return {
                "slots": len(self.slots),
                "busy_slots": sum(not s.free for s in self.slots),
                "queue_length": len(self._queue),
                "kv_cells_used": sum(len(s.cached) for s in self.slots),
                **self.counters,
            }

    def close(self) -> None:
        """Cancel everything, stop the thread, give the model back. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            for job in self._queue:
                job.cancel.set()
            for s in self.slots:
                if s.job is not None:
                    s.job.cancel.set()
            self._cv.notify()
        self._thread.join(30)
        self.batch.free()
        self._raw.__exit__(None, None, None)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and all(s.free for s in self.slots):
                    self._cv.wait()
                if self._closed and all(s.free for s in self.slots):
                    break
                self._drop_from_queue()
                self._admit()
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001 - every running job learns of it
                log.exception("batch step failed")
                for s in self.slots:
                    if s.job is not None:
                        self._fail(s, exc)
        for job in self._queue:
            job.error = ModelClosed("the server is shutting down")
            self._done(job)

    def _drop_from_queue(self) -> None:
        """Take cancelled jobs and jobs whose time ran out out of the queue (under the lock)."""
        now = time.perf_counter()
        keep: collections.deque[Job] = collections.deque()
        for job in self._queue:
            if job.cancel.is_set():
                self._finish_unstarted(job)
            elif job.deadline is not None and now >= job.deadline:
                self.counters["timeouts"] += 1
                job.error = QueueTimeout(
                    f"no slot was free within the request's time limit "
                    f"({job.deadline - job.t_submit:g} s)",
                    hint="retry later, or start the server with more --parallel slots",
                )
                self._done(job)
            else:
                keep.append(job)
        self._queue = keep

    def _admit(self) -> None:
        """Queued jobs into free slots (the one sharing the longest prefix first)."""
        while self._queue:
            free = [s for s in self.slots if s.free]
            if not free:
                return
            job = self._queue.popleft()
            if job.cancel.is_set() or self._closed:
                self._finish_unstarted(job)
                continue
            slot = max(free, key=lambda s: generation.common_prefix(s.cached, job.tokens))
            try:
                self._start(slot, job)
            except BaseException as exc:  # noqa: BLE001 - a bad grammar: this job only
                job.error = exc
                self._reset(slot)
                self._done(job)

    def _start(self, slot: _Slot, job: Job) -> None:
        eng = self.eng
        common = generation.common_prefix(slot.cached, job.tokens)
        if common == len(job.tokens):
            common -= 1  # the last prompt token is evaluated again, for its logits
        if common < len(slot.cached) and not eng.kv_keep(common, slot.seq):
            eng.kv_drop(slot.seq)
            common = 0
        del slot.cached[common:]
        slot.job, job.slot = job, slot.seq
        slot.prefill, slot.next_token = common, None
        slot.sampler = Sampler(job.params, eng.n_vocab)
        slot.grammar, slot.trigger = None, None
        if job.constraint is not None:
            slot.grammar = Grammar(eng.vocab, eng.n_vocab, job.constraint.gbnf)
        elif job.lazy is not None:
            text, gbnf = job.lazy
            slot.trigger = Trigger(text, Grammar(eng.vocab, eng.n_vocab, gbnf))
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.pending, slot.parts, slot.new_tokens, slot.generated = "", [], [], []
        free_text = self.spec is not None and slot.grammar is None and slot.trigger is None
        slot.ngrams = speculate.NgramIndex(job.tokens) if free_text else None
        slot.draft, slot.shadow = [], None
        slot.stats = Stats(
            prompt_tokens=len(job.tokens), prompt_eval_tokens=len(job.tokens) - common,
            load_s=self.model.load_s, model_bytes=self.model.model_bytes,
            kv_bytes=self.model.kv_bytes, backend=self.model.device,
            threads=self.model.threads, n_ctx=eng.n_ctx, notes=list(self.model.notes),
        )  # fmt: skip
        if job.constraint is not None:
            slot.stats.constraint = job.constraint.kind
            slot.stats.grammar_compile_s = job.constraint.compile_s
        slot.t_prefill = time.perf_counter()

    def _step(self) -> None:
        """One llama_decode: every generating slot's next token, then prompt chunks."""
        batch, eng = self.batch, self.eng
        batch.clear()
        now = time.perf_counter()
        for s in self.slots:
            s.index = -1
            if s.job is not None and s.job.cancel.is_set():
                self.counters["cancelled"] += 1
                self._end(s, "cancelled")
            elif s.job is not None and s.job.deadline is not None and now >= s.job.deadline:
                self.counters["timeouts"] += 1
                limit = s.job.deadline - s.job.t_submit
                assert s.stats is not None
                s.stats.notes.append(f"the request's time limit ({limit:g} s) ran out")
                self._end(s, "length")
        generating = [s for s in self.slots if s.job is not None and s.next_token is not None]
        for s in generating:
            s.index = batch.add(s.next_token, len(s.cached), s.seq, True)
            s.cached.append(s.next_token)
            s.next_token = None
        solo = self._solo(generating)
        if solo is not None:
            self._add_draft(solo)
        budget = batch.capacity - batch.n
        if generating:
            budget = min(budget, self.prefill_chunk)
        for s in self.slots:
            if s.job is None or s.index >= 0 or budget <= 0:
                continue
            todo = s.job.tokens[s.prefill : s.prefill + budget]
            last = s.prefill + len(todo) == len(s.job.tokens)
            for j, tok in enumerate(todo):
                i = batch.add(tok, len(s.cached), s.seq, last and j == len(todo) - 1)
                s.cached.append(tok)
            s.prefill += len(todo)
            budget -= len(todo)
            if last:
                s.index = i
        if batch.n == 0:
            return
        t0 = time.perf_counter()
        eng.decode_batch(batch)
        self._decode_s = dt = time.perf_counter() - t0
        if solo is not None:  # a lone sequence's decode of batch.n tokens: the policy's costs
            assert self.spec is not None
            self.spec.observe_decode(batch.n, dt)
            if self._drafted_s and not solo.draft:  # the draft model declined to draft
                self.spec.observe_step(1, self._drafted_s + dt)
        self.counters["decode_calls"] += 1
        for s in self.slots:
            if s.job is not None and s.index >= 0:
                if s.draft:
                    self._verify(s)
                else:
                    self._sampled(s)

    def _solo(self, generating: list[_Slot]) -> _Slot | None:
        """The slot to draft for: the only one with a job, generating without a grammar."""
        if self.spec is None or len(generating) != 1 or generating[0].ngrams is None:
            return None
        if any(s.job is not None for s in self.slots if s is not generating[0]):
            return None
        return generating[0]

    def _add_draft(self, s: _Slot) -> None:
        """Append a prompt-lookup draft after s's next token, as much as pays (ondevice.speculate);
        without one, remember the lookup's first token as a shadow draft."""
        assert self.spec is not None and s.ngrams is not None and s.job is not None
        room = min(self.eng.n_ctx - len(s.cached) - 2, self.batch.capacity - self.batch.n)
        if s.job.max_tokens >= 0:
            room = min(room, s.job.max_tokens - len(s.generated) - 1)
        self._drafted_s = 0.0
        if self.drafter is not None:
            self._add_model_draft(s, room)
            return
        lookup, n = s.ngrams.lookup(speculate.DRAFT_LENGTHS[-1])
        k = self.spec.length(min(room, len(lookup)), n)
        if k <= 0:
            s.shadow = (lookup[0], n) if lookup else None
            return
        s.draft, s.draft_n, s.shadow = lookup[:k], n, None
        for d in s.draft:
            self.batch.add(d, len(s.cached), s.seq, True)
            s.cached.append(d)

    def _add_model_draft(self, s: _Slot, room: int) -> None:
        """The draft model's draft after s's tokens (ondevice.draft), as long as it pays."""
        spec, drafter = self.spec, self.drafter
        assert spec is not None and drafter is not None
        k = spec.length(min(room, speculate.DRAFT_LENGTHS[-1]), speculate.DRAFT_BUCKET)
        if k <= 0:
            return
        draft, self._drafted_s = drafter.propose(s.cached, k, spec, owner=s.job)
        spec.observe_drafting(self._drafted_s - drafter.catch_up_s, len(draft))
        s.draft, s.draft_n, s.shadow = draft, speculate.DRAFT_BUCKET, None
        for d in draft:
            self.batch.add(d, len(s.cached), s.seq, True)
            s.cached.append(d)

    def _sampled(self, s: _Slot) -> None:
        """Sample this slot's next token from its logits at s.index, and hand out text."""
        eng, job, st = self.eng, s.job, s.stats
        assert job is not None and st is not None and s.sampler is not None
        if not s.generated:
            now = time.perf_counter()
            st.prompt_tps = st.prompt_eval_tokens / max(now - s.t_prefill, 1e-9)
            self.counters["prompt_tokens"] += st.prompt_eval_tokens
            s.sampler.accept(job.tokens)
        if s.grammar is None:
            tok = eng.sample(s.sampler, s.index)
        else:
            tok = self._constrained(s)
        if s.shadow is not None:  # would the lookup we didn't verify have been accepted?
            assert self.spec is not None
            self.spec.observe_shadow(tok == s.shadow[0], s.shadow[1])
            s.shadow = None
        self._take(s, tok)

    def _verify(self, s: _Slot) -> None:
        """Sample the pending token's position and each drafted one's in order while the
        samples equal the draft (llama.cpp's sample-and-accept), then drop the rejected rest
        of the draft from the slot's KV cache."""
        draft, n, base = s.draft, s.draft_n, s.index
        s.draft = []
        st = s.stats
        assert self.spec is not None and st is not None
        st.drafted_tokens += len(draft)
        self.counters["drafted_tokens"] += len(draft)
        accepted, rejected = 0, False
        for i in range(len(draft) + 1):
            tok = self.eng.sample(s.sampler, base + i)
            if i < len(draft) and tok == draft[i]:
                accepted += 1
                st.accepted_tokens += 1
                if not self._take(s, tok):
                    break  # the reply ended on it
                s.next_token = None  # it is in the KV cache already: sample the next one
                continue
            rejected = i < len(draft)
            self._take(s, tok)  # the correction, or the token after a fully accepted draft
            break
        self.counters["accepted_tokens"] += accepted
        self.spec.observe_draft(len(draft), accepted, n, rejected)
        keep = len(s.cached) - len(draft) + accepted
        del s.cached[keep:]
        if not self.eng.kv_keep(keep, s.seq):
            self.eng.kv_drop(s.seq)
            s.cached.clear()
            if s.job is not None:  # can't happen for a tail; stop rather than run on bad KV
                self._fail(s, OndeviceError("llama.cpp could not drop a rejected draft"))
        if self.drafter is not None:
            self.spec.observe_confidence(self.drafter.buckets, accepted, rejected)
            self.spec.observe_step(accepted + 1, self._drafted_s + self._decode_s)
            self.drafter.keep(len(s.cached))

    def _take(self, s: _Slot, tok: int) -> bool:
        """A sampled token into the slot's reply; False when it ended the reply."""
        eng, job, st = self.eng, s.job, s.stats
        assert job is not None and st is not None
        s.t_last = time.perf_counter()
        if not s.generated:
            s.t_first = s.t_last
            st.ttft_s = s.t_first - job.t_submit
        s.generated.append(tok)
        self.counters["generated_tokens"] += 1
        if eng.is_eog(tok):
            self._end(s, "stop")
            return False
        if s.trigger is not None:
            s.trigger.seen(eng, s, tok)  # sets s.grammar when a call starts
        if s.ngrams is not None:
            s.ngrams.append(tok)
        s.new_tokens.append(tok)
        s.pending += s.decoder.decode(eng.piece(tok))
        if self._emit_text(s):
            self._end(s, "stop")
            return False
        if len(s.generated) >= job.max_tokens >= 0 or len(s.cached) + 1 >= eng.n_ctx:
            self._end(s, "length")
            return False
        s.next_token = tok
        return True

    def _constrained(self, s: _Slot) -> int:
        eng, grammar, st = self.eng, s.grammar, s.stats
        assert grammar is not None and s.sampler is not None and st is not None
        tok = eng.sample(s.sampler, s.index)
        if not grammar.allows(tok):
            st.grammar_resamples += 1
            tok = grammar.resample(eng.ctx, s.sampler._ptr, s.index)
        if not eng.is_eog(tok):
            grammar.accept(tok)
        return tok

    def _emit_text(self, s: _Slot) -> bool:
        """Hand out the text that can't start a stop string; True when a stop string ended."""
        job = s.job
        assert job is not None
        if job.stops:
            cut = generation.find_stop(s.pending, job.stops)
            if cut is not None:
                s.pending = s.pending[:cut]
                return True
            hold = max(len(x) for x in job.stops) - 1
            safe = generation.safe_prefix(s.pending, job.stops, hold)
        else:
            safe = len(s.pending)
        if safe:
            chunk = Chunk(s.pending[:safe], tuple(s.new_tokens))
            s.parts.append(chunk.text)
            s.pending, s.new_tokens = s.pending[safe:], []
            self._deliver(job, chunk)
        return False

    def _end(self, s: _Slot, reason: str) -> None:
        job, st = s.job, s.stats
        assert job is not None and st is not None
        if s.decoder is not None:
            s.pending += s.decoder.decode(b"", final=True)
        n = len(s.generated)
        if reason == "length" and n < job.max_tokens and job.max_tokens >= 0:
            st.notes.append("the context is full")
        st.completion_tokens = n
        if n > 1 and s.t_last > s.t_first:
            st.generation_tps = (n - 1) / (s.t_last - s.t_first)
        st.finish_reason = reason
        generation.finish(st, job.t_submit)
        final = Chunk(s.pending, tuple(s.new_tokens), reason, st)
        s.parts.append(s.pending)
        job.result = Result("".join(s.parts), list(s.generated), st)
        self._deliver(job, final)
        self._reset(s)
        self._done(job)

    def _fail(self, s: _Slot, exc: BaseException) -> None:
        job = s.job
        assert job is not None
        job.error = exc
        self.eng.kv_drop(s.seq)
        s.cached = []
        self._reset(s)
        self._done(job)

    def _reset(self, s: _Slot) -> None:
        if s.sampler is not None:
            s.sampler.close()
        if s.trigger is not None:
            s.trigger.grammar.close()
        elif s.grammar is not None:
            s.grammar.close()
        s.job, s.sampler, s.grammar, s.next_token, s.index = None, None, None, None, -1
        s.trigger = None

    def _finish_unstarted(self, job: Job) -> None:
        self.counters["cancelled"] += 1
        st = Stats(finish_reason="cancelled", prompt_tokens=len(job.tokens))
        job.result = Result("", [], st)
        self._deliver(job, Chunk("", (), "cancelled", st))
        self._done(job)

    def _done(self, job: Job) -> None:
        job.done.set()
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the others
                log.exception("on_done callback of job %d failed", job.id)

    def _deliver(self, job: Job, chunk: Chunk) -> None:
        if job.on_chunk is None:
            return
        try:
            job.on_chunk(chunk)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the others
            log.exception("on_chunk callback of job %d failed", job.id)
            job.cancel.set()


def generate_many(
    model: Any, prompts: Sequence[str | Sequence[int]], **kwargs: Any
) -> list[Result]:
    """Generate a reply for each prompt, batched on the model's `parallel` sequences (one
    llama_decode a step for all of them); results in the prompts' order."""
    tokens = [model.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
    with Scheduler(model, max_queue=max(len(tokens), 1)) as sched:
        jobs = [sched.submit(t, **kwargs) for t in tokens]
        return [job.wait() for job in jobs]
