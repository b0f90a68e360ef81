"""Machine facts: CPU model and features, performance vs efficiency cores, RAM, and the llama.cpp build.

`threads="auto"` comes from here: on phones (big.LITTLE) decoding on the efficiency cores slows
generation by 30-40%, so we count only the performance cores, found from cpufreq's maximum
frequency per core (Linux and Android). Elsewhere we use the physical core count.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

# A core counts as a performance core when its maximum frequency is at least this fraction of
# the fastest core's: prime and big cores of a phone SoC pass, little cores (~55-65%) do not.
PERFORMANCE_FREQ_RATIO = 0.80


@dataclass
class CpuTopology:
    """Which logical CPUs exist, which are performance cores, and how we know."""

    logical: int
    physical: int
    performance: list[int] = field(default_factory=list)  # logical CPU ids
    efficiency: list[int] = field(default_factory=list)
    source: str = "psutil"  # "cpufreq" when the split came from per-core max frequency

    @property
    def n_performance(self) -> int:
        return len(self.performance) if self.performance else self.physical


def cpu_topology(sysfs_root: str | os.PathLike[str] = "/sys") -> CpuTopology:
    """Split the CPUs into performance and efficiency cores from cpufreq, if it tells.

    Reads `<sysfs_root>/devices/system/cpu/cpuN/cpufreq/cpuinfo_max_freq`; with no cpufreq (VMs,
    macOS, Windows) every physical core counts as a performance core.
    """
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    base = Path(sysfs_root) / "devices" / "system" / "cpu"
    freqs: dict[int, int] = {}
    try:
        for entry in base.iterdir():
            m = re.fullmatch(r"cpu(\d+)", entry.name)
            if not m:
                continue
            try:
                freqs[int(m.group(1))] = int((entry / "cpufreq" / "cpuinfo_max_freq").read_text())
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    allowed = _allowed_cpus()
    if allowed is not None:
        freqs = {cpu: f for cpu, f in freqs.items() if cpu in allowed}
    if len(freqs) >= 2 and len(set(freqs.values())) > 1:
        top = max(freqs.values())
        perf = sorted(c for c, f in freqs.items() if f >= PERFORMANCE_FREQ_RATIO * top)
        eff = sorted(c for c in freqs if c not in perf)
        # SoCs with mixed cores have no SMT: one logical CPU per core.
        return CpuTopology(
            logical=len(freqs),
            physical=len(freqs),
            performance=perf,
            efficiency=eff,
            source="cpufreq",
        )
    if allowed is not None and len(allowed) < logical:
        physical = max(1, min(physical, len(allowed)))
    return CpuTopology(logical=logical, physical=physical, source="psutil")


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def auto_threads(sysfs_root: str | os.PathLike[str] = "/sys") -> int:
    """Threads for `threads="auto"`: the performance cores, else the physical cores."""
    return max(1, cpu_topology(sysfs_root).n_performance)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """SIMD features that matter to llama.cpp's kernels, as the CPU reports them."""
    interesting = (
        "avx",
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512vnni",
        "avx_vnni",
        "fma",
        "f16c",
        "amx_int8",
        "amx_bf16",
        "sse3",
        "ssse3",
        "neon",
        "asimd",
        "asimddp",
        "sve",
        "sve2",
        "i8mm",
        "fphp",
        "asimdhp",
    )
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in interesting if f in have]
    except OSError:
        pass
    return []


@dataclass
class SystemInfo:
    os: str
    machine: str
    cpu_model: str
    cpu_features: list[str]
    cores_logical: int
    cores_physical: int
    cores_performance: int
    cores_efficiency: int
    core_split_source: str
    auto_threads: int
    ram_total_bytes: int
    ram_available_bytes: int
    llama_cpp_python: str
    llama_cpp_system_info: str
    backends: list[str]
    devices: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def system_info() -> SystemInfo:
    """Everything `ondevice system` prints; loads llama.cpp's library but no model."""
    from ondevice import backends

    topo = cpu_topology()
    mem = psutil.virtual_memory()
    build = backends.build_info()
    return SystemInfo(
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        cpu_model=cpu_model(),
        cpu_features=cpu_features(),
        cores_logical=topo.logical,
        cores_physical=topo.physical,
        cores_performance=topo.n_performance,
        cores_efficiency=len(topo.efficiency),
        core_split_source=topo.source,
        auto_threads=auto_threads(),
        ram_total_bytes=mem.total,
        ram_available_bytes=mem.available,
        llama_cpp_python=build["version"],
        llama_cpp_system_info=build["system_info"],
        backends=build["backends"],
        devices=[d.to_dict() for d in backends.devices()],
    )
