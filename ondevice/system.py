"""Machine facts: CPU model and features, performance vs efficiency cores, RAM, and the llama.cpp build.

`threads="auto"` comes from here: on phones (big.LITTLE) decoding on the efficiency cores slows
generation by 30-40%, so we count only the performance cores, found from sysfs (Intel's hybrid
core lists, ARM's per-core capacity, or each core's maximum frequency; Linux and Android).
Elsewhere we use the physical core count.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# A core counts as a performance core when its capacity (or maximum frequency) is at least this
# fraction of the fastest core's: prime and big cores of a phone SoC pass, little cores (~30-65%)
# do not.
PERFORMANCE_FREQ_RATIO = 0.80
DEFAULT_SYSFS = "/sys"


@dataclass
class CpuTopology:
    """Which logical CPUs exist, which are performance cores, and how we know.

    `performance` and `efficiency` list one logical CPU per physical core (the first SMT
    sibling), so their lengths are core counts, which is what llama.cpp's threads should be.
    """

    logical: int
    physical: int
    performance: list[int] = field(default_factory=list)  # logical CPU ids
    efficiency: list[int] = field(default_factory=list)
    # "cpu_capacity" or "cpufreq" (per-core sysfs values), "intel-hybrid" (cpu_core/cpu_atom
    # PMU lists), or "psutil" when nothing tells the cores apart.
    source: str = "psutil"
    # Each core's cpu_capacity or maximum frequency, where sysfs gives one.
    scores: dict[int, int] = field(default_factory=dict)

    @property
    def n_performance(self) -> int:
        return len(self.performance) if self.performance else self.physical

    def fastest(self, n: int) -> list[int]:
        """The n fastest performance cores (prime before big on a phone), in CPU id order."""
        ranked = sorted(self.performance, key=lambda c: (-self.scores.get(c, 0), c))
        return sorted(ranked[:n])


def parse_cpu_list(text: str) -> list[int]:
    """sysfs CPU lists: "0-3,6,8-9" → [0, 1, 2, 3, 6, 8, 9]; "" → []."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cpu_topology(
    sysfs_root: str | os.PathLike[str] = DEFAULT_SYSFS, allowed: set[int] | None = None
) -> CpuTopology:
    """Split the CPUs into performance and efficiency cores from sysfs, where it tells.

    In order of trust: Intel hybrid chips list their P and E cores (devices/cpu_core/cpus,
    devices/cpu_atom/cpus); ARM kernels give each core's relative compute capacity
    (cpuN/cpu_capacity, which also separates cores of equal clock but smaller design); else
    each core's maximum frequency (cpuN/cpufreq/cpuinfo_max_freq). SMT siblings
    (cpuN/topology/thread_siblings_list) count once. `allowed` restricts to the CPUs this
    process may run on (default: the OS's affinity mask when reading the real /sys, every CPU
    for another root, e.g. a test's fake tree). With no per-core information (VMs, macOS,
    Windows) every physical core counts as a performance core.
    """
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    root = Path(sysfs_root)
    if allowed is None and os.fspath(sysfs_root) == DEFAULT_SYSFS:
        allowed = _allowed_cpus()
    base = root / "devices" / "system" / "cpu"
    cpus: list[int] = []
    try:
        for entry in base.iterdir():
            m = re.fullmatch(r"cpu(\d+)", entry.name)
            if m:
                cpus.append(int(m.group(1)))
    except OSError:
        pass
    if allowed is not None:
        cpus = [c for c in cpus if c in allowed]
    cpus.sort()
    # One logical CPU per physical core: the first of each sibling group.
    first_sibling: dict[int, int] = {}
    for c in cpus:
        try:
            sib = parse_cpu_list(
                (base / f"cpu{c}" / "topology" / "thread_siblings_list").read_text()
            )
        except (OSError, ValueError):
            sib = [c]
        first_sibling[c] = min([x for x in sib if x in cpus] or [c])
    cores = sorted(set(first_sibling.values()))

    split = _intel_hybrid(root, cores) or _by_score(base, cores)
    if split is not None:
        perf, eff, source, scores = split
        return CpuTopology(
            logical=len(cpus),
            physical=len(cores),
            performance=perf,
            efficiency=eff,
            source=source,
            scores=scores,
        )
    if allowed is not None and len(allowed) < logical:
        physical = max(1, min(physical, len(allowed)))
        logical = len(allowed)
    return CpuTopology(logical=logical, physical=physical, source="psutil")


_Split = tuple[list[int], list[int], str, dict[int, int]]


def _intel_hybrid(root: Path, cores: list[int]) -> _Split | None:
    try:
        p_cpus = set(parse_cpu_list((root / "devices" / "cpu_core" / "cpus").read_text()))
        e_cpus = set(parse_cpu_list((root / "devices" / "cpu_atom" / "cpus").read_text()))
    except (OSError, ValueError):
        return None
    perf = [c for c in cores if c in p_cpus]
    eff = [c for c in cores if c in e_cpus]
    if not perf:
        return None
    return perf, eff, "intel-hybrid", {}


def _by_score(base: Path, cores: list[int]) -> _Split | None:
    for name, source in (("cpu_capacity", "cpu_capacity"), ("cpufreq/cpuinfo_max_freq", "cpufreq")):
        scores = {c: _read_int(base / f"cpu{c}" / name) for c in cores}
        known = {c: v for c, v in scores.items() if v}
        if len(known) < 2 or len(known) < len(cores) or len(set(known.values())) < 2:
            continue
        top = max(known.values())
        perf = [c for c in cores if known[c] >= PERFORMANCE_FREQ_RATIO * top]
        eff = [c for c in cores if c not in perf]
        return perf, eff, source, known
    return None


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def auto_threads(sysfs_root: str | os.PathLike[str] = DEFAULT_SYSFS) -> int:
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
        "sme",
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
