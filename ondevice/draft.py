"""A draft model for speculative decoding: a second, smaller GGUF with the same vocabulary that
proposes the next tokens greedily, for the target model to verify in one batched decode.

Prompt lookup (ondevice.speculate.NgramIndex) drafts for free but only where the reply copies
the input; a draft model drafts everywhere, at the price of one of its own decodes per drafted
token. It pays when the draft is much cheaper than the target and usually agrees with it (a
quantized copy of the same model; a small sibling of a family). The policy (Policy in
ondevice.speculate, mode "draft") prices a draft with that cost included and backs off when it
loses.

As llama.cpp's `common_speculative_gen_draft` does, the draft is the draft model's greedy
choice at each position, and drafting stops early once the draft is unsure. Not at a fixed
probability (llama.cpp's p_min of 0.75): the policy keeps the measured acceptance of drafted
tokens per confidence bucket, and the draft goes on while the chance that the next token is
accepted (with all before it), times a plain decode it would save, beats what drafting and
verifying it costs. A quantized copy of the target agrees with it far below p = 0.75. Verification samples
each position with the request's own chain from the target's logits, so what is drafted never
changes the output distribution, only how fast it comes.

The draft model's KV cache follows the target's: `tokens` records what it holds; before each
draft it evaluates what the target evaluated since (usually one or two tokens, in one decode),
and after verification `keep()` drops its rejected tail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from ondevice import speculate
from ondevice._native.engine import Engine
from ondevice.errors import UsageError

log = logging.getLogger(__name__)

CHECK_FROM = 0  # token ids compared from here on (all of them: a differing id is a wrong draft)


def check_vocab_tables(target: Sequence[str], draft: Sequence[str], name: str) -> None:
    """The same check on the GGUF headers' token tables, before the draft's weights are
    loaded: a draft of another family is refused at once, not after loading it."""
    why = ""
    if len(draft) != len(target):
        why = f"it has {len(draft)} tokens, the model {len(target)}"
    else:
        i = next((i for i, (a, b) in enumerate(zip(target, draft, strict=True)) if a != b), None)
        if i is not None:
            why = f"token {i} is {draft[i]!r} in it and {target[i]!r} in the model"
    if why:
        _refuse(name, why)


def _refuse(name: str, why: str) -> None:
    raise UsageError(
        f"the draft model {name} does not share the model's vocabulary: {why}",
        hint="draft with a smaller model of the same family or a quantized copy of this "
        "one, or use --speculative auto (prompt lookup needs no second model)",
    )


def check_compatible(target: Engine, draft: Engine, name: str) -> None:
    """UsageError unless `draft` tokenizes exactly as `target` does: the same number of
    tokens, the same bytes for every token id, the same BOS/EOS and BOS rule. A draft token id
    is fed to the target as it is, so one id meaning two things would make every draft wrong,
    and an id past the target's vocabulary would make llama.cpp abort."""
    why = ""
    if draft.n_vocab != target.n_vocab:
        why = f"it has {draft.n_vocab} tokens, the model {target.n_vocab}"
    elif (draft.bos, draft.eos, draft.add_bos) != (target.bos, target.eos, target.add_bos):
        why = (
            f"its BOS/EOS tokens are {draft.bos}/{draft.eos} (add BOS: {draft.add_bos}), "
            f"the model's {target.bos}/{target.eos} (add BOS: {target.add_bos})"
        )
    else:
        for i in range(CHECK_FROM, target.n_vocab):
            a, b = target.piece_copy(i, True), draft.piece_copy(i, True)
            if a != b:
                why = f"token {i} is {b!r} in it and {a!r} in the model"
                break
    if why:
        _refuse(name, why)


class Drafter:
    """Greedy drafts from a draft model's engine, its KV cache kept in step with a target's
    sequence. Used from one thread at a time (the target's lock, or the batch scheduler's)."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.buckets: list[int] = []  # the last draft's tokens' confidence buckets
        self.seconds = 0.0  # what the last draft took, all of it
        self.catch_up_s = 0.0  # of that, catching up on more than a token or two
        self.tokens: list[int] = []  # what the draft's KV cache holds (sequence 0), in order
        self.owner: object = None  # whose sequence `tokens` follows

    def propose(
        self,
        context: Sequence[int],
        k: int,
        policy: speculate.Policy,
        *,
        owner: object,
        last: int | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[list[int], float]:
        """Up to k tokens to follow `context` (+ `last`, the pending token, when given), and
        the seconds drafting took. Of those, `catch_up_s` went to evaluating tokens the draft
        fell behind on beyond one (after plain decodes): not the price of a drafted token, but
        the price of a probe after a back-off. `owner` names the sequence (a request, a job): when it
        changes, the draft's cache is trimmed to the prefix the new one shares with it."""
        t0 = time.perf_counter()
        self.catch_up_s = 0.0
        eng, held = self.eng, self.tokens
        if owner is not self.owner:
            self._resync(context)
            self.owner = owner
        missing = list(context[len(held) :])
        if last is not None:
            missing.append(last)
        if not missing and held:  # no new token to read logits after: the last one again
            missing = [held[-1]]
            self.keep(len(held) - 1)
        if not missing or len(held) + len(missing) + k > eng.n_ctx:
            self.seconds = time.perf_counter() - t0
            return [], self.seconds
        t1 = time.perf_counter()
        eng.decode(missing)
        held.extend(missing)
        now = time.perf_counter()
        if len(missing) > 2:  # catching up on a prompt: a prefill, not the price of drafting
            self.catch_up_s = (now - t1) * (1 - 1 / len(missing))
        out: list[int] = []
        buckets = self.buckets = []
        chance = 1.0
        while True:
            tok, p = eng.top()
            b = policy.bucket(p)
            chance *= policy.confident_acceptance(b)
            if not policy.worth_drafting(chance, len(out)):
                break
            out.append(tok)
            buckets.append(b)
            if len(out) >= k or eng.is_eog(tok) or (cancelled is not None and cancelled()):
                break
            eng.decode_one(tok)
            held.append(tok)
        self.seconds = time.perf_counter() - t0
        return out, self.seconds

    def prefill(
        self, context: Sequence[int], *, owner: object, cancelled: Callable[[], bool] | None = None
    ) -> None:
        """Evaluate `context` (a prompt the target just evaluated) in the draft's cache now,
        so that the reply's first draft doesn't stall on it. A cancel stops it, and the
        draft's cache is then forgotten (what it holds is unknown)."""
        if owner is not self.owner:
            self._resync(context)
            self.owner = owner
        missing = list(context[len(self.tokens) :])
        if not missing or len(context) >= self.eng.n_ctx:
            return
        try:
            done = self.eng.decode(missing, should_stop=cancelled)
        except BaseException:
            self.reset()
            raise
        if not done:
            self.reset()
            return
        self.tokens.extend(missing)

    def lag(self, context: Sequence[int], *, owner: object) -> int:
        """How many of `context`'s tokens the draft would evaluate before its next draft."""
        held = self.tokens
        if owner is self.owner:
            return max(len(context) - len(held), 0)
        n = min(len(held), len(context))
        common = next((i for i in range(n) if held[i] != context[i]), n)
        return len(context) - common

    def keep(self, n_tokens: int) -> None:
        """The target kept only its first n_tokens: drop what the draft holds past them."""
        n_tokens = max(n_tokens, 0)
        if n_tokens >= len(self.tokens):
            return
        if not self.eng.kv_keep(n_tokens):
            self.reset()
            return
        del self.tokens[n_tokens:]

    def reset(self) -> None:
        self.eng.kv_clear()
        self.tokens.clear()
        self.owner = None

    def _resync(self, context: Sequence[int]) -> None:
        held = self.tokens
        n = min(len(held), len(context))
        common = 0
        while common < n and held[common] == context[common]:
            common += 1
        self.keep(common)
