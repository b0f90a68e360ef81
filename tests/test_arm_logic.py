"""ondevice's own ARM rules, checked on any machine: a phone's cores from a fake sysfs tree, the
threads and profile pinning that follow from them, repacking left on for ARM builds, and the
fit planner's count of the repacked copy.

The phone is the boundary we cannot have here, so its sysfs is a temporary tree (as in
test_system.py) put in place of the real /sys; the model loads and the arithmetic are real. The
same rules run for real on aarch64 under qemu in test_arm64.py (scripts/arm64-check.sh).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_system import make_sysfs

import ondevice
from ondevice import bench, fit, policy, system
from ondevice.gguf_header import read_header

# Snapdragon 8 Gen 3 (OnePlus 12, Galaxy S24): 2 × Cortex-A520 2.27 GHz, 2 × A720 2.96 GHz,
# 3 × A720 3.15 GHz, 1 × X4 3.30 GHz; cpuinfo_max_freq in kHz as the kernel writes it.
SD8G3_FREQS = [2265600, 2265600, 2956800, 2956800, 3148800, 3148800, 3148800, 3302400]
# llama_print_system_info() of the aarch64 builds scripts/arm64-check.sh makes (0.3.36), as the
# emulated run printed them, and of an AMX build on a Sapphire Rapids Xeon.
ARM_DOTPROD_INFO = (
    "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
    "REPACK = 1 |"
)
ARM_I8MM_INFO = (
    "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | DOTPROD = 1 | OPENMP = 1 | "
    "REPACK = 1 |"
)
X86_AMX_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
)


@pytest.fixture
def phone(tmp_path, monkeypatch):
    """This process sees a Snapdragon 8 Gen 3's sysfs instead of the real /sys."""
    root = make_sysfs(tmp_path / "sys", max_freq=SD8G3_FREQS)
    real = system.cpu_topology
    # Whatever root a caller names (auto_threads passes the default "/sys"), it gets the phone's.
    monkeypatch.setattr(system, "cpu_topology", lambda *_args, **_kw: real(root))
    return root


def test_snapdragon_8_gen_3_splits_into_prime_big_and_little(phone):
    topo = system.cpu_topology()
    assert topo.source == "cpufreq"
    assert topo.performance == [2, 3, 4, 5, 6, 7]  # X4 + 3 × A720 + 2 × A720
    assert topo.efficiency == [0, 1]  # the A520s (2.27 / 3.30 = 0.69 < 0.80)
    assert topo.fastest(1) == [7]  # the X4
    assert topo.fastest(4) == [4, 5, 6, 7]  # X4 and the 3.15 GHz A720s


def test_threads_auto_uses_the_six_big_cores_in_a_real_load(phone, demo_path):
    assert system.auto_threads() == 6
    with ondevice.load(demo_path, n_ctx=64, threads="auto") as m:
        assert m.threads == 6
        assert m.generate("Hi", max_tokens=1).stats.threads == 6


@pytest.mark.parametrize(
    ("profile", "pinned"),
    [
        ("phone-4gb", [4, 5, 6, 7]),
        ("phone-6gb", [4, 5, 6, 7]),
        ("phone-8gb", [4, 5, 6, 7]),
        ("laptop-16gb", [2, 3, 4, 5, 6, 7]),  # 8 threads wanted, 6 performance cores
    ],
)
def test_profiles_pin_the_fastest_performance_cores(phone, demo_path, profile, pinned):
    opts = bench.BenchOptions(profile=bench.parse_profile(profile))
    chosen, cores = bench.apply_profile(read_header(demo_path), opts)
    assert cores == pinned
    assert chosen.threads == [len(pinned)]
    assert not set(cores) & {0, 1}  # never a little core


def test_repacking_stays_on_for_arm_builds():
    assert not policy.has_amx_kernels(ARM_DOTPROD_INFO)
    assert not policy.has_amx_kernels(ARM_I8MM_INFO)
    assert policy.has_amx_kernels(X86_AMX_INFO)


def fake_header(*tensors: tuple[str, str, tuple[int, int], int]) -> SimpleNamespace:
    return SimpleNamespace(
        tensors=[SimpleNamespace(name=n, type_name=t, shape=s, n_bytes=b) for n, t, s, b in tensors]
    )


def test_arm_repacks_what_llama_cpp_repacks():
    """ggml-cpu/repack.cpp on NEON+dotprod (or i8mm): Q4_0 and Q8_0 in 4-row groups, the
    K-quants in 8-row groups; Q4_1 never; token embeddings (row lookups) never."""
    h = fake_header(
        ("token_embd.weight", "Q4_0", (576, 49152), 1000),
        ("output.weight", "Q4_1", (576, 49152), 2000),
        ("blk.0.attn_q.weight", "Q4_0", (576, 576), 100),
        ("blk.0.attn_k.weight", "Q8_0", (576, 196), 10),  # 196 = 4 × 49
        ("blk.0.ffn_up.weight", "Q4_K", (576, 1540), 7),  # 1540 % 8 = 4: kept plain
        ("blk.0.ffn_down.weight", "Q6_K", (1536, 576), 3),
        ("blk.0.attn_v.weight", "Q4_1", (576, 192), 5000),
        ("blk.0.attn_norm.weight", "F32", (576,), 50000),
    )
    assert fit.repackable_bytes(h, "arm_dotprod") == 100 + 10 + 3
    # x86 AVX2 repacks in 8-row groups and has no Q8_0 or Q6_K layouts.
    assert fit.repackable_bytes(h, "x86_avx2") == 100


def test_tied_embeddings_are_repacked_for_the_output_layer():
    """Without output.weight the output layer multiplies by token_embd, and llama.cpp puts a
    repacked copy of it in CPU_REPACK (on ARM a Q8_0 embedding is 29 MiB of the demo's
    Q4_0 requantization; test_arm64.py checks the sum against llama.cpp's own log)."""
    tied = fake_header(
        ("token_embd.weight", "Q8_0", (576, 49152), 1000),
        ("blk.0.attn_q.weight", "Q4_0", (576, 576), 100),
    )
    assert fit.repackable_bytes(tied, "arm_dotprod") == 1000 + 100
    assert fit.repackable_bytes(tied, "x86_avx2") == 100  # no Q8_0 layout on x86


def test_fit_counts_the_repacked_copy_of_a_q4_0_model_on_arm(demo_f16_path, tmp_path):
    from ondevice.quantize import quantize

    q4_0 = tmp_path / "demo-q4_0.gguf"
    quantize(demo_f16_path, q4_0, "Q4_0")
    h = read_header(q4_0)
    matrices = sum(
        t.n_bytes
        for t in h.tensors
        if t.type_name == "Q4_0" and len(t.shape) == 2 and not t.name.startswith("token_embd")
    )
    assert matrices > 0
    plain = fit.predict(h, 2048, repack=False, repack_family="arm_dotprod")
    packed = fit.predict(h, 2048, repack=True, repack_family="arm_dotprod")
    read_in = fit.predict(h, 2048, repack=True, repack_family="arm_dotprod", use_mmap=False)
    embd = next(t for t in h.tensors if t.name == "token_embd.weight")
    assert embd.type_name == "Q8_0"  # llama.cpp keeps the (tied) embeddings at Q8_0
    assert packed.repack_bytes == matrices + embd.n_bytes  # the output layer's copy too
    assert packed.predicted_peak_bytes == plain.predicted_peak_bytes + packed.repack_bytes
    assert read_in.repack_bytes == 0  # without mmap the repacked copy replaces the plain one
