"""The child process that runs llama.cpp's quantizer: `python -m ondevice.quantize._worker`.

`ondevice.quantize.quantize()` starts it so that a native abort inside llama.cpp kills this
process, not the caller (a desktop app, a REPL). It reads one JSON job line from stdin (which
the parent keeps open: its end means the parent died, and so does this process, as it does on
Linux through PR_SET_PDEATHSIG), lets
llama.cpp log to stderr (the parent reads it for progress and error messages), runs the
quantizer (`ondevice._native.quantizer.run`) and prints one JSON line with the outcome on stdout.
Exit status 0 means the output file is complete.
"""

from __future__ import annotations

import json
import os
import sys

from ondevice.quantize.imatrix import read_imatrix

from ondevice import processes
from ondevice._native import quantizer


def run(job: dict) -> int:
    imatrix = read_imatrix(job["imatrix"]) if job.get("imatrix") else None
    rc, seconds = quantizer.run(job, imatrix)
    sys.stdout.write(json.dumps({"rc": rc, "seconds": seconds}) + "\n")
    sys.stdout.flush()
    return 0 if rc == 0 else 1


def _read_line(fd: int) -> bytes:
    """One line from a raw descriptor, byte by byte (nothing buffered past it: the rest of the
    pipe is the parent-death watch)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        b = os.read(fd, 1)
        if not b:
            break
        out += b
    return bytes(out)


def main() -> int:
    line = _read_line(0)
    processes.die_with_parent(watch=0)
    job = json.loads(line)
    try:
        return run(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        sys.stderr.write(f"ondevice-worker: error: {exc}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
