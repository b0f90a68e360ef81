"""Tool calls: what `tools=` and `tool_choice=` make of a chat turn, and the calls read back
from the reply.

    reply = conv.send("Weather in Paris?", tools=[WEATHER], tool_choice="required")
    call = reply.tool_calls[0]          # ToolCall(name="get_weather", arguments={...}, id=...)
    conv.send({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'})

tool_choice:
  "none"      the tools are shown to the template, no call is expected or read.
  "required"  the reply IS a call: the output is constrained (a grammar from the tools'
              parameter schemas, ondevice.constrain) to one JSON object
              {"name": <one of the tools>, "arguments": {...valid for that tool...}}, so even a
              model without tool training returns a valid call.
  {"type": "function", "function": {"name": N}} (or just N): the same, for that one tool.
  "auto"      the model decides. Its template's own call format is recognised (Hermes/Qwen
              `<tool_call>{...}</tool_call>`, Llama 3.1 `{"name": ..., "parameters": ...}`,
              Mistral `[TOOL_CALLS][...]`): when the reply starts such a call (its opening
              text: the trigger), a grammar for the rest of the call is switched on, so what
              follows the trigger is a valid call; the calls are parsed out of the reply.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ondevice import constrain
from ondevice.errors import UsageError

FORMATS = ("hermes", "llama3", "mistral")


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name, its arguments (parsed), and an id to answer
    it with (the `tool_call_id` of the tool's result message)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape, as an assistant message's `tool_calls` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class ToolPlan:
    """How one turn asks for calls: a constraint from the start (required / named), or a
    trigger and the grammar after it (auto), and how to read the calls back."""

    choice: str  # none, auto, required, or the named tool
    names: tuple[str, ...]
    format: str  # hermes, llama3, mistral, or "json" (the constrained object)
    json_schema: dict[str, Any] | None = None  # required / named: the whole reply
    trigger: str = ""  # auto: the opening text of a call
    after_trigger: constrain.Constraint | None = None  # auto: the grammar once triggered


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise UsageError(f"tools[{i}] has no function name")
        names.append(name)
    return names


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
    params = fn.get("parameters") if isinstance(fn, Mapping) else None
    return dict(params) if isinstance(params, Mapping) else {"type": "object"}


def call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools` (or to `only`):
    {"name": <name>, "arguments": <that tool's parameters>}."""
    options = []
    for name, tool in zip(tool_names(tools), tools, strict=True):
        if only is not None and name != only:
            continue
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": _parameters(tool)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise UsageError(f"tool_choice names {only!r}, which is not among the tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


def native_format(template: str) -> str:
    """The call format a chat template writes (from its source), or "hermes" when it names
    none: the most common convention among open models."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3"
    return "hermes"


def plan(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, template: str
) -> ToolPlan | None:
    """What this turn's tools and tool_choice ask of generation (None: no tools)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise UsageError("tool_choice needs tools")
        return None
    names = tuple(tool_names(tools))
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        choice = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
    if not isinstance(choice, str):
        raise UsageError("tool_choice must be none, auto, required or a tool's name")
    if choice == "none":
        return ToolPlan("none", names, "none")
    if choice == "required" or choice in names:
        only = None if choice == "required" else choice
        return ToolPlan(choice, names, "json", json_schema=call_schema(tools, only))
    if choice != "auto":
        raise UsageError(
            f"tool_choice {choice!r} is not none, auto, required or one of the tools",
            hint=f"tools: {', '.join(names)}",
        )
    fmt = native_format(template)
    schema = call_schema(tools)
    if fmt == "llama3":
        trigger, gbnf_schema = '{"name"', _llama3_schema(tools)
    elif fmt == "mistral":
        trigger, gbnf_schema = "[TOOL_CALLS]", {"type": "array", "items": schema, "minItems": 1}
    else:
        trigger, gbnf_schema = "<tool_call>", schema
    after = constrain.schema_constraint(gbnf_schema)
    return ToolPlan("auto", names, fmt, trigger=trigger, after_trigger=after)


def _llama3_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    options = []
    for name, tool in zip(tool_names(tools), tools, strict=True):
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": _parameters(tool)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def trigger_grammar(p: ToolPlan) -> str:
    """The GBNF of a call from its trigger text on (the trigger's own tokens are replayed into
    it when it appears): Hermes' tag, the call's JSON and the closing tag; Mistral's marker and
    a list of calls; Llama 3.1's bare object."""
    assert p.after_trigger is not None
    call = re.sub(r"^root ::=", "call ::=", p.after_trigger.gbnf, flags=re.M)
    if p.format == "hermes":
        return call + '\nroot ::= "<tool_call>" [ \\t\\n]* call [ \\t\\n]* "</tool_call>"\n'
    if p.format == "mistral":
        return call + '\nroot ::= "[TOOL_CALLS]" [ \\t\\n]* call\n'
    return p.after_trigger.gbnf


# After this text the call is complete and generation is free again (Hermes may call twice).
TRIGGER_ENDS = {"hermes": "</tool_call>"}


def parse_calls(text: str, p: ToolPlan) -> tuple[str, list[ToolCall]]:
    """The reply's text without its calls, and the calls (arguments parsed); calls that don't
    parse or name an unknown tool are left in the text."""
    if p.choice == "none":
        return text, []
    if p.format == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []
        call = _call(obj, p.names, "arguments")
        return ("", [call]) if call else (text, [])
    if p.format == "hermes":
        calls, rest = [], text
        for m in re.finditer(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S):
            call = _call(_loads(m.group(1)), p.names, "arguments")
            if call:
                calls.append(call)
                rest = rest.replace(m.group(0), "", 1)
        return rest.strip(), calls
    if p.format == "mistral":
        m = re.search(r"\[TOOL_CALLS\]\s*(\[.*\])", text, re.S)
        items = _loads(m.group(1)) if m else None
        if not isinstance(items, list):
            return text, []
        calls = [c for c in (_call(i, p.names, "arguments") for i in items) if c]
        return (text[: m.start()].strip(), calls) if calls else (text, [])
    obj = _loads(text.strip().removeprefix("<|python_tag|>"))
    call = _call(obj, p.names, "parameters") if isinstance(obj, dict) else None
    return ("", [call]) if call else (text, [])


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(obj: Any, names: Sequence[str], key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(key, obj.get("arguments", {}))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)
