"""Constrained generation on the real demo model: JSON that always parses and validates, GBNF
grammars, and every bad grammar or schema refused with one line before any token is made."""

from __future__ import annotations

import json
import subprocess
import time

import jsonschema
import pytest
from conftest import PYTHON

from ondevice import constrain, stats
from ondevice.errors import IncompleteOutput, UsageError

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 20},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["person"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 4,
            },
            "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        },
        "required": ["tags", "scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "priority": {"type": "string", "enum": ["low", "medium", "high"]},
            "flag": {"type": "boolean"},
        },
        "required": ["sentiment", "priority", "flag"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "delta": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
            "price": {"type": "number"},
        },
        "required": ["age", "rating", "delta", "price"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "subtitle": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "draft": {"type": "boolean"},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}
PROMPT = "Fill in this record about a book, a person or a review, as JSON:\n"
RUNS = 50


@pytest.fixture(scope="module")
def batched(demo_path):
    """The demo model with 8 sequences: the seeded runs go through the batch scheduler (each
    job with its own seed, sampler and grammar), 8 at a time."""
    import ondevice

    with ondevice.load(demo_path, n_ctx=512, threads=2, parallel=8) as m:
        yield m


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_seeded_generations_always_parse_and_validate(batched, name):
    """50 seeded replies at temperature 0.8 per schema: every one parses and validates."""
    from ondevice.batch import Scheduler

    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    prompt = batched.tokenize(PROMPT)
    with Scheduler(batched, max_queue=RUNS) as sched:
        jobs = [
            sched.submit(prompt, json_schema=schema, max_tokens=160, temperature=0.8, seed=seed)
            for seed in range(RUNS)
        ]
        results = [job.wait(600) for job in jobs]
    resampled = tokens = 0
    for seed, r in enumerate(results):
        assert r.finish_reason == "stop", (seed, r.text)
        value = r.json
        errors = list(validator.iter_errors(value))
        assert not errors, (seed, r.text, errors[0].message)
        assert r.stats.constraint == "json_schema"
        resampled += r.stats.grammar_resamples
        tokens += r.stats.completion_tokens
    assert len({r.text for r in results}) > 1  # the seeds gave different replies
    print(f"\n{name}: {RUNS} replies, {tokens} tokens, {resampled} resampled by the grammar")


def test_json_object_mode_and_the_openai_shape(demo_model):
    for seed in range(5):
        r = demo_model.generate(
            "A JSON object:", response_format={"type": "json_object"}, max_tokens=200, seed=seed
        )
        if r.finish_reason == "stop":
            assert isinstance(r.json, dict)
    schema = SCHEMAS["enums"]
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    r = demo_model.generate(PROMPT, response_format=rf, max_tokens=60, temperature=0)
    jsonschema.validate(r.json, schema)
    text = demo_model.generate("Hi", response_format={"type": "text"}, max_tokens=3)
    assert text.stats.constraint == ""


ARITHMETIC = r"""
root   ::= expr "=" num
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= num | "(" expr ")"
num    ::= [0-9]{1,3}
"""


def test_a_gbnf_grammar_for_arithmetic(demo_model):
    import re

    shape = re.compile(r"^[0-9()+\-*/]+=[0-9]{1,3}$")
    for seed in range(10):
        r = demo_model.generate(
            "Write a sum: ", grammar=ARITHMETIC, max_tokens=40, temperature=0.9, seed=seed
        )
        if r.finish_reason == "stop":
            assert shape.match(r.text), r.text
            assert r.text.count("(") == r.text.count(")")


def test_a_reply_cut_by_max_tokens_says_its_json_is_incomplete(demo_model):
    r = demo_model.generate(PROMPT, json_schema=SCHEMAS["nested"], max_tokens=5, temperature=0)
    assert r.finish_reason == "length" and r.truncated
    with pytest.raises(IncompleteOutput, match="incomplete"):
        _ = r.json


def test_conversation_stream_and_async_take_the_constraint(demo_model):
    import asyncio

    demo_model.reset()
    conv = demo_model.conversation(max_tokens=80, temperature=0)
    named = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}},
        "required": ["name"],
        "additionalProperties": False,
    }
    reply = conv.send("Give me a JSON object with a name.", json_schema=named)
    jsonschema.validate(reply.json, named)

    async def run() -> str:
        parts = []
        async for chunk in demo_model.astream("Yes or no?", grammar='root ::= "yes" | "no"'):
            parts.append(chunk.text)
        return "".join(parts)

    assert asyncio.run(run()) in ("yes", "no")
    handle = demo_model.start("Colour:", grammar='root ::= "red" | "blue"', max_tokens=5)
    assert handle.get(60).text in ("red", "blue")


# --- bad inputs: one line, before any token -------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"grammar": "root ::= foo"}, "Undefined rule identifier 'foo'"),
        ({"grammar": 'root ::= "a'}, "unexpected end of input"),
        ({"grammar": "root ::= root"}, "invalid grammar"),  # left recursion
        ({"grammar": "start ::= [a-z]"}, "invalid grammar"),  # no root rule
        ({"grammar": ""}, "grammar must be GBNF text"),
        ({"json_schema": {"type": "object", "not": {}}}, "keyword 'not'"),
        ({"json_schema": {"patternProperties": {"a": {}}}}, "keyword 'patternProperties'"),
        ({"json_schema": {"type": "string", "format": "email"}}, "format 'email'"),
        ({"json_schema": {"type": "number", "minimum": 0}}, "minimum/maximum on a number"),
        ({"json_schema": {"type": "integer", "minimum": 0}}, "needs both bounds"),
        ({"json_schema": {"type": "array", "minItems": 10**7}}, "minItems must be"),
        ({"json_schema": {"type": "strin"}}, "unknown type 'strin'"),
        ({"json_schema": "not a dict"}, "must be a JSON object"),
        ({"response_format": {"type": "xml"}}, "unknown response_format type"),
        ({"grammar": "root ::= [a]", "json_schema": {}}, "give one of"),
    ],
)
def test_bad_grammars_and_schemas_are_refused_before_any_token(demo_model, kwargs, needle):
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as info:
        next(iter(demo_model.stream("x", max_tokens=5, **kwargs)))
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()
    assert time.perf_counter() - t0 < 2


def test_a_grammar_that_matches_nothing(demo_model):
    # A character class that excludes every character: no first token can be allowed.
    with pytest.raises(UsageError, match="can't match anything"):
        demo_model.generate("x", grammar=r"root ::= [^\x00-\U0010FFFF]", max_tokens=3)


def _deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    "schema, needle",
    [
        (_deep(10_000), "nested too deeply|nests deeper"),
        (_deep(40), "nests deeper than"),
        ({"type": "array", "items": {"type": "array", "minItems": 500}, "minItems": 500}, ""),
        ({"type": "string", "pattern": "(" * 400 + "a" + ")*" * 400}, ""),
        ({"type": "string", "pattern": "((a|b|c|d)*)*" * 70}, ""),
        ({"enum": list(range(2000))}, "enum must be"),
    ],
)
def test_hostile_schemas_are_bounded_in_time_and_memory(schema, needle):
    """Refused, or converted within the bounds (5 s, 256 MiB): never a hang or a crash."""
    rss0 = stats.rss_bytes()
    t0 = time.perf_counter()
    try:
        c = constrain.from_request(json_schema=schema)
        assert not needle, "expected a refusal"
        assert len(c.gbnf) <= constrain.MAX_GBNF_BYTES
    except UsageError as exc:
        import re

        assert not needle or re.search(needle, exc.one_line()), exc.one_line()
    assert time.perf_counter() - t0 < constrain.CONVERT_TIMEOUT_S + 2
    assert stats.rss_bytes() - rss0 < constrain.CONVERT_MAX_RSS + 64 * 2**20


# --- the CLI and the REPL ----------------------------------------------------------------------------
def test_cli_json_schema_grammar_and_format(cli_env, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]))
    common = ["run", "demo", "A review as JSON:", "-n", "60", "--temperature", "0"]
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", *common, "--json-schema", str(schema)],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMAS["enums"])
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"')
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", *common, "--grammar", str(gbnf)],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stderr
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= nothing-here")
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", *common, "--grammar", str(bad)],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: invalid grammar")
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_repl_format_command(cli_env, tmp_path):
    schema = tmp_path / "enums.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]))
    script = f"/format {schema}\nA review as JSON.\n/format off\n/format\n".encode()
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", "chat", "demo", "-n", "60", "--temperature", "0"],
        input=script, capture_output=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    reply = out.stdout.decode().strip().splitlines()[0]
    jsonschema.validate(json.loads(reply), SCHEMAS["enums"])
    assert b"format: off (free text)" in out.stderr
