"""What generation hands back: `Chunk`s while a reply streams, a `Result` for a whole reply.

`Model.stream()` (the one streaming primitive) yields Chunks; `generate()`, chat, the REPL, the
app helpers and the benchmarks loop over it and collect Results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ondevice.errors import IncompleteOutput, UsageError
from ondevice.stats import Stats


@dataclass
class Chunk:
    """One piece of a streamed reply.

    text           new text since the previous chunk (may be "" on the final chunk).
    tokens         ids of the tokens sampled since the previous chunk (a token can end in the
                   middle of a UTF-8 character, so text and tokens need not line up 1:1).
    finish_reason  None while streaming; "stop", "length" or "cancelled" on the last chunk.
    stats          None while streaming; the reply's `Stats` on the last chunk.
    """

    text: str
    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    stats: Stats | None = None


@dataclass
class Result:
    """A whole reply: its text, the ids of the generated tokens, and its `Stats`."""

    text: str
    tokens: list[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason

    @property
    def truncated(self) -> bool:
        """Whether the reply was cut short (max_tokens, a full context, or cancelled): a
        constrained reply is then incomplete (its JSON doesn't close)."""
        return self.stats.finish_reason in ("length", "cancelled")

    @property
    def json(self) -> Any:
        """The reply parsed as JSON (for json_schema= / response_format= replies).

        Raises IncompleteOutput when the reply was cut short (finish_reason "length" or
        "cancelled": the JSON is incomplete, never silently returned broken), and UsageError
        when the text is not JSON (an unconstrained reply)."""
        if self.truncated:
            raise IncompleteOutput(
                f"the reply was cut short (finish_reason {self.finish_reason!r}) after "
                f"{self.stats.completion_tokens} tokens: its JSON is incomplete",
                hint="raise max_tokens",
            )
        try:
            return json.loads(self.text)
        except ValueError as exc:
            raise UsageError(
                f"the reply is not JSON ({exc})",
                hint="ask for it with json_schema= or response_format=",
            ) from None
