"""`ondevice chat` driven through a real pseudo-terminal (pexpect) and through a pipe, with the
demo model: streaming, the stats line, Ctrl-C, slash commands, history, colours."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pexpect
import pytest

from ondevice import repl

STATS = re.compile(
    r"\d+ tokens · prompt \d+/\d+ at [\d.]+ tok/s · generation [\d.]+ tok/s · "
    r"TTFT \d+ ms · RSS \d+ MiB \(peak \d+ MiB\)"
)
PROMPT = ">>>"
TIMEOUT = 240  # the shared test machine can be very slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def tty_env(cli_env):
    env = dict(cli_env)
    env.pop("NO_COLOR", None)
    env.pop("ONDEVICE_MODEL", None)
    env["TERM"] = "xterm"
    # pexpect's terminal does not answer cursor-position requests; tell prompt_toolkit so
    # instead of waiting for the answer and printing a warning.
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    return env


def spawn(env, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ondevice", "chat", "demo", "--ctx", "1024", "--threads", "2", *args],
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 200),
    )
    child.expect(PROMPT)
    return child


def read_reply(child: pexpect.spawn) -> list[tuple[float, str]]:
    """Everything the REPL writes up to its stats line and the next prompt, read by read."""
    reads: list[tuple[float, str]] = []
    deadline = time.monotonic() + TIMEOUT
    done = re.compile(STATS.pattern + r".*" + PROMPT, re.S)
    while not done.search(ANSI.sub("", "".join(text for _, text in reads))):
        assert time.monotonic() < deadline, "no stats line"
        try:
            reads.append((time.monotonic(), child.read_nonblocking(4096, timeout=TIMEOUT)))
        except pexpect.TIMEOUT:
            continue
    return reads


def test_interactive_session(tty_env, tmp_path):
    child = spawn(
        tty_env, "--temperature", "0", "-n", "16", "--system", "You are a helpful assistant."
    )
    banner = child.before
    assert "ondevice chat" in banner and "SmolLM2" in banner

    # A reply streams (many separate writes) and ends with a dim stats line.
    child.sendline("What is the capital of France?")
    reads = read_reply(child)
    text = "".join(t for _, t in reads)
    assert "Paris" in text
    # prompt_toolkit hands the terminal back (bracketed paste off) before the reply starts
    start = next(i for i, (_, t) in enumerate(reads) if "\x1b[?2004l" in t)
    pieces = [t for _, t in reads[start:] if re.search(r"[A-Za-z]", ANSI.sub("", t))]
    assert len(pieces) >= 3, f"the reply came in one piece: {reads!r}"
    assert re.search(r"\x1b\[2m" + STATS.pattern, text), "the stats line is not dim"

    # Ctrl-C in the middle of a reply stops it and keeps the session.
    child.sendline("/set max_tokens 400")
    child.expect("max_tokens = 400")
    child.expect(PROMPT)
    child.sendline("Write a very long story about a dragon who learns to cook.")
    child.expect(r"\x1b\[\?2004l")  # prompt_toolkit has let go of the terminal
    child.expect(r"\w+ \w+ \w+ \w+")  # and some of the story has arrived
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(STATS)
    child.expect(PROMPT)
    child.sendline("/set max_tokens 16")
    child.expect(PROMPT)
    child.sendline("What is the capital of Italy?")
    child.expect(STATS)
    assert "Rome" in child.before
    child.expect(PROMPT)

    # Ctrl-C at an empty prompt says how to quit.
    child.sendintr()
    child.expect("to quit, type /exit or press Ctrl-D")
    child.expect(PROMPT)

    # /system, /save, /reset, /load.
    child.sendline("/system You are a pirate.")
    child.expect("system prompt set")
    child.expect(PROMPT)
    saved = tmp_path / "talk.json"
    child.sendline(f"/save {saved}")
    child.expect(r"saved (\d+) messages")
    n_saved = int(child.match.group(1))
    assert n_saved == 6  # three questions and their replies (one cut short)
    child.expect(PROMPT)
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(r"conversation\s+0 messages")
    child.expect(PROMPT)
    child.sendline("/system --clear")
    child.expect("system prompt removed")
    child.expect(PROMPT)
    child.sendline(f"/load {saved}")
    child.expect(f"loaded {n_saved} messages and a system prompt")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(rf"conversation\s+{n_saved} messages")
    child.expect(r"system\s+You are a pirate\.")
    child.expect(PROMPT)
    doc = json.loads(saved.read_text())
    assert doc["system"] == "You are a pirate."
    assert doc["messages"][0]["content"] == "What is the capital of France?"
    assert "Paris" in doc["messages"][1]["content"]

    # Ctrl-D quits.
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "ondevice-home" / "chat_history").read_text()
    assert "What is the capital of France?" in history


def test_no_color_commands_and_multiline(tty_env, tmp_path):
    tty_env["NO_COLOR"] = "1"
    child = spawn(tty_env, "--temperature", "0", "-n", "8")
    child.sendline("/help")
    child.expect("/reset, /clear")
    child.expect(PROMPT)
    child.sendline("/frobnicate")
    child.expect("unknown command /frobnicate")
    child.expect(PROMPT)
    child.sendline('"""')
    child.expect(r"\.\.\.")
    child.sendline("Say hello")
    child.expect(r"\.\.\.")
    child.sendline('in one word."""')
    child.expect(STATS)
    child.expect(PROMPT)
    saved = tmp_path / "multi.json"
    child.sendline(f"/save {saved}")
    child.expect("saved 2 messages")
    child.expect(PROMPT)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads(saved.read_text())["messages"][0]["content"] == "Say hello\nin one word."
    assert "\x1b[2m" not in child.before


def test_piped_input(cli_env):
    env = dict(cli_env)
    env.pop("ONDEVICE_MODEL", None)  # no model named: the demo model (the store is empty)
    proc = subprocess.run(
        [sys.executable, "-m", "ondevice", "chat", "--temperature", "0", "-n", "12"]
        + ["--system", "You are a helpful assistant."],
        input="What is the capital of France?\n/set max_tokens 8\nAnd of Italy?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout  # one reply per message, nothing else on stdout
    assert "Paris" in lines[0]
    assert "\x1b" not in proc.stdout + proc.stderr
    assert len(STATS.findall(proc.stderr)) == 2
    assert "ondevice chat" not in proc.stdout + proc.stderr  # no banner


def test_default_model(monkeypatch, tmp_path):
    monkeypatch.setenv("ONDEVICE_MODEL", "my-model")
    assert repl.default_model() == "my-model"
    monkeypatch.delenv("ONDEVICE_MODEL")
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path))  # an empty store
    assert repl.default_model().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert repl.history_path() == tmp_path / "chat_history"
