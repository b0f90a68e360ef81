"""The local model store: GGUF files that `ondevice pull` made, each with a JSON manifest.

Layout under the store home (`$ONDEVICE_HOME`, else the platform's user data dir):

    models/<name>/<name>.<QUANT>.gguf    the model
    models/<name>/<name>.<QUANT>.json    its manifest: source repo and commit, quant, sha256 and
                                         size of the file, converter version, date
    tmp/<pid>-<random>/                  a pull's work space (removed when the pull ends)

An entry exists exactly when its manifest does. `install` renames the finished GGUF into place
first and the manifest last, so an interrupted pull leaves no entry behind. Names are
`phi-2:Q4_K_M`, or `phi-2` for the default quant (Q4_K_M if present, else the newest pull of that
name); a hub repo id (`microsoft/phi-2`) names the entry pulled from it.

This module reads and writes files only (no network, no huggingface-hub), so `locate.resolve`
can call `lookup` on every command cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ondevice import paths
from ondevice.errors import ModelNotFound, UsageError

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20  # real ones are ~1 KB

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_QUANT = re.compile(r"^[A-Z0-9_]{1,24}$")


def home() -> Path:
    """The store's root (`ondevice.paths.home()`: $ONDEVICE_HOME, else the user data dir)."""
    return paths.home()


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class Entry:
    """One stored model, as its manifest describes it."""

    name: str
    quant: str
    path: Path
    size: int
    sha256: str
    repo: str
    revision: str
    commit: str
    kind: str  # "converted" (from safetensors) or "gguf" (the repo's own GGUF file)
    created: str  # ISO 8601, UTC
    manifest: dict[str, Any]
    manifest_path: Path

    @property
    def ref(self) -> str:
        """The full store name, `name:QUANT`."""
        return f"{self.name}:{self.quant}"

    @property
    def source(self) -> str:
        """`repo@commit` (short commit)."""
        return f"{self.repo}@{self.commit[:8]}" if self.commit else self.repo

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quant": self.quant,
            "ref": self.ref,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "source": {"repo": self.repo, "revision": self.revision, "commit": self.commit},
            "kind": self.kind,
            "created": self.created,
            "converter": self.manifest.get("converter"),
        }


# -- names -----------------------------------------------------------------------------------


def canonical_quant(quant: str) -> str:
    """`q4_k_m` → `Q4_K_M`; raises UsageError for something that can't be a quant name."""
    q = quant.strip().upper()
    if not _QUANT.match(q):
        raise UsageError(f"{quant!r} is not a quant type", hint="e.g. Q4_K_M, Q8_0 or F16")
    return q


def check_name(name: str) -> str:
    """A store name: letters, digits, `.`, `_`, `-`; raises UsageError otherwise."""
    if not _NAME.match(name) or ".." in name or name.lower().endswith(".gguf"):
        raise UsageError(
            f"{name!r} can't be a store name",
            hint="use letters, digits, '.', '_' and '-', like phi-2",
        )
    return name


def name_for_repo(repo: str) -> str:
    """The store name a hub repo gets by default: `microsoft/phi-2` → `phi-2`,
    `someone/phi-2-GGUF` → `phi-2`."""
    base = repo.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[-_.]gguf$", "", base, flags=re.IGNORECASE) or base
    return check_name(base)


def parse_ref(text: str) -> tuple[str, str | None] | None:
    """`phi-2:Q4_K_M` → ("phi-2", "Q4_K_M"); `phi-2` → ("phi-2", None); a repo id keeps its slash.

    None when `text` can't be a store name at all (a stray path, say), so lookups just miss.
    """
    base, sep, quant = text.strip().rpartition(":")
    if not sep:
        base, quant = text.strip(), ""
    if sep and not quant:
        return None
    q = quant.upper() if quant else None
    if q is not None and not _QUANT.match(q):
        return None
    parts = base.split("/")
    if len(parts) > 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
        return None
    return base, q


# -- reading ---------------------------------------------------------------------------------


def entries() -> list[Entry]:
    """Every entry in the store, sorted by name and quant. Unreadable manifests are skipped
    (with a warning), so one bad file never hides the others."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for manifest_path in sorted(root.glob("*/*.json")):
        entry = _read_manifest(manifest_path)
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda e: (e.name.lower(), e.quant))


def _read_manifest(path: Path) -> Entry | None:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too big for a manifest")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        file_name = data["file"]
        # The manifest names a file beside it, never a path elsewhere.
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise ValueError(f"bad file name {file_name!r}")
        source = data.get("source") or {}
        return Entry(
            name=check_name(str(data["name"])),
            quant=canonical_quant(str(data["quant"])),
            path=path.parent / file_name,
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            repo=str(source.get("repo", "")),
            revision=str(source.get("revision", "")),
            commit=str(source.get("commit", "")),
            kind=str(data.get("kind", "")),
            created=str(data.get("created", "")),
            manifest=data,
            manifest_path=path,
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError) as exc:
        # A broken manifest hides its own entry only, never the store (RecursionError: a
        # manifest of 100000 "[" nests deeper than the JSON parser recurses).
        log.warning("ignoring unreadable store manifest %s: %s", path, str(exc)[:200])
        return None


def find(text: str) -> Entry | None:
    """The entry that `text` names (`phi-2`, `phi-2:Q8_0`, `microsoft/phi-2`), or None."""
    parsed = parse_ref(text)
    if parsed is None:
        return None
    base, quant = parsed
    candidates = [e for e in entries() if _matches(e, base)]
    if quant is not None:
        return next((e for e in candidates if e.quant == quant), None)
    return _default_of(candidates)


def _matches(entry: Entry, base: str) -> bool:
    if "/" in base:  # a repo id: hub ids are case-insensitive
        return entry.repo.lower() == base.lower()
    return entry.name == base


def _default_of(candidates: list[Entry]) -> Entry | None:
    """Of one name's entries: the default quant if present, else the newest."""
    if not candidates:
        return None
    for e in candidates:
        if e.quant == DEFAULT_QUANT:
            return e
    return _newest(candidates)


def _newest(candidates: list[Entry]) -> Entry:
    def key(e: Entry) -> tuple[str, float]:
        try:
            mtime = e.manifest_path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return (e.created, mtime)

    return max(candidates, key=key)


def lookup(name: str) -> Path | None:
    """The GGUF file of the store entry `name`, or None if the store has no such entry.

    Called by `locate.resolve` for names that are neither files nor `demo`. An entry whose file
    has gone missing or changed size raises ModelNotFound naming the fix.
    """
    entry = find(name)
    if entry is None:
        return None
    try:
        size = entry.path.stat().st_size
    except OSError:
        size = -1
    if size != entry.size:
        what = "is missing" if size < 0 else f"is {size} bytes, not {entry.size}"
        raise ModelNotFound(
            f"the store's file for {entry.ref} {what}",
            hint=f"ondevice rm {entry.ref} && ondevice pull {entry.repo} --quant {entry.quant}",
        )
    return entry.path


def most_recent() -> Entry | None:
    """The entry pulled last (the chat REPL's model when none is given), or None."""
    all_entries = entries()
    return _newest(all_entries) if all_entries else None


# -- writing ---------------------------------------------------------------------------------


def file_paths(name: str, quant: str) -> tuple[Path, Path]:
    """(GGUF path, manifest path) of the entry `name:quant`."""
    folder = models_dir() / check_name(name)
    stem = f"{name}.{canonical_quant(quant)}"
    return folder / f"{stem}.gguf", folder / f"{stem}.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def install(staged: Path, manifest: dict[str, Any]) -> Entry:
    """Move the finished GGUF `staged` (inside `work_dir()`) into the store with `manifest`.

    The manifest gets `format`, `file`, `name` and `quant` filled in. Order: the old manifest
    goes first (so a crash in between leaves no entry rather than a manifest describing another
    file), then the GGUF is renamed into place, then the new manifest.
    """
    name = check_name(manifest["name"])
    quant = canonical_quant(manifest["quant"])
    gguf_path, manifest_path = file_paths(name, quant)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT, **manifest, "name": name, "quant": quant}
    data["file"] = gguf_path.name

    paths.remove_stale_partials(manifest_path.parent)
    tmp_manifest = paths.partial_path(manifest_path)
    try:
        with open(tmp_manifest, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        # The converter and quantizer may not sync; a power cut must not leave a manifest that
        # describes a file whose blocks never reached the disk.
        paths.fsync_file(staged)
        manifest_path.unlink(missing_ok=True)
        os.replace(staged, gguf_path)
        os.replace(tmp_manifest, manifest_path)
        paths.fsync_dir(manifest_path.parent)
    finally:
        tmp_manifest.unlink(missing_ok=True)
    entry = _read_manifest(manifest_path)
    assert entry is not None, "a manifest we just wrote must read back"
    log.info("stored %s at %s", entry.ref, entry.path)
    return entry


def remove(text: str) -> Entry:
    """Delete the entry `text` names; a bare name must be unambiguous (one quant).

    Raises ModelNotFound if there is no such entry, UsageError if a bare name has several quants.
    """
    parsed = parse_ref(text)
    if parsed is None:
        raise ModelNotFound(f"{text!r} is not a store name", hint="see `ondevice list`")
    base, quant = parsed
    candidates = [e for e in entries() if _matches(e, base)]
    if quant is not None:
        candidates = [e for e in candidates if e.quant == quant]
    if not candidates:
        raise ModelNotFound(f"no model {text!r} in the store", hint="see `ondevice list`")
    if len(candidates) > 1:
        refs = ", ".join(e.ref for e in candidates)
        raise UsageError(f"{text} names {len(candidates)} models ({refs})", hint="say which one")
    entry = candidates[0]
    # Manifest first: the entry disappears at once, even if deleting the file is interrupted.
    entry.manifest_path.unlink(missing_ok=True)
    entry.path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        entry.path.parent.rmdir()  # only if nothing else is left in it
    log.info("removed %s", entry.ref)
    return entry


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A fresh folder under the store's tmp/ (same file system as the models, so `install`
    renames instead of copying); removed on exit, whatever happened."""
    clean_stale_work_dirs()
    path = home() / "tmp" / f"{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_work_dirs() -> None:
    """Remove work folders of pulls whose process is gone (killed before it could clean up)."""
    root = home() / "tmp"
    if not root.is_dir():
        return
    for child in root.iterdir():
        pid_text = child.name.split("-", 1)[0]
        if pid_text.isdigit() and not paths.pid_alive(int(pid_text)):
            log.info("removing a killed pull's work folder %s", child)
            shutil.rmtree(child, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
