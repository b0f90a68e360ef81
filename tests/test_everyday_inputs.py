"""Everyday inputs that used to end in a traceback or misbehave (issue 20's list), and the faults:
each one gets a one-line error (or works), a non-zero exit where it fails, and leaves nothing
behind. Real demo model, real CLI processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON

import ondevice
from ondevice.errors import ModelClosed, ModelNotFound, UsageError

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict, stdin: bytes | None = None, timeout: int = 120):
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )


def one_line_error(proc) -> str:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- text that isn't valid UTF-8, and lone surrogates -------------------------------------------
def test_invalid_utf8_on_stdin_is_read_with_replacement(cli_env):
    out = cli(
        "run", "demo", "-n", "3", "--temperature", "0", env=cli_env, stdin=b"hi\xff\xfe there"
    )
    assert out.returncode == 0, out.stderr
    err = out.stderr.decode()
    assert "not valid UTF-8" in err and "Traceback" not in err


def test_invalid_utf8_piped_into_chat(cli_env):
    out = cli("chat", "demo", "-n", "4", env=cli_env, stdin=b"hello \xff\xfe friend\n")
    assert out.returncode == 0, out.stderr
    assert b"Traceback" not in out.stderr and out.stdout.strip()


def test_lone_surrogates_are_one_line_errors(demo_model):
    for call in (
        lambda: demo_model.tokenize("a\ud800b"),
        lambda: demo_model.generate("a\udfffb", max_tokens=2),
        lambda: demo_model.conversation().send("bad \ud800 text", max_tokens=2),
        lambda: list(demo_model.chat([{"role": "user", "content": "x\ud800"}], max_tokens=2)),
    ):
        with pytest.raises(UsageError, match="invalid character|surrogate"):
            call()


# --- the repeat penalty works ---------------------------------------------------------------------
PENALTY_PROMPT = "one two three one two three one two three one two three one two"


def test_repeat_penalty_changes_the_output(demo_model):
    demo_model.reset()
    plain = demo_model.generate(PENALTY_PROMPT, max_tokens=16, temperature=0)
    demo_model.reset()
    penalized = demo_model.generate(
        PENALTY_PROMPT, max_tokens=16, temperature=0, repeat_penalty=1.8, repeat_last_n=64
    )
    assert penalized.stats.completion_tokens > 0
    assert penalized.tokens != plain.tokens  # greedy, so only the penalty changed it


def test_repeat_penalty_from_the_cli_and_the_repl(cli_env):
    args = ["run", "demo", PENALTY_PROMPT, "-n", "12", "--temperature", "0"]
    plain = cli(*args, env=cli_env)
    penalized = cli(*args, "--repeat-penalty", "1.8", env=cli_env)
    assert plain.returncode == 0 and penalized.returncode == 0, penalized.stderr
    assert plain.stdout != penalized.stdout
    repl = cli(
        "chat", "demo", "-n", "6", env=cli_env, stdin=b"/set repeat_penalty 1.3\nhello there\n"
    )
    assert repl.returncode == 0, repl.stderr
    assert b"repeat_penalty = 1.3" in repl.stderr and b"Traceback" not in repl.stderr


# --- numbers out of range ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"min_p": float("inf")}, "min_p must be a finite number"),
        ({"seed": 2**40}, "seed must be"),
        ({"max_tokens": 2**40}, "max_tokens"),
    ],
)
def test_out_of_range_sampling_values(demo_model, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        demo_model.generate("Hi", **{"max_tokens": 2, **kwargs})


@pytest.mark.parametrize("bad", [[2**40], [-3], [10**6]])
def test_token_ids_outside_the_vocabulary(demo_model, bad):
    with pytest.raises(UsageError, match="not in this model's vocabulary"):
        demo_model.generate(bad, max_tokens=2)
    with pytest.raises(UsageError, match="not in this model's vocabulary"):
        demo_model.detokenize(bad)
    # still usable afterwards
    assert demo_model.generate("Hi", max_tokens=2, temperature=0).stats.completion_tokens


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "demo", "--kv-type", "bogus"], "kv_type must be one of"),
        (["run", "demo", "hi", "--threads", "99999999999"], "threads must be at least 1"),
        (["run", "demo", "hi", "--temperature", "nan"], "temperature must be a finite number"),
        (["run", "demo", "hi", "--seed", "-5"], "seed must be"),
    ],
)
def test_bad_option_values_are_one_line(cli_env, args, needle):
    out = cli(*args, env=cli_env)
    assert out.returncode == 2
    assert needle in one_line_error(out)


# --- messages that say what is wrong ---------------------------------------------------------------
def test_a_fifo_is_not_called_missing(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelNotFound, match="not a regular file"):
        ondevice.load(fifo)


def test_a_prompt_the_vocabulary_drops_is_not_called_empty(demo_model):
    with pytest.raises(UsageError, match="the prompt is empty"):
        demo_model.generate("", max_tokens=2)


def test_send_of_a_number_names_the_type(demo_model):
    with pytest.raises(UsageError, match="not int"):
        demo_model.conversation().send(5)  # type: ignore[arg-type]


# --- the REPL's /save and /load ------------------------------------------------------------------
def test_repl_save_and_load_of_bad_paths_and_hostile_json(cli_env, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    digits = tmp_path / "digits.json"
    digits.write_text(
        '{"format": "ondevice.conversation", "messages": [], "n": ' + "9" * 5000 + "}"
    )
    script = "\n".join(
        [
            "hello",
            f"/save {tmp_path / 'missing' / 'x.json'}",
            f"/save {tmp_path}",
            f"/load {deep}",
            f"/load {digits}",
            f"/load {tmp_path}",
            "/save " + str(tmp_path / "ok.json"),
        ]
    )
    out = cli("chat", "demo", "-n", "4", env=cli_env, stdin=(script + "\n").encode())
    err = out.stderr.decode()
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 5, err
    assert "does not exist" in errors[0] and "is a folder" in errors[1]
    assert "nested too deep" in errors[2] and "not a saved conversation" in errors[3]
    assert json.loads((tmp_path / "ok.json").read_text())["messages"]
    assert out.returncode == 1  # piped input: a failed command is reported in the exit code


# --- the model store survives a hostile manifest ----------------------------------------------------
def test_a_manifest_of_brackets_hides_only_itself(cli_env, tmp_path):
    home = Path(cli_env["ONDEVICE_HOME"])
    bad = home / "models" / "evil"
    bad.mkdir(parents=True)
    (bad / "evil.Q4_K_M.json").write_text("[" * 100000)
    out = cli("list", env=cli_env)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr
    run = cli("run", "demo", "hi", "-n", "2", env=cli_env)
    assert run.returncode == 0, run.stderr


# --- close() while others wait -----------------------------------------------------------------------
def test_close_while_another_thread_waits_runs_nothing_after(demo_path):
    m = ondevice.load(demo_path, n_ctx=512, threads=1)
    started = threading.Event()
    results: dict[str, object] = {}

    def long_reply() -> None:
        # Counting goes on for hundreds of tokens (a story could end at once).
        stream = m.stream("1, 2, 3, 4, 5, 6, 7,", max_tokens=400, temperature=0)
        first = next(stream)
        started.set()
        results["first"] = first
        results["a"] = list(stream)

    def waiter() -> None:
        started.wait(30)
        try:
            results["b"] = m.generate("Another question", max_tokens=200)
        except ModelClosed as exc:
            results["b"] = exc

    a = threading.Thread(target=long_reply)
    b = threading.Thread(target=waiter)
    a.start()
    b.start()
    started.wait(30)
    time.sleep(0.2)  # b is now waiting for the model's lock
    m.close()
    closed_at = time.perf_counter()
    a.join(30)
    b.join(30)
    assert isinstance(results["b"], ModelClosed), results["b"]
    assert results["a"][-1].finish_reason == "cancelled"
    assert time.perf_counter() - closed_at < 10
    with pytest.raises(ModelClosed):
        m.generate("after", max_tokens=1)


# --- Ctrl-C during the load is never swallowed --------------------------------------------------------
def test_ctrl_c_during_load_always_stops_the_command(cli_env, demo_path):
    """SIGINT at moments spread over the model's load (from llama.cpp's first log line on):
    the command stops (130) or had already finished (0); never "Exception ignored on calling
    ctypes callback" with a run that goes on."""
    outcomes = []
    for delay in (0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25):
        proc = subprocess.Popen(
            [PYTHON, "-m", "ondevice", "-vv", "run", str(demo_path), "hello", "-n", "200"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen = []
        assert proc.stderr is not None
        for raw in proc.stderr:  # llama.cpp's log starts when the load does
            seen.append(raw.decode(errors="replace"))
            if "ondevice.llama_cpp" in seen[-1]:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        text = "".join(seen) + err.decode(errors="replace")
        assert "Exception ignored" not in text and "Traceback" not in text, text[-3000:]
        assert proc.returncode in (130, 0), (proc.returncode, text[-3000:])
        outcomes.append(proc.returncode)
    assert 130 in outcomes
