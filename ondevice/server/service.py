"""The model behind the routes: loading it in the background, the names it answers to, prompts
from messages and text, and generations as async chunk streams on the batch scheduler.

The routes translate their dialect (OpenAI, Ollama) to `GenerationRequest` and back; all
generation goes through `Service.start()`, which builds the prompt and submits it to
`ondevice.batch.Scheduler` on a worker thread (templates and tokenization of a long prompt must
not stall the event loop), and `Generation`, which hands the chunks to the route.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from starlette.requests import Request

from ondevice import chat_formats, chat_messages, chat_tokens, conversation, tools
from ondevice.batch import AsyncJob, Scheduler
from ondevice.chat_formats import ChatFormat
from ondevice.errors import ModelNotFound, OndeviceError, UsageError
from ondevice.results import Chunk, Result
from ondevice.server.config import ServerConfig
from ondevice.server.toolcalls import ToolReply
from ondevice.stats import Stats

log = logging.getLogger(__name__)


class NotReady(OndeviceError):
    """The model is still loading (or failed to load): 503 with Retry-After."""


class Unsupported(UsageError):
    """A request asks for something this server does not do (yet): 400."""


@dataclass
class GenerationRequest:
    """What a route asks for, in ondevice's terms."""

    messages: list[dict[str, Any]] | None = None  # a chat, rendered with the model's template
    prompt: str | list[int] | None = None  # or a raw prompt (text, or token ids)
    max_tokens: int | None = None  # None: until the reply ends or the context is full
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    constraint: dict[str, Any] = field(default_factory=dict)  # response_format= / json_schema=
    notes: list[str] = field(default_factory=list)
    return_tokens: bool = False  # the ids in the `ondevice` field (for debugging clients)
    tools: list[dict[str, Any]] | None = None  # OpenAI's function tools, for the template
    tool_choice: Any = None  # none, auto (the default with tools), required, or a tool's name


def chat_prompt(
    model: Any,
    fmt: ChatFormat,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """The prompt tokens for a chat: the model's template rendered (with the tools), then
    tokenized the way ondevice.conversation does it (the caller's text without special-token
    parsing, so a user can't write role tokens). The one place the server turns messages into
    tokens."""
    prompt = conversation.render_prompt(model, fmt, messages, tools=tools)
    return chat_tokens.tokenize_pieces(
        model, prompt.pieces, protected=chat_tokens.protected_ids(model)
    )


class Service:
    """One model, loaded in the background, and the scheduler that runs every request on it."""

    def __init__(self, config: ServerConfig, load: Callable[[], Any]) -> None:
        self.config = config
        self._load = load
        self.model: Any = None
        self.sched: Scheduler | None = None
        self.fmt: ChatFormat | None = None
        self.error: BaseException | None = None
        self.loaded = threading.Event()
        self.on_failure: Callable[[BaseException], Any] | None = None
        self.on_ready: Callable[[Service], Any] | None = None
        self.started = time.time()

    # --- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model on a worker thread; /health says 503 until it is ready."""
        threading.Thread(target=self._load_now, name="ondevice-serve-load", daemon=True).start()

    def _load_now(self) -> None:
        try:
            model = self._load()
            try:
                self.fmt = chat_formats.for_model(model, self.config.chat_format)
            except OndeviceError as exc:  # completions still work without a chat format
                log.warning("no chat format: %s", exc.one_line())
            self.sched = Scheduler(model, max_queue=self.config.max_queue)
            self.model = model
            log.info("serving %s: %d slots", model.path.name, len(self.sched.slots))
            if self.on_ready is not None:
                self.on_ready(self)
        except BaseException as exc:  # noqa: BLE001 - reported by the CLI as one line
            self.error = exc
            if self.on_failure is not None:
                self.on_failure(exc)
        finally:
            self.loaded.set()

    def close(self) -> None:
        if self.sched is not None:
            self.sched.close()
        if self.model is not None:
            self.model.close()

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        return "ok" if self.sched is not None else "loading"

    def ready(self) -> Scheduler:
        if self.sched is None:
            why = "failed to load" if self.error is not None else "is still loading"
            raise NotReady(f"the model {why}", hint="retry in a moment")
        return self.sched

    # --- names -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.model_name

    def names(self) -> set[str]:
        """What a request's `model` may say: the served name (also with Ollama's `:latest`),
        and the file's name with and without .gguf."""
        out = {self.name, f"{self.name}:latest"}
        if self.model is not None:
            out |= {self.model.path.name, self.model.path.stem}
        return out

    def check_model(self, name: str | None) -> None:
        """ModelNotFound (404) unless `name` is empty or names the served model."""
        if name and name not in self.names():
            raise ModelNotFound(
                f"model {name!r} is not served here", hint=f"this server serves {self.name!r}"
            )

    # --- generation ------------------------------------------------------------------------
    async def start_generation(self, req: GenerationRequest) -> Generation:
        """Build the prompt and submit it (on a worker thread); the Generation to read."""
        sched = self.ready()
        loop = asyncio.get_running_loop()
        return await anyio.to_thread.run_sync(self._submit, sched, req, loop)

    def _submit(
        self, sched: Scheduler, req: GenerationRequest, loop: asyncio.AbstractEventLoop
    ) -> Generation:
        t0 = time.perf_counter()
        stops = list(req.stop)
        constraint, plan = dict(req.constraint), None
        if req.messages is not None:
            if self.fmt is None:
                raise Unsupported(
                    "this model has no chat format, so it can only do completions",
                    hint="start the server with --chat-format, or use /v1/completions",
                )
            checked = chat_messages.validate_messages(req.messages)
            messages = chat_formats.calls_as_text(self.fmt, checked)
            tokens = chat_prompt(sched.model, self.fmt, messages, req.tools)
            stops = list(dict.fromkeys([*self.fmt.stop, *stops]))
            plan = tools.plan(req.tools, req.tool_choice, self.fmt.template)
            if conversation.tool_kwargs(plan) and constraint:
                raise Unsupported(
                    "tools can't be combined with response_format or format",
                    hint='send tool_choice "none", or the request without one of them',
                )
            constraint.update(conversation.tool_kwargs(plan))
        elif isinstance(req.prompt, str):
            # A raw prompt is the client's whole text, control tokens included (as in
            # llama-server and Ollama's raw mode): there is no role boundary to protect. Text
            # that isn't valid Unicode (lone surrogates from a JSON escape) is a UsageError.
            tokens = sched.model.tokenize(req.prompt, add_special=True, parse_special=True)
        else:
            tokens = list(req.prompt or ())
        max_tokens, notes = self._max_tokens(req.max_tokens, len(tokens), sched.eng.n_ctx)
        ajob = sched.submit_async(
            tokens,
            loop=loop,
            max_tokens=max_tokens,
            stop=stops,
            time_limit_s=self.config.time_limit_s,
            **constraint,
            **req.sampling,
        )
        gen = Generation(ajob, len(tokens), max_tokens, [*req.notes, *notes], t0)
        gen.tools = ToolReply(sched.model, plan)
        if req.return_tokens:
            gen.prompt_ids = tokens
        return gen

    def _max_tokens(self, asked: int | None, n_prompt: int, n_ctx: int) -> tuple[int, list[str]]:
        """The request's max_tokens, clamped to the room the context leaves after the prompt
        (and to --max-tokens); a note says when it was lowered."""
        room = max(n_ctx - n_prompt, 1)
        cap = min(room, self.config.max_tokens or room)
        if asked is None or asked < 0:
            return cap, []
        if asked <= cap:
            return asked, []
        why = "the room left in the context" if cap == room else "the server's --max-tokens"
        return cap, [f"max_tokens {asked} was lowered to {cap} ({why})"]


@dataclass
class Generation:
    """A submitted request, read by its route: `chunks()` streams it, `result()` waits for it;
    either cancels the job when the route stops reading (the client went away)."""

    ajob: AsyncJob
    prompt_tokens: int
    max_tokens: int
    notes: list[str]
    t0: float
    strip_leading: bool = False  # chat replies: drop the whitespace a reply starts with
    stats: Stats | None = None
    prompt_ids: list[int] | None = None  # kept when the request asked for return_tokens
    token_ids: list[int] = field(default_factory=list)
    tools: ToolReply = field(default_factory=lambda: ToolReply(None, None))

    @property
    def slot(self) -> int | None:
        return self.ajob.job.slot if self.ajob.job is not None else None

    async def chunks(self) -> AsyncIterator[Chunk]:
        started = not self.strip_leading
        try:
            async for chunk in self.ajob:
                if not started and chunk.text:
                    chunk = Chunk(
                        chunk.text.lstrip(), chunk.tokens, chunk.finish_reason, chunk.stats
                    )
                    started = bool(chunk.text)
                if chunk.stats is not None:
                    self._finish(chunk.stats)
                yield chunk
        finally:
            self.ajob.cancel()  # a no-op when the job is done

    def _finish(self, st: Stats) -> None:
        # The scheduler times from submit(); the template and tokenization came before it.
        job = self.ajob.job
        prep = max(job.t_submit - self.t0, 0.0) if job is not None else 0.0
        st.ttft_s += prep
        st.total_s += prep
        st.notes[:0] = self.notes
        self.stats = st
        if job is not None and job.result is not None:
            self.token_ids = list(job.result.tokens)  # the end-of-turn token included

    async def opened(self, request: Request) -> AsyncIterator[Chunk]:
        """The stream, once its first chunk is there: an error before the first token (a bad
        grammar, no slot within the time limit) is still an HTTP error status, not a broken
        stream. Cancelled if the client disconnects while it waits."""
        it = self.chunks().__aiter__()
        holder: list[Chunk] = []

        async def first() -> None:
            holder.append(await it.__anext__())

        try:
            await _until_disconnect(request, first())
        except BaseException:
            await it.aclose()
            raise
        if not holder:  # the client left before the first token
            await it.aclose()

        async def rest() -> AsyncIterator[Chunk]:
            try:
                if not holder:
                    return
                yield holder[0]
                async for chunk in it:
                    yield chunk
            finally:
                await it.aclose()

        return rest()

    async def result(self, request: Request | None = None) -> Result:
        """The whole reply; cancelled if the client disconnects while it is generated."""
        parts: list[str] = []
        tokens: list[int] = []

        async def collect() -> None:
            async for chunk in self.chunks():
                parts.append(chunk.text)
                tokens.extend(chunk.tokens)

        if request is None:
            await collect()
        else:
            await _until_disconnect(request, collect())
        return Result("".join(parts), tokens, self.stats or Stats(finish_reason="cancelled"))


async def _until_disconnect(request: Request, work: Any) -> None:
    """Run `work`; if the client disconnects first, cancel it (which cancels the job) and
    return: the reply goes nowhere, so there is nothing to raise."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled():
        task.result()


def numbers(gen: Generation) -> dict[str, Any]:
    """ondevice's own numbers for a reply, in the `ondevice` field of every dialect."""
    st = gen.stats or Stats()
    out = {
        "prompt_tokens": st.prompt_tokens,
        "prompt_eval_tokens": st.prompt_eval_tokens,
        "completion_tokens": st.completion_tokens,
        "prompt_tps": round(st.prompt_tps, 2),
        "generation_tps": round(st.generation_tps, 2),
        "ttft_s": round(st.ttft_s, 4),
        "total_s": round(st.total_s, 4),
        "rss_bytes": st.rss_bytes,
        "peak_rss_bytes": st.peak_rss_bytes,
        "max_tokens": gen.max_tokens,
        "drafted_tokens": st.drafted_tokens,  # speculative decoding (serve --speculative)
        "accepted_tokens": st.accepted_tokens,
        "slot": gen.slot,
        "notes": list(st.notes),
        # The line `ondevice chat` prints after a reply, from the same function, so the chat
        # page shows exactly what the terminal does.
        "summary": st.summary(),
    }
    if gen.prompt_ids is not None:
        out.update(prompt_token_ids=gen.prompt_ids, token_ids=gen.token_ids)
    return out
