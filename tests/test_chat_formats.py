"""Prompt formats: built-ins against reference renderings, GGUF templates against plain jinja2,
the choice of format, BOS handling, and malicious or runaway templates (CVE-2024-34359)."""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from llama_cpp.llama_chat_format import (
    CHATML_CHAT_TEMPLATE,
    LLAMA3_INSTRUCT_CHAT_TEMPLATE,
    MISTRAL_INSTRUCT_CHAT_TEMPLATE,
)

import ondevice
from ondevice import chat_formats as cf
from ondevice.conversation import tokenize_prompt
from ondevice.errors import ChatFormatError, UsageError
from ondevice.gguf_header import read_header

SYSTEM = "You are terse."
TALK = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
ONE = [{"role": "user", "content": "Hi there"}]


# --- a GGUF with different key/values, written by patching the demo model's header ------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip(buf, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    etype, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALAR_SIZES:
        return pos + n * _SCALAR_SIZES[etype]
    for _ in range(n):
        pos = _skip(buf, pos, etype)
    return pos


def _kv(key: str, value: str | bool) -> bytes:
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k
    if isinstance(value, bool):
        return head + struct.pack("<IB", 7, int(value))
    v = value.encode()
    return head + struct.pack("<IQ", 8, len(v)) + v


def patch_gguf(src: Path, dst: Path, changes: dict[str, str | bool | None]) -> Path:
    """Copy a GGUF with some key/values replaced, added, or (value None) removed. Only the header
    is rewritten; the tensor data is copied as is (its offsets are relative to the data section)."""
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos, kvs, alignment = 24, [], 32
        for _ in range(n_kv):
            start = pos
            klen = struct.unpack_from("<Q", buf, pos)[0]
            key = bytes(buf[pos + 8 : pos + 8 + klen]).decode()
            vtype = struct.unpack_from("<I", buf, pos + 8 + klen)[0]
            pos = _skip(buf, pos + 12 + klen, vtype)
            kvs.append((key, bytes(buf[start:pos])))
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", buf, pos - 4)[0]
        infos_start = pos
        for _ in range(n_tensors):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            pos += 4 + 8 * n_dims + 4 + 8
        infos = bytes(buf[infos_start:pos])
        data_offset = -(-pos // alignment) * alignment
        todo = dict(changes)
        body = b""
        count = 0
        for key, raw in kvs:
            if key in todo:
                value = todo.pop(key)
                if value is None:
                    continue
                raw = _kv(key, value)
            body += raw
            count += 1
        for key, value in todo.items():
            if value is not None:
                body += _kv(key, value)
                count += 1
        header = bytes(buf[:16]) + struct.pack("<Q", count) + body + infos
        header += b"\0" * (-len(header) % alignment)
        with open(dst, "wb") as out:
            out.write(header)
            fh.seek(data_offset)
            shutil.copyfileobj(fh, out, 1 << 22)
    return dst


# --- built-in formats against reference renderings -------------------------------------------

# Each format's documented layout, written out by hand (bos <s>, eos </s> where used).
REFERENCE = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    ),
    # Phi-2's model card: "Instruct: <prompt>\nOutput:"; turns repeat the pair.
    "phi-2": (
        "You are terse.\nInstruct: Hi there\nOutput: Hello!\nInstruct: What is 2+2?\nOutput:",
        "Instruct: Hi there\nOutput:",
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] What is 2+2? [/INST]",
        "<s>[INST] Hi there [/INST]",
    ),
    "llama-3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "phi-3": (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
        "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    ),
    "gemma": (
        "<s><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n",
        "<s><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    ),
    "zephyr": (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
        "<|user|>\nHi there</s>\n<|assistant|>\n",
    ),
}


def _bound(name: str) -> cf.ChatFormat:
    return replace(cf.BUILTIN[name], bos_token="<s>", eos_token="</s>")


def test_every_builtin_has_a_reference():
    assert set(REFERENCE) == set(cf.BUILTIN)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_builtin_format_matches_reference(name):
    with_system, single = REFERENCE[name]
    fmt = _bound(name)
    assert fmt.render(TALK) == with_system
    assert fmt.render(ONE) == single


def _plain_env() -> jinja2.Environment:
    """Plain (unsandboxed) jinja2 configured like Hugging Face's renderer: the reference."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env


def _plain(template: str, messages, **ctx) -> str:
    return (
        _plain_env()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True, **ctx)
    )


@pytest.mark.parametrize(
    "name, published",
    [("chatml", CHATML_CHAT_TEMPLATE), ("llama-3", LLAMA3_INSTRUCT_CHAT_TEMPLATE)],
)
def test_builtin_matches_published_template(name, published):
    # The templates llama-cpp-python copied from the models' tokenizer_config.json.
    bos = "<|begin_of_text|>" if name == "llama-3" else "<s>"
    fmt = replace(cf.BUILTIN[name], bos_token=bos, eos_token="</s>")
    for messages in (TALK, ONE):
        assert fmt.render(messages) == _plain(published, messages, bos_token=bos, eos_token="</s>")


# --- GGUF templates: the sandboxed renderer against plain jinja2 -----------------------------

# Template features real GGUFs use: namespace(), loop controls, tojson, trim, bos/eos tokens,
# slicing, loop.first/last, inline if, string tests.
QWEN_LIKE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}\
{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}\
{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}{% break %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim }}
    {%- if loop.index0 == ns.last_user %}{{- ' (latest)' }}{% endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

GEMMA_LIKE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}\
{% set sys = messages[0]['content'] + '\\n\\n' %}{% set rest = messages[1:] %}\
{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}
{% for message in rest %}
{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + message['content'] | trim \
+ '<end_of_turn>\\n' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"""


def _demo_template(demo_path) -> str:
    return read_header(demo_path).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("which", ["demo", "mistral", "llama-3", "qwen-like", "gemma-like"])
def test_gguf_template_renders_like_plain_jinja2(which, demo_path):
    template = {
        "demo": _demo_template(demo_path),
        "mistral": MISTRAL_INSTRUCT_CHAT_TEMPLATE,
        "llama-3": LLAMA3_INSTRUCT_CHAT_TEMPLATE,
        "qwen-like": QWEN_LIKE,
        "gemma-like": GEMMA_LIKE,
    }[which]
    fmt = cf.ChatFormat("gguf", template, source="gguf", bos_token="<s>", eos_token="</s>")
    # Mistral's template has no system role; the rest get the system prompt and several turns.
    conversations = [TALK[1:], ONE] if which == "mistral" else [TALK, ONE, TALK[1:]]
    for messages in conversations:
        expected = _plain(template, messages, bos_token="<s>", eos_token="</s>", tools=None)
        assert fmt.render(messages) == expected
        assert "Hi there" in expected


def test_tools_and_tojson_like_hugging_face():
    tools = [{"name": "add", "description": "añadir", "parameters": {"a": "int"}}]
    rendered = cf.render_bounded(
        QWEN_LIKE, {"messages": TALK, "add_generation_prompt": True, "tools": tools}
    )
    assert rendered == _plain(QWEN_LIKE, TALK, tools=tools)
    assert "añadir" in rendered  # HF's tojson does not escape non-ASCII


def test_generation_tag_renders_its_body():
    template = (
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    assert cf.render_bounded(template, {"messages": ONE}) == "[Hi there]"


def test_raise_exception_is_our_error():
    fmt = cf.ChatFormat("gguf", MISTRAL_INSTRUCT_CHAT_TEMPLATE, source="gguf")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatFormatError, match="roles must alternate"):
        fmt.render(bad)
    with pytest.raises(ChatFormatError, match="alternate"):
        _bound("llama-2").render(bad)


def test_messages_are_validated():
    fmt = _bound("chatml")
    with pytest.raises(UsageError, match="role"):
        fmt.render([{"role": "robot", "content": "x"}])
    with pytest.raises(UsageError, match="content"):
        fmt.render([{"role": "user", "content": None}])
    with pytest.raises(UsageError):
        fmt.render("hello")


# --- choosing the format -----------------------------------------------------------------------


def _meta(arch: str, template: str | None = None) -> dict:
    meta = {
        "general.architecture": arch,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta


def test_resolution_order(tmp_path):
    gguf_template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    # 1. explicit beats the file's template
    assert cf.resolve(_meta("phi2", gguf_template), "chatml").name == "chatml"
    # 2. the file's template beats the architecture
    fmt = cf.resolve(_meta("phi2", gguf_template))
    assert fmt.source == "gguf" and fmt.render(ONE) == "<Hi there>"
    # 3. the architecture: Phi-2 files carry no template
    phi2 = cf.resolve(_meta("phi2"))
    assert phi2.name == "phi-2"
    assert (phi2.bos_token, phi2.eos_token) == ("<s>", "</s>")
    # a template file by path
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[-1]['content'] }}!")
    assert cf.resolve(_meta("llama"), str(path)).render(ONE) == "Hi there!"


def test_phi2_stops_before_invented_turns():
    stops = cf.BUILTIN["phi-2"].stop
    assert "<|endoftext|>" in stops
    assert "\nInstruct:" in stops


def test_no_silent_fallback():
    with pytest.raises(ChatFormatError) as err:
        cf.resolve(_meta("llama"))
    text = err.value.one_line()
    assert "--chat-format" in text
    for name in cf.BUILTIN:
        assert name in text
    with pytest.raises(ChatFormatError, match="--chat-format"):
        cf.resolve(_meta("llama", "x"), "no-such-format")
    with pytest.raises(ChatFormatError, match="no chat template"):
        cf.resolve(_meta("phi2"), "gguf")


def test_template_that_does_not_parse():
    with pytest.raises(ChatFormatError, match="does not parse"):
        cf.resolve(_meta("llama", "{% for m in messages %}"))


# --- BOS handling --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_model(demo_path, tmp_path_factory):
    """The demo model, patched so its vocabulary asks for a BOS (<|im_start|>, id 1)."""
    path = tmp_path_factory.mktemp("bos") / "bos.gguf"
    patch_gguf(demo_path, path, {"tokenizer.ggml.add_bos_token": True})
    with ondevice.load(path, n_ctx=256, threads=2) as m:
        yield m


def test_bos_added_once(bos_model):
    bos = bos_model.bos
    assert bos_model.add_bos
    with_bos = cf.ChatFormat("gguf", "{{ bos_token }}{{ messages[0]['content'] }}", source="gguf")
    with_bos = replace(with_bos, bos_token=cf.resolve(bos_model.metadata).bos_token)
    without = cf.ChatFormat("gguf", "{{ messages[0]['content'] }}", source="gguf")
    for fmt in (with_bos, without):
        tokens = tokenize_prompt(bos_model, fmt.render(ONE))
        assert tokens[0] == bos
        assert tokens.count(bos) == 1
        # the rest is the text's own tokens, special tokens parsed
        assert bos_model.detokenize(tokens[1:]) == "Hi there"


def test_special_tokens_are_parsed(demo_model):
    text = cf.for_model(demo_model).render(ONE)
    tokens = tokenize_prompt(demo_model, text)
    im_start = demo_model.tokenize("<|im_start|>", add_special=False)
    assert len(im_start) == 1
    assert tokens[0] == im_start[0]
    assert not demo_model.add_bos  # SmolLM adds no BOS: none was prepended
    assert tokens.count(im_start[0]) == text.count("<|im_start|>")


# --- untrusted templates -----------------------------------------------------------------------

CVE_PAYLOAD = (
    "{% for x in ().__class__.__base__.__subclasses__() %}"
    '{% if "warning" in x.__name__ %}'
    "{{ x()._module.__builtins__['__import__']('os').popen('touch CANARY') }}"
    "{% endif %}{% endfor %}"
)
PAYLOADS = [
    CVE_PAYLOAD,
    "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('touch CANARY') }}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch CANARY').read() }}",
    "{{ namespace.__init__.__globals__['os'].popen('touch CANARY') }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].popen('touch CANARY') }}",
    "{% set x = namespace(__class__=1) %}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
]


def test_the_cve_payload_is_real(tmp_path):
    """Control: outside the sandbox the payload runs a shell command."""
    canary = tmp_path / "CANARY"
    payload = CVE_PAYLOAD.replace("touch CANARY", f"touch {canary}")
    jinja2.Environment().from_string(payload).render()
    for _ in range(50):  # popen returns before the command has run
        if canary.exists():
            break
        time.sleep(0.05)
    assert canary.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_template_is_refused(payload, tmp_path):
    canary = tmp_path / "CANARY"
    fmt = cf.ChatFormat("gguf", payload.replace("touch CANARY", f"touch {canary}"), source="gguf")
    with pytest.raises(ChatFormatError, match="unsafe"):
        fmt.render(ONE)
    time.sleep(0.1)
    assert not canary.exists()


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "larger than the limit"),
        ("{{ 'x' * 1000000000 }}", "larger than the limit"),
        ("{{ 'x'.center(1000000000) }}", "larger than the limit"),
        ("{{ 'x' | center(1000000000) }}", "larger than the limit"),
        ("{{ '%0999999999d' % 1 }}", "larger than the limit"),
        ("{{ '{:>999999999}'.format(1) }}", "larger than the limit"),
        ("{{ 9 ** 999999999 }}", "larger than the limit"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}",
            "larger than the limit",
        ),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_runaway_template_is_bounded(template, match):
    t0 = time.perf_counter()
    with pytest.raises(ChatFormatError, match=match):
        cf.render_bounded(template, {"messages": ONE})
    assert time.perf_counter() - t0 < cf.RENDER_TIMEOUT_S + 1


def test_endless_template_is_stopped():
    # 10^10 iterations that print nothing: only the time bound can stop it.
    template = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = i %}"
        "{% endfor %}{% endfor %}"
    )
    t0 = time.perf_counter()
    with pytest.raises(ChatFormatError, match="took longer than 0.3 s; stopped"):
        cf.render_bounded(template, {"messages": ONE}, timeout_s=0.3)
    assert time.perf_counter() - t0 < 2.0


@pytest.fixture(scope="module")
def malicious_gguf(demo_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evil")
    canary = folder / "CANARY"
    payload = CVE_PAYLOAD.replace("touch CANARY", f"touch {canary}")
    path = patch_gguf(demo_path, folder / "evil.gguf", {"tokenizer.chat_template": payload})
    return path, canary


def test_malicious_gguf_template_raises_and_runs_nothing(malicious_gguf):
    path, canary = malicious_gguf
    assert (
        read_header(path).metadata["tokenizer.chat_template"].startswith("{% for x in ().__class__")
    )
    with ondevice.load(path, n_ctx=256, threads=2) as m:
        with pytest.raises(ChatFormatError, match="unsafe"):
            list(m.chat(ONE, max_tokens=4))
        conv = m.conversation()
        with pytest.raises(ChatFormatError, match="unsafe"):
            conv.send("hello", max_tokens=4)
        # the user can still chat with a built-in format
        reply = m.conversation(chat_format="chatml").send("hello", max_tokens=4)
        assert reply.stats.completion_tokens > 0
    time.sleep(0.1)
    assert not canary.exists()


def test_malicious_gguf_in_the_cli(malicious_gguf, cli_env):
    path, canary = malicious_gguf
    proc = subprocess.run(
        [sys.executable, "-m", "ondevice", "chat", str(path), "--ctx", "256", "-n", "4"],
        input="hello\n",
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "error: the model's chat template tried something unsafe" in proc.stderr
    assert "Traceback" not in proc.stderr
    time.sleep(0.1)
    assert not canary.exists()


def test_calls_as_text_for_templates_that_cant_render_calls():
    """llama-server's polyfill, as the server uses it: a template that ignores tool_calls (or
    fails on them) gets them as Hermes text in the content; one that renders them is left as
    it is."""
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]  # fmt: skip
    msgs = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "tool_calls": calls}]
    plain = cf.ChatFormat(
        "gguf", "{% for m in messages %}{{ m['content'] }}|{% endfor %}", source="gguf"
    )
    (user, asst) = cf.calls_as_text(plain, msgs)
    assert user == msgs[0] and "tool_calls" not in asst
    assert json.loads(asst["content"].split("\n")[1]) == {
        "name": "add",
        "arguments": {"a": 1, "b": 2},
    }
    assert asst["content"].startswith("<tool_call>\n") and asst["content"].endswith("</tool_call>")
    assert "add" in plain.render_text(cf.calls_as_text(plain, msgs), True)
    aware = cf.ChatFormat(
        "gguf",
        "{% for m in messages %}{{ m.get('content', '') }}{% for c in m.get('tool_calls', []) %}"
        "{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}",
        source="gguf",
    )
    assert cf.calls_as_text(aware, msgs) is msgs
