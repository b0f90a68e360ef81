"""What generation hands back: `Chunk`s while a reply streams, a `Result` for a whole reply.

`Model.stream()` (the one streaming primitive) yields Chunks; `generate()`, chat, the REPL, the
app helpers and the benchmarks loop over it and collect Results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
