"""Tool calls in the server's replies, for both dialects: the text a stream may show while the
model writes (held back while it could still be the opening of a call), and the calls read from
the finished reply with `ondevice.conversation.read_calls`.

The plan itself (`ondevice.tools.plan`) is made where the prompt is built: tool_choice
required or a named tool constrains the whole reply to a call's JSON; auto lets the model write
freely until the opening of a call in its template's own format (Hermes' `<tool_call>`,
Mistral's `[TOOL_CALLS]`, Llama 3.1's `{"name"`), from where a lazy grammar holds it to a
valid call.
"""

from __future__ import annotations

from typing import Any

from ondevice import conversation
from ondevice.tools import ToolCall, ToolPlan


class ToolReply:
    """Watches one reply's chunks: `show()` says what of each a stream may send as content,
    `finish()` what is left to send and the calls."""

    def __init__(self, model: Any, plan: ToolPlan | None) -> None:
        self.model, self.plan = model, plan
        self.active = plan is not None and plan.choice != "none"
        # A constrained reply (required / named) is a call from its first token.
        self.in_call = self.active and plan is not None and plan.format == "json"
        self.held = ""  # text not shown yet: it may open a call
        self.shown: list[str] = []
        self.parts: list[str] = []
        self.tokens: list[int] = []

    def show(self, text: str, tokens: list[int]) -> str:
        """The part of this chunk's text a stream may send now."""
        if not self.active:
            return text
        self.parts.append(text)
        self.tokens.extend(tokens)
        if self.in_call:
            self.held += text
            return ""
        assert self.plan is not None
        trigger = self.plan.trigger
        if self.plan.format == "mistral":
            # [TOOL_CALLS] is a control token: its text shows only detokenized with specials.
            if trigger in self.model.detokenize(tokens, special=True):
                self.in_call = True
                return self._sent(self.held)
        pending = self.held + text
        at = pending.find(trigger)
        if at >= 0:
            self.in_call, self.held = True, pending[at:]
            return self._sent(pending[:at])
        keep = next(
            (k for k in range(min(len(trigger) - 1, len(pending)), 0, -1)
             if pending.endswith(trigger[:k])),
            0,
        )  # fmt: skip
        self.held = pending[len(pending) - keep :]
        return self._sent(pending[: len(pending) - keep])

    def _sent(self, text: str) -> str:
        self.shown.append(text)
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the text still to send, the calls). A call that didn't come out whole (the reply
        was cut short) is sent as the text the model wrote, so nothing is lost."""
        if not self.active:
            return "", []
        rest, calls = self.read("".join(self.parts), self.tokens)
        if not calls:
            return self.held, []
        shown = "".join(self.shown).strip()
        rest = rest.strip()
        return (rest[len(shown) :] if rest.startswith(shown) else ""), calls

    def read(self, text: str, tokens: list[int]) -> tuple[str, list[ToolCall]]:
        """A whole reply's text without its calls, and the calls."""
        return conversation.read_calls(self.model, self.plan, text, tokens)


def finish_reason(reason: str, calls: list[ToolCall]) -> str:
    """OpenAI's finish_reason: tool_calls when the reply made calls."""
    if calls:
        return "tool_calls"
    return "length" if reason == "length" else "stop"
