"""Issue 14's import-time check: `python -X importtime -m ondevice info demo` and `fit demo`, for
one or more checkouts (e.g. an old commit in a git worktree): the sum of the top-level imports'
cumulative times, median of N runs after a warm-up, and how many llama_cpp modules got imported.

    git worktree add /tmp/wt-before 34253d4
    python benchmarks/importtime.py before=/tmp/wt-before after=.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def run(root: Path, args: list[str]) -> tuple[float, int, int]:
    """(ms of top-level imports, llama_cpp modules imported, exit code) of one command."""
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ondevice", *args],
        env=env, capture_output=True, text=True, cwd="/tmp",
    )  # fmt: skip
    total, llama = 0, 0
    for line in p.stderr.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        if len(m.group(3)) == 1:  # a top-level import: its cumulative time
            total += int(m.group(2))
        if m.group(4).startswith("llama_cpp"):
            llama += 1
    return total / 1000, llama, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="+", help="NAME=PATH of a checkout")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    for args in (["info", "demo"], ["fit", "demo"]):
        for spec in a.checkouts:
            name, _, path = spec.partition("=")
            root = Path(path).resolve()
            run(root, args)  # warm the page cache and the .pyc files
            results = [run(root, args) for _ in range(a.runs)]
            ms = [r[0] for r in results]
            print(
                f"{' '.join(args):10s} {name:8s} median {statistics.median(ms):6.0f} ms  "
                f"runs {', '.join(f'{m:.0f}' for m in ms)}  "
                f"llama_cpp modules {results[0][1]}  rc {results[0][2]}"
            )


if __name__ == "__main__":
    main()
