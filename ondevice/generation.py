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

from ondevice import stats
from ondevice._native.engine import Engine, Sampler
from ondevice._native.grammar import Grammar
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
class Request:
    """One generation: the prompt's tokens, the sampler, and when to stop."""

    tokens: list[int]
    sampler: Sampler
    max_tokens: int
    stops: list[str]
    cancelled: Callable[[], bool]
    grammar: Grammar | None = None
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


def _generate(
    eng: Engine, cache: TokenCache, req: Request, st: Stats, t_call: float
) -> Iterator[Chunk]:
    stops = req.stops
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold_back = max((len(s) for s in stops), default=0) - 1
    pending = ""  # decoded text not yet emitted (could start a stop string)
    new_tokens: list[int] = []
    n_generated = 0
    t_first = t_last = 0.0
    finish_reason = "length"
    room = eng.n_ctx - len(cache.tokens)  # positions left in the context
    limit = min(req.max_tokens, room) if req.max_tokens >= 0 else room
    sample, piece, is_eog, decode_one = eng.sample, eng.piece, eng.is_eog, eng.decode_one
    sampler, cancelled, cached, grammar = req.sampler, req.cancelled, cache.tokens, req.grammar
    while n_generated < limit:
        if cancelled():
            finish_reason = "cancelled"
            break
        tok = sample(sampler) if grammar is None else _constrained(eng, req, st)
        n_generated += 1
        t_last = time.perf_counter()
        if n_generated == 1:
            t_first = t_last
            st.ttft_s = t_first - t_call
        if is_eog(tok):
            finish_reason = "stop"
            break
        new_tokens.append(tok)
        pending += decoder.decode(piece(tok))
        if stops:
            cut = find_stop(pending, stops)
            if cut is not None:
                pending = pending[:cut]
                finish_reason = "stop"
                break
            safe = safe_prefix(pending, stops, hold_back)
        else:
            safe = len(pending)
        if safe:
            yield Chunk(pending[:safe], tuple(new_tokens))
            pending = pending[safe:]
            new_tokens = []
        if n_generated >= limit:
            break
        decode_one(tok)
        cached.append(tok)
    pending += decoder.decode(b"", final=True)
    if finish_reason == "length" and req.max_tokens >= 0 and n_generated < req.max_tokens:
        st.notes.append("the context is full")
    st.completion_tokens = n_generated
    if n_generated > 1 and t_last > t_first:
        st.generation_tps = (n_generated - 1) / (t_last - t_first)
    st.finish_reason = finish_reason
    finish(st, t_call)
    yield Chunk(pending, tuple(new_tokens), finish_reason, st)


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
