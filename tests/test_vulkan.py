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
from ondevice.errors import ModelLoadError
from ondevice.logits import agreement, log_softmax

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

# CPU vs Vulkan may differ by at most this multiple of the difference between two correct CPU
# kernels (flash attention off vs on) on the same prompt; see test_cpu_and_vulkan_agree.
KL_FACTOR = 3.0
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
    offloaded = vulkan_model.offloaded
    assert offloaded == (n_layer + 1, n_layer + 1)  # the layers and the output layer
    result = vulkan_model.generate("The capital of France is", max_tokens=3, temperature=0)
    assert "llvmpipe" in result.stats.backend
    assert f"{n_layer + 1}/{n_layer + 1} layers offloaded" in result.stats.backend
    assert result.stats.completion_tokens == 3 and result.text.strip()


def test_partial_offload_is_reported(demo_path):
    with ondevice.load(demo_path, backend="vulkan", gpu_layers=10, n_ctx=64, threads=2) as m:
        n_layer = int(m.header.arch_value("block_count"))
        assert m.device.endswith(f"10/{n_layer + 1} layers offloaded")


# --- numerics: CPU vs Vulkan ---------------------------------------------------------------------
def all_logits(model: ondevice.Model, tokens: list[int]) -> np.ndarray:
    return model.score(tokens)


def test_cpu_and_vulkan_agree_within_tolerance(cpu_model, vulkan_model, demo_path):
    """Backends run different kernels (Vulkan shaders accumulate in other orders and precisions),
    so identical text is not the bar. The yardstick is measured on the spot: the difference
    between two correct CPU kernels for the same model, flash attention off vs on. Vulkan must
    stay within KL_FACTOR times that floor in mean KL divergence of the next-token
    distributions, every top-1 disagreement must be a near-tie (the CPU's top-2 margin smaller
    than the largest logit difference the two CPU kernels show), and the top-5 sets must mostly
    agree (near-ties at rank 5/6 swap). A broken kernel gives a mean KL of the order of 1 nat
    and a top-1 agreement near 0, orders of magnitude outside these bounds.
    """
    tokens = cpu_model.tokenize(PROMPT)
    assert tokens == vulkan_model.tokenize(PROMPT)
    cpu, vk = all_logits(cpu_model, tokens), all_logits(vulkan_model, tokens)
    with ondevice.load(demo_path, backend="cpu", n_ctx=N_CTX, threads=2, flash_attn="off") as a:
        fa_off = all_logits(a, tokens)
    with ondevice.load(demo_path, backend="cpu", n_ctx=N_CTX, threads=2, flash_attn="on") as b:
        fa_on = all_logits(b, tokens)
    floor = agreement(fa_off, fa_on)
    stats = agreement(cpu, vk)
    print(f"\nCPU flash-attn off vs on, {len(tokens)} positions: {floor}")
    print(f"CPU vs Vulkan (lavapipe), {len(tokens)} positions: {stats}")
    assert np.isfinite(vk).all()
    assert floor["mean_kl"] > 0  # the two CPU kernels differ, so the yardstick is real
    assert stats["mean_kl"] <= KL_FACTOR * floor["mean_kl"], (stats, floor)
    lp = log_softmax(cpu)
    for pos in np.nonzero(cpu.argmax(-1) != vk.argmax(-1))[0]:
        margin = lp[pos, cpu[pos].argmax()] - lp[pos, vk[pos].argmax()]
        assert margin < floor["max_abs_diff"], (pos, margin, stats)
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


def test_a_failed_gpu_load_falls_back_to_the_cpu(demo_path, monkeypatch):
    # lavapipe never runs out of "device" memory (it is host memory, and it does not enforce
    # its 2 GiB heap: a 65536-token context loads), so the GPU's refusal is faked at the C
    # boundary: llama.cpp's loader returns NULL when asked to offload, as it does on a real
    # out-of-memory or driver error. Everything else is real, the CPU retry included.
    import llama_cpp.llama_cpp as L

    real = L.llama_model_load_from_file
    offload_requests = []

    def refuse_offload(path, params):
        offload_requests.append(params.n_gpu_layers)
        return None if params.n_gpu_layers != 0 else real(path, params)

    monkeypatch.setattr(L, "llama_model_load_from_file", refuse_offload)
    lavapipe()
    with ondevice.load(demo_path, backend="vulkan", n_ctx=64, threads=2) as m:
        assert offload_requests == [-1, 0]  # tried the GPU, then the CPU
        assert m.backend == "CPU" and not m.placement.on_gpu
        note = next(n for n in m.notes if "ran on the CPU instead" in n)
        assert note.startswith("loading on Vulkan0 (llvmpipe")
        stats = m.generate("The capital of France is", max_tokens=2, temperature=0).stats
        assert note in stats.notes and stats.backend == "CPU"
    with pytest.raises(ModelLoadError, match="loading on Vulkan0 .* failed"):
        ondevice.load(demo_path, backend="vulkan", n_ctx=64, threads=2, no_fallback=True)


def test_a_cancelled_gpu_load_is_not_retried_on_the_cpu(demo_path):
    calls: list[float] = []

    def stop(fraction: float) -> bool:
        calls.append(fraction)
        return False  # cancel

    lavapipe()
    with pytest.raises(ModelLoadError):
        ondevice.load(demo_path, backend="vulkan", n_ctx=64, threads=2, on_progress=stop)
    assert len(calls) == 1  # one load, cancelled; no second attempt on the CPU
