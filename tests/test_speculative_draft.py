"""Speculative decoding with a draft model (ondevice.draft): the demo model's Q4_1 drafting for its
F16 copy (dequantized by ondevice.quantize, in a temp folder). Greedy text equals plain
decoding up to near-ties, sampling keeps its distribution, the KV caches of both models stay
consistent, cancellation and stop strings work inside drafts, the batch scheduler drafts for a
lone job; and a draft with another vocabulary is refused in one line."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import threading

import pytest
from test_speculative import NEAR_TIE, PROMPTS, first_divergence

import ondevice
from ondevice import speculate
from ondevice.batch import Scheduler
from ondevice.draft import Drafter
from ondevice.errors import ModelNotFound, UsageError

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,"  # the draft model is sure of every token


@pytest.fixture(scope="module")
def target(demo_f16_path, demo_path):
    with ondevice.load(demo_f16_path, n_ctx=2048, threads=2, speculative=demo_path) as m:
        yield m


def test_load_attaches_the_draft_and_defaults_to_it(target, demo_path):
    assert target.speculative == "draft"
    assert target.draft is not None and target.draft.path == demo_path
    assert target.draft.n_ctx >= target.n_ctx  # its cache can follow every position
    assert any("drafts with" in n for n in target.notes)
    r = target.generate(COUNTING, max_tokens=24, temperature=0, speculative="draft-always")
    assert r.stats.drafted_tokens > 0 and r.stats.accepted_tokens > 0
    with Scheduler(target) as sched:  # the model's default mode: its draft, while it pays
        assert sched.drafter is target._drafter and sched.spec.mode == "draft"


def test_greedy_text_equals_plain_decoding_up_to_near_ties(target):
    diverged, drafted = [], 0
    for prompt in [*PROMPTS, COUNTING]:
        target.reset()
        plain = target.generate(prompt, max_tokens=48, temperature=0, speculative="off")
        target.reset()
        spec = target.generate(prompt, max_tokens=48, temperature=0, speculative="draft-always")
        drafted += spec.stats.drafted_tokens
        where = first_divergence(target, prompt, plain.tokens, spec.tokens)
        if where is not None:
            assert where[1] < NEAR_TIE, (prompt, where)
            diverged.append((prompt[:30], *where))
    assert drafted > 0
    print(f"\n{len(diverged)} of {len(PROMPTS) + 1} prompts diverged, at near-ties: {diverged}")
    assert len(diverged) <= 2 * (len(PROMPTS) + 1) // 3


def test_sampling_distribution_is_unchanged(target):
    """At temperature 1, tokens drawn at drafted positions have the distribution plain
    sampling gives them (total variation over 120 seeds)."""
    counts = {}
    for mode in ("off", "draft-always"):
        c = collections.Counter()
        for seed in range(120):
            r = target.generate(
                COUNTING, max_tokens=4, temperature=1.0, seed=seed, speculative=mode
            )
            c[tuple(r.tokens[1:4])] += 1
        counts[mode] = c
    keys = set(counts["off"]) | set(counts["draft-always"])
    tv = 0.5 * sum(abs(counts["off"][k] - counts["draft-always"][k]) / 120 for k in keys)
    assert tv <= 0.1, tv


def test_both_caches_stay_consistent_across_turns(target):
    """After a reply with drafts, a follow-up reuses the target's cached prefix, the draft's
    cache holds a prefix of the target's, and the follow-up equals a fresh run."""
    target.reset()
    first = target.generate(PROMPTS[0], max_tokens=40, temperature=0, speculative="draft-always")
    assert first.stats.drafted_tokens > 0
    drafter = target._drafter
    cached = target._cache.tokens
    assert drafter.tokens == cached[: len(drafter.tokens)]
    assert drafter.eng.kv_used() == len(drafter.tokens)
    follow = PROMPTS[0] + first.text + "\nNow count: 1, 2, 3,"
    reused = target.generate(follow, max_tokens=24, temperature=0, speculative="draft-always")
    assert reused.stats.prompt_eval_tokens < reused.stats.prompt_tokens
    target.reset()
    fresh = target.generate(follow, max_tokens=24, temperature=0, speculative="off")
    where = first_divergence(target, follow, fresh.tokens, reused.tokens)
    assert where is None or where[1] < NEAR_TIE


def test_cancel_mid_draft(target):
    target.reset()
    cancel = threading.Event()
    chunks = []
    for chunk in target.stream(
        COUNTING, max_tokens=300, temperature=0, cancel=cancel, speculative="draft-always"
    ):
        chunks.append(chunk)
        if sum(len(c.tokens) for c in chunks) >= 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].stats.completion_tokens < 40
    assert target.generate("Hi", max_tokens=3, temperature=0).stats.completion_tokens > 0


def test_stop_string_inside_a_draft(target):
    target.reset()
    free = target.generate(COUNTING, max_tokens=30, temperature=0, speculative="off")
    assert " 15," in free.text, free.text
    got = target.generate(
        COUNTING, max_tokens=30, temperature=0, stop=[" 15,"], speculative="draft-always"
    )
    assert got.stats.drafted_tokens > 0
    assert got.finish_reason == "stop"
    assert got.text == free.text[: free.text.index(" 15,")]


def test_the_scheduler_drafts_with_the_draft_model_for_a_lone_job(target):

    prompts = [COUNTING, PROMPTS[1]]
    plain = []
    for prompt in prompts:
        target.reset()
        plain.append(target.generate(prompt, max_tokens=40, temperature=0, speculative="off"))
    with Scheduler(target, speculative="draft-always") as sched:
        assert sched.drafter is target._drafter
        got = [
            sched.submit(target.tokenize(p), max_tokens=40, temperature=0).wait(120)
            for p in prompts
        ]
        counters = dict(sched.counters)
    assert counters["drafted_tokens"] == sum(r.stats.drafted_tokens for r in got) > 0
    assert counters["decode_calls"] < sum(len(r.tokens) for r in got)
    for prompt, a, b in zip(prompts, plain, got, strict=True):
        where = first_divergence(target, prompt, a.tokens, b.tokens)
        assert where is None or where[1] < NEAR_TIE, (prompt, where)


def test_per_call_modes(target, demo_path):
    target.reset()
    lookup = target.generate(PROMPTS[1], max_tokens=24, temperature=0, speculative="lookup")
    assert lookup.stats.drafted_tokens > 0  # prompt lookup, though a draft model is loaded
    target._policies.pop("draft", None)  # a fresh policy: drafts until it has measured
    by_path = target.generate(COUNTING, max_tokens=16, temperature=0, speculative=str(demo_path))
    assert by_path.stats.drafted_tokens > 0
    with pytest.raises(UsageError, match="speculative must be one of"):
        target.generate("x", speculative="other.gguf")


def test_draft_mode_needs_a_draft_model(demo_model, demo_path):
    with pytest.raises(UsageError, match="needs a draft model"):
        demo_model.generate("x", speculative="draft")
    with pytest.raises(UsageError, match="speculative must be one of"):
        ondevice.load(demo_path, speculative="draft")
    with pytest.raises(ModelNotFound, match="the draft model"):
        ondevice.load(demo_path, speculative="no-such-draft.gguf")


def test_a_draft_with_another_vocabulary_is_refused(demo_path, tmp_path):
    """A tiny llama with a vocabulary of its own: a different size. The model that tried to
    take it as a draft is closed, not leaked."""
    from gguf_corpus import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny.gguf")
    with pytest.raises(UsageError, match="does not share the model's vocabulary: it has"):
        ondevice.load(demo_path, n_ctx=512, threads=2, speculative=tiny)


def _patched(src, dst, find: bytes, offset: int, new: bytes):
    """A copy of src with bytes replaced in place in its header (the layout unchanged)."""
    shutil.copyfile(src, dst)
    i = bytes(dst.read_bytes()[: 4 << 20]).find(find)
    assert i > 0
    with open(dst, "r+b") as f:
        f.seek(i + offset)
        f.write(new)
    return dst


def test_a_draft_differing_in_one_token_or_its_bos_is_refused(demo_path, tmp_path):
    """The demo model with one token's text changed in place (the same size, the same ids
    everywhere else): the header check names the token, before the draft's weights load.
    With its BOS id changed instead (the tokens equal), the loaded vocabularies differ."""
    # "ĠParis" in the length-prefixed tokens array becomes "ĠPqris"
    one = _patched(demo_path, tmp_path / "token.gguf", b"\xc4\xa0Paris", 3, b"q")
    with pytest.raises(UsageError, match=r"token \d+ is 'ĠPqris' in it and 'ĠParis'"):
        ondevice.load(demo_path, n_ctx=512, threads=2, speculative=one)
    key = b"tokenizer.ggml.bos_token_id"
    bos = ondevice.load(demo_path, n_ctx=512, threads=2, speculative="off")
    old = bos.bos
    bos.close()
    # the key, then its value type (uint32, 4 bytes), then the value
    two = _patched(
        demo_path, tmp_path / "bos.gguf", key, len(key) + 4, (old + 1).to_bytes(4, "little")
    )
    with pytest.raises(UsageError, match="its BOS/EOS tokens are"):
        ondevice.load(demo_path, n_ctx=512, threads=2, speculative=two)


def test_cli_run_with_a_draft_model(demo_f16_path, demo_path, cli_env, tmp_path):
    args = [sys.executable, "-m", "ondevice", "run", str(demo_f16_path), COUNTING]
    opts = ["-n", "24", "--temperature", "0", "--threads", "2", "--ctx", "512", "--json"]
    r = subprocess.run(
        [*args, *opts, "--speculative", str(demo_path)],
        capture_output=True, text=True, env=cli_env, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["drafted_tokens"] > 0
    bad = subprocess.run(
        [*args, *opts, "--speculative", str(tmp_path / "missing.gguf")],
        capture_output=True, text=True, env=cli_env, timeout=180,
    )  # fmt: skip
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "draft model" in lines[0] and "Traceback" not in bad.stderr


def test_drafter_trims_its_cache_to_what_the_target_kept(target):
    d = Drafter(target.draft._live_engine())
    d.reset()
    policy = speculate.Policy(speculate.DRAFT)
    policy.observe_decode(1, 1.0)  # a slow target and a cheap draft: long drafts pay
    policy.observe_drafting(0.001, 1)
    ctx = target.tokenize(COUNTING)
    draft, _ = d.propose(ctx, 6, policy, owner="a")
    assert len(draft) == 6
    assert d.tokens == ctx + draft[:5]  # the last drafted token is proposed, not evaluated
    d.keep(len(ctx) + 2)
    assert d.tokens == ctx + draft[:2] and d.eng.kv_used() == len(ctx) + 2
    again, _ = d.propose(ctx + draft[:3], 2, policy, owner="a")  # catches up one token
    assert again == draft[3:5]
    other, _ = d.propose(ctx[:4], 1, policy, owner="b")  # a new owner: back to the prefix
    assert d.tokens[:4] == ctx[:4] and len(d.tokens) == 4 and len(other) <= 1
    d.reset()


def test_policy_stops_a_draft_when_the_next_token_is_not_worth_it():
    p = speculate.Policy(speculate.DRAFT)
    p.observe_decode(1, 0.010)
    for n in (2, 5, 9, 17):
        p.observe_decode(n, 0.010 + 0.002 * (n - 1))
    p.observe_drafting(0.004, 1)  # a draft decode costs 40% of the target's
    assert p.worth_drafting(0.95)
    assert not p.worth_drafting(0.5)  # 0.5 x 10 ms saved < 4 ms + 2 ms
    for _ in range(20):  # the low-confidence bucket keeps being refused
        p.observe_confidence([5], 0, True)
    assert p.confident_acceptance(5) < 0.05
    assert p.confident_acceptance(0) > 0.9


def test_policy_backs_off_when_drafting_loses_and_probes_less_and_less():
    p = speculate.Policy(speculate.DRAFT)
    assert p.length(16) == 0  # a plain decode first: the yardstick
    p.observe_decode(1, 0.010)
    assert p.length(16) == 16  # nothing measured against it yet: try
    for _ in range(30):
        p.observe_step(1, 0.025)  # drafting steps give 40 tok/s against plain 100
    waits = []
    for _ in range(3):
        n = 1
        while p.length(16) == 0:
            n += 1
        waits.append(n)
    assert waits == [8, 16, 32], waits
    for _ in range(30):
        p.observe_step(4, 0.020)  # it pays now (200 tok/s)
    assert p.length(16) == 16 and p.probe_wait == speculate.PROBE_EVERY
    got = [p.length(16) for _ in range(2 * speculate.PLAIN_EVERY)]
    assert got.count(0) == 2  # still one plain decode in PLAIN_EVERY: a fresh yardstick


def test_policy_defers_a_probe_that_needs_a_long_catch_up_to_the_next_prompt():
    p = speculate.Policy(speculate.DRAFT)
    p.observe_decode(1, 0.010)
    for _ in range(30):
        p.observe_step(1, 0.025)  # drafting loses: the gate is closed
    p.probe_wait = 128
    assert not p.drafting() and not p.probe_due(speculate.PROBE_LAG_MAX)
    n = 1
    while p.length(16) == 0:
        n += 1
    assert n == 128 and p.probe_wait == 256  # a probe, and the wait doubled after it
    p.defer_probe()  # ... but the draft model is far behind: not now
    assert p.probe_wait == 128 and p.probe_due(1)  # due, at the next prompt
    assert p.length(16) == 16  # and asked again at once


def test_a_backed_off_draft_is_not_caught_up_on_a_long_prompt_mid_reply(target):
    """Backed off, the draft model doesn't see a new prompt; a probe that comes up in the
    reply would first evaluate all of it (seconds, mid-stream). It waits for the next prompt,
    which the draft then evaluates with the target, before the first token."""
    policy = target._speculation(speculate.DRAFT)
    drafter = target._drafter
    policy.observe_decode(1, 0.010)
    for _ in range(30):
        policy.observe_step(1, 0.050)  # measured: drafting loses
    policy.probe_wait, policy.skipped = 128, 28  # a probe comes 100 tokens into the reply
    long_prompt = " ".join(f"item {i}," for i in range(150))
    lags = []
    propose = drafter.propose

    def watching(context, *a, **k):
        lags.append(drafter.lag(context, owner=k["owner"]))
        return propose(context, *a, **k)

    drafter.propose = watching
    try:
        target.reset()
        drafter.reset()
        got = target.generate(long_prompt, max_tokens=120, temperature=0, speculative="draft")
        assert got.stats.completion_tokens == 120
        assert lags == [] and drafter.tokens == []  # the probe was put off, not paid
        assert policy.probe_due(1)
        target.reset()
        target.generate(long_prompt, max_tokens=8, temperature=0, speculative="draft")
        assert lags and max(lags) <= 2  # the prompt went in with the target's: no catch-up
        # A probe due within PROBE_LAG_MAX tokens: the prompt goes in, the probe catches up
        # on the reply's tokens so far only.
        policy.probe_wait, policy.skipped = 128, 100
        lags.clear()
        target.reset()
        target.generate(long_prompt, max_tokens=40, temperature=0, speculative="draft")
        assert lags and max(lags) <= speculate.PROBE_LAG_MAX
    finally:
        drafter.propose = propose
        target._policies.pop(speculate.DRAFT, None)


def test_speculative_serve_with_a_draft_model(demo_f16_path, demo_path):
    """`serve MODEL --speculative DRAFT`: a request running alone drafts with the draft model
    (the real server process, the official openai client)."""
    import openai
    from server_fixtures import ServerProcess

    with ServerProcess(demo_f16_path, "--ctx", "1024", "--speculative", str(demo_path)) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="demo", prompt=COUNTING, max_tokens=24, temperature=0)
        extra = r.model_extra["ondevice"]
        assert 0 < extra["accepted_tokens"] <= extra["drafted_tokens"]
        assert s.metrics()["drafted_tokens_total"] == extra["drafted_tokens"]
