"""Performance-core detection from sysfs, on fake /sys trees shaped like real phones and laptops.

sysfs is the one boundary we cannot have here (this machine is a 2-core VM whose cores are all
alike), so each test builds the files the kernel would show under a temporary root and passes
that root to `cpu_topology(sysfs_root=...)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ondevice.system import auto_threads, cpu_topology, parse_cpu_list


def make_sysfs(
    root: Path,
    max_freq: list[int] | None = None,
    capacity: list[int] | None = None,
    siblings: list[str] | None = None,
) -> Path:
    """A fake /sys with cpu0..N-1: cpufreq max frequency, cpu_capacity, SMT siblings."""
    n = len(max_freq or capacity or siblings or [])
    base = root / "devices" / "system" / "cpu"
    for i in range(n):
        cpu = base / f"cpu{i}"
        (cpu / "cpufreq").mkdir(parents=True)
        (cpu / "topology").mkdir()
        if max_freq:
            (cpu / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freq[i]}\n")
        if capacity:
            (cpu / "cpu_capacity").write_text(f"{capacity[i]}\n")
        (cpu / "topology" / "thread_siblings_list").write_text(
            (siblings[i] if siblings else str(i)) + "\n"
        )
    # Entries that look like CPUs but are not (the kernel has these too).
    (base / "cpufreq").mkdir(parents=True, exist_ok=True)
    (base / "cpuidle").mkdir(exist_ok=True)
    (base / "online").write_text(f"0-{n - 1}\n")
    return root


def test_snapdragon_8_gen_3_counts_prime_and_big_cores(tmp_path):
    # 1 × X4 3.30 GHz, 3 × A720 3.15, 2 × A720 2.96, 2 × A520 2.27 (kHz, as cpufreq writes).
    freqs = [2265600, 2265600, 2956800, 2956800, 3148800, 3148800, 3148800, 3302400]
    root = make_sysfs(tmp_path, max_freq=freqs)
    topo = cpu_topology(root)
    assert topo.source == "cpufreq"
    assert topo.performance == [2, 3, 4, 5, 6, 7]
    assert topo.efficiency == [0, 1]
    assert topo.n_performance == 6
    assert auto_threads(root) == 6


def test_classic_big_little_keeps_only_big_cores(tmp_path):
    # 4 × A55 1.8 GHz + 4 × A76 2.4 GHz (ratio 0.75 < 0.80).
    root = make_sysfs(tmp_path, max_freq=[1800000] * 4 + [2400000] * 4)
    topo = cpu_topology(root)
    assert topo.performance == [4, 5, 6, 7]
    assert topo.efficiency == [0, 1, 2, 3]


def test_cpu_capacity_wins_over_equal_clocks(tmp_path):
    # Same maximum clock but a smaller core design: only cpu_capacity tells them apart.
    root = make_sysfs(tmp_path, max_freq=[2000000] * 6, capacity=[430, 430, 430, 430, 1024, 1024])
    topo = cpu_topology(root)
    assert topo.source == "cpu_capacity"
    assert topo.performance == [4, 5]
    assert topo.efficiency == [0, 1, 2, 3]


def test_uniform_cores_fall_back_to_physical_count(tmp_path):
    root = make_sysfs(tmp_path, max_freq=[3000000] * 4, capacity=[1024] * 4)
    topo = cpu_topology(root)
    assert topo.source == "psutil"
    assert topo.performance == []
    assert topo.n_performance == topo.physical


def test_missing_cpufreq_is_not_an_error(tmp_path):
    (tmp_path / "devices" / "system" / "cpu" / "cpu0").mkdir(parents=True)
    assert cpu_topology(tmp_path).source == "psutil"
    assert cpu_topology(tmp_path / "does-not-exist").source == "psutil"


def test_smt_siblings_count_once(tmp_path):
    # 2 fast cores with 2 threads each (cpus 0/4 and 1/5), 2 slower cores with 2 threads each.
    root = make_sysfs(
        tmp_path,
        max_freq=[4000000, 4000000, 2600000, 2600000] * 2,
        siblings=["0,4", "1,5", "2,6", "3,7", "0,4", "1,5", "2,6", "3,7"],
    )
    topo = cpu_topology(root)
    assert topo.logical == 8
    assert topo.physical == 4
    assert topo.performance == [0, 1]
    assert topo.efficiency == [2, 3]


def test_intel_hybrid_core_lists(tmp_path):
    # P-cores with hyperthreads (0-7 as 4 cores × 2), E-cores 8-15; clocks alone would not
    # separate them well, the PMU lists do.
    siblings = [f"{2 * (i // 2)}-{2 * (i // 2) + 1}" for i in range(8)] + [
        str(i) for i in range(8, 16)
    ]
    root = make_sysfs(tmp_path, max_freq=[5000000] * 8 + [4100000] * 8, siblings=siblings)
    (root / "devices" / "cpu_core").mkdir(parents=True)
    (root / "devices" / "cpu_core" / "cpus").write_text("0-7\n")
    (root / "devices" / "cpu_atom").mkdir(parents=True)
    (root / "devices" / "cpu_atom" / "cpus").write_text("8-15\n")
    topo = cpu_topology(root)
    assert topo.source == "intel-hybrid"
    assert topo.performance == [0, 2, 4, 6]
    assert topo.efficiency == list(range(8, 16))
    assert topo.n_performance == 4


def test_affinity_mask_restricts_the_cores(tmp_path):
    # Android may confine an app to some cores (cpusets); only those count.
    root = make_sysfs(tmp_path, max_freq=[1800000] * 4 + [2400000] * 4)
    topo = cpu_topology(root, allowed={0, 1, 2, 3, 6, 7})
    assert topo.performance == [6, 7]
    assert topo.efficiency == [0, 1, 2, 3]


def test_real_machine_gives_a_usable_answer():
    topo = cpu_topology()
    assert topo.n_performance >= 1
    assert auto_threads() >= 1


@pytest.mark.parametrize(
    "text, expected",
    [("0-3,6,8-9\n", [0, 1, 2, 3, 6, 8, 9]), ("5", [5]), ("", []), ("0,2", [0, 2])],
)
def test_parse_cpu_list(text, expected):
    assert parse_cpu_list(text) == expected
