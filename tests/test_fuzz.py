"""Fuzzing the untrusted inputs: GGUF headers through the real CLI, chat templates from GGUF files,
safetensors headers, pickles, prompts and contexts that don't fit.

GGUF: seeded random mutations of a valid model's header region (tests/gguf_corpus.py `Mutator`:
a numeric field set to an interesting value, bytes flipped or overwritten, the file cut short).
For every case `ondevice info` and `ondevice run` run in subprocesses and must end with exit
status 0 (a correct result) or 1 (one `error:` line), never a signal death or a traceback, each
within 5 s of CPU time (RLIMIT_CPU; wall-clock time on this shared machine measures the other
tenants). The mutated file is the whole model, patched in place on a working copy and restored
after the case, so a valid mutation still loads and generates. The default run takes 30 cases
(26 on the tiny llama, 4 on the demo model); the slow one 520 (400 + 120).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V
from gguf_corpus import Layout, Mutator, TinySpec, WorkingCopy, build_tiny_llama

import ondevice
from ondevice import chat_formats
from ondevice.errors import (
    ChatFormatError,
    ContextOverflow,
    ConversionError,
    DoesNotFit,
    InvalidModelFile,
)
from ondevice.gguf_header import read_header

PYTHON = sys.executable
CASE_CPU_S = 5.0  # per command: the "each case within 5 s"
CASE_WALL_S = 120.0
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("fuzz-tiny") / "tiny.gguf")


# --- the GGUF fuzzer ----------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    description: str
    # command -> (exit status or "timeout", seconds, stderr tail)
    results: dict[str, tuple[int | str, float, str]] = field(default_factory=dict)


def _commands(path: Path) -> dict[str, list[str]]:
    return {
        "info": ["info", str(path)],
        "run": ["run", str(path), PROMPT, "-n", "4", "--temperature", "0", "--threads", "1",
                "--ctx", "64"],
    }  # fmt: skip


def _run_once(args: list[str], env: dict[str, str]) -> tuple[int | str, float, str]:
    # 5 s of CPU time per command, enforced by the kernel (SIGXCPU): the bound holds however
    # busy the shared machine is, where a wall-clock limit would measure the other tenants.
    # Set by the shell, not a preexec_fn: the fuzzer runs commands from two threads.
    limited = ["/bin/sh", "-c", f'ulimit -S -t {int(CASE_CPU_S)} && exec "$0" "$@"', PYTHON]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [*limited, "-m", "ondevice", *args],
            capture_output=True,
            text=True,
            timeout=CASE_WALL_S,  # a hang that burns no CPU (a deadlock)
            env=env,
        )
    except subprocess.TimeoutExpired:
        return "wall-clock timeout", CASE_WALL_S, ""
    rc: int | str = proc.returncode
    if rc == -signal.SIGXCPU:
        rc = f"more than {CASE_CPU_S:g} s of CPU"
    return rc, time.perf_counter() - t0, proc.stderr[-1500:]


def fuzz(source: Path, seeds: list[int], workdir: Path, env: dict[str, str], workers: int = 2):
    """Run every seed's mutation of `source` through `ondevice info` and `ondevice run`."""
    lay = Layout.read(source)
    mutator = Mutator(lay)
    todo = list(seeds)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def worker(copy: WorkingCopy) -> None:
        while True:
            with lock:
                if not todo:
                    return
                seed = todo.pop(0)
            patches, length, description = mutator.mutate(random.Random(seed))
            outcome = Outcome(seed, description)
            with copy.mutated(patches, length) as path:
                for name, args in _commands(path).items():
                    outcome.results[name] = _run_once(args, env)
            with lock:
                outcomes.append(outcome)

    copies = [WorkingCopy(lay, source, workdir / f"copy{i}.gguf") for i in range(workers)]
    threads = [threading.Thread(target=worker, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every working copy is the valid file again.
    for c in copies:
        assert c.path.stat().st_size == lay.size
        read_header(c.path)
    return sorted(outcomes, key=lambda o: o.seed)


def problems_of(outcomes: list[Outcome]) -> list[str]:
    problems = []
    for o in outcomes:
        for name, (rc, _, err) in o.results.items():
            where = f"seed {o.seed} ({o.description}) {name}"
            if rc not in (0, 1):
                problems.append(f"{where}: exit status {rc}: {err[-300:]!r}")
            elif "Traceback" in err:
                problems.append(f"{where}: traceback: {err[-300:]!r}")
            elif rc == 1 and not err.strip().splitlines()[-1].startswith("error: "):
                problems.append(f"{where}: no error line: {err[-300:]!r}")
    return problems


def summary(label: str, outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        for name, (rc, _, _) in o.results.items():
            kind = {0: "ok", 1: "clean error"}.get(rc, "CRASH") if isinstance(rc, int) else rc
            counts[f"{name} {kind}"] = counts.get(f"{name} {kind}", 0) + 1
    slowest = max((s for o in outcomes for _, s, _ in o.results.values()), default=0.0)
    return f"{label}: {len(outcomes)} cases, {json.dumps(counts)}, slowest {slowest:.2f} s wall"


@pytest.mark.parametrize(
    "source, seeds",
    [
        ("tiny", range(26)),
        ("demo", range(1000, 1004)),
        pytest.param("tiny", range(400), marks=pytest.mark.slow, id="tiny-400"),
        pytest.param("demo", range(1000, 1120), marks=pytest.mark.slow, id="demo-120"),
    ],
)
def test_mutated_gguf_never_crashes_the_cli(source, seeds, tiny, demo_path, tmp_path, cli_env):
    path = tiny if source == "tiny" else demo_path
    outcomes = fuzz(path, list(seeds), tmp_path, cli_env)
    print(summary(f"fuzz {source}", outcomes))
    assert len(outcomes) == len(seeds)
    problems = problems_of(outcomes)
    assert not problems, "\n".join(problems)


def test_mutator_is_seeded_and_reaches_every_field_kind(tiny):
    lay = Layout.read(tiny)
    m = Mutator(lay)
    first = [m.mutate(random.Random(s)) for s in range(300)]
    again = [m.mutate(random.Random(s)) for s in range(300)]
    assert first == again
    described = " ".join(d for _, _, d in first)
    for kind in ("key length", "value type", "array length", "dim", "tensor type", "scalar"):
        assert kind in described, kind
    assert "truncated" in described and "byte(s) changed" in described


# --- chat templates from GGUF files ---------------------------------------------------------------

CANARY = "CANARY"
# Published Jinja2 SSTI payloads (PayloadsAllTheThings, HackTricks, CVE-2024-34359 variants) not
# already in test_chat_formats.py, and runaway templates.
PAYLOADS = [
    "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f')|attr('\\x5f\\x5fmro\\x5f\\x5f') }}",
    "{{ (messages|attr('__class__')).__mro__[1].__subclasses__() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch CANARY') }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{% set x = messages.pop() %}",
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ strftime_now.__globals__['os'].popen('touch CANARY') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch CANARY') }}",
    "{% with a = namespace.__init__.__globals__ %}{{ a.os.popen('touch CANARY') }}{% endwith %}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
    "{{ c.__init__.__globals__['__builtins__'].eval(\"__import__('os').popen('touch CANARY')\") }}"
    "{% endif %}{% endfor %}",
    "{{ raise_exception.__code__.co_consts }}",
    "{{ range(10**7)|list|length }}",
    "{{ 'x'|indent(10**9) }}",
    "{{ messages|tojson(indent=10**8) }}",
    "{{ 'ab'|replace('a', 'a' * 10**7) }}",
    "{{ messages|join('x' * 10**7) }}",
    "{{ (range(10**4)|list) * 10**4 }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ ('\\t' * 100).expandtabs(99999) }}",
    "{{ (" * 50000 + "1" + ")" * 50000 + " }}",
    "{% for i in range(10**5) %}{% for j in range(10**5) %}{% set k = i %}{% endfor %}{% endfor %}",
]
ONE = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("index", range(len(PAYLOADS)))
def test_template_payload_from_a_gguf_is_refused_or_harmless(index, tmp_path):
    """The template comes from a real GGUF file, through read_header and chat format
    resolution, as `ondevice chat` gets it: it renders harmlessly within the size bound or
    raises ChatFormatError within the time bound, and touches no canary file."""
    canary = tmp_path / CANARY
    template = PAYLOADS[index].replace(CANARY, str(canary))
    spec = TinySpec(kv={"tokenizer.chat_template": (template, V.STRING, None)})
    path = build_tiny_llama(tmp_path / "evil.gguf", spec)
    metadata = read_header(path).metadata
    assert metadata["tokenizer.chat_template"] == template
    t0 = time.perf_counter()
    try:
        fmt = chat_formats.resolve(metadata)
        text = fmt.render(ONE, timeout_s=0.5)
    except ChatFormatError as exc:
        assert "\n" not in exc.one_line()
    else:
        assert len(text) <= chat_formats.RENDER_MAX_CHARS
        assert "popen" not in text and "<function" not in text and "<class" not in text
    # the bound, not a benchmark: a runaway render must be stopped, not run to completion
    assert time.perf_counter() - t0 < 0.5 + 5.0
    time.sleep(0.05)
    assert not canary.exists()


# --- safetensors headers and pickles (the converter's inputs) -------------------------------------


def _safetensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "a.weight": rng.standard_normal((8, 16)).astype(np.float32),
            "b.weight": rng.standard_normal((16,)).astype(np.float16),
            "c.bias": rng.standard_normal((4, 4)).astype(np.float32),
        },
        str(path),
    )
    return path


def _with_header(src: bytes, header: dict | bytes, declared: int | None = None) -> bytes:
    (n,) = struct.unpack_from("<Q", src)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + src[8 + n :]


def test_safetensors_classes_are_clear_errors(tmp_path):
    from ondevice.convert.safetensors_source import SafetensorsFile

    good = _safetensors(tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + n])
    a, b = header["a.weight"], header["b.weight"]

    def edited(**changes) -> dict:
        h = json.loads(json.dumps(header))
        for name, info in changes.items():
            h[name] = info
        return h

    cases = {
        "header over 100 MB": (_with_header(good, header, declared=100_000_001), "limit"),
        "header past the end": (_with_header(good, header, declared=10**7), "past the end"),
        "bad JSON": (_with_header(good, b'{"a.weight": {"dtype": '), "not valid JSON"),
        "duplicate key": (_with_header(good, b'{"x": 1, "x": 2}'), "not valid JSON"),
        "overlapping": (
            _with_header(good, edited(**{"b.weight": {**b, "data_offsets": [0, 32]}})),
            "overlap",
        ),
        "out of range": (
            _with_header(good, edited(**{"a.weight": {**a, "data_offsets": [0, 10**9]}})),
            "ends at byte",
        ),
        "dtype/shape mismatch": (
            _with_header(good, edited(**{"a.weight": {**a, "dtype": "F16"}})),
            "needs",
        ),
        "unknown dtype": (
            _with_header(good, edited(**{"a.weight": {**a, "dtype": "Q4"}})),
            "dtype",
        ),
        "negative dim": (
            _with_header(good, edited(**{"a.weight": {**a, "shape": [-8, -16]}})),
            "shape",
        ),
        "short file": (good[:5], "shorter"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_').replace('/', '_')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ConversionError, match=words):
            SafetensorsFile(path).close()


def test_safetensors_header_fuzz(tmp_path):
    """500 seeded mutations of a safetensors header: ConversionError or a file whose every
    tensor lies inside it, never another exception."""
    from ondevice.convert.safetensors_source import SafetensorsFile

    good = _safetensors(tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", good)
    refused = accepted = 0
    for seed in range(500):
        rng = random.Random(seed)
        data = bytearray(good)
        for _ in range(rng.choice([1, 1, 2, 4])):
            at = rng.randrange(8 + n) if rng.random() < 0.9 else rng.randrange(len(data))
            data[at] = rng.choice([rng.randrange(256), ord("9"), ord("-"), ord('"'), ord("}")])
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        path = tmp_path / "fuzz.safetensors"
        path.write_bytes(bytes(data))
        try:
            f = SafetensorsFile(path)
        except ConversionError:
            refused += 1
            continue
        try:
            for ref in f.tensors.values():
                assert 0 <= ref.offset and ref.offset + ref.nbytes <= len(data)
        finally:
            f.close()
        accepted += 1
    print(f"safetensors fuzz: 500 cases, {refused} refused, {accepted} accepted")
    assert refused and refused + accepted == 500


def test_pickle_is_never_loaded(tmp_path):
    """A checkpoint folder with only a pickle whose loading would create a canary file."""
    canary = tmp_path / "CANARY"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["PhiForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    # control: loading the pickle would indeed create the canary
    assert not canary.exists()
    from ondevice.convert import convert

    with pytest.raises(ConversionError, match="pickle|safetensors"):
        convert(folder, tmp_path / "out.gguf")
    assert not canary.exists()
    assert not (tmp_path / "out.gguf").exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes()).close()
    assert canary.exists(), "the pickle was a real payload"


# --- prompts and contexts -------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_a_typed_error(tiny):
    with ondevice.load(tiny, n_ctx=32, threads=1) as m:
        with pytest.raises(ContextOverflow, match=r"but the context holds \d+"):
            m.generate("word " * 200, max_tokens=4)
        # the model stays usable
        assert m.generate(PROMPT, max_tokens=2, temperature=0).stats.completion_tokens >= 1


def test_prompt_longer_than_the_context_in_the_cli(tiny, cli_env):
    proc = subprocess.run(
        [PYTHON, "-m", "ondevice", "run", str(tiny), "word " * 200, "--ctx", "32", "--threads",
         "1"],
        capture_output=True, text=True, env=cli_env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: the prompt is") and "--ctx" in proc.stderr


def test_context_that_cannot_fit_is_refused_before_allocation(demo_path):
    from ondevice import stats

    rss0 = stats.rss_bytes()
    with pytest.raises(DoesNotFit, match="n_ctx"):
        ondevice.load(demo_path, n_ctx=1 << 24, threads=1)
    # 360 GiB of KV cache were asked for; nothing near that (nor the weights) was allocated
    assert stats.rss_bytes() - rss0 < 64 * 2**20


def test_invalid_file_never_reaches_llama_cpp(tiny, tmp_path, monkeypatch):
    """load() validates first: with the header refused, the engine is never constructed."""
    from ondevice import loader

    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny.read_bytes())
    struct.pack_into("<Q", data, 16, 2**64 - 1)  # the key/value count
    bad.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(loader, "Engine", lambda *a, **k: calls.append(a))
    with pytest.raises(InvalidModelFile):
        ondevice.load(bad, n_ctx=64, threads=1)
    assert calls == []
    assert os.path.getsize(bad) == os.path.getsize(tiny)
