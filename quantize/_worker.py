"""The child process that runs llama.cpp's quantizer: `python -m ondevice.quantize._worker`.

`ondevice.quantize.quantize()` starts it so that a native abort inside llama.cpp kills this
process, not the caller (a desktop app, a REPL). It reads one JSON job from stdin, lets
llama.cpp log to stderr (the parent reads it for progress and error messages), runs the
quantizer (`ondevice._native.quantizer.run`) and prints one JSON line with the outcome on stdout.
Exit status 0 means the output file is complete.
"""

from __future__ import annotations

import json
import sys

from ondevice.quantize.imatrix import read_imatrix

from ondevice._native import quantizer


def run(job: dict) -> int:
    imatrix = read_imatrix(job["imatrix"]) if job.get("imatrix") else None
    rc, seconds = quantizer.run(job, imatrix)
    sys.stdout.write(json.dumps({"rc": rc, "seconds": seconds}) + "\n")
    sys.stdout.flush()
    return 0 if rc == 0 else 1


def main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        return run(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        sys.stderr.write(f"ondevice-worker: error: {exc}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
