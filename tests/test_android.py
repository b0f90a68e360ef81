"""Android (Termux) as ondevice meets it: where its folders go, and a /proc an app may not read.

A phone is the boundary we cannot have here, so its environment is faked at exactly the two
places ondevice touches it: the environment variables Android and Termux set (platformdirs
decides from them), and psutil's view of /proc (psutil.PROCFS_PATH pointed at a tree with only
what an Android app may read: no /proc/stat, /proc/net, /proc/loadavg or /proc/uptime, and an
ARM /proc/cpuinfo). The model load and generation in that environment are real.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import PYTHON

import ondevice
from ondevice import fit, stats, system

TERMUX_PREFIX = "/data/data/com.termux/files/usr"
# What `cat /proc/cpuinfo` shows for one core of a Snapdragon 8 Gen 3 (Cortex-X4) under Android.
ARM_CPUINFO = """processor\t: {n}
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb \
paca pacg dcpodp flagm2 frint i8mm bf16 bti
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd82
CPU revision\t: 1

"""


def termux_env(home: Path) -> dict[str, str]:
    """The variables Termux's shell has (ANDROID_* from Android itself), and no ONDEVICE_HOME."""
    env = {k: v for k, v in os.environ.items() if k != "ONDEVICE_HOME"}
    env.update(
        HOME=str(home),
        ANDROID_DATA="/data",
        ANDROID_ROOT="/system",
        PREFIX=TERMUX_PREFIX,
        SHELL=f"{TERMUX_PREFIX}/bin/bash",
        TERMUX_VERSION="0.118.1",
    )
    for key in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        env.pop(key, None)
    return env


def test_termux_folders_are_under_its_home(tmp_path):
    home = tmp_path / "data" / "data" / "com.termux" / "files" / "home"
    home.mkdir(parents=True)
    code = (
        "import json; from ondevice import repl, store, tune_store; print(json.dumps("
        "[str(store.home()), str(store.models_dir()), str(tune_store.tunings_path()), "
        "str(repl.history_path())]))"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=termux_env(home), timeout=60
    )
    assert out.returncode == 0, out.stderr
    data_home, models, tunings, history = (Path(p) for p in json.loads(out.stdout))
    assert data_home == home / ".local" / "share" / "ondevice"
    assert models.is_relative_to(data_home) and history.parent == data_home
    assert tunings.is_relative_to(home / ".config" / "ondevice")
    # `ondevice list` in that environment: works and creates nothing outside the home.
    listed = subprocess.run(
        [PYTHON, "-m", "ondevice", "list"],
        capture_output=True,
        text=True,
        env=termux_env(home),
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert not (tmp_path / "None").exists() and not Path("None").exists()


@pytest.fixture
def android_proc(tmp_path, monkeypatch):
    """psutil sees an Android app's /proc: meminfo, cpuinfo and this process only."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text(Path("/proc/meminfo").read_text())
    (proc / "cpuinfo").write_text("".join(ARM_CPUINFO.format(n=i) for i in range(8)))
    (proc / "self").symlink_to(f"/proc/{os.getpid()}")
    (proc / str(os.getpid())).symlink_to(f"/proc/{os.getpid()}")
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(proc))
    return proc


def test_psutil_on_a_restricted_proc_still_gives_what_ondevice_needs(android_proc):
    for denied in ("stat", "net", "loadavg", "uptime"):
        assert not (android_proc / denied).exists()
    mem = psutil.virtual_memory()
    assert mem.total > 0 and 0 < mem.available <= mem.total
    assert fit.available_memory_bytes() == pytest.approx(mem.available, rel=0.2)
    assert stats.rss_bytes() > 0
    assert stats.peak_rss_bytes() >= stats.rss_bytes()
    topo = system.cpu_topology()
    assert topo.logical >= 1 and topo.physical >= 1 and system.auto_threads() >= 1
    with pytest.raises((OSError, psutil.Error)):
        psutil.cpu_times()  # what an app really cannot have; ondevice never asks for it


def test_a_real_load_and_generation_on_a_restricted_proc(android_proc, demo_path):
    with ondevice.load(demo_path, n_ctx=128, threads=2) as m:
        result = m.generate("The capital of France is", max_tokens=3, temperature=0)
    assert result.text.strip()
    assert result.stats.rss_bytes > 0 and result.stats.peak_rss_bytes >= result.stats.rss_bytes
