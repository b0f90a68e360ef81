"""Speculative decoding's two decisions: what to draft (prompt lookup: an n-gram index over the
token ids of the prompt and the reply so far) and how much to draft (from the measured cost of a
batched decode and the measured acceptance of recent drafts).

Generation reads every weight once per decode, so on a CPU that sits at its memory-bandwidth
roof the only way to go faster is more tokens per pass: verify several drafted tokens in one
`llama_decode` (ondevice.generation does the verification). That pays only when drafts are
good, because a batch of k tokens costs more than one token (on this project's 2-core machine
4 tokens cost ~1.9x one). So the draft length k is chosen each step to maximise

    expected tokens per pass / cost of the pass = (1 + a + a^2 + ... + a^k) / (c(k+1) / c(1))

with `a` the probability that a drafted token is accepted given the ones before it were, and
c(n) the seconds of a decode of n tokens: c(1) measured (a moving average), and for n >= 2 a
straight line fitted to every measured batched decode (decaying weights). One line, not one
average per size: on a shared CPU a single slow pass would otherwise price its size out for
good (a size that is never chosen is never measured again), and batched decodes do cost close
to a line in n (on the 2-core test machine, each drafted token adds about half a plain decode,
and the step from 1 to 2 tokens is the largest). Before two sizes are measured, a prior slope.

`a` is estimated the way that model asks for: accepted tokens over tested ones, where a draft rejected at position j
tested j + 1 tokens and the ones after the rejection were never tested (counting them as
failures, as accepted/drafted does, underestimates `a` and keeps drafts too short). It is
kept separately for each length of the n-gram the lookup matched: a draft that follows a
4-gram seen before is far likelier to be right than one that follows a single token, and
each gets its own draft length. Counts decay per observation, so `a` follows the text.

With `auto`, no draft is made before a single-token decode has been timed, nor when the best
k would not beat plain decoding, so open-ended text (where lookups rarely match) costs
nothing. While it decodes plainly, `auto` still measures acceptance for free: the lookup's
first token is compared with the token the model then samples (a "shadow draft"), so
drafting resumes as soon as the text turns repetitive, without paying for probe drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("auto", "lookup", "off")
NGRAM_MAX = 4  # longest n-gram looked up (llama.cpp's lookup uses up to 4 too)
NGRAM_MIN = 1
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)
PRIOR_ACCEPT = 0.6  # until drafts have been seen: optimistic enough to try
PRIOR_TRIALS = 2.0  # the prior's weight, in tested tokens
EWMA = 0.3  # decay of costs, and of acceptance counts per verified draft
SHADOW_EWMA = 0.1  # one shadow draft is one Bernoulli trial: a smaller step than a real draft's
# c(n)/c(1) before measurements: llama-bench pp1/pp4/pp16 on the demo model, 2 threads.
PRIOR_COST_SLOPE = 0.3
PAY_MARGIN = 1.05  # auto drafts only when the estimate beats plain decoding by this much
FIT_DECAY = 0.05  # per batched decode: the line follows the last few dozen
OUTLIER = 1.5  # a batched decode counts at most this many times the line's price


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
        return self.lookup(k)[0]

    def lookup(self, k: int) -> tuple[list[int], int]:
        """(the draft, the length n of the n-gram it follows); ([], 0) when none matched."""
        h = self.history
        end = len(h)
        for n in range(min(NGRAM_MAX, end), NGRAM_MIN - 1, -1):
            follow = self.table[n].get(tuple(h[end - n :]))
            if follow is not None and follow < end:
                return h[follow : min(follow + k, end)], n
        return [], 0


def _prior() -> dict[int, list[float]]:
    return {n: [PRIOR_ACCEPT * PRIOR_TRIALS, PRIOR_TRIALS] for n in range(NGRAM_MIN, NGRAM_MAX + 1)}


@dataclass
class Policy:
    """How many tokens to draft, from measured costs and acceptance."""

    mode: str = "auto"
    # n-gram length -> [accepted, tested] drafted tokens (decaying counts, prior included)
    counts: dict[int, list[float]] = field(default_factory=_prior)
    cost: dict[int, float] = field(default_factory=dict)  # batch size -> seconds (EWMA)
    # decaying sums for the least-squares line through batched decodes: w, x, y, xx, xy
    fit: list[float] = field(default_factory=lambda: [0.0] * 5)
    line: tuple[float, float] | None = None  # (intercept, slope) of the fit, once it has one
    drafted: int = 0
    accepted: int = 0

    def acceptance(self, n: int = NGRAM_MAX) -> float:
        """P(a drafted token is accepted | the ones before it were), for drafts that follow
        a matched n-gram of length n."""
        hit, tested = self.counts[n]
        return hit / tested

    def seconds(self, n: int) -> float:
        """Seconds of a decode of n tokens: c(1) measured, n >= 2 from the fitted line (before
        c(1) is measured, in relative units, all sizes alike: a measured c(n) is never
        compared with an unmeasured c(1))."""
        one = self.cost.get(1)
        if one is None:
            return 1.0 + PRIOR_COST_SLOPE * (n - 1)
        if n == 1:
            return one
        line = self.line
        if line is not None:
            return max(line[0] + line[1] * n, one)
        if n in self.cost:
            return self.cost[n]
        batched = [k for k in self.cost if k > 1]
        if batched:  # one batched size measured: the prior slope from there
            return self.cost[batched[0]] + one * PRIOR_COST_SLOPE * (n - batched[0])
        return one * (1.0 + PRIOR_COST_SLOPE * (n - 1))

    def _fit_line(self) -> tuple[float, float] | None:
        """(intercept, slope) through the batched decodes, once two sizes are measured
        (computed once per measured decode, not per question: length() asks per token)."""
        w, x, y, xx, xy = self.fit
        if sum(1 for k in self.cost if k > 1) < 2 or w <= 0:
            return None
        var = xx / w - (x / w) ** 2
        if var <= 1e-9:
            return None
        slope = (xy / w - (x / w) * (y / w)) / var
        return y / w - slope * x / w, max(slope, 0.0)

    def observe_decode(self, n: int, seconds: float) -> None:
        old = self.cost.get(n)
        self.cost[n] = seconds if old is None else old + EWMA * (seconds - old)
        if n > 1:
            line = self.line
            if line is not None:  # a pass far over the line is the machine, not the size
                seconds = min(seconds, OUTLIER * (line[0] + line[1] * n))
            f = self.fit
            for i, v in enumerate((1.0, n, seconds, n * n, n * seconds)):
                f[i] = f[i] * (1.0 - FIT_DECAY) + v
            self.line = self._fit_line()

    def observe_draft(
        self, drafted: int, accepted: int, n: int = NGRAM_MAX, rejected: bool | None = None
    ) -> None:
        """A verified draft of `drafted` tokens following an n-gram of length n, of which the
        first `accepted` were. `rejected`: whether the token after them was refused (default:
        whenever not all were accepted; False when the reply ended inside the draft)."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if rejected is None:
            rejected = accepted < drafted
        self._count(n, accepted, accepted + int(rejected), EWMA)

    def observe_shadow(self, hit: bool, n: int = NGRAM_MAX) -> None:
        """A draft that was looked up but not verified: would its first token have been
        accepted (the sampled token equals it)? Costs nothing, so it runs on every plain
        decode that had a lookup, and it is what brings drafting back after a back-off."""
        self._count(n, int(hit), 1, SHADOW_EWMA)

    def _count(self, n: int, hits: int, tested: int, decay: float) -> None:
        c = self.counts[n]
        c[0] = c[0] * (1.0 - decay) + hits
        c[1] = c[1] * (1.0 - decay) + tested

    def speedup(self, k: int, n: int = NGRAM_MAX) -> float:
        a = self.acceptance(n)
        # 1 + a + ... + a^k, in closed form (asked for every draft length, every token)
        expected = k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        return expected * self.seconds(1) / self.seconds(k + 1)

    def length(self, available: int, n: int = NGRAM_MAX) -> int:
        """How many of the `available` lookup tokens (following a matched n-gram of length
        n) to draft now (0: decode plainly)."""
        if self.mode == "off" or available <= 0:
            return 0
        options = [k for k in DRAFT_LENGTHS if k <= available] or [available]
        best = max(options, key=lambda k: self.speedup(k, n))
        if self.mode == "lookup":
            return best
        if 1 not in self.cost:  # time one plain decode first: the yardstick for every k
            return 0
        return best if self.speedup(best, n) >= PAY_MARGIN else 0
