"""Where `ondevice tune`'s results live and how `ondevice.load()` applies them.

Tunings are stored per (device fingerprint, model sha256, workload) in tunings.json in the
user's config dir ($ONDEVICE_HOME/config when set, as the store's home). The sha256 is cached by
(real path, size, mtime) next to it, and a file is hashed only when a tuning for a file of its
size exists, so a load never hashes a 1.7 GB file for nothing. This module is what load() imports;
the measuring lives in ondevice.tune.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil

from ondevice import paths
from ondevice._native import binding
from ondevice.errors import UsageError
from ondevice.settings import DEFAULT_KV_TYPE, DEFAULT_N_BATCH, DEFAULT_N_UBATCH, DEFAULT_USE_MMAP
from ondevice.store import sha256_file
from ondevice.system import cpu_features, cpu_model, cpu_topology

log = logging.getLogger(__name__)

FORMAT = 1
WORKLOADS = ("chat", "long-prompt", "short")


# --- where tunings live ---------------------------------------------------------------------------
def config_dir() -> Path:
    """$ONDEVICE_HOME/config if set (as the store's home), else the user config dir."""
    return paths.config_dir()


def tunings_path() -> Path:
    return config_dir() / "tunings.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(path, json.dumps(data, indent=1, sort_keys=True))


def model_sha256(path: Path) -> str:
    """The file's sha256, cached by (real path, size, mtime) in the config dir."""

    real = str(Path(path).resolve())
    st = os.stat(real)
    cache_file = config_dir() / "sha256-cache.json"
    cache = _read_json(cache_file)
    hit = cache.get(real)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in key.items()):
        return str(hit["sha256"])
    digest = sha256_file(Path(real))
    cache[real] = {**key, "sha256": digest}
    try:
        _write_json(cache_file, cache)
    except OSError as exc:  # a read-only config dir only costs the next load a re-hash
        log.warning("could not cache the sha256 of %s: %s", real, exc)
    return digest


@functools.lru_cache(maxsize=1)
def device_fingerprint() -> dict[str, Any]:
    """What makes measured settings transferable: CPU, cores, memory size, the llama.cpp build."""
    topo = cpu_topology()
    return {
        "cpu": cpu_model(),
        "features": cpu_features(),
        "cores": topo.physical,
        "performance_cores": topo.n_performance,
        "logical": topo.logical,
        "ram_gib": round(psutil.virtual_memory().total / 2**30),
        "llama_cpp_python": binding.version(),
        "amx_build": binding.amx_compiled(),
    }


def device_id(dev: dict[str, Any] | None = None) -> str:
    blob = json.dumps(dev or device_fingerprint(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_tuning(entry: dict[str, Any]) -> Path:
    """Store `entry` (ondevice.tune.TuneResult.entry()), replacing the tuning for the same
    (device, model sha256, workload)."""
    path = tunings_path()
    key = (entry["device_id"], entry["model_sha256"], entry["workload"])
    entries = [
        e
        for e in _read_json(path).get("tunings", [])
        if isinstance(e, dict)
        and (e.get("device_id"), e.get("model_sha256"), e.get("workload")) != key
    ]
    entries.append({**entry, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _write_json(path, {"format": FORMAT, "tunings": entries})
    return path


def stored(this_device: bool = True) -> list[dict[str, Any]]:
    """The stored tunings (for this device only by default)."""
    entries = [e for e in _read_json(tunings_path()).get("tunings", []) if isinstance(e, dict)]
    if this_device:
        me = device_id()
        entries = [e for e in entries if e.get("device_id") == me]
    return entries


def lookup(path: Path, workload: str | None = None) -> dict[str, Any] | None:
    """The stored tuning for this file on this device: `workload`'s, or (None) chat's, else the
    newest. Hashes the file only when a tuning for a file of its size exists."""
    if not tunings_path().exists():
        return None
    size = os.path.getsize(path)
    mine = [e for e in stored() if e.get("model_bytes") == size]
    if workload is not None:
        mine = [e for e in mine if e.get("workload") == workload]
    if not mine:
        return None
    sha = model_sha256(path)
    mine = [e for e in mine if e.get("model_sha256") == sha]
    if not mine:
        return None
    chat = [e for e in mine if e.get("workload") == "chat"]
    return (chat or sorted(mine, key=lambda e: str(e.get("created"))))[-1]


# --- what load() uses -------------------------------------------------------------------------------
# What a load uses for what neither the caller nor a tuning set (repack: as ondevice.policy
# allows; flash_attn auto: as ondevice.policy decides for the device).
UNTUNED = {
    "flash_attn": "auto",
    "repack": True,
    "use_mmap": DEFAULT_USE_MMAP,
    "n_batch": DEFAULT_N_BATCH,
    "n_ubatch": DEFAULT_N_UBATCH,
    "threads": "auto",
    "kv_type": DEFAULT_KV_TYPE,
}


def settings_in_force(
    path: Path, tune: bool | str, backend: str, asked: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """The settings load() uses and where each came from ("argument", "tuned", "default"),
    plus a note for Stats when a stored tuning is in force.

    `asked` holds load()'s arguments; None (and "auto" for flash_attn and threads) means the
    caller left the choice to us, which a stored tuning then makes. A tuning measured on the
    CPU is not applied when a GPU backend is asked for."""
    if tune not in (True, False) and tune not in WORKLOADS:
        raise UsageError(
            f"tune must be True, False or a workload, not {tune!r}",
            hint=f"workloads: {', '.join(WORKLOADS)}",
        )
    entry = None
    if tune is not False and backend in ("auto", "cpu"):
        try:
            entry = lookup(path, None if tune is True else str(tune))
        except OSError as exc:
            log.warning("stored tunings unreadable: %s", exc)
    tuned = entry.get("settings", {}) if entry else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in UNTUNED.items():
        given = asked.get(key)
        if given is not None and not (key in ("flash_attn", "threads") and given == "auto"):
            values[key], sources[key] = given, "argument"
        elif key in tuned:
            values[key], sources[key] = tuned[key], "tuned"
        else:
            values[key], sources[key] = (given if given is not None else default), "default"
    if sources.get("n_ubatch") == "tuned" and sources.get("n_batch") != "argument":
        values["n_batch"] = max(values["n_batch"], values["n_ubatch"])
    note = None
    if entry:
        used = [k for k, s in sources.items() if s == "tuned"]
        note = (
            f"settings tuned by `ondevice tune` ({entry.get('workload')} workload, ctx "
            f"{entry.get('n_ctx')}, {str(entry.get('created', ''))[:10]}): "
            + (", ".join(f"{k}={values[k]}" for k in used) or "none applied")
            + "; pass tune=False / --no-tune for the defaults"
        )
    return values, sources, note
