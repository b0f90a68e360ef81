"""Chat on top of `Model.stream`: one-shot `chat(messages)` and a `Conversation` that keeps the
history and reuses the KV cache from one turn to the next.

KV reuse. `Model.stream` keeps the longest common *token* prefix with its previous call, so turn N
costs only its new tokens if the history re-tokenizes to exactly the tokens already in the cache.
Re-tokenizing the rendered text is not enough for that: the model's own reply tokens are often
not the tokenizer's canonical split of the reply text, and the template may render a reply
slightly differently (trimmed) from how it was generated. So a Conversation keeps a ledger: the
token ids it last sent (prompt plus reply, as generated) and the exact bytes they stand for.
Each turn renders the whole history, finds the longest common byte prefix with the ledger, keeps
the ledger's tokens up to the last token boundary inside that prefix, and tokenizes only the rest.
Vocabularies whose tokenization of a piece of text depends on what precedes it (SentencePiece
with a space prefix) can't be split like that; there we send the canonical tokenization of the
whole prompt and the runtime still reuses whatever prefix matches.

When the history no longer fits the context, the oldest turns are dropped (the system prompt
stays), down to three quarters of the room so that the following turns reuse the cache again
instead of each dropping one turn and re-evaluating everything; the reply says so in
`dropped_turns` and a note in its stats. A single message longer than the context is
`ContextOverflow`.

A Conversation is not thread-safe; the Model under it is.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ondevice import app, chat_formats, paths
from ondevice.chat_formats import ChatFormat
from ondevice.errors import ContextOverflow, UsageError
from ondevice.results import Chunk, Result
from ondevice.settings import MAX_TOKENS, SAMPLING, Setting, sampling_defaults
from ondevice.stats import Stats

FILE_FORMAT = "ondevice.conversation"
FILE_VERSION = 1
MAX_FILE_BYTES = 64 << 20  # a saved conversation; a long one is a few hundred KB
DEFAULT_MAX_TOKENS = 512

# What /set and Conversation.set accept: the sampling settings and max_tokens (ondevice.settings).
SETTINGS: dict[str, Setting] = {**SAMPLING, "max_tokens": MAX_TOKENS}


class ModelLike(Protocol):
    """What a conversation needs of a model (`ondevice.Model` has it)."""

    n_ctx: int
    bos: int
    add_bos: bool
    path: Path
    metadata: dict[str, Any]

    def stream(self, prompt: Any, **kwargs: Any) -> Iterator[Chunk]: ...
    def tokenize(
        self, text: str | bytes, *, add_special: bool = ..., parse_special: bool = ...
    ) -> list[int]: ...
    def token_bytes(self, tokens: Sequence[int], *, special: bool = ...) -> list[bytes]: ...


@dataclass
class Reply(Result):
    """A conversation turn's reply: text, generated token ids, stats, and how many of the oldest
    turns were dropped from the history to make room for it."""

    dropped_turns: int = 0


def chat(
    model: ModelLike,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_format: str | None = None,
    max_tokens: int = 256,
    stop: str | Sequence[str] | None = None,
    cancel: threading.Event | None = None,
    **sampling: Any,
) -> Iterator[Chunk]:
    """Stream the assistant's reply to an OpenAI-style message list, like `Model.stream`.

    The prompt is rendered with the model's chat format (see `ondevice.chat_formats`), so the
    format's stop strings apply besides `stop`. Stateless: the runtime still reuses the KV cache
    for the longest common token prefix with the previous call.
    """
    t0 = time.perf_counter()
    fmt = chat_formats.for_model(model, chat_format)
    text = fmt.render(messages, add_generation_prompt=True)
    check_text(text)
    tokens = tokenize_prompt(model, text)
    gen = model.stream(
        tokens, max_tokens=max_tokens, stop=_stops(fmt, stop), cancel=cancel, **sampling
    )
    return _tidy(gen, time.perf_counter() - t0)


def check_text(text: str) -> None:
    """UsageError for text that can't be UTF-8 (lone surrogates from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"the text has an invalid character at position {exc.start} (a lone surrogate)",
            hint="decode input with errors='replace'",
        ) from None


def tokenize_prompt(model: ModelLike, text: str) -> list[int]:
    """Tokens of a rendered prompt: special tokens parsed, BOS added once.

    The model's BOS is prepended when its vocabulary asks for one and the template has not
    already written it (many templates start with `{{ bos_token }}`).
    """
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    bos = model.bos
    if model.add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
        tokens.insert(0, bos)
    return tokens


def _stops(fmt: ChatFormat, stop: str | Sequence[str] | None) -> list[str]:
    extra = [stop] if isinstance(stop, str) else list(stop or ())
    return list(dict.fromkeys([*fmt.stop, *extra]))


def _tidy(gen: Iterator[Chunk], prep_s: float) -> Iterator[Chunk]:
    """Drop the whitespace a reply starts with (Phi-2 answers " Paris" after "Output:") and count
    the template's time in the stats."""
    started = False
    try:
        for chunk in gen:
            text = chunk.text
            if not started:
                text = text.lstrip()
                started = bool(text)
            if chunk.stats is not None:
                _add_prep_time(chunk.stats, prep_s)
            yield Chunk(text, chunk.tokens, chunk.finish_reason, chunk.stats)
    finally:
        gen.close()  # type: ignore[attr-defined]


def _add_prep_time(st: Stats, prep_s: float) -> None:
    # Stats.ttft_s counts from the call: the template and tokenization are part of it.
    st.ttft_s += prep_s
    st.total_s += prep_s


class _Ledger:
    """Token ids as last sent to the model, the bytes they stand for, and the points where the
    two line up (a prefix of the tokens that spells exactly a prefix of the bytes)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.data = b""
        self.cut_tokens: list[int] = [0]
        self.cut_bytes: list[int] = [0]

    def truncate(self, n_tokens: int, n_bytes: int) -> None:
        i = bisect.bisect_right(self.cut_tokens, n_tokens)
        del self.cut_tokens[i:], self.cut_bytes[i:]
        del self.tokens[n_tokens:]
        self.data = self.data[:n_bytes]

    def extend(self, tokens: Sequence[int], text: bytes, pieces: Sequence[bytes] | None) -> None:
        """Append tokens that spell `text`; `pieces` (each token's bytes) give a cut after every
        token when they add up to `text`, else there is one cut at the end."""
        n0, b0 = len(self.tokens), len(self.data)
        self.tokens.extend(tokens)
        self.data += text
        if pieces is not None and b"".join(pieces) == text:
            pos = b0
            for i, p in enumerate(pieces):
                pos += len(p)
                self._cut(n0 + i + 1, pos)
        else:
            self._cut(len(self.tokens), len(self.data))

    def _cut(self, n_tokens: int, n_bytes: int) -> None:
        if n_tokens == self.cut_tokens[-1]:
            self.cut_bytes[-1] = n_bytes  # the same point again (an empty block)
        else:
            self.cut_tokens.append(n_tokens)
            self.cut_bytes.append(n_bytes)

    def cut_for(self, data: bytes) -> tuple[int, int]:
        """(tokens, bytes) of the longest ledger prefix that `data` starts with, ending on a
        token boundary and a UTF-8 character boundary of `data`."""
        common = _common_prefix_len(self.data, data)
        i = bisect.bisect_right(self.cut_bytes, common) - 1
        while i > 0:
            b = self.cut_bytes[i]
            if b >= len(data) or (data[b] & 0xC0) != 0x80:
                break
            i -= 1
        return self.cut_tokens[i], self.cut_bytes[i]


def _common_prefix_len(a: bytes, b: bytes) -> int:
    """Length of the common prefix of two byte strings, by bisection over memcmp'd slices."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Plan:
    """The tokens for one rendered prompt, and how they extend the ledger."""

    tokens: list[int]
    keep_tokens: int
    keep_bytes: int
    new_tokens: list[int]
    new_text: bytes
    new_pieces: list[bytes] | None


class Conversation:
    """A chat with history on one Model. Create with `Model.conversation(system=None, ...)`.

        conv = model.conversation("You are terse.", temperature=0.2)
        reply = conv.send("What is the capital of France?")
        print(reply.text, reply.stats.prompt_eval_tokens)
        for chunk in conv.stream("And of Italy?"):
            print(chunk.text, end="")

    Keyword arguments are defaults for every turn (max_tokens, stop and the sampling parameters
    of `Model.stream`); `send`/`stream` take the same keywords for one turn.
    """

    def __init__(
        self,
        model: ModelLike,
        system: str | None = None,
        *,
        chat_format: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] | None = None,
        **sampling: Any,
    ) -> None:
        self.model = model
        self.format: ChatFormat = chat_formats.for_model(model, chat_format)
        self._system = system or None
        self._turns: list[dict[str, str]] = []  # user and assistant messages, in order
        self.stop: list[str] = [stop] if isinstance(stop, str) else list(stop or ())
        self.settings: dict[str, Any] = {}
        self.set("max_tokens", max_tokens)
        for name, value in sampling.items():
            self.set(name, value)
        self.last: Reply | None = None
        self.dropped_turns = 0  # over the conversation's life
        self._ledger = _Ledger()
        self._splittable = self._tokenizer_splits_cleanly()

    # --- history --------------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        """The system prompt (None: the format's default, if any)."""
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        self._system = text or None

    @property
    def messages(self) -> list[dict[str, str]]:
        """The history as OpenAI-style messages, system prompt first (copies)."""
        return [dict(m) for m in self._with_system(self._turns)]

    def _with_system(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self._system}] if self._system else []
        return head + turns

    def reset(self) -> None:
        """Forget the turns; the system prompt stays (and stays in the KV cache)."""
        self._turns = []
        self.last = None

    def __len__(self) -> int:
        return len(self._turns)

    def render(self, add_generation_prompt: bool = False) -> str:
        """The history as the prompt text the model sees."""
        return self.format.render(self._with_system(self._turns), add_generation_prompt)

    @property
    def tokens(self) -> list[int]:
        """Token ids last sent to the model: the previous prompt and the reply to it."""
        return list(self._ledger.tokens)

    # --- settings -------------------------------------------------------------------------
    def set(self, name: str, value: Any) -> Any:
        """Change a per-turn default (temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed, max_tokens); strings are converted. Returns the stored value."""
        if name not in SETTINGS:
            raise UsageError(f"unknown setting {name!r}", hint=f"use one of {', '.join(SETTINGS)}")
        converted = SETTINGS[name].validate(value)
        if converted is None:
            self.settings.pop(name, None)
        else:
            self.settings[name] = converted
        return converted

    def effective_settings(self) -> dict[str, Any]:
        """Every setting with the value a turn would use (defaults filled in)."""
        out = {**sampling_defaults(), "max_tokens": DEFAULT_MAX_TOKENS}
        out.update(self.settings)
        return out

    # --- turns ----------------------------------------------------------------------------
    def send(self, text: str, **kwargs: Any) -> Reply:
        """Add a user message and return the whole reply (loops over `stream`)."""
        for _ in self.stream(text, **kwargs):
            pass
        assert self.last is not None
        return self.last

    def astream(self, text: str, **kwargs: Any) -> app.AsyncStream:
        """`stream()` as an async iterator run on a worker thread (`ondevice.app.astream`);
        cancelling the consuming task stops the reply within one token."""
        return app.astream(self, text, **kwargs)

    def stream(self, text: str, **kwargs: Any) -> Iterator[Chunk]:
        """Add a user message and stream the reply; the turn enters the history when the reply
        ends (a reply cancelled before its first word leaves the history unchanged).

        Keywords: max_tokens, stop, cancel (a threading.Event), and sampling parameters.
        Raises ContextOverflow (now, not when iterating) if the message can't fit the context.
        """
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise UsageError(f"the message must be text, not {type(text).__name__}")
        if not text.strip():
            raise UsageError("the message is empty")
        check_text(text)
        opts = dict(self.settings)
        cancel = kwargs.pop("cancel", None)
        stop = kwargs.pop("stop", None)
        opts.update(kwargs)
        max_tokens = int(opts.pop("max_tokens", DEFAULT_MAX_TOKENS))
        user = {"role": "user", "content": text}
        turns, plan, dropped = self._prepare(user, max_tokens)
        stops = _stops(
            self.format, [*self.stop, *([stop] if isinstance(stop, str) else stop or [])]
        )
        gen = self.model.stream(
            plan.tokens, max_tokens=max_tokens, stop=stops, cancel=cancel, **opts
        )
        self._apply(plan)
        return self._run(gen, turns, user, dropped, time.perf_counter() - t0)

    def _run(
        self,
        gen: Iterator[Chunk],
        turns: list[dict[str, str]],
        user: dict[str, str],
        dropped: int,
        prep_s: float,
    ) -> Iterator[Chunk]:
        shown: list[str] = []
        tokens: list[int] = []
        done = False
        tidy = _tidy(gen, prep_s)
        try:
            for chunk in tidy:
                tokens.extend(chunk.tokens)
                shown.append(chunk.text)
                if chunk.stats is not None:
                    if dropped:
                        chunk.stats.notes.append(
                            f"dropped the {dropped} oldest turn(s) to fit the "
                            f"{self.model.n_ctx}-token context"
                        )
                    tidy.close()  # the runtime holds the model until its stream is closed
                    self._commit(turns, user, "".join(shown), tokens, chunk.stats, dropped)
                    done = True
                yield chunk
        finally:
            tidy.close()
            if not done and "".join(shown).strip():
                # The caller stopped reading: keep what it saw, as a cancelled reply.
                st = Stats(finish_reason="cancelled", n_ctx=self.model.n_ctx)
                self._commit(turns, user, "".join(shown), tokens, st, dropped)

    def _commit(
        self,
        turns: list[dict[str, str]],
        user: dict[str, str],
        text: str,
        tokens: list[int],
        st: Stats,
        dropped: int,
    ) -> None:
        reply = Reply(text, tokens, st, dropped)
        self.last = reply
        if st.finish_reason == "cancelled" and not text.strip():
            return
        self._turns = [*turns, user, {"role": "assistant", "content": text.strip()}]
        self.dropped_turns += dropped
        if tokens:
            pieces = self.model.token_bytes(tokens)
            self._ledger.extend(tokens, b"".join(pieces), pieces)

    # --- fitting the context and building the tokens -----------------------------------------
    def _prepare(
        self, user: dict[str, str], max_tokens: int
    ) -> tuple[list[dict[str, str]], _Plan, int]:
        n_ctx = self.model.n_ctx
        reserve = n_ctx // 4 if max_tokens < 0 else min(max_tokens, n_ctx // 4)
        turns = list(self._turns)
        plan = self._plan(self._render(turns, user))
        dropped = 0
        if len(plan.tokens) + reserve <= n_ctx:
            return turns, plan, dropped
        target = (n_ctx - reserve) * 3 // 4
        while turns and len(plan.tokens) > target:
            # Drop the oldest turn: a user message and the replies up to the next one.
            del turns[0]
            while turns and turns[0]["role"] != "user":
                del turns[0]
            dropped += 1
            plan = self._plan(self._render(turns, user))
        if len(plan.tokens) >= n_ctx:
            raise ContextOverflow(
                f"this message needs {len(plan.tokens)} tokens with the system prompt and "
                f"the chat format, but the context holds {n_ctx}",
                hint="shorten it, or load the model with a larger context (--ctx)",
            )
        return turns, plan, dropped

    def _render(self, turns: list[dict[str, str]], user: dict[str, str]) -> str:
        return self.format.render(self._with_system([*turns, user]), add_generation_prompt=True)

    def _plan(self, prompt: str) -> _Plan:
        data = prompt.encode("utf-8")
        keep_tok, keep_bytes = self._ledger.cut_for(data) if self._splittable else (0, 0)
        if keep_tok == 0:
            tokens = tokenize_prompt(self.model, prompt)
            new_tokens, new_text = tokens, data
            added_bos = len(tokens) > 0 and not self._spells(tokens[:1], data)
        else:
            new_tokens = self.model.tokenize(
                data[keep_bytes:], add_special=False, parse_special=True
            )
            tokens = self._ledger.tokens[:keep_tok] + new_tokens
            new_text = data[keep_bytes:]
            added_bos = False
        pieces = None
        if self._splittable:
            pieces = self.model.token_bytes(new_tokens)
            if added_bos:
                pieces[0] = b""
        return _Plan(tokens, keep_tok, keep_bytes, new_tokens, new_text, pieces)

    def _spells(self, tokens: list[int], data: bytes) -> bool:
        return data.startswith(b"".join(self.model.token_bytes(tokens)))

    def _apply(self, plan: _Plan) -> None:
        self._ledger.truncate(plan.keep_tokens, plan.keep_bytes)
        self._ledger.extend(plan.new_tokens, plan.new_text, plan.new_pieces)

    def _tokenizer_splits_cleanly(self) -> bool:
        """Whether tokenizing a text in two parts gives tokens that spell it exactly (byte-level
        BPE: yes; SentencePiece with a space prefix: no, each part gains a leading space)."""
        probe = b"a b\nc"
        toks = self.model.tokenize(probe, add_special=False, parse_special=True)
        return b"".join(self.model.token_bytes(toks)) == probe

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation (system prompt and turns) as JSON, atomically."""
        target = Path(path).expanduser()
        doc = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model.path.name,
            "chat_format": self.format.name,
            "system": self._system,
            "messages": self._turns,
        }
        return paths.write_text(target, json.dumps(doc, ensure_ascii=False, indent=2) + "\n")

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the history (and system prompt) with a saved conversation, or with a JSON
        list of OpenAI-style messages. Returns the number of messages loaded."""
        source = Path(path).expanduser()
        try:
            if source.is_file() and source.stat().st_size > MAX_FILE_BYTES:
                raise UsageError(f"{source} is larger than {MAX_FILE_BYTES >> 20} MiB")
            doc = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no such file: {source}") from None
        except IsADirectoryError:
            raise UsageError(f"{source} is a folder, not a saved conversation") from None
        except RecursionError:  # "[[[[..." deeper than the JSON parser recurses
            raise UsageError(f"{source} is not a saved conversation: nested too deep") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: 5000-digit ints
            raise UsageError(f"{source} is not a saved conversation: {exc}") from None
        if isinstance(doc, list):
            messages = doc
            system = None
        elif isinstance(doc, dict) and doc.get("format") == FILE_FORMAT:
            messages = doc.get("messages")
            system = doc.get("system")
            if system is not None and not isinstance(system, str):
                raise UsageError(f"{source}: 'system' must be text")
        else:
            raise UsageError(
                f"{source} is not a saved conversation",
                hint="save one with /save or Conversation.save()",
            )
        if not isinstance(messages, list):
            raise UsageError(f"{source}: 'messages' must be a list")
        msgs = chat_formats.validate_messages(messages)
        if msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        if any(m["role"] == "system" for m in msgs):
            raise UsageError(f"{source}: only the first message may be a system prompt")
        self._system = system or None
        self._turns = [{"role": m["role"], "content": m["content"]} for m in msgs]
        self.last = None
        return len(self._turns)
