"""The Tk chat example (examples/tk_chat.py), for real: a virtual X server (Xvfb), the app as a
subprocess with the demo model, driven with xdotool's synthetic mouse clicks and typing. We
read the app's own state (it writes JSON after every event when asked) and take a screenshot
mid-reply (xwd of the window, converted to PNG here).

Needs Xvfb, xdotool and xwd (Debian: apt-get install xvfb xdotool x11-apps) and tkinter;
skipped with the reason when one is missing. ONDEVICE_SCREENSHOT_DIR=DIR keeps the screenshot.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON

from ondevice import policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tk_chat.py"
STORY = "Write a long story about a dragon who learns to bake bread."
QUESTION = "What is the capital of France?"
WAIT_S = 120  # generous: the suite may share two cores with other work


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found (Debian: apt-get install xvfb xdotool x11-apps)")
    return path


@pytest.fixture(scope="module")
def display():
    """A private Xvfb server; its display name (":N")."""
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("tkinter is missing from this Python (Debian: apt-get install python3-tk)")
    xvfb = _need("Xvfb")
    _need("xdotool")
    _need("xwd")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    number = b""
    with os.fdopen(read_fd, "rb") as pipe:
        # Xvfb writes its display number once it listens (EOF if it dies first).
        if select.select([pipe], [], [], 60)[0]:
            number = pipe.readline().strip()
    if not number:
        proc.kill()
        err = proc.communicate(timeout=10)[1].decode(errors="replace").strip().splitlines()
        pytest.skip(f"Xvfb could not start: {err[-1] if err else 'no output'}")
    try:
        yield f":{number.decode()}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Driver:
    """The running app: its state file, and xdotool against its display."""

    def __init__(self, display: str, state_file: Path, proc: subprocess.Popen) -> None:
        self.display = display
        self.state_file = state_file
        self.proc = proc
        self.env = {**os.environ, "DISPLAY": display}

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_for(self, what: str, cond, timeout: float = WAIT_S, every: float = 0.02) -> dict:
        """Poll the app's state until cond(state) holds; also return every state seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited ({self.proc.returncode}) waiting for {what}")
            s = self.state()
            if s and cond(s):
                return s
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}; last state: {self.state()}")

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=30)

    def click(self, widget: str) -> None:
        w = self.state()["widgets"][widget]
        assert w["mapped"], f"{widget} is not on screen"
        self.xdotool("mousemove", "--sync", str(w["x"]), str(w["y"]), "click", "1")

    def type_into(self, widget: str, text: str) -> None:
        self.click(widget)  # focus: Tk focuses an entry on click; X focus follows the pointer
        self.xdotool("type", "--delay", "15", text)

    def screenshot(self, path: Path) -> Path:
        xwd = subprocess.run(
            ["xwd", "-name", "ondevice chat", "-silent", "-display", self.display],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        _write_png(path, _xwd_to_rgb(xwd))
        return path


@pytest.fixture
def driver(display, demo_path, tmp_path):
    state = tmp_path / "state.json"
    env = {**os.environ, "DISPLAY": display, "PYTHONPATH": str(ROOT)}
    # libgomp's long-spinning barriers make 2 threads crawl when the machine is oversubscribed
    # (a shared CI box); a short spin before sleeping, as ondevice.load() sets, keeps the pace.
    policy.set_omp_wait(env)
    cmd = [PYTHON, str(EXAMPLE), "--model", str(demo_path), "--no-autoload", "--ctx", "2048"]
    cmd += ["--temperature", "0", "--max-tokens", "400", "--threads", "2"]
    cmd += ["--state-file", str(state)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    d = Driver(display, state, proc)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
        if out.strip():
            print(f"--- the app's output ---\n{out}")


def test_chat_window_streams_stops_and_answers_again(driver, tmp_path):
    d = driver
    s = d.wait_for("the window", lambda s: s["widgets"]["load"]["mapped"])
    assert s["model"] is None and not s["widgets"]["send"]["enabled"]

    # Load with the button; the progress bar's value comes from llama.cpp's load callback.
    d.click("load")
    s = d.wait_for("the model", lambda s: s["model"] is not None)
    assert s["load_progress"] == pytest.approx(1.0) and "MiB" in s["status"]
    assert s["widgets"]["send"]["enabled"] and not s["widgets"]["stop"]["enabled"]

    # Ask for a long story, click Send, and watch it stream.
    d.type_into("input", STORY)
    d.click("send")
    lengths: set[int] = set()

    def streaming(s) -> bool:
        if s["generating"] and s["turns"]:
            lengths.add(len(s["turns"][0]["reply"]))
        return s["generating"] and s["turns"][0]["chunks"] >= 12

    s = d.wait_for("a reply streaming", streaming, every=0.005)
    assert s["turns"][0]["user"] == STORY  # the keystrokes reached the entry
    assert s["widgets"]["stop"]["enabled"] and not s["widgets"]["send"]["enabled"]
    assert "tok/s" in s["status"]
    shot = d.screenshot(tmp_path / "tk_chat_mid_reply.png")
    keep = os.environ.get("ONDEVICE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)

    # Stop it mid-reply.
    d.click("stop")
    s = d.wait_for("the reply to stop", lambda s: not s["generating"])
    first = s["turns"][0]
    assert first["finish_reason"] == "cancelled"
    assert 0 < first["tokens"] < 400 and first["reply"].strip()
    assert len(lengths) >= 3  # the text grew while we watched: it streamed
    assert "[stopped]" in s["transcript"]

    # Ask again: the second answer comes in full.
    d.type_into("input", QUESTION)
    d.click("send")
    s = d.wait_for(
        "the second answer",
        lambda s: len(s["turns"]) == 2 and s["turns"][1]["finish_reason"] is not None,
    )
    second = s["turns"][1]
    assert second["user"] == QUESTION
    assert second["finish_reason"] in ("stop", "length") and second["reply"].strip()
    assert s["transcript"].index(STORY) < s["transcript"].index(QUESTION)
    assert s["transcript"].rstrip().endswith(second["reply"].strip())

    # The screenshot shows a drawn window (many colours), not an empty screen.
    rgb = _png_pixels(shot)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 8

    # Ctrl+Q closes the window and the app exits cleanly.
    d.xdotool("key", "ctrl+q")
    assert d.proc.wait(60) == 0


# --- screenshots: X window dumps (XWD) to PNG, with no imaging library ----------------------------


def _xwd_to_rgb(data: bytes) -> np.ndarray:
    """Decode a ZPixmap XWD dump of a TrueColor window (what xwd gives on Xvfb)."""
    fields = struct.unpack(">25I", data[:100])
    header_size, _, pixmap_format, _, width, height = fields[:6]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    masks = fields[14:17]
    ncolors = fields[19]
    if pixmap_format != 2 or bits_per_pixel != 32:
        raise ValueError(f"unsupported XWD: format {pixmap_format}, {bits_per_pixel} bpp")
    start = header_size + 12 * ncolors
    dtype = "<u4" if byte_order == 0 else ">u4"
    rows = np.frombuffer(data, dtype=np.uint8, count=bytes_per_line * height, offset=start)
    pixels = rows.reshape(height, bytes_per_line)[:, : width * 4].copy().view(dtype)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for i, mask in enumerate(masks):
        shift = (mask & -mask).bit_length() - 1
        out[..., i] = (pixels >> shift) & 0xFF
    return out


def _write_png(path: Path, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _png_pixels(path: Path) -> np.ndarray:
    """Read back a PNG written by _write_png (filter 0 rows, one IDAT)."""
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    return raw[:, 1:].reshape(height, width, 3)
