"""The Vulkan backend, for real, on Mesa's lavapipe (Vulkan 1.3 on the CPU): discovery, full
offload, agreement with the CPU backend, and the CPU fallback.

Runs only in the venv that scripts/build-vulkan.sh prepares (marker `vulkan`, excluded by
default):

    scripts/build-vulkan.sh && source ~/.cache/ondevice-vulkan/env.sh
    pytest -m vulkan tests/test_vulkan.py

Elsewhere every test here skips, saying so. lavapipe runs the demo model at under 1 token/s, so
the tests evaluate short prompts and generate a few tokens.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import PYTHON

import ondevice
from ondevice import backends

ICD = "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json"
# ggml-vulkan skips CPU-type devices (lavapipe) unless asked for them by index; must be set
# before ggml's registry first initialises (env.sh sets both for the whole session).
os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
os.environ.setdefault("VK_ICD_FILENAMES", ICD)

pytestmark = [
    pytest.mark.vulkan,
    pytest.mark.skipif(
        "vulkan" not in backends.compiled_backends(),
        reason="needs the Vulkan build of llama-cpp-python: run scripts/build-vulkan.sh, then "
        "`source ~/.cache/ondevice-vulkan/env.sh` and pytest -m vulkan",
    ),
]

PROMPT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome. Water boils at one hundred degrees Celsius at sea level, and"
)
N_CTX = 256

# Agreement of the next-token distributions, CPU vs Vulkan, over every position of PROMPT.
# Filled in from measurements: see test_cpu_and_vulkan_agree for the justification.
MAX_MEAN_KL = 0.05
MIN_TOP1 = 0.75
MIN_TOP5_OVERLAP = 0.8


def lavapipe() -> backends.Device:
    devs = [d for d in backends.devices() if d.family == "vulkan" and d.software]
    assert devs, (
        "the Vulkan build finds no lavapipe device: source ~/.cache/ondevice-vulkan/env.sh "
        f"(GGML_VK_VISIBLE_DEVICES=0, VK_ICD_FILENAMES={ICD}) before the first ggml call; "
        f"devices seen: {backends.devices()}"
    )
    return devs[0]


@pytest.fixture(scope="module")
def vulkan_model(demo_path):
    lavapipe()
    with ondevice.load(demo_path, backend="vulkan", n_ctx=N_CTX, threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def cpu_model(demo_path):
    with ondevice.load(demo_path, backend="cpu", n_ctx=N_CTX, threads=2) as m:
        yield m


def cli_env(tmp_path, **changes: str | None) -> dict[str, str]:
    env = dict(os.environ, ONDEVICE_HOME=str(tmp_path / "home"), NO_COLOR="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "ondevice", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- discovery ---------------------------------------------------------------------------------
def test_discovery_lists_the_llvmpipe_device(tmp_path):
    dev = lavapipe()
    assert dev.name.startswith("Vulkan") and dev.type == "gpu" and dev.memory_total > 0
    assert "vulkan" in backends.compiled_backends() and "Vulkan" in backends.registered_backends()
    out = run_cli("system", env=cli_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "llvmpipe" in ln)
    assert dev.name in line and "Vulkan" in line and "MiB" in line
    info = json.loads(run_cli("system", "--json", env=cli_env(tmp_path), timeout=120).stdout)
    assert any(d["software"] and d["family"] == "vulkan" for d in info["devices"])
    # auto never runs on a software rasterizer: the CPU backend is faster than lavapipe.
    assert backends.choose("auto") == backends.CPU


# --- offload -------------------------------------------------------------------------------------
def test_backend_vulkan_offloads_every_layer_and_the_stats_say_so(vulkan_model):
    n_layer = int(vulkan_model.header.arch_value("block_count"))
    placement = vulkan_model.placement
    assert placement.backend == "vulkan" and placement.n_gpu_layers == -1  # auto: it all fits
    offloaded = backends.offloaded_layers(vulkan_model.engine.load_log)
    assert offloaded == (n_layer + 1, n_layer + 1)  # the layers and the output layer
    result = vulkan_model.generate("The capital of France is", max_tokens=3, temperature=0)
    assert "llvmpipe" in result.stats.backend
    assert f"{n_layer + 1}/{n_layer + 1} layers offloaded" in result.stats.backend
    assert result.stats.completion_tokens == 3 and result.text.strip()


def test_partial_offload_is_reported(demo_path):
    with ondevice.load(demo_path, backend="vulkan", gpu_layers=10, n_ctx=64, threads=2) as m:
        n_layer = int(m.header.arch_value("block_count"))
        assert m.backend.endswith(f"10/{n_layer + 1} layers offloaded")


# --- numerics: CPU vs Vulkan ---------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ref: np.ndarray, other: np.ndarray, k: int = 5) -> dict[str, float]:
    """Per-position comparison of two [positions, vocab] logit arrays."""
    lp, lq = log_softmax(ref), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # KL(ref || other), nats
    top_ref = np.argsort(-ref, axis=-1)[:, :k]
    top_other = np.argsort(-other, axis=-1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other, strict=True)]
    return {
        "positions": float(len(ref)),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1": float((top_ref[:, 0] == top_other[:, 0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
        "max_abs_diff": float(np.abs(ref - other).max()),
        "logit_scale": float(np.abs(ref).max()),
    }


def all_logits(model: ondevice.Model, tokens: list[int]) -> np.ndarray:
    with model.lock():
        model.engine.kv_clear()
        out = model.engine.decode_all_logits(tokens)
        model.engine.kv_clear()
    model.reset()
    return out


def test_cpu_and_vulkan_agree_within_tolerance(cpu_model, vulkan_model):
    tokens = cpu_model.tokenize(PROMPT)
    assert tokens == vulkan_model.tokenize(PROMPT)
    cpu, vk = all_logits(cpu_model, tokens), all_logits(vulkan_model, tokens)
    stats = agreement(cpu, vk)
    print(f"\nCPU vs Vulkan (lavapipe), {len(tokens)} positions: {stats}")
    assert np.isfinite(vk).all()
    assert stats["mean_kl"] <= MAX_MEAN_KL, stats
    assert stats["top1"] >= MIN_TOP1, stats
    assert stats["top5_overlap"] >= MIN_TOP5_OVERLAP, stats


# --- fallback ------------------------------------------------------------------------------------
def test_hidden_device_falls_back_to_the_cpu_with_a_note(tmp_path):
    # Without GGML_VK_VISIBLE_DEVICES, ggml-vulkan skips lavapipe (a CPU-type device).
    env = cli_env(tmp_path, GGML_VK_VISIBLE_DEVICES=None)
    args = ("run", "demo", "The capital of France is", "--backend", "vulkan", "-n", "2")
    out = run_cli(*args, "--temperature", "0", "--json", env=env)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["backend"] == "CPU"
    assert any("no usable device" in n and "CPU instead" in n for n in stats["notes"]), stats
    assert "no usable device" in out.stderr  # the warning reaches the terminal too
    strict = run_cli(*args, "--no-fallback", env=env)
    assert strict.returncode == 1 and strict.stdout == ""
    assert strict.stderr.startswith("error: vulkan is compiled in but finds no usable device")


def test_a_failed_gpu_load_falls_back_to_the_cpu(tmp_path):
    # A real allocation failure: the device may allocate at most 1 MiB per buffer, less than
    # the demo model's output tensor, so llama.cpp cannot load the model onto it.
    env = cli_env(tmp_path, GGML_VK_FORCE_MAX_ALLOCATION_SIZE=str(1 << 20))
    args = ("run", "demo", "The capital of France is", "--backend", "vulkan", "-n", "2")
    out = run_cli(*args, "--temperature", "0", "--json", env=env)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["backend"] == "CPU"
    assert any("failed" in n and "CPU instead" in n for n in stats["notes"]), stats
    strict = run_cli(*args, "--no-fallback", env=env)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert strict.stderr.startswith("error: loading on Vulkan0")
