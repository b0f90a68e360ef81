"""Speculative decoding's two decisions: what to draft (prompt lookup: an n-gram index over the
token ids of the prompt and the reply so far) and how much to draft (from the measured cost of a
batched decode and the measured acceptance of recent drafts).

Generation reads every weight once per decode, so on a CPU that sits at its memory-bandwidth
roof the only way to go faster is more tokens per pass: verify several drafted tokens in one
`llama_decode` (ondevice.generation does the verification). That pays only when drafts are
good, because a batch of k tokens costs more than one token (on this project's 2-core machine
4 tokens cost ~1.9x one). So the draft length k is chosen each step to maximise

    expected tokens per pass / cost of the pass = (1 + a + a^2 + ... + a^k) / (c(k+1) / c(1))

with `a` the recent acceptance rate (per drafted position, a moving average) and c(n) the
measured seconds of a decode of n tokens (moving averages; a size not yet measured is
estimated from the measured single-token decode and a prior slope). With `auto`, no draft is
made before a single-token decode has been timed, nor when the best k would not beat plain
decoding, so open-ended text (where lookups rarely match) costs nothing. While it decodes
plainly, `auto` still measures acceptance for free: the lookup's first token is compared
with the token the model then samples (a "shadow draft"), so drafting resumes as soon as the
text turns repetitive, without paying for probe drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("auto", "lookup", "off")
NGRAM_MAX = 4  # longest n-gram looked up (llama.cpp's lookup uses up to 4 too)
NGRAM_MIN = 1
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)
PRIOR_ACCEPT = 0.6  # until drafts have been seen: optimistic enough to try
EWMA = 0.3
SHADOW_EWMA = 0.1  # one shadow draft is one Bernoulli trial: a smaller step than a real draft's
# c(n)/c(1) before measurements: llama-bench pp1/pp4/pp16 on the demo model, 2 threads.
PRIOR_COST_SLOPE = 0.3
PAY_MARGIN = 1.05  # auto drafts only when the estimate beats plain decoding by this much


class NgramIndex:
    """Where each n-gram (n = 1..NGRAM_MAX) of a token sequence last occurred: for drafting
    the tokens that followed it then. Updated per token in O(NGRAM_MAX) dict operations."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.history: list[int] = []
        # n -> {n-gram: index of the token that followed its latest occurrence}
        self.table: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(NGRAM_MIN, NGRAM_MAX + 1)
        }
        for t in tokens or ():
            self.append(t)

    def append(self, token: int) -> None:
        h = self.history
        t = len(h)
        h.append(token)
        for n, table in self.table.items():
            if t - n >= 0:
                table[tuple(h[t - n : t])] = t

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.append(t)

    def truncate(self, n_tokens: int) -> None:
        """Forget everything from position n_tokens on (a new prompt that shares a prefix)."""
        if n_tokens >= len(self.history):
            return
        kept = self.history[:n_tokens]
        self.__init__(kept)  # rare (a new request): rebuild

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram
        the sequence now ends with; [] when none occurred before."""
        h = self.history
        end = len(h)
        for n in range(min(NGRAM_MAX, end), NGRAM_MIN - 1, -1):
            follow = self.table[n].get(tuple(h[end - n :]))
            if follow is not None and follow < end:
                return h[follow : min(follow + k, end)]
        return []


@dataclass
class Policy:
    """How many tokens to draft, from measured costs and acceptance."""

    mode: str = "auto"
    accept: float = PRIOR_ACCEPT
    cost: dict[int, float] = field(default_factory=dict)  # batch size -> seconds (EWMA)
    drafted: int = 0
    accepted: int = 0

    def seconds(self, n: int) -> float:
        """Seconds of a decode of n tokens: measured, else estimated from the measured
        single-token decode (before that, in relative units, all sizes alike: a measured c(n)
        is never compared with an unmeasured c(1))."""
        one = self.cost.get(1)
        if one is None:
            return 1.0 + PRIOR_COST_SLOPE * (n - 1)
        if n in self.cost:
            return self.cost[n]
        return one * (1.0 + PRIOR_COST_SLOPE * (n - 1))

    def observe_decode(self, n: int, seconds: float) -> None:
        old = self.cost.get(n)
        self.cost[n] = seconds if old is None else old + EWMA * (seconds - old)

    def observe_draft(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        # Per-position acceptance: all of a k-draft accepted counts as k successes.
        rate = accepted / drafted
        self.accept += EWMA * (rate - self.accept)

    def observe_shadow(self, hit: bool) -> None:
        """A draft that was looked up but not verified: would its first token have been
        accepted (the sampled token equals it)? Costs nothing, so it runs on every plain
        decode that had a lookup, and it is what brings drafting back after a back-off."""
        self.accept += SHADOW_EWMA * (float(hit) - self.accept)

    def speedup(self, k: int) -> float:
        a = self.accept
        expected = 1.0 + sum(a**i for i in range(1, k + 1))
        return expected * self.seconds(1) / self.seconds(k + 1)

    def length(self, available: int) -> int:
        """How many of the `available` lookup tokens to draft now (0: decode plainly)."""
        if self.mode == "off" or available <= 0:
            return 0
        options = [k for k in DRAFT_LENGTHS if k <= available] or [available]
        best = max(options, key=self.speedup)
        if self.mode == "lookup":
            return best
        if 1 not in self.cost:  # time one plain decode first: the yardstick for every k
            return 0
        return best if self.speedup(best) >= PAY_MARGIN else 0
