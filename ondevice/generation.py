"""The streaming primitive's inner loop: evaluate what the KV cache lacks of a prompt, then sample,
detokenize, check stop strings and evaluate, one token per turn, yielding `Chunk`s.

`Model.stream()` holds the model's lock and calls `stream_tokens()`; everything that generates
text (generate, chat, the REPL, the app helpers, bench's end-to-end test) goes through it.

KV reuse: a `TokenCache` records which tokens sequence 0 of the KV cache holds, in order. A prompt
that shares a prefix with them evaluates only the rest (the last prompt token is always
evaluated, for its logits). Whoever changes the cache behind the record must `invalidate()` it;
`Model.raw()` does that for the tools that drive the engine themselves.

Stop strings: text that could be the start of a stop string is held back, so no partial stop
string ever reaches the caller, and nothing after a stop string does.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ondevice import speculate, stats
from ondevice._native.engine import Batch, Engine, Sampler
from ondevice._native.grammar import Grammar
from ondevice.draft import Drafter
from ondevice.results import Chunk
from ondevice.stats import Stats


@dataclass
class TokenCache:
    """The token ids whose keys and values are in the KV cache (sequence 0), in order."""

    tokens: list[int] = field(default_factory=list)

    def reuse(self, eng: Engine, prompt: Sequence[int]) -> int:
        """Trim the cache to the longest prefix it shares with `prompt` (keeping at least the
        last prompt token to evaluate); returns how many prompt tokens are already cached."""
        common = common_prefix(self.tokens, prompt)
        if common == len(prompt):
            common -= 1  # the last prompt token must be evaluated to get its logits
        if common < len(self.tokens):
            if not eng.kv_keep(common):
                eng.kv_clear()
                common = 0
            del self.tokens[common:]
        return common

    def invalidate(self, eng: Engine | None) -> None:
        """Forget everything (and clear the engine's cache, which may hold anything now)."""
        if eng is not None:
            eng.kv_clear()
        self.tokens.clear()


@dataclass
class Trigger:
    """A lazy grammar: generation is free until `text` appears (its tokens starting at a token
    boundary); those tokens are replayed into `grammar`, which then constrains what follows,
    until `end` appears (then generation is free again) or the reply ends."""

    text: str
    grammar: Grammar
    end: str = ""
    recent: list[tuple[int, str]] = field(default_factory=list)  # (token, text) since a call
    active: bool = False

    def seen(self, eng: Engine, req: Request, tok: int) -> None:
        """After each token of the reply: switch the grammar on or off."""
        piece = eng.piece(tok, True).decode("utf-8", errors="replace")
        self.recent.append((tok, piece))
        if self.active:
            if self.end and self.end in "".join(p for _, p in self.recent[-8:]):
                req.grammar, self.active, self.recent = None, False, []
            return
        text = "".join(p for _, p in self.recent)
        start = text.find(self.text)
        if start < 0:
            del self.recent[: max(0, len(self.recent) - 16)]
            return
        self._activate(eng, req, start)

    def _activate(self, eng: Engine, req: Request, start: int) -> None:
        pos, i = 0, 0
        while i < len(self.recent) and pos < start:
            pos += len(self.recent[i][1])
            i += 1
        replay = [t for t, _ in self.recent[i:]]
        self.recent = self.recent[i:]
        if pos != start or not all(self._fits(t) for t in replay):
            self.recent = []  # not at a token boundary, or not a call after all: stay free
            return
        req.grammar, self.active = self.grammar, True

    def _fits(self, tok: int) -> bool:
        if not self.grammar.allows(tok):
            return False
        self.grammar.accept(tok)
        return True


@dataclass
class Request:
    """One generation: the prompt's tokens, the sampler, and when to stop."""

    tokens: list[int]
    sampler: Sampler
    max_tokens: int
    stops: list[str]
    cancelled: Callable[[], bool]
    grammar: Grammar | None = None
    speculation: speculate.Policy | None = None  # prompt-lookup drafting (ondevice.speculate)
    trigger: Trigger | None = None  # a grammar that starts when its trigger text appears
    batch: Batch | None = None  # for verifying drafts
    drafter: Drafter | None = None  # a draft model (speculation mode "draft"), else prompt lookup
    # With a repeat penalty the chain's choice must not be accepted before the grammar agrees
    # (the penalty would remember a refused token): apply the grammar first, always.
    grammar_first: bool = False


def stream_tokens(
    eng: Engine, cache: TokenCache, req: Request, st: Stats, t_call: float
) -> Iterator[Chunk]:
    """Evaluate the prompt (reusing the cache) and stream the reply; the last Chunk carries
    `st` filled in. The caller holds the model's lock while iterating."""
    if not _evaluate_prompt(eng, cache, req, st):
        st.finish_reason = "cancelled"
        finish(st, t_call)
        yield Chunk("", (), "cancelled", st)
        return
    req.sampler.accept(req.tokens)
    yield from _generate(eng, cache, req, st, t_call)


def _evaluate_prompt(eng: Engine, cache: TokenCache, req: Request, st: Stats) -> bool:
    common = cache.reuse(eng, req.tokens)
    todo = req.tokens[common:]
    st.prompt_eval_tokens = len(todo)
    t0 = time.perf_counter()
    # Until decode returns, the cache holds an unknown part of `todo`: forget it on error.
    try:
        finished = eng.decode(todo, should_stop=req.cancelled)
    except BaseException:
        cache.invalidate(eng)
        raise
    if not finished:
        cache.invalidate(eng)
        return False
    cache.tokens.extend(todo)
    t1 = time.perf_counter()
    st.prompt_tps = len(todo) / (t1 - t0) if t1 > t0 else 0.0
    return True


class _Emitter:
    """The reply's text as it grows: UTF-8 decoding across token boundaries, stop strings
    (text that could start one is held back), and the Chunk with the tokens since the last."""

    def __init__(self, stops: list[str], st: Stats, t_call: float) -> None:
        self.stops = stops
        self.hold_back = max((len(s) for s in stops), default=0) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text not yet handed out
        self.new_tokens: list[int] = []
        self.n = 0
        self.t_first = self.t_last = 0.0
        self.st, self.t_call = st, t_call
        self.pending_chunk: Chunk | None = None  # the speculative loop's hand-over

    def sampled(self) -> None:
        """Count a sampled token (the one ending generation too) and stamp the time."""
        self.n += 1
        self.t_last = time.perf_counter()
        if self.n == 1:
            self.t_first = self.t_last
            self.st.ttft_s = self.t_first - self.t_call

    def push(self, tok: int, piece: bytes) -> tuple[Chunk | None, bool]:
        """Add a token's bytes; (a Chunk to hand out or None, whether a stop string ended)."""
        self.new_tokens.append(tok)
        self.pending += self.decoder.decode(piece)
        stops = self.stops
        if stops:
            cut = find_stop(self.pending, stops)
            if cut is not None:
                self.pending = self.pending[:cut]
                return None, True
            safe = safe_prefix(self.pending, stops, self.hold_back)
        else:
            safe = len(self.pending)
        if not safe:
            return None, False
        chunk = Chunk(self.pending[:safe], tuple(self.new_tokens))
        self.pending = self.pending[safe:]
        self.new_tokens = []
        return chunk, False

    def last(self, reason: str, max_tokens: int) -> Chunk:
        st = self.st
        self.pending += self.decoder.decode(b"", final=True)
        if reason == "length" and max_tokens >= 0 and self.n < max_tokens:
            st.notes.append("the context is full")
        st.completion_tokens = self.n
        if self.n > 1 and self.t_last > self.t_first:
            st.generation_tps = (self.n - 1) / (self.t_last - self.t_first)
        st.finish_reason = reason
        finish(st, self.t_call)
        return Chunk(self.pending, tuple(self.new_tokens), reason, st)


def _limit(eng: Engine, cache: TokenCache, req: Request) -> int:
    room = eng.n_ctx - len(cache.tokens)  # positions left in the context
    return min(req.max_tokens, room) if req.max_tokens >= 0 else room


def _generate(
    eng: Engine, cache: TokenCache, req: Request, st: Stats, t_call: float
) -> Iterator[Chunk]:
    if req.speculation is not None and req.grammar is None:
        yield from _generate_speculative(eng, cache, req, st, t_call)
        return
    out = _Emitter(req.stops, st, t_call)
    limit = _limit(eng, cache, req)
    finish_reason = "length"
    sample, piece, is_eog, decode_one = eng.sample, eng.piece, eng.is_eog, eng.decode_one
    sampler, cancelled, cached, grammar = req.sampler, req.cancelled, cache.tokens, req.grammar
    while out.n < limit:
        if cancelled():
            finish_reason = "cancelled"
            break
        tok = sample(sampler) if grammar is None else _constrained(eng, req, st)
        out.sampled()
        if is_eog(tok):
            finish_reason = "stop"
            break
        if req.trigger is not None:
            req.trigger.seen(eng, req, tok)
            grammar = req.grammar
        chunk, stopped = out.push(tok, piece(tok))
        if stopped:
            finish_reason = "stop"
            break
        if chunk is not None:
            yield chunk
        if out.n >= limit:
            break
        decode_one(tok)
        cached.append(tok)
    yield out.last(finish_reason, req.max_tokens)


def _generate_speculative(
    eng: Engine, cache: TokenCache, req: Request, st: Stats, t_call: float
) -> Iterator[Chunk]:
    """Like _generate, with drafts (prompt lookup, or a draft model's) verified in one decode
    each (the module docstring of ondevice.speculate says when it drafts). Every emitted token
    is sampled by the request's own chain from the target model's logits at its position, in
    order, so the text is what plain decoding gives (greedy: equal up to batched kernels'
    rounding)."""
    spec = req.speculation
    assert spec is not None
    index = speculate.NgramIndex(list(req.tokens))
    out = _Emitter(req.stops, st, t_call)
    limit = _limit(eng, cache, req)
    cached = cache.tokens
    if req.drafter is not None and spec.probe_due(min(limit, speculate.PROBE_LAG_MAX)):
        # The prompt into the draft model's cache too, as part of the prompt's time (TTFT):
        # caught up at the first draft instead, it would stall the reply mid-stream. Only
        # when it will draft soon: backed off, the draft would have fallen behind again.
        req.drafter.prefill(cached, owner=req, cancelled=req.cancelled)
    reason = "length" if limit <= 0 else ""
    tok = shadow = -1
    shadow_n = 0
    while not reason:
        if req.cancelled():  # before each token, as plain decoding checks
            reason = "cancelled"
            break
        if tok < 0:
            tok = eng.sample(req.sampler)
            if shadow >= 0:  # the draft we didn't verify: would it have been accepted?
                spec.observe_shadow(tok == shadow, shadow_n)
        out.sampled()
        reason = _emit(eng, out, tok, limit)
        if out.pending_chunk is not None:
            yield out.pending_chunk
        if reason:
            break
        index.append(tok)
        room = min(limit - out.n, eng.n_ctx - len(cached) - 1)
        if req.drafter is None:
            lookup, matched = index.lookup(speculate.DRAFT_LENGTHS[-1])
            k = spec.length(min(room, len(lookup)), matched)
            draft = lookup[:k]
        else:
            lookup, matched = [], speculate.DRAFT_BUCKET
            draft = _model_draft(req, cached, tok, room)
        if not draft:
            shadow, shadow_n = (lookup[0] if lookup else -1), matched
            t0 = time.perf_counter()
            eng.decode_one(tok)
            dt = time.perf_counter() - t0
            spec.observe_decode(1, dt)
            if req.drafter is not None and req.drafter.seconds:  # the draft model declined
                spec.observe_step(1, req.drafter.seconds + dt)
            cached.append(tok)
            tok = -1  # sampled at the top, after the cancel check
            continue
        shadow = -1
        tok, reason, chunks = _verify(eng, cache, req, out, index, tok, draft, matched, limit)
        yield from chunks
    yield out.last(reason, req.max_tokens)


def _model_draft(req: Request, cached: list[int], tok: int, room: int) -> list[int]:
    """The draft model's draft after cached + [tok], as long as the policy says pays."""
    spec, drafter = req.speculation, req.drafter
    assert spec is not None and drafter is not None
    drafter.seconds = 0.0
    k = spec.length(min(room, speculate.DRAFT_LENGTHS[-1]), speculate.DRAFT_BUCKET)
    if k <= 0:
        return []
    if not spec.drafting() and drafter.lag(cached, owner=req) > speculate.PROBE_LAG_MAX:
        spec.defer_probe()  # a probe, but a long catch-up first: at the next prompt instead
        return []
    draft, seconds = drafter.propose(cached, k, spec, owner=req, last=tok, cancelled=req.cancelled)
    spec.observe_drafting(seconds - drafter.catch_up_s, len(draft))
    return draft


def _emit(eng: Engine, out: _Emitter, tok: int, limit: int) -> str:
    """Hand a sampled token to the emitter; the finish reason if it ends the reply, else ""."""
    out.pending_chunk = None
    if eng.is_eog(tok):
        return "stop"
    chunk, stopped = out.push(tok, eng.piece(tok))
    if stopped:
        return "stop"
    out.pending_chunk = chunk
    if out.n >= limit:
        return "length"
    return ""


def _verify(
    eng: Engine,
    cache: TokenCache,
    req: Request,
    out: _Emitter,
    index: speculate.NgramIndex,
    tok: int,
    draft: list[int],
    matched: int,
    limit: int,
) -> tuple[int, str, list[Chunk]]:
    """Decode tok + draft in one batch (logits everywhere), then sample position by position
    while the samples equal the draft; roll the KV cache back past the first difference.
    Returns (the next token to decode, a finish reason or "", chunks to hand out)."""
    spec, cached = req.speculation, cache.tokens
    assert spec is not None
    p = len(cached)
    batch = req.batch
    assert batch is not None
    batch.clear()
    batch.add(tok, p, 0, True)
    for j, d in enumerate(draft):
        batch.add(d, p + 1 + j, 0, True)
    t0 = time.perf_counter()
    eng.decode_batch(batch)
    dt = time.perf_counter() - t0
    spec.observe_decode(len(draft) + 1, dt)
    cached.append(tok)
    chunks: list[Chunk] = []
    reason, nxt, accepted, rejected = "", -1, 0, False
    for i in range(len(draft) + 1):
        t = eng.sample(req.sampler, i)
        if i == len(draft) or t != draft[i]:
            nxt = t  # the correction (or the bonus token after a fully accepted draft)
            rejected = i < len(draft)
            break
        accepted += 1
        out.sampled()
        reason = _emit(eng, out, t, limit)
        if out.pending_chunk is not None:
            chunks.append(out.pending_chunk)
        if reason:
            break
        index.append(t)
        cached.append(t)
    spec.observe_draft(len(draft), accepted, matched, rejected)
    st = out.st
    st.drafted_tokens += len(draft)
    st.accepted_tokens += accepted
    if not eng.kv_keep(len(cached)):  # positions past what we keep are a rejected draft
        cache.invalidate(eng)
    if req.drafter is not None:
        spec.observe_confidence(req.drafter.buckets, accepted, rejected)
        spec.observe_step(accepted + 1, req.drafter.seconds + dt)
        req.drafter.keep(len(cached))
    return nxt, reason, chunks


def _constrained(eng: Engine, req: Request, st: Stats) -> int:
    """The next token under the grammar: the chain's own choice if the grammar allows it (one
    token checked), else the chain's choice among what the grammar allows (llama.cpp's common
    sampler does the same). The grammar advances past every token but an end token."""
    grammar = req.grammar
    assert grammar is not None
    if not req.grammar_first:
        tok = eng.sample(req.sampler)
        if grammar.allows(tok):
            if not eng.is_eog(tok):
                grammar.accept(tok)
            return tok
    st.grammar_resamples += 1
    tok = grammar.resample(eng.ctx, req.sampler._ptr)
    if not eng.is_eog(tok):
        grammar.accept(tok)
    return tok


def finish(st: Stats, t_call: float) -> None:
    """Fill in the end-of-call numbers: total time and memory now and at its peak."""
    st.total_s = time.perf_counter() - t_call
    st.rss_bytes = stats.rss_bytes()
    st.peak_rss_bytes = stats.peak_rss_bytes()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def safe_prefix(text: str, stops: list[str], hold_back: int) -> int:
    """How much of `text` can be emitted: all but a tail that could begin a stop string."""
    n = len(text)
    for k in range(min(hold_back, n), 0, -1):
        tail = text[n - k :]
        if any(s.startswith(tail) for s in stops):
            return n - k
    return n
