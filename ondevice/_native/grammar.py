"""llama.cpp's grammar sampler (GBNF) and the binding's JSON-schema-to-GBNF converter.

A `Grammar` is llama.cpp's native grammar sampler for one sequence. Sampling stays fast the way
llama.cpp's common sampler keeps it: the request's own chain picks a token first; the grammar
is asked about that one token (a one-element candidate array); only when it refuses is the
grammar applied to the whole vocabulary and the chain run again on what is left. Accepting a
token the grammar refuses would abort the process inside llama.cpp, so `accept()` is only ever
called with a token that passed, and never with an end-of-generation token.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ondevice._native import log as native_log
from ondevice._native.binding import llama
from ondevice.errors import UsageError

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


# The binding's port (0.3.x) lets a JSON string hold raw control characters (`[^"\\]`), which
# JSON forbids (json.loads refuses "a\nb" written raw); llama.cpp's own converter excludes them.
_LAX_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema, by the converter llama-cpp-python ships (a port of llama.cpp's
    json-schema-to-grammar), with its string character rule made JSON's (no raw control
    characters, as llama.cpp's converter has it). Raises whatever the converter raises; callers
    bound and translate it."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # the binding's pure-Python part

    gbnf = json_schema_to_gbnf(json.dumps(schema))
    return "\n".join(
        _STRICT_CHAR + line[len(_LAX_CHAR) :] if line.startswith(_LAX_CHAR) else line
        for line in gbnf.split("\n")
    )


class Grammar:
    """llama.cpp's grammar sampler over a model's vocabulary; freed with the object."""

    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, root: str = "root") -> None:
        L = llama()
        self._L = L
        native_log.clear()
        # llama.cpp's grammar parser reports its errors with fprintf(stderr, ...), not through
        # its log: catch them (and keep them off the user's terminal).
        with _stderr_captured() as captured:
            self._ptr = L.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), root.encode())
        if not self._ptr:
            raise UsageError(f"invalid grammar: {_grammar_error(captured())}")
        self.n_vocab = n_vocab
        # One candidate, for asking about the token the chain chose.
        self._one = (L.llama_token_data * 1)()
        self._one_arr = L.llama_token_data_array(self._one, 1, -1, False)
        # The whole vocabulary, for when the grammar refuses that token (filled on demand).
        self._all = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._all["id"] = np.arange(n_vocab, dtype=np.int32)
        self._all_ptr = ctypes.cast(self._all.ctypes.data, ctypes.POINTER(L.llama_token_data))
        self._all_arr = L.llama_token_data_array(self._all_ptr, n_vocab, -1, False)

    def allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, allows `token` next."""
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        self._L.llama_sampler_apply(self._ptr, ctypes.byref(self._one_arr))
        return not math.isinf(self._one[0].logit)

    def resample(self, ctx: Any, chain: Any, index: int = -1) -> int:
        """The chain's choice among the tokens the grammar allows, from the logits at `index`
        (the chain's own state is advanced as llama_sampler_sample would)."""
        L = self._L
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        self._all["id"] = np.arange(self.n_vocab, dtype=np.int32)  # samplers may reorder
        self._all["logit"] = logits
        self._all["p"] = 0.0
        arr = self._all_arr
        arr.data, arr.size, arr.selected, arr.sorted = self._all_ptr, self.n_vocab, -1, False
        L.llama_sampler_apply(self._ptr, ctypes.byref(arr))
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise UsageError("the grammar allows no token here")
        token = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(chain, token)
        return token

    def can_start(self) -> bool:
        """Whether any token at all is allowed first (a grammar that matches nothing isn't)."""
        self._all["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._all["logit"] = 0.0
        arr = self._all_arr
        arr.data, arr.size, arr.selected, arr.sorted = self._all_ptr, self.n_vocab, -1, False
        self._L.llama_sampler_apply(self._ptr, ctypes.byref(arr))
        return bool(np.isfinite(self._all["logit"]).any())

    def accept(self, token: int) -> None:
        """Advance the grammar past `token` (which it must allow; never an end token)."""
        self._L.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            self._L.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """File descriptor 2 goes to a temporary file while the block runs; yields a function
    returning what was written (the first 8 KB)."""
    text: list[str] = []
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: "".join(text)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read(8192).decode("utf-8", errors="replace"))


def _grammar_error(stderr_text: str) -> str:
    """llama.cpp's own reason ("parse: error parsing grammar: ..."), one line."""
    lines = [ln for ln in stderr_text.splitlines() if ln.strip()] + native_log.recent(40)
    for line in reversed(lines):
        if "error parsing grammar" in line:
            return line.split("error parsing grammar:", 1)[1].strip()
    for line in reversed(lines):
        low = line.lower()
        if "grammar" in low or "left recursion" in low or "undefined rule" in low:
            return line.split(": ", 1)[-1].strip()
    return "llama.cpp could not parse it"
