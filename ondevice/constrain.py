"""Constrained generation: what a request's `grammar=`, `json_schema=` or `response_format=` becomes
(GBNF for llama.cpp's grammar sampler), checked and bounded before any token is generated.

    model.generate(prompt, json_schema={"type": "object", "properties": {...}})
    model.generate(prompt, response_format={"type": "json_object"})
    model.generate(prompt, grammar='root ::= "yes" | "no"')

JSON schemas become GBNF through the converter llama-cpp-python ships (a port of llama.cpp's
json-schema-to-grammar); `json_object` is any JSON object. The converter enforces some keywords
and silently ignores others, and a reply must validate against the schema it was asked for, so
a schema that uses a keyword it can't enforce is refused with the keyword's name, except integer
bounds, which become the enum of the allowed values when there are at most MAX_ENUM of them.

A schema is untrusted input (it may come from a web request): its size, nesting, node count and
repetition counts are bounded before conversion, and the conversion itself runs under a time
and memory bound (ondevice.watchdog). Compiled grammars are cached by their source.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondevice._native.grammar import schema_to_gbnf
from ondevice.errors import UsageError
from ondevice.watchdog import Exceeded, run_bounded

MAX_SCHEMA_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 5000
MAX_REPEAT = 500  # minItems/maxItems/minLength/maxLength: each unit is a rule copy
MAX_ENUM = 1000  # an enum's values
MAX_RANGE = 10_001  # a bounded integer's values (written as their enum: ~6 bytes of GBNF each)
MAX_PATTERN = 1000
MAX_GBNF_BYTES = 1 << 20
CONVERT_TIMEOUT_S = 5.0
CONVERT_MAX_RSS = 256 * 1024 * 1024

# Keywords the converter enforces, annotations that don't constrain, and where subschemas are.
_ENFORCED = frozenset(
    "type properties required additionalProperties items prefixItems minItems maxItems enum "
    "const oneOf anyOf allOf $ref $defs definitions pattern format minLength maxLength".split()
)
_ANNOTATIONS = frozenset(
    "title description default examples $schema $id $comment deprecated readOnly writeOnly "
    "$anchor contentMediaType contentEncoding".split()
)
_INT_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4"})
_FORMATS |= {"uuid5"}
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: the GBNF, what it came from, and how long compiling took."""

    gbnf: str
    kind: str  # "grammar", "json_schema", "json_object" or "lazy"
    schema: Mapping[str, Any] | None = None
    compile_s: float = 0.0
    trigger: str = ""  # lazy: the grammar starts where this text appears
    trigger_end: str = ""  # lazy: and stops applying after this text

    @property
    def json(self) -> bool:
        return self.kind in ("json_schema", "json_object")


def from_request(
    grammar: str | None = None,
    json_schema: Mapping[str, Any] | None = None,
    response_format: Mapping[str, Any] | None = None,
) -> Constraint | None:
    """The constraint a request asks for (at most one of the three), or None."""
    given = [n for n, v in (("grammar", grammar), ("json_schema", json_schema)) if v is not None]
    given += ["response_format"] if response_format is not None else []
    if len(given) > 1:
        raise UsageError(f"give one of grammar, json_schema and response_format, not {given}")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise UsageError('grammar must be GBNF text (e.g. root ::= "yes" | "no")')
        if len(grammar.encode("utf-8", "replace")) > MAX_GBNF_BYTES:
            raise UsageError(f"the grammar is larger than {MAX_GBNF_BYTES >> 10} KiB")
        return Constraint(grammar, "grammar")
    if json_schema is not None:
        return schema_constraint(json_schema)
    if response_format is not None:
        return _response_format(response_format)
    return None


def _response_format(rf: Mapping[str, Any]) -> Constraint | None:
    """OpenAI's shapes: {"type": "text"}, {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    if not isinstance(rf, Mapping):
        raise UsageError('response_format must be an object like {"type": "json_object"}')
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        c = schema_constraint({"type": "object"})
        return Constraint(c.gbnf, "json_object", c.schema, c.compile_s)
    if kind == "json_schema":
        inner = rf.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise UsageError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
        return schema_constraint(schema)
    raise UsageError(
        f"unknown response_format type {kind!r}", hint="use text, json_object or json_schema"
    )


def schema_constraint(schema: Mapping[str, Any]) -> Constraint:
    """A JSON schema checked, rewritten where needed (integer bounds), and converted."""
    if not isinstance(schema, Mapping):
        raise UsageError("json_schema must be a JSON object (a dict)")
    try:
        text = json.dumps(schema, allow_nan=False)  # key order kept: it is the output order
    except RecursionError:
        raise UsageError(
            f"the JSON schema is nested too deeply (over {MAX_DEPTH} levels)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the JSON schema is not plain JSON: {exc}") from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise UsageError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES >> 10} KiB")
    return _compiled(text)


@functools.lru_cache(maxsize=64)
def _compiled(text: str) -> Constraint:
    schema = json.loads(text)
    rewritten = _checked(schema)
    t0 = time.perf_counter()
    try:
        gbnf = run_bounded(
            lambda: schema_to_gbnf(rewritten),
            timeout_s=CONVERT_TIMEOUT_S,
            max_rss_growth=CONVERT_MAX_RSS,
            name="ondevice-schema-to-gbnf",
        )
    except Exceeded as exc:
        raise UsageError(f"converting the JSON schema to a grammar {exc.reason}; stopped") from None
    except RecursionError:
        raise UsageError("the JSON schema is nested too deeply to convert") from None
    except Exception as exc:  # noqa: BLE001 - the converter's asserts and KeyErrors
        raise UsageError(f"the JSON schema can't be converted to a grammar: {exc}") from None
    if len(gbnf) > MAX_GBNF_BYTES:
        raise UsageError("the JSON schema's grammar is larger than 1 MiB; simplify the schema")
    return Constraint(gbnf, "json_schema", schema, time.perf_counter() - t0)


def _checked(schema: Any) -> Any:
    """The schema with every node checked (keywords, sizes) and integer bounds rewritten."""
    nodes = [0]

    def visit(node: Any, depth: int, where: str) -> Any:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise UsageError(f"{where}: a schema must be an object, not {type(node).__name__}")
        nodes[0] += 1
        if nodes[0] > MAX_NODES:
            raise UsageError(f"the JSON schema has more than {MAX_NODES} subschemas")
        if depth > MAX_DEPTH:
            raise UsageError(f"the JSON schema nests deeper than {MAX_DEPTH} levels")
        _check_keywords(node, where)
        out = dict(node)
        for key in ("properties", "$defs", "definitions"):
            if isinstance(node.get(key), dict):
                out[key] = {
                    k: visit(v, depth + 1, f"{where}/{key}/{k}") for k, v in node[key].items()
                }
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out[key] = visit(node[key], depth + 1, f"{where}/{key}")
        for key in ("prefixItems", "oneOf", "anyOf", "allOf", "items"):
            if isinstance(node.get(key), list):
                out[key] = [
                    visit(v, depth + 1, f"{where}/{key}/{i}") for i, v in enumerate(node[key])
                ]
        return _integer_bounds(out, where)

    return visit(schema, 0, "#")


def _check_keywords(node: dict[str, Any], where: str) -> None:
    if node.get("type") == "number" and _INT_BOUNDS & set(node):
        raise UsageError(
            f"{where}: minimum/maximum on a number can't be enforced by the grammar",
            hint='use "type": "integer" (bounded integers are enforced) or check it yourself',
        )
    for key, value in node.items():
        if key in _ANNOTATIONS:
            continue
        if key in _INT_BOUNDS and node.get("type") == "integer":
            continue
        if key not in _ENFORCED:
            raise UsageError(
                f"{where}: the JSON schema keyword {key!r} can't be enforced by the grammar",
                hint="drop it, or check it yourself after generation",
            )
        if key in ("minItems", "maxItems", "minLength", "maxLength"):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not 0 <= value <= MAX_REPEAT
            ):
                raise UsageError(f"{where}: {key} must be an integer from 0 to {MAX_REPEAT}")
        if key == "pattern" and (not isinstance(value, str) or len(value) > MAX_PATTERN):
            raise UsageError(
                f"{where}: pattern must be a regular expression of at most {MAX_PATTERN} characters"
            )
        if key == "pattern" and ("minLength" in node or "maxLength" in node):
            raise UsageError(
                f"{where}: pattern with minLength/maxLength can't be enforced together"
            )
        if key == "format" and value not in _FORMATS:
            raise UsageError(
                f"{where}: format {value!r} can't be enforced by the grammar",
                hint=f"supported: {', '.join(sorted(_FORMATS))}",
            )
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in _TYPES]
            if bad:
                raise UsageError(f"{where}: unknown type {bad[0]!r}")
        if key == "enum" and (not isinstance(value, list) or not value or len(value) > MAX_ENUM):
            raise UsageError(f"{where}: enum must be a list of 1 to {MAX_ENUM} values")


def _integer_bounds(node: dict[str, Any], where: str) -> dict[str, Any]:
    """An integer with bounds becomes the enum of its allowed values (the converter ignores
    minimum/maximum); more than MAX_ENUM values is refused."""
    bounds = _INT_BOUNDS & set(node)
    if node.get("type") != "integer" or not bounds:
        return node
    lo, hi = -math.inf, math.inf
    for key in bounds:
        v = node[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise UsageError(f"{where}: {key} must be a number")
    if "minimum" in node:
        lo = max(lo, math.ceil(node["minimum"]))
    if "exclusiveMinimum" in node:
        lo = max(lo, math.floor(node["exclusiveMinimum"]) + 1)
    if "maximum" in node:
        hi = min(hi, math.floor(node["maximum"]))
    if "exclusiveMaximum" in node:
        hi = min(hi, math.ceil(node["exclusiveMaximum"]) - 1)
    if math.isinf(lo) or math.isinf(hi) or hi - lo + 1 > MAX_RANGE:
        raise UsageError(
            f"{where}: an integer range needs both bounds and at most {MAX_RANGE} values to be "
            "enforced by the grammar"
        )
    if hi < lo:
        raise UsageError(f"{where}: the integer range is empty")
    out = {k: v for k, v in node.items() if k not in bounds and k != "type"}
    out["enum"] = [v for v in out.get("enum", range(int(lo), int(hi) + 1)) if lo <= v <= hi]
    return out


def stream_kwargs(spec: str) -> dict[str, Any]:
    """`json`, `off`, or a file: a JSON schema (.json) or a GBNF grammar (anything else), as
    the keywords of Model.stream (the REPL's /format and the CLI's options), checked now."""
    if spec == "off":
        return {}
    if spec == "json":
        return {"response_format": {"type": "json_object"}}
    path = Path(spec).expanduser()
    try:
        if path.stat().st_size > 1 << 20:
            raise UsageError(f"{path} is larger than 1 MiB")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"can't read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{path} is not a JSON schema: {exc}") from None
        from_request(json_schema=schema)  # refuse a bad schema now, not at the first reply
        return {"json_schema": schema}
    from_request(grammar=text)
    return {"grammar": text}
