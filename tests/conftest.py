"""Shared fixtures: the real demo model (SmolLM2-135M-Instruct Q4_1 from `ondevice[demo]`)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Hermetic: the user's model store, tunings and history must not leak into the tests (nor the
# tests' into them). Tests that need their own home set ONDEVICE_HOME themselves.
os.environ["ONDEVICE_HOME"] = tempfile.mkdtemp(prefix="ondevice-test-home-")

import ondevice  # noqa: E402
from ondevice import policy  # noqa: E402
from ondevice.locate import demo_model_path  # noqa: E402

# llama.cpp's OpenMP threads spin while they wait; with a loaded model in this process and
# CLI subprocesses beside it on a 2-core machine, long-spinning threads starve each other (the
# demo model fell from 55 to 0.1 tok/s). The suite waits as ondevice.load() has every process
# wait (a short spin, then sleep); importing ondevice loads no llama.cpp library, so this is
# still before libgomp reads it, and subprocesses inherit it.
policy.set_omp_wait()

# The suite's own subprocesses must run the same interpreter and package as pytest.
PYTHON = sys.executable


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return demo_model_path()


@pytest.fixture(scope="session")
def demo_model(demo_path):
    """One demo model (n_ctx 2048, 2 threads) shared by the session. Tests that need a clean
    KV cache call `demo_model.reset()`."""
    with ondevice.load(demo_path, n_ctx=2048, threads=2) as m:
        yield m


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for running `python -m ondevice` in a subprocess with an isolated home."""
    env = dict(os.environ)
    env["ONDEVICE_HOME"] = str(tmp_path / "ondevice-home")
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(scope="session")
def demo_f16_path(tmp_path_factory, demo_path) -> Path:
    """The demo model dequantized to an F16 GGUF (real weights to quantize from), made once."""
    from ondevice.quantize import dequantize_to_f16

    return dequantize_to_f16(demo_path, tmp_path_factory.mktemp("f16") / "demo-f16.gguf")
