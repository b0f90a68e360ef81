"""Where ondevice keeps its files, and the one way it writes them: atomically.

Every folder comes from `home()` / `config_dir()` (`$ONDEVICE_HOME` when set, else the
platform's user folders from platformdirs), and every file ondevice writes (converted and
quantized models, the store's manifests, tunings, saved conversations, bench records) goes
through `atomic_write`: a temporary file beside the target (same file system), flushed and
fsync'd, renamed over the target, then the folder fsync'd. A crash, a full disk or Ctrl-C leaves
either the old file or the new one, never half of one; the temporary file is removed on every
error. Temporary names carry the writer's pid (`.NAME.PID-RANDOM.partial`), so the next writer
into that folder removes those of processes that died without cleaning up (SIGKILL, power cut):
`remove_stale_partials`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from ondevice.errors import OndeviceError, UsageError

log = logging.getLogger(__name__)

APP_NAME = "ondevice"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.partial$")


def home() -> Path:
    """ondevice's data folder: $ONDEVICE_HOME if set, else the user data dir
    (~/.local/share/ondevice on Linux, ~/Library/Application Support/ondevice on macOS)."""
    env = os.environ.get("ONDEVICE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs  # a dependency, imported here only because most commands never need it

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """Settings that belong to this machine (tunings, cached file hashes):
    $ONDEVICE_HOME/config if set, else the user config dir (~/.config/ondevice)."""
    env = os.environ.get("ONDEVICE_HOME")
    if env:
        return Path(env).expanduser() / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def partial_path(target: Path) -> Path:
    """A fresh temporary name beside `target`, carrying this process's pid."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def owner_pid(path: Path) -> int | None:
    """The pid in a temporary name made by `partial_path`, or None for any other name."""
    m = _PARTIAL.match(path.name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    import psutil  # a dependency; imported late to keep `import ondevice` light

    return psutil.pid_exists(pid)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the temporary files in `folder` whose writing process is gone; returns them."""
    removed: list[Path] = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return removed
    for child in children:
        pid = owner_pid(child)
        if pid is None or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            child.unlink()
            removed.append(child)
            log.info("removed %s, left by process %d, which is gone", child, pid)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders can't be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def check_target(
    target: Path, *, overwrite: bool = True, error: type[OndeviceError] = UsageError
) -> None:
    """Refuse early what would fail late: a folder as the target, a missing parent folder, an
    existing file without `overwrite`."""
    if target.is_dir():
        raise error(f"{target} is a folder", hint="give a file name")
    if not target.parent.is_dir():
        raise error(f"the folder {target.parent} does not exist", hint="create it first")
    if not overwrite and (target.exists() or target.is_symlink()):
        raise error(f"{target} already exists", hint="pass --force to overwrite it")


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    error: type[OndeviceError] = UsageError,
) -> Iterator[Path]:
    """A temporary file beside `target` that becomes `target` only if the block finishes.

        with atomic_write(out) as tmp:
            tmp.write_bytes(data)          # or hand `tmp` to a writer (llama.cpp's quantizer)

    The temporary file exists (empty, created exclusively, mode 0o666 less the umask) when the
    block starts. On success it is fsync'd and renamed to `target` (with `overwrite=False`
    through a hard link, so a file that appeared meanwhile is never replaced) and the folder is
    fsync'd. On any exception, Ctrl-C included, it is removed and `target` is untouched.
    Refusals (a folder, a missing parent, an existing target without `overwrite`) and I/O
    errors are raised as `error`.
    """
    path = Path(target)
    check_target(path, overwrite=overwrite, error=error)
    remove_stale_partials(path.parent)
    tmp = partial_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise error(f"can't write in {path.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield tmp
        fsync_file(tmp)
        _publish(tmp, path, overwrite, error)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"writing {path} failed: {exc.strerror or exc}") from None
        raise
    fsync_dir(path.parent)


def _publish(tmp: Path, target: Path, overwrite: bool, error: type[OndeviceError]) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if target exists: no check-then-replace race
    except FileExistsError:
        raise error(f"{target} already exists", hint="pass --force to overwrite it") from None
    except OSError:
        # File systems without hard links: the best we can do is check, then rename.
        if target.exists():
            raise error(f"{target} already exists", hint="pass --force to overwrite it") from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def write_text(
    target: str | os.PathLike[str], text: str, *, error: type[OndeviceError] = UsageError
) -> Path:
    """Write a text file (UTF-8) atomically; returns its path."""
    path = Path(target)
    with atomic_write(path, error=error) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
