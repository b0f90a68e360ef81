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

Mode "draft" drafts with a second model (ondevice.draft) instead of prompt lookup. Its drafts
are not free: each drafted token costs one decode of the draft model, measured (seconds per
drafted token, a moving average) and added to the price of the pass. It backs off like `auto`;
as there is no free shadow draft to tell when drafting would pay again, it probes with a real
draft after PROBE_EVERY plain decodes, and waits twice as long after each probe that did
not pay. It compares tokens per second, measured: those of the recent steps that drafted
against a plain decode's, and while drafting it still decodes one step in PLAIN_EVERY plainly:
on a shared CPU whose speed drifts, a plain decode timed long ago is no yardstick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("auto", "lookup", "off")  # prompt lookup's modes; "draft" comes with a draft model
DRAFT = "draft"
# A draft model at every step, each draft going on while the measured chance that its next
# token is accepted stays >= ALWAYS_CHANCE, costs aside (llama.cpp's way with a draft model).
DRAFT_ALWAYS = "draft-always"
DRAFT_MODES = (DRAFT, DRAFT_ALWAYS)
ALWAYS_CHANCE = 0.5
DRAFT_BUCKET = 4  # a draft model's drafts follow no n-gram: one acceptance estimate for all
PRIOR_DRAFT_COST = 0.5  # a drafted token's cost in plain decodes of the target, until measured
PROBE_EVERY = 8  # "draft" mode: plain decodes before drafting again to re-measure; the wait
PROBE_MAX = 256  # doubles after each probe that did not pay, up to this
STEP_DECAY = 0.1  # "draft" mode: per step, for the tokens/s of steps that draft
PROBE_LAG_MAX = 64  # "draft" mode: a probe that needs a longer catch-up waits for a new prompt
PLAIN_EVERY = 16  # "draft" mode, while drafting: one plain decode in this many, to re-time it
# A draft model's confidence in its token (its probability) sorts drafted tokens into buckets,
# each with its own acceptance: the draft goes on while the next token is worth its cost.
CONFIDENCE = (0.9, 0.75, 0.5, 0.3, 0.15, 0.0)
# Their acceptance until measured: optimistic, so that every bucket gets tried (one never
# drafted from is never measured); a few refusals bring an estimate down.
PRIOR_CONFIDENT = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
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
    draft_cost: float | None = None  # seconds per drafted token (mode "draft"), EWMA
    # mode "draft": confidence bucket -> [accepted, tested] (decaying, prior included)
    confident: list[list[float]] = field(
        default_factory=lambda: [[a * PRIOR_TRIALS, PRIOR_TRIALS] for a in PRIOR_CONFIDENT]
    )
    steps: list[float] = field(default_factory=lambda: [0.0, 0.0])  # draft: tokens, seconds
    skipped: int = 0  # plain decodes since the last draft (mode "draft")
    probe_wait: int = PROBE_EVERY  # plain decodes between probes while drafting does not pay
    since_plain: int = 0  # steps since the last plain decode (mode "draft")
    probed_from: int = PROBE_EVERY  # probe_wait before the last probe doubled it

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

    def observe_drafting(self, seconds: float, n_tokens: int) -> None:
        """A draft model took `seconds` to draft `n_tokens` (0: it was unsure of the first,
        which still cost one of its decodes)."""
        per = seconds / max(n_tokens, 1)
        old = self.draft_cost
        self.draft_cost = per if old is None else old + EWMA * (per - old)

    @staticmethod
    def bucket(p: float) -> int:
        """The confidence bucket of a drafted token the draft model gave probability p."""
        for i, floor in enumerate(CONFIDENCE):
            if p >= floor:
                return i
        return len(CONFIDENCE) - 1

    def confident_acceptance(self, bucket: int) -> float:
        hit, tested = self.confident[bucket]
        return hit / tested

    def worth_drafting(self, chance: float, position: int = 0) -> bool:
        """Draft one more token that will be accepted with probability `chance` (it and every
        token before it)? It saves a plain decode when accepted, and costs a decode of the
        draft model plus one more token in the verifying batch."""
        if self.mode == DRAFT_ALWAYS:
            return chance >= ALWAYS_CHANCE
        one = self.seconds(1)
        # Its place in the verifying batch: the first drafted token turns a plain decode
        # into a batched one (c(2) - c(1), the largest step on a CPU), later ones add a slope.
        extra = self.seconds(position + 2) - self.seconds(position + 1)
        return chance * one > self.drafting_seconds(1) + extra

    def observe_confidence(self, buckets: list[int], accepted: int, rejected: bool) -> None:
        """A verified draft model's draft: its tokens' buckets, the first `accepted` taken."""
        for j, b in enumerate(buckets[: accepted + int(rejected)]):
            c = self.confident[b]
            c[0] = c[0] * (1.0 - EWMA) + (j < accepted)
            c[1] = c[1] * (1.0 - EWMA) + 1

    def observe_step(self, tokens: int, seconds: float) -> None:
        """Mode "draft": a step that drafted (or tried to) gave `tokens` in `seconds`, drafting
        and verifying (or the plain decode after an empty draft) included."""
        s = self.steps  # decaying sums: a ratio of sums, steadier than an average of ratios
        s[0] = s[0] * (1.0 - STEP_DECAY) + tokens
        s[1] = s[1] * (1.0 - STEP_DECAY) + seconds

    @property
    def step_rate(self) -> float | None:
        """Tokens per second of the recent steps that drafted (None before one did)."""
        tokens, seconds = self.steps
        return tokens / seconds if seconds > 0 else None

    def drafting_seconds(self, k: int) -> float:
        """What drafting k tokens costs: nothing for prompt lookup."""
        if self.mode not in DRAFT_MODES:
            return 0.0
        if self.draft_cost is None:
            return k * PRIOR_DRAFT_COST * self.seconds(1)
        return k * self.draft_cost

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
        return expected * self.seconds(1) / (self.seconds(k + 1) + self.drafting_seconds(k))

    def length(self, available: int, n: int = NGRAM_MAX) -> int:
        """How many of the `available` lookup tokens (following a matched n-gram of length
        n) to draft now (0: decode plainly)."""
        if self.mode == "off" or available <= 0:
            return 0
        if self.mode == DRAFT_ALWAYS:
            return min(available, DRAFT_LENGTHS[-1])
        if self.mode == DRAFT:
            return self._draft_length(available)
        options = [k for k in DRAFT_LENGTHS if k <= available] or [available]
        best = max(options, key=lambda k: self.speedup(k, n))
        if self.mode == "lookup":
            return best
        if 1 not in self.cost:  # time one plain decode first: the yardstick for every k
            return 0
        return best if self.speedup(best, n) >= PAY_MARGIN else 0

    def drafting(self) -> bool:
        """Mode "draft": does drafting pay now (or is it still to be measured)?"""
        rate, one = self.step_rate, self.cost.get(1)
        return self.mode == DRAFT_ALWAYS or rate is None or one is None or rate * one >= 1.0

    def probe_due(self, within: int) -> bool:
        """Mode "draft" or "draft-always": will it draft within the next `within` tokens (the
        gate open, or a probe due)? Then a new prompt goes into the draft model's cache too."""
        if self.mode == DRAFT_ALWAYS or self.drafting():
            return self.mode in (DRAFT, DRAFT_ALWAYS)
        return self.mode == DRAFT and self.skipped + within >= self.probe_wait

    def defer_probe(self) -> None:
        """The probe length() just asked for would first have to catch the draft model up on
        more than PROBE_LAG_MAX tokens (it fell behind while backed off, or never saw this
        prompt): a stall of a prompt's evaluation in the middle of a reply. It stays due, for
        the next prompt, which the draft then evaluates with it (probe_due)."""
        self.probe_wait = self.probed_from
        self.skipped = self.probe_wait

    def _draft_length(self, available: int) -> int:
        """Mode "draft": draft (up to `available`; the draft itself stops when the next token
        is not worth it) while steps that draft give more tokens per second than plain
        decodes; else decode plainly, and try again every PROBE_EVERY tokens."""
        k = min(available, DRAFT_LENGTHS[-1])
        one = self.cost.get(1)
        if one is None:  # time one plain decode first: the yardstick
            return 0
        rate = self.step_rate
        if rate is None or rate * one >= 1.0:
            self.skipped, self.probe_wait = 0, PROBE_EVERY
            self.since_plain += 1
            if self.since_plain >= PLAIN_EVERY:  # the yardstick goes stale on a shared CPU
                self.since_plain = 0
                return 0
            return k
        self.skipped += 1
        if self.skipped >= self.probe_wait:  # probe; if it still doesn't pay, wait longer
            self.probed_from = self.probe_wait
            self.skipped, self.probe_wait = 0, min(2 * self.probe_wait, PROBE_MAX)
            return k
        return 0
