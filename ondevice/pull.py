"""`ondevice pull`: a hub repo → a GGUF in the local model store, in one idempotent step.

    from ondevice.pull import pull
    result = pull("microsoft/phi-2", quant="Q4_K_M")
    result.entry.path   # .../models/phi-2/phi-2.Q4_K_M.gguf

What it does, in order:
1. If the store already has `name:quant` from this repo (and revision), return it: no network.
2. Ask the hub for the revision's commit and its file listing (huggingface-hub's `HfApi`), and
   remember the listing under the store's sources/ so a later offline pull can plan without it.
   Remote names with `..`, absolute or drive paths refuse the whole repo.
3. Plan: a GGUF file whose name carries the quant (`*Q4_K_M*.gguf`) is taken as is; otherwise
   config + tokenizer + safetensors are fetched for conversion.
4. Fetch into the Hugging Face cache. LFS files go through a resumable download of our own
   (huggingface-hub >= 2 drops a killed process's partial file; we keep `blobs/<sha256>.incomplete`
   and continue it with a Range request), then `hf_hub_download` links them into the snapshot.
   Every file used is checked against the listing: size, and sha256 (LFS) or the git blob id;
   a mismatch is deleted and reported.
5. Convert (ondevice.convert) to f16 and quantize (ondevice.quantize), or take the GGUF; check
   the header (gguf_check), then `store.install` renames the file and then the manifest into place.

With HF_HUB_OFFLINE=1 (or no network) a pull whose listing and files are cached still works;
otherwise it says that it needs the network.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondevice import paths, probe, store
from ondevice.errors import (
    ConversionError,
    DownloadError,
    MissingExtra,
    QuantizeError,
    UsageError,
)
from ondevice.gguf_header import read_header

log = logging.getLogger(__name__)

DEFAULT_QUANT = store.DEFAULT_QUANT
DEFAULT_REVISION = "main"
# Quant types the converter writes directly; everything else is converted to f16, then quantized.
CONVERT_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
INTERMEDIATE_OUTTYPE = "f16"

# owner/name as the hub spells repo ids (an owner-less legacy id like "gpt2" also exists)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Step = Callable[[str], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file of the hub's listing: what we may download and how to check it."""

    path: str
    size: int
    sha256: str | None  # LFS files: the content's sha256 (the hub's X-Linked-Etag)
    oid: str | None  # git blob id (for non-LFS files, sha1 of the content)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "oid": self.oid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteFile:
        return cls(str(d["path"]), int(d["size"]), d.get("sha256"), d.get("oid"))


@dataclass(frozen=True)
class Plan:
    kind: str  # "gguf" or "convert"
    files: list[RemoteFile]


@dataclass(frozen=True)
class PullResult:
    entry: store.Entry
    status: str  # "present" (nothing to do) or "pulled"
    downloaded: int = 0  # bytes fetched from the network by this call


def pull(
    repo: str,
    *,
    quant: str = DEFAULT_QUANT,
    revision: str | None = None,
    name: str | None = None,
    force: bool = False,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    on_step: Step | None = None,
) -> PullResult:
    """Pull `repo` (a hub repo id) as `name:quant` into the store; see the module docstring.

    `revision`: branch, tag or commit (default: main). `name`: the store name (default: the
    repo's name without a `-GGUF` suffix). `force`: ask the hub again and rebuild even if the
    store has the entry (cached downloads are still reused). `endpoint`/`cache_dir` override
    HF_ENDPOINT and the Hugging Face cache. `progress`: progress bars on stderr (None: if it is
    a terminal). `on_step`: called with a line per step (default: logged).

    Raises DownloadError (hub, network, verification), ConversionError, QuantizeError,
    MissingExtra (no quantizer for this quant), UsageError (bad names).
    """
    repo = check_repo_id(repo)
    quant = _canonical(quant)
    name = store.check_name(name) if name else store.name_for_repo(repo)
    want_rev = revision or DEFAULT_REVISION
    step = on_step or log.info
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()

    existing = store.find(f"{name}:{quant}")
    if existing is not None:
        if existing.repo.lower() != repo.lower() and not force:
            raise UsageError(
                f"{existing.ref} in the store comes from {existing.repo}, not {repo}",
                hint="pick another name with --name, or --force to replace it",
            )
        same = existing.repo.lower() == repo.lower() and _same_revision(existing, want_rev)
        if same and not force:
            if _intact(existing):
                return PullResult(existing, "present")
            step(f"{existing.ref}'s file is missing or damaged; pulling it again")

    hub = _Hub(repo, endpoint=endpoint, cache_dir=cache_dir, progress=progress, step=step)
    commit, files = hub.listing(want_rev)
    check_remote_names(repo, files)
    plan = make_plan(repo, files, quant)
    quantizer = _quantizer(quant) if plan.kind == "convert" else None

    missing = [f for f in plan.files if not hub.is_cached(commit, f)]
    if missing:
        what = missing[0].path if len(missing) == 1 else f"{len(missing)} files"
        size = store.human_size(sum(f.size for f in missing))
        step(f"downloading {what} ({size}) from {repo}@{commit[:8]}")
    else:
        step(f"{repo}@{commit[:8]}: the files are in the Hugging Face cache")
    local = {f.path: hub.fetch(commit, f) for f in plan.files}

    with store.work_dir() as work:
        staged = work / f"{name}.{quant}.gguf"
        manifest: dict[str, Any] = {
            "name": name,
            "quant": quant,
            "source": {
                "repo": repo,
                "revision": want_rev,
                "commit": commit,
                "files": [f.to_dict() for f in plan.files],
            },
            "kind": "gguf" if plan.kind == "gguf" else "converted",
            "converter": None,
            "quantizer": None,
        }
        if plan.kind == "gguf":
            (remote,) = plan.files
            _link_or_copy(local[remote.path], staged)
            digest = remote.sha256 or store.sha256_file(staged)
        else:
            folder = hub.snapshot_dir(commit)
            manifest.update(_build(folder, work, staged, name, quant, quantizer, progress, step))
            digest = store.sha256_file(staged)
        manifest["file_type"] = _check_gguf(staged, quant)
        manifest["size"] = staged.stat().st_size
        manifest["sha256"] = digest
        manifest["created"] = store.now_iso()
        entry = store.install(staged, manifest)
    step(f"stored {entry.ref} ({store.human_size(entry.size)}) at {entry.path}")
    return PullResult(entry, "pulled", hub.downloaded)


# -- checks and planning ---------------------------------------------------------------------


def check_repo_id(repo: str) -> str:
    text = repo.strip()
    if not _REPO_ID.match(text) or ".." in text:
        hint = (
            "for a local folder use `ondevice convert`"
            if Path(text).expanduser().exists()
            else "give a hub repo id like microsoft/phi-2"
        )
        raise UsageError(f"{repo!r} is not a hub repo id", hint=hint)
    return text


def check_remote_names(repo: str, files: list[RemoteFile]) -> None:
    """Refuse a listing that names a file outside the repo's folder: `..`, absolute, drive or
    backslash paths. One such name means the server is not to be trusted with the rest."""
    for f in files:
        if not _safe_remote_name(f.path):
            raise DownloadError(
                f"{repo} lists an unsafe file name {f.path!r}; refusing to download from it",
                hint="the hub (or whatever answers as HF_ENDPOINT) is not behaving; report it",
            )


def _safe_remote_name(path: str) -> bool:
    if not path or path.startswith(("/", "\\")) or "\\" in path or "\0" in path:
        return False
    if re.match(r"^[A-Za-z]:", path) or any(ord(c) < 32 for c in path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def make_plan(repo: str, files: list[RemoteFile], quant: str) -> Plan:
    """Which files to fetch: the repo's GGUF for `quant` if it hosts one, else a checkpoint."""
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    matching = [f for f in ggufs if _names_quant(f.path, quant)]
    if matching:
        whole = [f for f in matching if not _SPLIT_GGUF.search(f.path)]
        if not whole:
            raise DownloadError(
                f"{repo} has {quant} only as a split GGUF ({matching[0].path}, ...), "
                "which ondevice can't store yet",
                hint="pick another --quant",
            )
        if len(whole) > 1:
            names = ", ".join(f.path for f in whole[:6])
            raise DownloadError(
                f"{repo} has several {quant} GGUF files ({names})",
                hint="ondevice can't tell which one you want; convert the one you need yourself",
            )
        return Plan("gguf", whole)

    top = [f for f in files if "/" not in f.path]
    top_names = {f.path for f in top}
    weights = [f for f in top if f.path.endswith(".safetensors")]
    if "config.json" in top_names and weights:
        patterns = _convert_patterns()
        wanted = [f for f in top if any(fnmatch.fnmatchcase(f.path, p) for p in patterns)]
        return Plan("convert", wanted)
    if ggufs:
        names = ", ".join(f.path for f in ggufs[:6])
        raise DownloadError(
            f"{repo} has no {quant} GGUF file and no safetensors checkpoint to convert",
            hint=f"its GGUF files: {names}; pick one of their quants with --quant",
        )
    if any(f.path.endswith(_PICKLE) for f in top):
        raise ConversionError(
            f"{repo} has only pickle weights; ondevice reads only safetensors, because loading "
            "a pickle can run arbitrary code"
        )
    raise DownloadError(f"{repo} has neither a GGUF file nor a safetensors checkpoint")


def _names_quant(path: str, quant: str) -> bool:
    # Q4_K must not match Q4_K_M, nor F16 match BF16.
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, path.rsplit("/", 1)[-1], re.IGNORECASE) is not None


def _convert_patterns() -> list[str]:
    """The files a conversion reads; the converter's own list when it has one."""
    try:
        from ondevice.convert.hub import ALLOW_PATTERNS  # the converter: only for checkpoints

        return list(ALLOW_PATTERNS)
    except ImportError:
        return ["config.json", "tokenizer*.json", "special_tokens_map.json", "vocab.json",
                "merges.txt", "added_tokens.json", "*.safetensors",
                "model.safetensors.index.json"]  # fmt: skip


def _same_revision(entry: store.Entry, revision: str) -> bool:
    if revision in (entry.revision, entry.commit):
        return True
    return (
        len(revision) >= 7
        and bool(re.fullmatch(r"[0-9a-f]+", revision))
        and (entry.commit.startswith(revision))
    )


def _intact(entry: store.Entry) -> bool:
    try:
        return entry.path.stat().st_size == entry.size
    except OSError:
        return False


def _quantizer(quant: str) -> Callable[..., Any] | None:
    """The quantize function if `quant` needs one; the type is checked before any download."""
    if quant in CONVERT_OUTTYPES:
        return None
    try:
        from ondevice.quantize import get_type, quantize  # only when a quant must be made
    except ImportError:
        raise MissingExtra(
            f"making {quant} needs ondevice's quantizer (ondevice.quantize), which isn't installed",
            hint="--quant F16, BF16 or Q8_0 converts without it",
        ) from None
    qtype = get_type(quant)  # UsageError for an unknown type
    if qtype.needs_imatrix:
        raise UsageError(
            f"{quant} needs an importance matrix, which pull doesn't make",
            hint="pull F16, then `ondevice quantize --imatrix`; or pick e.g. Q4_K_M",
        )
    return quantize


def _canonical(quant: str) -> str:
    """Upper case, llama-quantize's aliases resolved (Q4_K → Q4_K_M, so one model has one
    name), and unknown types refused before any network traffic (UsageError)."""
    q = store.canonical_quant(quant)
    try:
        from ondevice.quantize import get_type  # the quantizer's types: only for a quant
    except ImportError:
        return q
    return get_type(q).name


# -- building the GGUF -----------------------------------------------------------------------


def _build(
    folder: Path,
    work: Path,
    out: Path,
    name: str,
    quant: str,
    quantizer: Callable[..., Any] | None,
    progress: bool,
    step: Step,
) -> dict[str, Any]:
    """Convert (and quantize) the checkpoint in `folder` to `out`; returns manifest fields."""
    from ondevice.convert.base import convert_folder  # gguf-py etc.: only to convert

    outtype = CONVERT_OUTTYPES.get(quant, INTERMEDIATE_OUTTYPE)
    converter = {
        "name": "ondevice.convert",
        "version": _version("ondevice"),
        "gguf": _version("gguf"),
        "outtype": outtype,
    }
    if quantizer is None:
        step(f"converting to {quant}")
        convert_folder(folder, out, outtype=outtype, name=name, progress=progress)
        return {"converter": converter}
    intermediate = work / f"{name}.{outtype.upper()}.gguf"
    step(f"converting to {outtype.upper()}")
    convert_folder(folder, intermediate, outtype=outtype, name=name, progress=progress)
    step(f"quantizing to {quant}")
    try:
        if progress:
            with _TensorBar(f"quantizing to {quant}") as bar:
                quantizer(intermediate, out, type=quant, on_progress=bar.update)
        else:
            quantizer(intermediate, out, type=quant)
    except (QuantizeError, MissingExtra):
        raise
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"quantizing to {quant} failed: {exc}") from exc
    intermediate.unlink(missing_ok=True)
    if not out.is_file():
        raise QuantizeError(f"the quantizer reported success but wrote no {out.name}")
    quant_info = {"name": "llama.cpp", "llama_cpp_python": _version("llama-cpp-python")}
    return {"converter": converter, "quantizer": quant_info}


class _TensorBar:
    """A progress bar over the quantizer's `on_progress(done, total, name)` calls."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def update(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _TensorBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_gguf(path: Path, quant: str) -> str | None:
    """Validate the header (nothing malformed enters the store); return the file type name."""

    header = read_header(path)
    # The hub's bytes are untrusted: load them once in a child process now, so a file llama.cpp
    # dies on is refused before it is stored, and its first `run` is free.
    probe.ensure_safe(path, header)
    ftype = header.metadata.get("general.file_type")
    if not isinstance(ftype, int):
        return None
    try:
        import gguf

        ftype_name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return str(ftype)
    if ftype_name != quant:
        log.warning("%s says its file type is %s, not %s", path.name, ftype_name, quant)
    return ftype_name


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link keeps the store's file when the HF cache is cleaned, without a copy."""
    real = Path(os.path.realpath(src))
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the hub and its cache -------------------------------------------------------------------


class _Hub:
    """Everything that talks to huggingface-hub for one repo (imported only when pulling)."""

    def __init__(
        self,
        repo: str,
        *,
        endpoint: str | None,
        cache_dir: str | os.PathLike[str] | None,
        progress: bool,
        step: Step,
    ) -> None:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as exc:  # a dependency, but say so plainly if it's missing
            raise MissingExtra(
                "pulling needs huggingface-hub", hint="pip install huggingface-hub"
            ) from exc
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo = repo
        self.endpoint = endpoint
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
        self.step = step
        self.tqdm_class = None if progress else _quiet_tqdm()
        self.downloaded = 0
        self.offline_reason: str | None = _OFFLINE_ENV if _offline() else None

    # -- listing ---------------------------------------------------------------------------

    def listing(self, revision: str) -> tuple[str, list[RemoteFile]]:
        """(commit, files) of `revision`, from the hub, or from the last listing we saved when
        offline or the hub can't be reached."""
        if self.offline_reason is None:
            try:
                commit, files = self._listing_online(revision)
            except _Unreachable as exc:
                self.offline_reason = f"the hub can't be reached ({exc.__cause__})"
            else:
                # checked before saving: a hostile listing must not be replayed offline either
                check_remote_names(self.repo, files)
                _save_listing(self.repo, revision, commit, files)
                return commit, files
        cached = _load_listing(self.repo, revision)
        if cached is None:
            raise DownloadError(
                f"{self.repo}@{revision} isn't in the local cache and {self.offline_reason}",
                hint=self._network_hint(),
            )
        commit, files = cached
        self.step(f"offline: using the cached listing of {self.repo}@{commit[:8]}")
        return commit, files

    def _listing_online(self, revision: str) -> tuple[str, list[RemoteFile]]:
        import httpx2
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(
            endpoint=self.endpoint, library_name="ondevice", library_version=_version("ondevice")
        )
        try:
            info = api.repo_info(self.repo, revision=revision)
            commit = str(info.sha)
            tree = api.list_repo_tree(self.repo, revision=commit, recursive=True)
            files = [
                RemoteFile(
                    f.path,
                    int(f.lfs.size if f.lfs is not None else f.size),
                    f.lfs.sha256 if f.lfs is not None else None,
                    f.blob_id,
                )
                for f in tree
                if isinstance(f, RepoFile)
            ]
        except GatedRepoError as exc:
            raise DownloadError(
                f"{self.repo} is gated",
                hint="accept its terms on the hub and log in (hf auth login)",
            ) from exc
        except RepositoryNotFoundError as exc:
            raise DownloadError(f"no hub repo {self.repo} (or it is private)") from exc
        except RevisionNotFoundError as exc:
            raise DownloadError(f"{self.repo} has no revision {revision!r}") from exc
        except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
            raise _Unreachable from exc
        except HfHubHTTPError as exc:
            raise DownloadError(f"the hub refused {self.repo}: {_short(exc)}") from exc
        if not _COMMIT.match(commit):
            raise DownloadError(f"the hub gave {self.repo} a malformed commit id {commit!r}")
        return commit, files

    def _network_hint(self) -> str:
        if self.offline_reason == _OFFLINE_ENV:
            return "pulling it needs the network: unset HF_HUB_OFFLINE"
        return "pulling it needs the network: check the connection (and HF_ENDPOINT)"

    # -- files -----------------------------------------------------------------------------

    def snapshot_dir(self, commit: str) -> Path:
        return self.storage / "snapshots" / commit

    def is_cached(self, commit: str, f: RemoteFile) -> bool:
        return (self.snapshot_dir(commit) / f.path).is_file()

    def fetch(self, commit: str, f: RemoteFile) -> Path:
        """The verified local copy of `f` in the HF cache, downloading it if needed."""
        pointer = self.snapshot_dir(commit) / f.path
        if not pointer.is_file():
            if self.offline_reason is not None:
                raise DownloadError(
                    f"{self.repo}: {f.path} isn't in the local cache and {self.offline_reason}",
                    hint=self._network_hint(),
                )
            if f.sha256 is not None:
                self._download_lfs(commit, f)
            pointer = self._hf_hub_download(commit, f)
        self._verify(pointer, f)
        return pointer

    def _hf_hub_download(self, commit: str, f: RemoteFile) -> Path:
        import httpx2
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        blob = self.storage / "blobs" / f.sha256 if f.sha256 else None
        try:
            local = hf_hub_download(
                self.repo,
                f.path,
                revision=commit,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                library_name="ondevice",
                library_version=_version("ondevice"),
                tqdm_class=self.tqdm_class,
            )
        except HfHubHTTPError as exc:
            raise DownloadError(f"downloading {f.path} failed: {_short(exc)}") from exc
        except httpx2.TransportError as exc:
            raise DownloadError(
                f"downloading {f.path} failed: {exc}", hint="run the same pull again"
            ) from exc
        except OSError as exc:  # huggingface-hub's size check, or the disk
            raise DownloadError(f"downloading {f.path} failed: {_short(exc)}") from exc
        local_path = Path(local)
        if blob is not None and Path(os.path.realpath(local_path)) != blob:
            # the hub's etag differed from the listing's sha256: it was fetched a second time
            log.warning("%s was not linked to the blob we downloaded", f.path)
        if blob is None:
            self.downloaded += f.size
        return local_path

    def _download_lfs(self, commit: str, f: RemoteFile) -> None:
        """Download an LFS file into blobs/<sha256>, resuming a partial file from a killed pull
        and checking size and sha256 before the file gets its final name."""
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        assert f.sha256 is not None
        blob = self.storage / "blobs" / f.sha256
        partial = blob.with_name(f"{f.sha256}.incomplete")
        lock = self.cache_dir / ".locks" / self.storage.name / f"{f.sha256}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if blob.is_file():
                return
            have = partial.stat().st_size if partial.is_file() else 0
            if have > f.size:
                partial.unlink()
                have = 0
            if have:
                self.step(f"resuming {f.path} at {store.human_size(have)}")
            url = hf_hub_url(self.repo, f.path, revision=commit, endpoint=self.endpoint)
            headers = build_hf_headers(
                library_name="ondevice", library_version=_version("ondevice")
            )
            try:
                with open(partial, "ab") as fh:
                    http_get(
                        url,
                        fh,
                        resume_size=have,
                        headers=headers,
                        expected_size=f.size,
                        displayed_filename=f.path,
                        tqdm_class=self.tqdm_class,
                    )
            except HfHubHTTPError as exc:
                raise DownloadError(f"downloading {f.path} failed: {_short(exc)}") from exc
            except httpx2.TransportError as exc:
                done = partial.stat().st_size if partial.is_file() else 0
                raise DownloadError(
                    f"downloading {f.path} was interrupted at {store.human_size(done)} of "
                    f"{store.human_size(f.size)} ({exc})",
                    hint="run the same pull again to resume",
                ) from exc
            except OSError as exc:  # the body ended at the wrong size (or the disk failed)
                partial.unlink(missing_ok=True)
                raise DownloadError(
                    f"downloading {f.path} failed and was deleted: {_short(exc)}"
                ) from exc
            finally:
                if partial.is_file():
                    self.downloaded += max(0, partial.stat().st_size - have)
            size = partial.stat().st_size
            if size != f.size:
                partial.unlink()
                raise DownloadError(
                    f"{f.path}: got {size} bytes, the hub's listing says {f.size}; deleted"
                )
            digest = store.sha256_file(partial)
            if digest != f.sha256:
                partial.unlink()
                raise DownloadError(
                    f"{f.path}: sha256 {digest[:16]}… doesn't match the hub's {f.sha256[:16]}…; "
                    "the download was deleted and nothing was stored",
                    hint="try again later; if it persists, the repo or a proxy serves a bad file",
                )
            os.replace(partial, blob)

    def _verify(self, local: Path, f: RemoteFile) -> None:
        """Size, and sha256 (LFS) or git blob id, against the listing; a mismatch is deleted
        from the cache (pointer and blob) so the next pull fetches it again."""
        size = local.stat().st_size
        problem = None
        if size != f.size:
            problem = f"is {size} bytes, the hub's listing says {f.size}"
        elif f.sha256 is not None:
            digest = store.sha256_file(local)
            if digest != f.sha256:
                problem = f"has sha256 {digest[:16]}…, the hub's listing says {f.sha256[:16]}…"
        elif f.oid and re.fullmatch(r"[0-9a-f]{40}", f.oid):
            oid = _git_blob_sha1(local)
            if oid != f.oid:
                problem = f"has git blob id {oid[:12]}…, the hub's listing says {f.oid[:12]}…"
        if problem is None:
            return
        blob = Path(os.path.realpath(local))
        local.unlink(missing_ok=True)
        if blob != local:
            blob.unlink(missing_ok=True)
        raise DownloadError(
            f"{self.repo}: {f.path} {problem}; deleted it and stored nothing",
            hint="pull again; if it persists, the repo or a proxy serves a bad file",
        )


_OFFLINE_ENV = "HF_HUB_OFFLINE is set"


class _Unreachable(Exception):
    """The hub didn't answer (network down, or HF_HUB_OFFLINE): fall back to the cache."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _git_blob_sha1(path: Path) -> str:
    import hashlib

    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# -- the saved listings (for offline pulls) --------------------------------------------------


def _listing_path(repo: str) -> Path:
    return store.home() / "sources" / ("models--" + repo.replace("/", "--") + ".json")


def _load_listing(repo: str, revision: str) -> tuple[str, list[RemoteFile]] | None:
    path = _listing_path(repo)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        commit = data["refs"].get(revision) or (revision if revision in data["trees"] else None)
        if commit is None:
            return None
        return commit, [RemoteFile.from_dict(d) for d in data["trees"][commit]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable saved listing %s: %s", path, exc)
        return None


def _save_listing(repo: str, revision: str, commit: str, files: list[RemoteFile]) -> None:
    path = _listing_path(repo)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("refs"), dict) or not isinstance(data.get("trees"), dict):
            raise ValueError("bad layout")
    except (OSError, ValueError):
        data = {"repo": repo, "refs": {}, "trees": {}}
    data["refs"][revision] = commit
    data["trees"][commit] = [f.to_dict() for f in files]
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(path, json.dumps(data, indent=1))
