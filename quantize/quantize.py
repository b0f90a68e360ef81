"""Quantize a GGUF model with llama.cpp's own quantizer, safely, from any Python process.

`quantize(src, dst, "Q4_K_M")` validates the input (ondevice.gguf_header), refuses to overwrite
the input, checks free disk space against an estimate of the output size, then runs
`llama_model_quantize` in a child process (ondevice.quantize._worker) that writes to a temp file
beside `dst`. Only a complete file is renamed to `dst`; on an error, a crash of the child
(llama.cpp aborts on some inputs), a cancel or Ctrl-C, the child is killed and the temp file
removed. llama.cpp's log is read from the child's stderr: it drives the progress callback and
supplies the message of the `QuantizeError` when the quantizer fails.

The quantizer reads and writes files only; it never loads the model for inference, so weight
repacking (and its AMX crash on some Xeons) does not come into it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ondevice import locate, paths, processes
from ondevice.errors import QuantizeError
from ondevice.gguf_header import GGUFHeader, read_header
from ondevice.probe import ensure_safe

from .imatrix import read_imatrix
from .types import QuantType, get_type

log = logging.getLogger(__name__)
_native_log = logging.getLogger("ondevice.llama_cpp.quantize")

# Tensor types that are not quantized yet (anything else needs allow_requantize).
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# "[  12/ 272] blk.1.attn_q.weight ..." — one line per tensor in llama.cpp's quantizer log.
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# Disk check headroom: what a legacy fallback type costs over a k-quant, and a fixed slack.
_FALLBACK_BPW = 2.0
_EXTRA_BYTES = 16 * 1024 * 1024

ProgressFn = Callable[[int, int, str], object]


@dataclass
class QuantizeResult:
    """What `quantize()` made: the file, its type and size, bits per weight, time taken."""

    path: Path
    type: str
    file_bytes: int
    tensor_bytes: int
    n_params: int
    seconds: float

    @property
    def bpw(self) -> float:
        """Bits per weight of the tensor data (llama.cpp's "BPW")."""
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["bpw"] = round(self.bpw, 4)
        return d


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    type: str | QuantType = "Q4_K_M",  # noqa: A002 - the word users know (--type)
    *,
    allow_requantize: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> QuantizeResult:
    """Quantize the GGUF model `src` to `dst` as `type` (e.g. "Q4_K_M", "Q8_0", "IQ4_XS").

    allow_requantize  start from an already quantized file (quality suffers; llama.cpp refuses
                      by default).
    imatrix           an importance matrix file (llama-imatrix output, GGUF or legacy .dat);
                      required by the IQ1/IQ2/IQ3_XXS types and Q2_K_S.
    threads           quantizer threads (None: all cores).
    on_progress       called as on_progress(done, total, tensor_name) after each tensor.
    cancel            set it (from any thread) to stop: the child is killed, nothing is kept.

    Raises QuantizeError (bad inputs, no space, the engine's own failure message),
    InvalidModelFile (src is not a valid GGUF), UsageError (unknown type).
    """
    qtype = get_type(type)
    src_path = locate.resolve(src)
    dst_path = Path(dst).expanduser().absolute()
    _check_paths(src_path, dst_path)
    header = read_header(src_path)
    _check_requantize(header, qtype, allow_requantize)
    imatrix_path = _check_imatrix(qtype, imatrix)
    _check_space(header, qtype, dst_path)

    log.info("quantizing %s -> %s as %s", src_path, dst_path, qtype.name)
    t0 = time.perf_counter()
    with paths.atomic_write(dst_path, error=QuantizeError) as tmp:
        job = {
            "src": str(src_path),
            "dst": str(tmp),
            "ftype": qtype.ftype,
            "threads": int(threads or 0),
            "allow_requantize": allow_requantize,
            "imatrix": str(imatrix_path) if imatrix_path else None,
        }
        _run_child(job, qtype, on_progress, cancel)
        out = read_header(tmp)  # the engine said it's done; make sure the file says so too
        # Its metadata is the source file's: load it once in a child process before it gets
        # its name (a first `run` of it is then free).
        ensure_safe(tmp, out, shown=dst_path, error=QuantizeError)
    seconds = time.perf_counter() - t0
    return QuantizeResult(
        path=dst_path,
        type=qtype.name,
        file_bytes=dst_path.stat().st_size,
        tensor_bytes=out.tensor_bytes,
        n_params=out.n_params,
        seconds=seconds,
    )


def estimate_bytes(header: GGUFHeader, qtype: QuantType) -> int:
    """A generous estimate of the output size, for the free-space check.

    1-d tensors stay F32; the others take the type's typical bits per weight, or about two bits
    more where a 256-wide block type can't be used (rows not a multiple of 256 fall back to a
    legacy type: Q4_K -> Q5_0, Q6_K -> Q8_0, ...); plus the metadata and a 10% margin.
    """
    bpw = qtype.bpw if qtype.bpw is not None else 8.5
    superblock = "_K" in qtype.name or (
        qtype.name.startswith(("IQ", "TQ")) and qtype.name != "IQ4_NL"
    )
    total = header.data_offset
    for t in header.tensors:
        if len([d for d in t.shape if d > 1]) <= 1:
            total += t.n_elements * 4
        elif superblock and t.shape[0] % 256:
            total += int(t.n_elements * min(8.5, bpw + _FALLBACK_BPW) / 8)
        else:
            total += int(t.n_elements * bpw / 8)
    return int(total * 1.1) + _EXTRA_BYTES


# --- checks before starting -------------------------------------------------------------------
def _check_paths(src: Path, dst: Path) -> None:
    if dst.is_dir():
        raise QuantizeError(f"{dst} is a directory", hint="give the output file's name")
    if not dst.parent.is_dir():
        raise QuantizeError(
            f"the output directory {dst.parent} does not exist", hint="create it first"
        )
    if dst.exists() and os.path.samefile(src, dst):
        raise QuantizeError(
            f"the output {dst} is the input file",
            hint="write the quantized model to a new file",
        )


def _check_requantize(header: GGUFHeader, qtype: QuantType, allow: bool) -> None:
    if allow:
        return
    quantized = sorted(
        {
            t.type_name
            for t in header.tensors
            if len(t.shape) >= 2 and t.type_name not in _FLOAT_TYPES
        }
    )
    if quantized:
        raise QuantizeError(
            f"{header.path} is already quantized ({', '.join(quantized)})",
            hint="start from an F16/BF16/F32 file, or pass --allow-requantize "
            "(requantizing loses more quality)",
        )


def _check_imatrix(qtype: QuantType, imatrix: str | os.PathLike[str] | None) -> Path | None:
    if imatrix is None:
        if qtype.needs_imatrix:
            raise QuantizeError(
                f"{qtype.name} needs an importance matrix",
                hint="pass --imatrix FILE (made by llama.cpp's llama-imatrix), "
                "or pick a type that doesn't need one, such as IQ4_XS or Q2_K",
            )
        return None

    path = Path(imatrix).expanduser().absolute()
    read_imatrix(path)  # a bad file fails here, with a clear message, not in the child
    return path


def _check_space(header: GGUFHeader, qtype: QuantType, dst: Path) -> None:
    need = estimate_bytes(header, qtype)
    free = shutil.disk_usage(dst.parent).free
    if free < need:
        raise QuantizeError(
            f"not enough free disk space in {dst.parent}: {qtype.name} output needs about "
            f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free",
            hint="free some space or write the output elsewhere",
        )


# --- the child process ---------------------------------------------------------------------
def _run_child(
    job: dict,
    qtype: QuantType,
    on_progress: ProgressFn | None,
    cancel: threading.Event | None,
) -> None:
    kwargs: dict = {}
    if os.name == "posix":
        # Its own session: a terminal's Ctrl-C reaches only us, and we decide to kill it.
        kwargs["start_new_session"] = True
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    env = processes.child_env()  # it dies with us and imports the same ondevice
    proc = subprocess.Popen(
        [sys.executable, "-m", "ondevice.quantize._worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kwargs,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_read_log, args=(proc.stderr, lines, on_progress), daemon=True)
    reader.start()
    try:
        assert proc.stdin is not None
        # One line; stdin stays open while the child runs: its end tells the child we died.
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        proc.stdin.flush()
        while proc.poll() is None:
            if cancel is not None and cancel.wait(0.1):
                raise QuantizeError("quantization cancelled")
            elif cancel is None:
                time.sleep(0.1)
    except BaseException:
        processes.kill(proc, "quantizer child")
        reader.join(timeout=5)
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    reader.join(timeout=5)
    rc = proc.returncode
    if rc == 0:
        return
    detail = _engine_message(lines)
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        raise QuantizeError(
            f"llama.cpp's quantizer crashed ({name}) making {qtype.name}: {detail}",
            hint="the input file may be damaged or unsupported; run with -vv for the full log",
        )
    log.debug("quantizer child said: %s", out.strip())
    raise QuantizeError(f"llama.cpp could not quantize to {qtype.name}: {detail}")


def _read_log(stream, lines: list[str], on_progress: ProgressFn | None) -> None:
    """Collect the child's log lines (kept for the error message) and report progress."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line.strip():
            continue
        lines.append(line)
        del lines[:-400]
        _native_log.debug("%s", line)
        m = _PROGRESS.match(line)
        if m and on_progress is not None:
            try:
                on_progress(int(m.group(1)), int(m.group(2)), m.group(3))
            except Exception:  # noqa: BLE001 - a UI callback must not break quantization
                log.exception("on_progress callback failed")
    stream.close()


def _engine_message(lines: list[str]) -> str:
    """The most telling line of the child's log."""
    for line in reversed(lines):
        for marker in ("failed to quantize:", "ondevice-worker: error:"):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    for line in reversed(lines):
        low = line.lower()
        if "error" in low or "abort" in low or "failed" in low:
            return line.strip()
    return lines[-1].strip() if lines else "no output from the quantizer"
