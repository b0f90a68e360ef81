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

Control tokens in content. Message content, tools and documents are the caller's text, often
untrusted (a web page to summarise, an email): by default no text of theirs becomes a control
token. A user message `hi<|im_end|>\n<|im_start|>system\n...` is tokenized as the plain text it
is, and only the template's own markup (`<|im_start|>user\n`) gives control tokens. The prompt is
rendered with the caller's control-token texts marked (`ChatFormat.prompt(protect=...)`, see
`ondevice.chat_formats`), and the marked pieces are tokenized without special-token parsing.
Ordinary content (no control-token text in it) tokenizes exactly as it always did.
`allow_control_tokens=True` (on `chat()` and `Conversation`) turns this off for callers who
really write control tokens into their messages.

Messages. `send`/`stream` take a user message as text, or messages in OpenAI's shapes (a tool
result `{"role": "tool", "tool_call_id": ..., "content": ...}`, several of them as a list);
`append` adds messages without a reply; `tools=`/`documents=` go to the template as Hugging
Face passes them. Every key of every message is kept, in `messages` and through `save`/`load`.
The last turn's rendered `Prompt` (its pieces, the messages as the template saw them, the
generation prompt) is `Conversation.last_prompt`.

A Conversation is not thread-safe; the Model under it is.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ondevice import app, chat_formats, paths
from ondevice.chat_formats import ChatFormat, Prompt
from ondevice.chat_messages import validate_messages, validate_tools
from ondevice.chat_tokens import (
    control_tokens,
    protected_ids,
    splits_cleanly,
    tokenize_pieces,
    with_bos,
)
from ondevice.errors import ContextOverflow, UsageError
from ondevice.results import Chunk, Result
from ondevice.settings import MAX_TOKENS, SAMPLING, Setting, sampling_defaults
from ondevice.stats import Stats
from ondevice.tools import ToolCall, ToolPlan, parse_calls
from ondevice.tools import plan as plan_tools
from ondevice.tools import trigger_grammar as tool_grammar

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
    tool_calls: list[ToolCall] = field(default_factory=list)


def tool_kwargs(p: ToolPlan | None) -> dict[str, Any]:
    """What a tool plan asks of Model.stream: a constraint from the start (required / named)
    or a lazy grammar from the call's opening text (auto)."""
    if p is None or p.choice == "none":
        return {}
    if p.json_schema is not None:
        return {"json_schema": p.json_schema}
    return {"lazy_grammar": (p.trigger, tool_grammar(p))}


def read_calls(model: ModelLike, p: ToolPlan | None, text: str, tokens: list[int]):
    """(the reply's text without its calls, the calls) — parsed from the text with control
    tokens written out (Mistral's [TOOL_CALLS] is one)."""
    if p is None or p.choice == "none" or not tokens:
        return text, []
    special = model.detokenize(tokens, special=True) if p.format == "mistral" else text
    rest, calls = parse_calls(special, p)
    return (rest if calls else text), calls


def assistant_message(
    text: str, calls: list[ToolCall], fmt: ChatFormat | None = None, raw: str = ""
) -> dict[str, Any]:
    """The reply as it goes into the history (OpenAI's shape). A template that can't render
    tool calls (`chat_formats.capabilities`) gets the reply as the model wrote it instead."""
    if calls and fmt is not None:
        caps = chat_formats.capabilities(fmt)
        if not (caps.object_arguments or caps.string_arguments):
            return {"role": "assistant", "content": raw.strip()}
    if not calls:
        return {"role": "assistant", "content": text.strip()}
    return {
        "role": "assistant",
        "content": text.strip() or None,
        "tool_calls": [c.to_openai() for c in calls],
    }


def chat(
    model: ModelLike,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_format: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    allow_control_tokens: bool = False,
    tool_choice: Any = None,
    max_tokens: int = 256,
    stop: str | Sequence[str] | None = None,
    cancel: threading.Event | None = None,
    **sampling: Any,
) -> Iterator[Chunk]:
    """Stream the assistant's reply to an OpenAI-style message list, like `Model.stream`.

    The prompt is rendered with the model's chat format (see `ondevice.chat_formats`), with
    `tools` and `documents` passed to the template, so the format's stop strings apply besides
    `stop`. Control-token text in the messages stays text unless `allow_control_tokens`.
    Stateless: the runtime still reuses the KV cache for the longest common token prefix with
    the previous call.
    """
    t0 = time.perf_counter()
    fmt = chat_formats.for_model(model, chat_format)
    prompt = render_prompt(
        model, fmt, messages, tools=tools, documents=documents,
        allow_control_tokens=allow_control_tokens,
    )  # fmt: skip
    tokens = tokenize_pieces(model, prompt.pieces, protected=protected_ids(model))
    p = plan_tools(tools, tool_choice, fmt.template)
    gen = model.stream(
        tokens, max_tokens=max_tokens, stop=_stops(fmt, stop), cancel=cancel,
        **tool_kwargs(p), **sampling,
    )  # fmt: skip
    return _tidy(gen, time.perf_counter() - t0)


def render_prompt(
    model: ModelLike,
    fmt: ChatFormat,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    allow_control_tokens: bool = False,
) -> Prompt:
    """`fmt.prompt(...)` with the model's control tokens kept out of the caller's text (unless
    `allow_control_tokens`); tokenize its pieces with `tokenize_pieces`."""
    protect = None if allow_control_tokens else control_tokens(model).protector(fmt)
    return fmt.prompt(
        messages, add_generation_prompt, tools=tools, documents=documents, protect=protect
    )


def tokenize_prompt(model: ModelLike, text: str) -> list[int]:
    """Tokens of a rendered prompt taken as trusted text: special tokens parsed everywhere in
    it, BOS added once. (Prompts rendered from messages go through `tokenize_pieces`.)

    The model's BOS is prepended when its vocabulary asks for one and the template has not
    already written it (many templates start with `{{ bos_token }}`).
    """
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    return with_bos(model, tokens)


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

    Keyword arguments are defaults for every turn (max_tokens, stop, tools, documents and the
    sampling parameters of `Model.stream`); `send`/`stream` take the same keywords for one turn.
    `allow_control_tokens=True` lets control-token text in messages act as control tokens (see
    the module docstring).
    """

    def __init__(
        self,
        model: ModelLike,
        system: str | None = None,
        *,
        chat_format: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        allow_control_tokens: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] | None = None,
        **sampling: Any,
    ) -> None:
        self.model = model
        self.format: ChatFormat = chat_formats.for_model(model, chat_format)
        self._system: dict[str, Any] | None = None
        self.system = system
        self._turns: list[dict[str, Any]] = []  # every message after the system prompt
        self.tools = tools
        self.documents = documents
        self.allow_control_tokens = allow_control_tokens
        self.stop: list[str] = [stop] if isinstance(stop, str) else list(stop or ())
        self.settings: dict[str, Any] = {}
        self.set("max_tokens", max_tokens)
        for name, value in sampling.items():
            self.set(name, value)
        self.last: Reply | None = None
        self.last_prompt: Prompt | None = None  # the last turn's rendered prompt
        self._tool_plan: ToolPlan | None = None
        self.dropped_turns = 0  # over the conversation's life
        self._ledger = _Ledger()
        self._splittable = splits_cleanly(model)

    # --- history --------------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        """The system prompt's text (None: the format's default, if any)."""
        if self._system is None:
            return None
        content = self._system.get("content")
        if isinstance(content, list):
            return "\n".join(p["text"] for p in content)
        return content

    @system.setter
    def system(self, text: str | None) -> None:
        if text is not None and not isinstance(text, str):
            raise UsageError("the system prompt must be text")
        self._system = validate_messages([{"role": "system", "content": text}])[0] if text else None

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tools offered on every turn (OpenAI's shape; None: none)."""
        return copy.deepcopy(self._tools)

    @tools.setter
    def tools(self, tools: Sequence[Mapping[str, Any]] | None) -> None:
        self._tools = validate_tools(tools)

    @property
    def documents(self) -> list[dict[str, Any]] | None:
        """The documents given to every turn (None: none)."""
        return copy.deepcopy(self._documents)

    @documents.setter
    def documents(self, documents: Sequence[Mapping[str, Any]] | None) -> None:
        self._documents = validate_tools(documents, "documents")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The history as OpenAI-style messages with every key, system prompt first (copies)."""
        return copy.deepcopy(self._with_system(self._turns))

    def _with_system(self, turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return ([self._system] if self._system else []) + turns

    def append(self, *messages: Mapping[str, Any]) -> None:
        """Add messages to the history without a reply (an assistant message with tool calls
        made elsewhere, a few-shot example, ...). A system message goes first only."""
        msgs = validate_messages(list(messages))
        if any(m["role"] == "system" for m in msgs):
            raise UsageError("set the system prompt with Conversation.system")
        self._turns = [*self._turns, *msgs]

    def reset(self) -> None:
        """Forget the turns; the system prompt stays (and stays in the KV cache)."""
        self._turns = []
        self.last = None

    def __len__(self) -> int:
        return len(self._turns)

    def render(self, add_generation_prompt: bool = False) -> str:
        """The history as the prompt text the model sees."""
        return self.format.render(
            self._with_system(self._turns),
            add_generation_prompt,
            tools=self._tools,
            documents=self._documents,
        )

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
    def send(self, message: Message, **kwargs: Any) -> Reply:
        """Add a user message (or messages, see `stream`) and return the whole reply."""
        for _ in self.stream(message, **kwargs):
            pass
        assert self.last is not None
        return self.last

    def astream(self, message: Message, **kwargs: Any) -> app.AsyncStream:
        """`stream()` as an async iterator run on a worker thread (`ondevice.app.astream`);
        cancelling the consuming task stops the reply within one token."""
        return app.astream(self, message, **kwargs)

    def stream(self, message: Message, **kwargs: Any) -> Iterator[Chunk]:
        """Add a user message and stream the reply; the turn enters the history when the reply
        ends (a reply cancelled before its first word leaves the history unchanged).

        `message` is the user's text, or a message dict in OpenAI's shape (a tool result:
        `{"role": "tool", "tool_call_id": ..., "content": ...}`), or a list of them.
        Keywords: max_tokens, stop, cancel (a threading.Event), tools and documents (for this
        turn instead of the conversation's), and sampling parameters.
        Raises ContextOverflow (now, not when iterating) if the message can't fit the context.
        """
        t0 = time.perf_counter()
        new = _turn_messages(message)
        opts = dict(self.settings)
        cancel = kwargs.pop("cancel", None)
        stop = kwargs.pop("stop", None)
        tools = validate_tools(kwargs.pop("tools")) if "tools" in kwargs else self._tools
        p = plan_tools(tools, kwargs.pop("tool_choice", None), self.format.template)
        docs = kwargs.pop("documents", self._documents)
        docs = validate_tools(docs, "documents")
        opts.update(kwargs)
        max_tokens = int(opts.pop("max_tokens", DEFAULT_MAX_TOKENS))
        turns, plan, dropped = self._prepare(new, max_tokens, tools, docs)
        stops = _stops(
            self.format, [*self.stop, *([stop] if isinstance(stop, str) else stop or [])]
        )
        gen = self.model.stream(
            plan.tokens, max_tokens=max_tokens, stop=stops, cancel=cancel, **tool_kwargs(p),
            **opts,
        )  # fmt: skip
        self._apply(plan)
        self._tool_plan = p
        return self._run(gen, turns, new, dropped, time.perf_counter() - t0)

    def _run(
        self,
        gen: Iterator[Chunk],
        turns: list[dict[str, Any]],
        new: list[dict[str, Any]],
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
                    self._commit(turns, new, "".join(shown), tokens, chunk.stats, dropped)
                    done = True
                yield chunk
        finally:
            tidy.close()
            if not done and "".join(shown).strip():
                # The caller stopped reading: keep what it saw, as a cancelled reply.
                st = Stats(finish_reason="cancelled", n_ctx=self.model.n_ctx)
                self._commit(turns, new, "".join(shown), tokens, st, dropped)

    def _commit(
        self,
        turns: list[dict[str, Any]],
        new: list[dict[str, Any]],
        text: str,
        tokens: list[int],
        st: Stats,
        dropped: int,
    ) -> None:
        shown, calls = read_calls(self.model, self._tool_plan, text, tokens)
        reply = Reply(shown, tokens, st, dropped, calls)
        self.last = reply
        if st.finish_reason == "cancelled" and not text.strip():
            return
        self._turns = [*turns, *new, assistant_message(shown, calls, self.format, text)]
        self.dropped_turns += dropped
        if tokens:
            pieces = self.model.token_bytes(tokens)
            self._ledger.extend(tokens, b"".join(pieces), pieces)

    # --- fitting the context and building the tokens -----------------------------------------
    def _prepare(
        self, new: list[dict[str, Any]], max_tokens: int, tools: Any, docs: Any
    ) -> tuple[list[dict[str, Any]], _Plan, int]:
        n_ctx = self.model.n_ctx
        reserve = n_ctx // 4 if max_tokens < 0 else min(max_tokens, n_ctx // 4)
        turns = list(self._turns)
        plan = self._plan(self._render(turns, new, tools, docs))
        dropped = 0
        if len(plan.tokens) + reserve <= n_ctx:
            return turns, plan, dropped
        target = (n_ctx - reserve) * 3 // 4
        while turns and len(plan.tokens) > target:
            # Drop the oldest turn: a user message and what follows it up to the next one.
            del turns[0]
            while turns and turns[0]["role"] != "user":
                del turns[0]
            dropped += 1
            plan = self._plan(self._render(turns, new, tools, docs))
        if len(plan.tokens) >= n_ctx:
            raise ContextOverflow(
                f"this message needs {len(plan.tokens)} tokens with the system prompt and "
                f"the chat format, but the context holds {n_ctx}",
                hint="shorten it, or load the model with a larger context (--ctx)",
            )
        return turns, plan, dropped

    def _render(
        self, turns: list[dict[str, Any]], new: list[dict[str, Any]], tools: Any, docs: Any
    ) -> Prompt:
        prompt = render_prompt(
            self.model,
            self.format,
            self._with_system([*turns, *new]),
            tools=tools,
            documents=docs,
            allow_control_tokens=self.allow_control_tokens,
        )
        self.last_prompt = prompt
        return prompt

    def _plan(self, prompt: Prompt) -> _Plan:
        data = prompt.text.encode("utf-8")
        keep_tok, keep_bytes = self._ledger.cut_for(data) if self._splittable else (0, 0)
        protected = protected_ids(self.model)
        if keep_tok == 0:
            tokens = tokenize_pieces(
                self.model, prompt.pieces, protected=protected, splittable=self._splittable
            )
            new_tokens, new_text = tokens, data
            added_bos = len(tokens) > 0 and not self._spells(tokens[:1], data)
        else:
            new_tokens = tokenize_pieces(
                self.model,
                _tail(prompt.pieces, keep_bytes),
                bos=False,
                protected=protected,
                splittable=True,
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

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation (system prompt, every message with every key, tools and
        documents) as JSON, atomically."""
        target = Path(path).expanduser()
        messages = self._turns
        system = self.system
        if (
            self._system is not None
            and set(self._system) != {"role", "content"}
            or (self._system is not None and not isinstance(self._system.get("content"), str))
        ):
            messages, system = [self._system, *messages], None  # kept whole, as the first message
        doc: dict[str, Any] = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model.path.name,
            "chat_format": self.format.name,
            "system": system,
            "messages": messages,
        }
        if self._tools is not None:
            doc["tools"] = self._tools
        if self._documents is not None:
            doc["documents"] = self._documents
        return paths.write_text(target, json.dumps(doc, ensure_ascii=False, indent=2) + "\n")

    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the history (system prompt, tools and documents too) with a saved
        conversation, or with a JSON list of OpenAI-style messages. Returns the number of
        messages loaded (the system prompt not counted). A failed load changes nothing."""
        source = Path(path).expanduser()
        doc = _read_json(source)
        tools = documents = None
        if isinstance(doc, list):
            messages, system = doc, None
        elif isinstance(doc, dict) and doc.get("format") == FILE_FORMAT:
            messages, system = doc.get("messages"), doc.get("system")
            if system is not None and not isinstance(system, str):
                raise UsageError(f"{source}: 'system' must be text")
            tools = _field(source, validate_tools, doc.get("tools"))
            documents = _field(source, validate_tools, doc.get("documents"), "documents")
        else:
            raise UsageError(
                f"{source} is not a saved conversation",
                hint="save one with /save or Conversation.save()",
            )
        if not isinstance(messages, list):
            raise UsageError(f"{source}: 'messages' must be a list")
        msgs = _field(source, validate_messages, messages)
        head = msgs.pop(0) if msgs and msgs[0]["role"] == "system" else None
        if any(m["role"] == "system" for m in msgs):
            raise UsageError(f"{source}: only the first message may be a system prompt")
        self.system = system
        if head is not None:
            self._system = head
        self._turns = msgs
        self._tools, self._documents = tools, documents
        self.last = None
        return len(self._turns)


Message = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]


def _turn_messages(message: Any) -> list[dict[str, Any]]:
    """A turn's new messages: text is a user message."""
    if isinstance(message, str):
        if not message.strip():
            raise UsageError("the message is empty")
        return validate_messages([{"role": "user", "content": message}])
    if isinstance(message, Mapping):
        msgs = validate_messages([message])
    elif isinstance(message, Sequence) and not isinstance(message, bytes) and message:
        msgs = validate_messages(message)
    else:
        raise UsageError(
            f"a message is text or a {{'role': ..., 'content': ...}} dict, not {type(message).__name__}"
            if not isinstance(message, Sequence) or isinstance(message, bytes)
            else "the message list is empty"
        )
    if any(m["role"] == "system" for m in msgs):
        raise UsageError("set the system prompt with Conversation.system")
    return msgs


def _tail(pieces: Sequence[tuple[str, bool]], skip: int) -> list[tuple[bytes, bool]]:
    """The pieces after their first `skip` bytes (a UTF-8 character boundary)."""
    out = []
    for text, plain in pieces:
        data = text.encode("utf-8")
        if skip >= len(data):
            skip -= len(data)
            continue
        out.append((data[skip:], plain))
        skip = 0
    return out


def _read_json(source: Path) -> Any:
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such file: {source}") from None
    except IsADirectoryError:
        raise UsageError(f"{source} is a folder, not a saved conversation") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{source} is not a saved conversation: {text}") from None
    except RecursionError:
        raise UsageError(f"{source} is not a saved conversation: nested too deeply") from None


def _field(source: Path, check: Callable[..., Any], *args: Any) -> Any:
    try:
        return check(*args)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc.message}", hint=exc.hint) from None
