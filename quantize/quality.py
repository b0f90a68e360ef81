"""Perplexity, KL divergence and top-1 agreement of a model on a text, as llama-perplexity does it.

The method is llama.cpp's tools/perplexity/perplexity.cpp (its default mode), step for step:
- the whole text is tokenized once, with special tokens added (BOS where the model adds one) and
  no special-token parsing; a file's single trailing newline is dropped first (`-f` does that);
- it is cut into n_chunk = n_tokens // ctx windows of ctx tokens (the tail is not scored; at
  least 2 * ctx tokens are needed);
- each window is evaluated from an empty KV cache at positions 0..ctx-1, its first token replaced
  by BOS if the model adds BOS;
- only the second half is scored: the logits at positions ctx/2 .. ctx-2 predict the tokens at
  ctx/2+1 .. ctx-1 (ctx - 1 - ctx/2 tokens per window), perplexity = exp(mean NLL).
llama-perplexity packs several windows into one batch (n_seq = 2048 // ctx) in one context; we
evaluate one window at a time (the batch split inside llama.cpp — n_ubatch 512 — is the same).

With a reference model (the unquantized file) the same windows are also evaluated by it, and for
every scored position we add KL(P_ref || P_model) = sum P_ref * (log P_ref - log P_model) and
whether both models' most likely token is the same (llama-perplexity's KL mode, "Same top p").
Logits are copied to numpy (Engine.decode_all_logits), which is fine for a measurement.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ondevice.errors import UsageError
from ondevice.loader import load
from ondevice.logits import log_softmax
from ondevice.runtime import Model

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike[str] | Model


@dataclass
class QualityResult:
    """Perplexity of a model on a text, and how far it is from a reference model.

    perplexity      exp(mean negative log-likelihood) over the scored tokens.
    tokens          how many tokens were scored (ctx - 1 - ctx/2 per window).
    ctx             window length.
    chunks          windows evaluated.
    text_tokens     tokens in the whole text.
    kl_divergence   mean KL(reference || model) in nats per scored token (None without a
                    reference).
    top1_agreement  fraction of scored positions where both models' argmax agree.
    seconds         wall time of the evaluation.
    """

    perplexity: float
    tokens: int
    ctx: int
    chunks: int
    text_tokens: int
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | os.PathLike[str]) -> str:
    """A text file as llama-perplexity's `-f` reads it: UTF-8, one trailing newline dropped."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such text file: {p}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text[:-1] if text.endswith("\n") else text


class ReferenceLogits:
    """A reference model's scored logits for one text and ctx, computed once and reused.

    For a quantization ladder the reference (the F16 file) is compared with every type; keeping
    its scored-position logits saves evaluating it again each time. They take
    `cache_bytes(...)` of memory (chunks * (ctx - 1 - ctx/2) * n_vocab * 4 bytes), so this is
    for test-sized texts; `quality_ladder` keeps the reference model loaded instead when that
    is too much. `result` is the reference's own perplexity on the text.
    """

    def __init__(
        self,
        reference: ModelLike,
        text: str,
        *,
        ctx: int = 512,
        threads: int | str = "auto",
        max_chunks: int | None = None,
    ) -> None:
        t0 = time.perf_counter()
        with ExitStack() as stack:
            ref = _open(stack, reference, ctx, threads)
            with ref.raw() as eng:
                self.tokens = _tokenize(eng, text)
                self.ctx = ctx
                self.n_vocab = eng.n_vocab
                n_chunk = _n_chunks(self.tokens, ctx, max_chunks)
                self.windows: list[np.ndarray] = []
                nll = 0.0
                first = ctx // 2
                for i, logits in enumerate(_scored_logits(eng, self.tokens, ctx, n_chunk)):
                    self.windows.append(logits.copy())
                    targets = np.asarray(self.tokens[i * ctx + first + 1 : (i + 1) * ctx])
                    nll -= float(log_softmax(logits)[np.arange(len(targets)), targets].sum())
        count = n_chunk * (ctx - 1 - first)
        self.result = QualityResult(
            perplexity=float(np.exp(nll / count)),
            tokens=count,
            ctx=ctx,
            chunks=n_chunk,
            text_tokens=len(self.tokens),
            kl_divergence=0.0,
            top1_agreement=1.0,
            seconds=time.perf_counter() - t0,
        )


def cache_bytes(n_tokens: int, n_vocab: int, ctx: int, max_chunks: int | None = None) -> int:
    """Memory ReferenceLogits needs for a text of n_tokens."""
    n = n_tokens // ctx if not max_chunks or max_chunks < 1 else min(n_tokens // ctx, max_chunks)
    return n * (ctx - 1 - ctx // 2) * n_vocab * 4


def evaluate(
    model: ModelLike,
    text: str,
    *,
    ctx: int = 512,
    reference: ModelLike | ReferenceLogits | None = None,
    threads: int | str = "auto",
    max_chunks: int | None = None,
    on_progress: Callable[[int, int], object] | None = None,
) -> QualityResult:
    """Perplexity of `model` on `text` with windows of `ctx` tokens (llama-perplexity's method),
    and with `reference` also the mean KL divergence from it and the top-1 agreement.

    model, reference  a path (or `demo`, or a store name), or a loaded Model (its n_ctx must be
                      at least ctx; its KV cache is cleared), or for the reference a
                      ReferenceLogits.
    max_chunks        score only the first windows (llama-perplexity's --chunks).
    on_progress       called as on_progress(done_windows, total_windows).
    """
    if ctx < 8:
        raise UsageError(f"ctx must be at least 8 tokens, got {ctx}")
    t0 = time.perf_counter()
    if reference is not None and reference is model:
        raise UsageError("the model and the reference are the same object")
    with ExitStack() as stack:
        m = _open(stack, model, ctx, threads)
        ref_model = None
        ref_cached = reference if isinstance(reference, ReferenceLogits) else None
        if reference is not None and ref_cached is None:
            ref_model = _open(stack, reference, ctx, threads)
        with m.raw() as eng:
            tokens = _tokenize(eng, text)
            n_chunk = _n_chunks(tokens, ctx, max_chunks)
            ref_windows: Iterator[np.ndarray] | None = None
            if ref_cached is not None:
                if (
                    ref_cached.ctx != ctx
                    or ref_cached.tokens != tokens
                    or len(ref_cached.windows) < n_chunk
                ):
                    raise UsageError(
                        "the reference logits were computed for another text, ctx or chunks",
                        hint="compute ReferenceLogits with the same text, ctx and max_chunks",
                    )
                ref_windows = iter(ref_cached.windows)
            elif ref_model is not None:
                ref_windows = _reference_windows(stack, ref_model, text, tokens, ctx, n_chunk)
            nll = 0.0
            kld = 0.0
            same_top = 0
            count = 0
            first = ctx // 2
            for i, logits in enumerate(_scored_logits(eng, tokens, ctx, n_chunk)):
                start = i * ctx
                targets = np.asarray(tokens[start + first + 1 : start + ctx])
                logp = log_softmax(logits)
                nll -= float(logp[np.arange(len(targets)), targets].sum())
                if ref_windows is not None:
                    ref_logits = next(ref_windows)
                    if ref_logits.shape != logits.shape:
                        raise UsageError(
                            "the reference model has a different vocabulary",
                            hint="compare models made from the same original",
                        )
                    ref_logp = log_softmax(ref_logits)
                    kld += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
                    same_top += int((ref_logits.argmax(axis=1) == logits.argmax(axis=1)).sum())
                count += len(targets)
                if on_progress is not None:
                    on_progress(i + 1, n_chunk)
    result = QualityResult(
        perplexity=float(np.exp(nll / count)),
        tokens=count,
        ctx=ctx,
        chunks=n_chunk,
        text_tokens=len(tokens),
        seconds=time.perf_counter() - t0,
    )
    if ref_windows is not None:
        result.kl_divergence = kld / count
        result.top1_agreement = same_top / count
    return result


# --- helpers ----------------------------------------------------------------------------------
def _open(stack: ExitStack, model: ModelLike, ctx: int, threads) -> Model:
    """A loaded model with room for ctx tokens: the caller's, or one loaded (and closed) here."""
    if isinstance(model, Model):
        if model.n_ctx < ctx:
            raise UsageError(
                f"the model was loaded with n_ctx={model.n_ctx}, smaller than ctx={ctx}",
                hint=f"load it with n_ctx >= {ctx}",
            )
        return model
    # n_batch 2048 / n_ubatch 512 are llama-perplexity's; repacking is the engine's business
    # (off on AMX builds, where it crashes).
    return stack.enter_context(load(model, n_ctx=ctx, threads=threads))


def _tokenize(eng, text: str) -> list[int]:
    if not text:
        raise UsageError("the text is empty")
    return eng.tokenize(text, add_special=True, parse_special=False)


def _n_chunks(tokens: list[int], ctx: int, max_chunks: int | None) -> int:
    if len(tokens) < 2 * ctx:
        raise UsageError(
            f"the text is {len(tokens)} tokens; perplexity with ctx {ctx} needs at least {2 * ctx}",
            hint="use a longer text or a smaller --ctx",
        )
    n = len(tokens) // ctx
    return n if max_chunks is None or max_chunks < 1 else min(n, max_chunks)


def _scored_logits(eng, tokens: list[int], ctx: int, n_chunk: int | None) -> Iterator[np.ndarray]:
    """For each window, the logits of its scored positions (ctx/2 .. ctx-2)."""
    n = len(tokens) // ctx if n_chunk is None else n_chunk
    first = ctx // 2
    for i in range(n):
        window = list(tokens[i * ctx : (i + 1) * ctx])
        if eng.add_bos:
            window[0] = eng.bos
        eng.kv_clear()
        try:
            logits = eng.decode_all_logits(window)
        finally:
            eng.kv_clear()
        yield logits[first : ctx - 1]


def _reference_windows(
    stack: ExitStack, ref: Model, text: str, tokens: list[int], ctx: int, n_chunk: int
) -> Iterator[np.ndarray]:
    eng = stack.enter_context(ref.raw())
    if _tokenize(eng, text) != tokens:
        raise UsageError(
            "the reference model tokenizes the text differently",
            hint="compare models made from the same original",
        )
    return _scored_logits(eng, tokens, ctx, n_chunk)
