"""Backend discovery and choice: simulated machines for the selection logic (a Mac with Metal, a
PC with two Vulkan GPUs, a server with only lavapipe), and this machine's real build for the rest.

The simulation sits at the boundary: `backends.choose()` takes the probe's facts (platform,
compiled backends, devices with memory) as data, so nothing of ondevice is mocked. The Vulkan
build itself is exercised by tests/test_vulkan.py (marker `vulkan`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON
from gguf import GGUFWriter
from gguf.constants import GGUFValueType as V

import ondevice
from ondevice import backends, fit
from ondevice.backends import Device, Probe
from ondevice.errors import BackendUnavailable, UsageError
from ondevice.gguf_header import read_header

GIB = 1024**3


def cpu_device(index: int = 0) -> Device:
    return Device(index, "CPU", "Some CPU", "cpu", "CPU", 16 * GIB, 32 * GIB)


def gpu(index: int, name: str, desc: str, reg: str, free: int, kind: str = "gpu") -> Device:
    return Device(index, name, desc, kind, reg, free, free + GIB)


MAC = Probe(
    platform="darwin",
    machine="arm64",
    compiled=("metal",),
    registered=("MTL", "BLAS", "CPU"),
    devices=(gpu(0, "MTL0", "Apple M2 Pro", "MTL", 21 * GIB), cpu_device(1)),
)
PC = Probe(
    platform="linux",
    machine="x86_64",
    compiled=("vulkan",),
    registered=("Vulkan", "CPU"),
    devices=(
        gpu(0, "Vulkan0", "Intel(R) Graphics (RPL-S)", "Vulkan", 8 * GIB, "igpu"),
        gpu(1, "Vulkan1", "AMD Radeon RX 7600 (RADV NAVI33)", "Vulkan", 7 * GIB),
        cpu_device(2),
    ),
)
LAVAPIPE_ONLY = Probe(
    platform="linux",
    machine="x86_64",
    compiled=("vulkan",),
    registered=("Vulkan", "CPU"),
    devices=(
        gpu(0, "Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", "Vulkan", 20 * GIB),
        cpu_device(1),
    ),
)
CPU_ONLY = Probe("linux", "x86_64", (), ("CPU",), (cpu_device(0),))
VULKAN_NO_DEVICE = Probe("linux", "x86_64", ("vulkan",), ("CPU",), (cpu_device(0),))


# --- selection, on simulated machines --------------------------------------------------------
def test_auto_is_metal_on_apple_silicon():
    p = backends.choose("auto", probe_data=MAC)
    assert (p.backend, p.device_index, p.n_gpu_layers) == ("metal", 0, -1)
    assert "Apple M2 Pro" in p.device and p.on_gpu


def test_auto_prefers_a_discrete_gpu_and_vulkan_n_picks_exactly_that_device():
    assert backends.choose("auto", probe_data=PC).device_index == 1  # the Radeon, not the iGPU
    first = backends.choose("vulkan", probe_data=PC)
    second = backends.choose("vulkan:1", probe_data=PC)
    assert (first.device_index, second.device_index) == (0, 1)
    assert "Intel" in first.device and "Radeon" in second.device


def test_auto_never_picks_a_software_vulkan_device_but_vulkan_does():
    assert backends.choose("auto", probe_data=LAVAPIPE_ONLY) == backends.CPU
    p = backends.choose("vulkan", probe_data=LAVAPIPE_ONLY)
    assert p.backend == "vulkan" and "llvmpipe" in p.device and p.n_gpu_layers == -1
    assert backends.choose("auto", probe_data=CPU_ONLY) == backends.CPU


@pytest.mark.parametrize(
    ("probe", "asked", "flag"),
    [(CPU_ONLY, "metal", "-DGGML_METAL=on"), (MAC, "vulkan", "-DGGML_VULKAN=on")],
)
def test_a_backend_not_compiled_in_is_an_error_with_the_reinstall_command(probe, asked, flag):
    with pytest.raises(BackendUnavailable) as err:
        backends.choose(asked, probe_data=probe, fallback=True)
    text = err.value.one_line()
    assert "not compiled into the installed llama-cpp-python" in text
    assert (
        f'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir llama-cpp-python' in text
    )


def test_no_usable_device_falls_back_to_cpu_with_a_note_or_raises_without_fallback():
    p = backends.choose("vulkan", probe_data=VULKAN_NO_DEVICE)
    assert p.backend == "cpu" and not p.on_gpu
    assert any("no usable device" in n and "CPU" in n for n in p.notes)
    with pytest.raises(BackendUnavailable, match="no usable device"):
        backends.choose("vulkan", probe_data=VULKAN_NO_DEVICE, fallback=False)
    with pytest.raises(BackendUnavailable, match="vulkan device 5 does not exist"):
        backends.choose("vulkan:5", probe_data=PC, fallback=False)
    assert backends.choose("vulkan:5", probe_data=PC).backend == "cpu"


def test_cpu_and_zero_gpu_layers_mean_no_gpu_at_all():
    assert backends.choose("cpu", probe_data=PC) == backends.CPU
    assert backends.choose("vulkan", 0, probe_data=PC) == backends.CPU
    assert backends.engine_devices(backends.CPU) == []  # llama.cpp gets an empty device list
    assert backends.choose("vulkan:1", 12, probe_data=PC).n_gpu_layers == 12


@pytest.mark.parametrize(
    ("backend", "gpu_layers", "match"),
    [
        ("opencl", "auto", "unknown backend"),
        ("vulkan:x", "auto", "bad device index"),
        ("cpu:0", "auto", "unknown backend"),
        ("vulkan", "lots", "gpu_layers must be auto or a number"),
        ("vulkan", -2, "gpu_layers must be -1"),
    ],
)
def test_nonsense_is_a_usage_error(backend, gpu_layers, match):
    with pytest.raises(UsageError, match=match):
        backends.choose(backend, gpu_layers, probe_data=PC)


# --- gpu_layers="auto": the fit arithmetic against the device's free memory -------------------
def _with_free(probe: Probe, free: int) -> Probe:
    dev = probe.devices[0]
    moved = Device(dev.index, dev.name, dev.description, dev.type, dev.backend, free, free)
    return Probe(probe.platform, probe.machine, probe.compiled, probe.registered, (moved,))


def test_gpu_layers_auto_offloads_what_fits_the_free_memory(demo_path):
    header = read_header(demo_path)
    n_ctx, kv = 2048, "f16"
    per_layer, output = backends.layer_bytes(header)
    n_layer = int(header.arch_value("block_count"))
    assert len(per_layer) == n_layer and all(b > 0 for b in per_layer)
    # Every tensor but the token embeddings (kept on the CPU) counts once; with tied embeddings
    # llama.cpp puts a copy of them on the output layer's device.
    embd = sum(t.n_bytes for t in header.tensors if t.name.startswith("token_embd."))
    tied = not any(t.name.startswith("output.") for t in header.tensors)
    assert sum(per_layer) + output == header.tensor_bytes - embd + (embd if tied else 0)

    kv_layer = fit.kv_cache_bytes(header, n_ctx, kv) // n_layer
    fixed = fit.compute_bytes(header, n_ctx)

    def free_for(budget: float) -> int:  # invert the reserve: budget = free*0.95 - 256 MiB
        return int(
            (budget + fixed + backends.GPU_RESERVE_BYTES) / (1 - backends.GPU_RESERVE_FRACTION)
        )

    everything = sum(per_layer) + n_layer * kv_layer + output

    def place(free: int) -> backends.Placement:
        return backends.choose(
            "vulkan", "auto", header=header, n_ctx=n_ctx, kv_type=kv,
            probe_data=_with_free(LAVAPIPE_ONLY, free),
        )  # fmt: skip

    assert place(free_for(everything) + 1024).n_gpu_layers == -1
    ten = sum(per_layer[-10:]) + 10 * kv_layer  # llama.cpp offloads the last layers first
    partial = place(free_for(ten) + 1024)
    assert partial.n_gpu_layers == 10 and partial.on_gpu
    assert any(f"10/{n_layer} layers fit" in n for n in partial.notes)
    none = place(free_for(per_layer[-1] + kv_layer) - 1024)
    assert none.backend == "cpu" and any("not one layer" in n for n in none.notes)
    with pytest.raises(BackendUnavailable, match="not one layer"):
        backends.choose(
            "vulkan", header=header, n_ctx=n_ctx, fallback=False,
            probe_data=_with_free(LAVAPIPE_ONLY, free_for(0) - 1),
        )  # fmt: skip
    # A longer context leaves less room for layers.
    assert backends.layers_that_fit(header, free_for(ten) + 1024, 8192) < 10


# --- Phi-2's attention settings --------------------------------------------------------------
def test_attention_settings_per_backend():
    gpu_place = backends.choose("vulkan", probe_data=LAVAPIPE_ONLY)
    cpu = backends.attention_settings("phi2", backends.CPU, "auto", "f16", (80, 80))
    on_gpu = backends.attention_settings("phi2", gpu_place, "auto", "f16", (80, 80))
    llama = backends.attention_settings("llama", backends.CPU, "auto", "f16", (64, 64))
    assert (cpu.flash_attn, on_gpu.flash_attn, llama.flash_attn) == ("off", "auto", "off")
    assert cpu.offload_kqv and on_gpu.offload_kqv  # llama.cpp #4437: never off
    forced = backends.attention_settings("phi2", backends.CPU, "on", "f16", (80, 80))
    assert forced.flash_attn == "on" and any("overflow" in n for n in forced.notes)
    with pytest.raises(UsageError, match="head dimension 80 is not a multiple of 32"):
        backends.attention_settings("phi2", gpu_place, "auto", "q8_0", (80, 80))
    # A quantized V cache needs flash attention: there "auto" stays llama.cpp's.
    q8 = backends.attention_settings("llama", backends.CPU, "auto", "q8_0", (64, 64))
    assert q8.flash_attn == "auto"
    assert backends.attention_settings("llama", backends.CPU, "on", "f16").flash_attn == "on"


def write_tiny_phi2(path: Path) -> Path:
    """A tiny random Phi-2 GGUF (llama.cpp's phi2 graph, head dimension 80 like the real one)."""
    from gguf_corpus import tiny_vocab

    tokens, merges, types = tiny_vocab()
    n_vocab, e, ff, n_head, n_layer = len(tokens), 160, 320, 2, 2
    eos = tokens.index("<|endoftext|>")
    w = GGUFWriter(path, "phi2")
    for key, value, vtype, sub in [
        ("phi2.context_length", 256, V.UINT32, None),
        ("phi2.embedding_length", e, V.UINT32, None),
        ("phi2.feed_forward_length", ff, V.UINT32, None),
        ("phi2.block_count", n_layer, V.UINT32, None),
        ("phi2.attention.head_count", n_head, V.UINT32, None),
        ("phi2.attention.head_count_kv", n_head, V.UINT32, None),
        ("phi2.attention.layer_norm_epsilon", 1e-5, V.FLOAT32, None),
        ("phi2.rope.dimension_count", 32, V.UINT32, None),
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", "phi-2", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        ("tokenizer.ggml.bos_token_id", eos, V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", eos, V.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
    ]:
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, e), "output_norm.weight": (e,)}
    shapes |= {"output_norm.bias": (e,), "output.weight": (n_vocab, e), "output.bias": (n_vocab,)}
    for i in range(n_layer):
        for name, shape in [
            ("attn_norm", (e,)),
            ("attn_qkv", (3 * e, e)),
            ("attn_output", (e, e)),
            ("ffn_up", (ff, e)),
            ("ffn_down", (e, ff)),
        ]:
            shapes[f"blk.{i}.{name}.weight"] = shape
            shapes[f"blk.{i}.{name}.bias"] = (shape[0],)
    for name, shape in shapes.items():
        ones = name.endswith("norm.weight")
        data = np.ones(shape) if ones else rng.standard_normal(shape) * 0.05
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_phi2_on_the_cpu_loads_without_flash_attention(tmp_path):
    from ondevice._native import log as native_log

    path = write_tiny_phi2(tmp_path / "tiny-phi2.gguf")
    assert backends.head_dims(read_header(path)) == (80, 80)
    with ondevice.load(path, backend="cpu", n_ctx=128, threads=1) as m:
        # What llama.cpp itself logged while creating the context.
        logged = [ln for ln in native_log.recent(200) if "flash_attn" in ln]
        assert any("disabled" in ln for ln in logged), logged
        assert m.config.offload_kqv
        out = m.generate("the capital of", max_tokens=3, temperature=0)
        assert out.stats.backend == "CPU" and out.stats.completion_tokens >= 1
    with pytest.raises(UsageError, match="cannot use a q8_0 KV cache"):
        ondevice.load(path, backend="cpu", kv_type="q8_0", n_ctx=128)


# --- this machine's real build ---------------------------------------------------------------
def test_the_real_probe_is_consistent():
    p = backends.probe()
    cpus = [d for d in p.devices if d.type == "cpu"]
    assert "CPU" in p.registered and len(cpus) == 1 and cpus[0].memory_total > 0
    assert [d.index for d in p.devices] == list(range(len(p.devices)))
    for d in p.devices:  # every device belongs to a registered backend; GPUs to a compiled one
        assert d.backend in p.registered
        if d.type in ("gpu", "igpu"):
            assert d.family in p.compiled
    info = backends.build_info()
    assert info["gpu_backends_compiled"] == list(p.compiled)
    for family, command in info["reinstall"].items():
        assert family not in p.compiled and command == backends.REINSTALL[family]


def test_stats_name_the_device_that_ran(demo_model):
    demo_model.reset()
    result = demo_model.generate("The capital of France is", max_tokens=2, temperature=0)
    expected = backends.describe(demo_model.placement, None)
    assert result.stats.backend.startswith(expected)
    if not demo_model.placement.on_gpu:
        assert result.stats.backend == "CPU"


def test_cli_reports_backends_and_explains_a_missing_one(cli_env):
    out = subprocess.run(
        [PYTHON, "-m", "ondevice", "system", "--json"],
        capture_output=True, text=True, env=cli_env, timeout=120, check=True,
    )  # fmt: skip
    info = json.loads(out.stdout)
    assert "CPU" in info["backends"] and any(d["type"] == "cpu" for d in info["devices"])
    missing = next((f for f in ("vulkan", "metal") if f not in backends.compiled_backends()), None)
    if missing is None:
        pytest.skip("this build has both Vulkan and Metal")
    run = subprocess.run(
        [PYTHON, "-m", "ondevice", "run", "demo", "hi", "--backend", missing, "-n", "1"],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert backends.REINSTALL[missing] in run.stderr
