"""`python -m ondevice` and the `ondevice` console script: the CLI, started so that Ctrl-C,
SIGTERM or SIGHUP while it is still importing end it quietly (exit 130 / 128+N), not with a
traceback from the middle of an import."""

from __future__ import annotations

import signal
import sys


def _quit_early(signum: int, _frame: object) -> None:
    sys.stderr.write("interrupted\n")
    raise SystemExit(128 + signum)


def run() -> None:
    handled = [s for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
    for name in handled:
        signal.signal(getattr(signal, name), _quit_early)
    from ondevice.cli import main  # click and the command table: the slow part of starting

    # From here the CLI handles them: Ctrl-C stops a reply (KeyboardInterrupt), and
    # SIGTERM/SIGHUP raise Terminated inside a command (ondevice.processes).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in handled[1:]:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    main(prog_name="ondevice")


if __name__ == "__main__":
    run()
