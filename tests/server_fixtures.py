"""A real `ondevice serve` process on a free loopback port, for the server tests: started with
`--port 0`, its URL read from its first line, ready when /health says 200; its log kept."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
from conftest import PYTHON

from ondevice import policy

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m ondevice serve MODEL --port 0 ARGS...`; use as a context manager."""

    def __init__(self, model: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [PYTHON, "-m", "ondevice", "serve", str(model), "--port", "0",
                    "--threads", "2", "--name", "demo", *args]  # fmt: skip
        self.env = dict(env or os.environ)
        policy.set_omp_wait(self.env)  # as ondevice.load() sets it
        self.lines: list[str] = []
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=self.env, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stderr is not None
        t0 = time.monotonic()
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                break
            assert time.monotonic() - t0 < 120, "".join(self.lines)
        if not self.url:
            self.proc.wait(30)
            raise AssertionError(f"the server did not start:\n{''.join(self.lines)}")
        threading.Thread(target=self._drain, daemon=True).start()
        self.wait_ready()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < timeout, f"not ready after {timeout} s:\n{self.log}"
            time.sleep(0.2)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self, **headers: str) -> dict[str, float]:
        """The scheduler's Prometheus numbers (ondevice_*, without labels)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line.startswith("ondevice_") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name.removeprefix("ondevice_")] = float(value)
        return out

    def wait_slots_free(self, timeout: float = 5) -> dict[str, float]:
        """Wait until no slot is busy (a cancelled stream's slot frees within one token);
        the metrics then."""
        t0 = time.monotonic()
        while self.metrics()["busy_slots"] > 0:
            assert time.monotonic() - t0 < timeout, "the slot was not freed"
            time.sleep(0.05)
        return self.metrics()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
