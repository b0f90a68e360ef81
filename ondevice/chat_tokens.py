"""Tokenizing rendered prompts so that the caller's text never becomes control tokens.

`ChatFormat.prompt(protect=...)` (ondevice.chat_formats) renders a prompt as pieces: the
template's markup, and the control-token texts found in the caller's strings. This module
supplies the `protect` function for a model (`control_tokens(model).protector(fmt)`: which
tokens count as control tokens, learned from the model as they are met) and tokenizes the
pieces (`tokenize_pieces`): markup with special-token parsing, the caller's control-token
texts without it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from ondevice.chat_formats import ChatFormat


class TokenizerLike(Protocol):
    """What this module needs of a model (`ondevice.Model` has it)."""

    bos: int
    add_bos: bool
    metadata: dict[str, Any]

    def tokenize(
        self, text: str | bytes, *, add_special: bool = ..., parse_special: bool = ...
    ) -> list[int]: ...
    def token_bytes(self, tokens: Sequence[int], *, special: bool = ...) -> list[bytes]: ...


def with_bos(model: TokenizerLike, tokens: list[int]) -> list[int]:
    """`tokens` with the model's BOS first when its vocabulary asks for one and the template
    did not write it."""
    bos = model.bos
    if model.add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
        tokens.insert(0, bos)
    return tokens


def tokenize_pieces(
    model: TokenizerLike,
    pieces: Sequence[tuple[str | bytes, bool]],
    *,
    bos: bool = True,
    protected: Collection[int] = (),
    splittable: bool | None = None,
) -> list[int]:
    """Tokens of a prompt's (text, plain) pieces (`Prompt.pieces`): plain pieces without
    special-token parsing (and split where a `protected` token would still match, as llama.cpp
    matches user-defined tokens regardless), the others with it; BOS added once with `bos`.

    One piece tokenizes exactly as `tokenize_prompt` does. With several, vocabularies that
    prefix each text with a space (`splittable` False) tokenize every piece after the first
    behind a newline that is then dropped, as Hugging Face does.
    """
    if splittable is None and len(pieces) > 1:
        splittable = splits_cleanly(model)
    newline: list[int] | None = None
    out: list[int] = []
    for i, (text, plain) in enumerate(pieces):
        data = text.encode("utf-8") if isinstance(text, str) else text
        if i == 0 or splittable:
            toks = _piece_tokens(model, data, plain, protected)
        else:
            if newline is None:
                newline = model.tokenize(b"\n", add_special=False, parse_special=False)
            toks = _piece_tokens(model, b"\n" + data, plain, protected)
            if toks[: len(newline)] == newline:
                toks = toks[len(newline) :]
            else:
                toks = _piece_tokens(model, data, plain, protected)
        out.extend(toks)
    return with_bos(model, out) if bos else out


def _piece_tokens(
    model: TokenizerLike, data: bytes, plain: bool, protected: Collection[int]
) -> list[int]:
    if not plain:
        return model.tokenize(data, add_special=False, parse_special=True)
    toks = model.tokenize(data, add_special=False, parse_special=False)
    if len(data) < 2 or not any(t in protected for t in toks):
        return toks
    # A user-defined token matched even without special parsing: cut the text in two (at a
    # character boundary) so that neither half spells it.
    mid = len(data) // 2
    while 0 < mid < len(data) and (data[mid] & 0xC0) == 0x80:
        mid -= 1
    if mid <= 0:
        return toks
    return _piece_tokens(model, data[:mid], True, protected) + _piece_tokens(
        model, data[mid:], True, protected
    )


def splits_cleanly(model: TokenizerLike) -> bool:
    """Whether tokenizing a text in two parts gives tokens that spell it exactly (byte-level
    BPE: yes; SentencePiece with a space prefix: no, each part gains a leading space)."""
    probe = b"a b\nc"
    toks = model.tokenize(probe, add_special=False, parse_special=True)
    return b"".join(model.token_bytes(toks)) == probe


class _ControlTokens:
    """Which of a model's tokens the caller's text must not produce, learned as met.

    A token is protected when llama.cpp parses it only with special-token parsing (its CONTROL
    and UNKNOWN tokens: empty when detokenized without `special`), or when it is the template's
    own markup (a control or user-defined token of the GGUF vocabulary whose text is in the
    template: Qwen's `<tool_call>`, gpt-oss's `<|start|>`), as Hugging Face decides.
    """

    _MAX_CACHED = 1024  # texts remembered (each under _MAX_CACHED_CHARS)
    _MAX_CACHED_CHARS = 100_000

    def __init__(self, model: TokenizerLike) -> None:
        self.model = model
        meta = model.metadata
        self._types = meta.get("tokenizer.ggml.token_type")
        self._texts = meta.get("tokenizer.ggml.tokens")
        self._control: dict[int, bool] = {}
        self._found: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.protected: set[int] = set()
        self._markup: dict[str, str] = {}  # template source -> its literal text
        self._lock = threading.Lock()  # one model may serve chat() on several threads

    def protector(self, fmt: ChatFormat) -> Callable[[str], list[str]]:
        """The `protect` function `ChatFormat.prompt` takes, for this model and `fmt`."""
        with self._lock:
            markup = self._markup.get(fmt.template)
        if markup is None:
            markup = fmt.literal_text()
            with self._lock:
                if len(self._markup) > 16:
                    self._markup.clear()
                self._markup[fmt.template] = markup
        return lambda text: self._find(text, markup)

    def _find(self, text: str, markup: str) -> list[str]:
        """The protected tokens' texts in `text`."""
        with self._lock:
            out = []
            for t in self._special_in(text):
                tok_text = self._text(t)
                if not tok_text or tok_text not in text:
                    continue
                if self._control[t] or self._is_markup(t, tok_text, markup):
                    self.protected.add(t)
                    out.append(tok_text)
            return out

    def _special_in(self, text: str) -> tuple[int, ...]:
        """Tokens in `text` that are not ordinary (cached by text)."""
        hit = self._found.get(text)
        if hit is not None:
            self._found.move_to_end(text)
            return hit
        toks = set(self.model.tokenize(text, add_special=False, parse_special=True))
        self._learn([t for t in toks if t not in self._control])
        types = self._types if isinstance(self._types, list) else []
        # GGUF control/user-defined types (3, 4) may be markup; llama.cpp's own CONTROL set
        # (which it widens past the file's types, for EOG tokens found by text) is asked for.
        cands = tuple(
            t for t in toks if self._control[t] or (0 <= t < len(types) and types[t] in (3, 4))
        )
        if len(text) <= self._MAX_CACHED_CHARS:
            self._found[text] = cands
            if len(self._found) > self._MAX_CACHED:
                self._found.popitem(last=False)
        return cands

    def _learn(self, tokens: list[int]) -> None:
        """Whether each token is a control token: llama.cpp writes CONTROL and UNKNOWN tokens
        only when asked for special tokens."""
        if tokens:
            plain = self.model.token_bytes(tokens, special=False)
            full = self.model.token_bytes(tokens, special=True)
            for t, p, f in zip(tokens, plain, full, strict=True):
                self._control[t] = p == b"" and f != b""

    def is_control(self, t: int) -> bool:
        """Whether token `t` is one of llama.cpp's control (or unknown) tokens."""
        with self._lock:
            if t not in self._control:
                self._learn([t])
            return self._control[t]

    def _is_markup(self, t: int, tok_text: str, markup: str) -> bool:
        types = self._types
        kind = types[t] if isinstance(types, list) and 0 <= t < len(types) else None
        return kind in (3, 4) and not tok_text.isspace() and tok_text in markup

    def _text(self, t: int) -> str:
        texts = self._texts
        if isinstance(texts, list) and 0 <= t < len(texts) and isinstance(texts[t], str):
            return texts[t]
        return self.model.token_bytes([t], special=True)[0].decode("utf-8", "replace")


_CONTROL: weakref.WeakKeyDictionary[Any, _ControlTokens] = weakref.WeakKeyDictionary()
_CONTROL_LOCK = threading.Lock()


def control_tokens(model: TokenizerLike) -> _ControlTokens:
    """The model's control-token knowledge (one per model, kept while the model lives)."""
    with _CONTROL_LOCK:
        try:
            found = _CONTROL.get(model)
        except TypeError:  # a model that can't be weakly referenced: no sharing
            return _ControlTokens(model)
        if found is None:
            found = _CONTROL[model] = _ControlTokens(model)
        return found


def protected_ids(model: TokenizerLike) -> set[int]:
    """Token ids the caller's text has been found to hold and must not produce (for
    `tokenize_pieces`)."""
    try:
        found = _CONTROL.get(model)
    except TypeError:
        return set()
    return found.protected if found is not None else set()
