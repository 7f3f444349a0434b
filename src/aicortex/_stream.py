"""``AsyncStream``: the typed events of one streamed chat, read as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import httpx
from pydantic_core import from_json

from ._events import EventType, Stats, StreamEvent, ToolCall
from ._exceptions import PARTIAL_TEXT_ADVICE, CortexTimeoutError, StreamError, consumed_error
from ._idle import IdleWatch
from ._metrics import Meter, Outcome
from ._openai import SSETranslator
from ._protocol import BadChunk, decode_line, stats_from_chunk, tool_calls_from_message
from ._routing import FailureKind

if TYPE_CHECKING:
    from trio.lowlevel import TrioToken

__all__ = ["DEFAULT_MAX_LINE", "AsyncStream", "StartFailed", "StreamLease", "final_chunk"]

DEFAULT_MAX_LINE = 8 * 1024 * 1024
"""The longest NDJSON line a stream accepts, in bytes."""

_TOKEN = EventType.TOKEN

logger = logging.getLogger("aicortex")

_MORE: Any = object()  # every line read so far is decoded: read more

# Stream states.
_NEW, _RUNNING, _FINISHING, _FINISHED, _FAILED, _CLOSED = range(6)


class StreamLease(Protocol):
    """What a stream tells about its request: that the answer broke, and that the
    request is over (``completed``: it ended cleanly)."""

    def failed(self, reason: str) -> None: ...

    def release(self, completed: bool = False) -> None: ...


class StartFailed(Exception):
    """The stream broke before its first token: the caller may try another server.

    ``record`` is how the server's state machine counts it: ``model`` when the
    answer broke or reported an error (the model may be at fault), ``failed`` when
    the server sent something that is not Ollama's chat stream.
    """

    def __init__(
        self,
        reason: str,
        *,
        timeout: CortexTimeoutError | None = None,
        deadline: bool = False,
        record: FailureKind = "model",
    ) -> None:
        self.reason = reason
        self.timeout = timeout
        self.deadline = deadline  # the caller's deadline for the first token passed
        self.record: FailureKind = record
        super().__init__(reason)


class AsyncStream:
    """The events of one streamed chat, as an async iterator.

    Yields one ``START`` event, ``TOKEN`` events as chunks arrive, then ``END``.
    If the server fails after the first token it yields an ``ERROR`` event and
    the next step raises :class:`~aicortex.StreamError` with the partial text.

    Use it as an async context manager (or call :meth:`aclose`) so that leaving
    early closes the connection at once::

        async with await cortex.chat("Tell me a story", stream=True) as stream:
            async for event in stream:
                if event.type is EventType.TOKEN:
                    print(event.content, end="")

    ``await stream.text()`` returns the whole text, whether called before,
    during or after iterating. After the end, :attr:`thinking`,
    :attr:`tool_calls`, :attr:`stats` and :attr:`done_reason` hold the rest.
    """

    def __init__(
        self,
        response: httpx.Response,
        *,
        model: str,
        server: str,
        deadline: float | None = None,
        total: float | None = None,
        idle: float | None = None,
        lease: StreamLease | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        sse: SSETranslator | None = None,
    ) -> None:
        # deadline: the caller's total limit, checked at every read; idle: a gap limit
        # the transport does not enforce itself, so this stream does; lease: told how
        # the answer went when it breaks or ends.
        self._response = response
        # Without a content-encoding the raw byte stream is the body: reading it
        # directly skips generator layers per chunk on the hot path.
        raw = response.stream
        self._chunks: AsyncIterator[bytes]
        if isinstance(raw, httpx.AsyncByteStream) and response.headers.get(
            "content-encoding", "identity"
        ) in ("identity", ""):
            self._chunks = raw.__aiter__()
        else:
            self._chunks = response.aiter_bytes()
        self._model = model
        self._server = server
        self._deadline = deadline
        self._total = total
        self._idle = idle
        # The caller's deadline takes a cancel scope per read (for both limits); the
        # idle limit alone takes one loop timer per stream (asyncio: aiohttp pools).
        self._limited = deadline is not None
        self._watch = IdleWatch(idle) if idle is not None and deadline is None else None
        self._loop = current_loop()  # for closing from __del__, which cannot await
        self._lease = lease
        self._sse = sse  # an OpenAI-style server: its SSE lines read as Ollama's chunks
        self._lines: list[bytes] = []
        self._pos = 0
        # The start of a line still being received, in pieces (joined once, when its
        # end arrives: a long line costs time linear in its length).
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._max_line = max_line
        self._overlong = False  # a line past the limit follows the lines in _lines
        self._parts: list[str] = []
        self._thinking: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._index = 0
        self._state = _NEW
        self._end: StreamEvent | None = None
        self._error: StreamError | None = None
        self._stats: Stats | None = None
        self._done_reason: str | None = None
        self._released = False
        self._first: dict[str, Any] | None = None
        self._meter: Meter | None = None  # the request's record, made when released

    # -- public surface ------------------------------------------------------

    @property
    def model(self) -> str:
        """The model that answers."""
        return self._model

    @property
    def server(self) -> str:
        """The base URL of the server that answers."""
        return self._server

    @property
    def thinking(self) -> str:
        """The thinking text received so far."""
        return "".join(self._thinking)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls received so far."""
        return list(self._tool_calls)

    @property
    def stats(self) -> Stats | None:
        """Token counts and timings, once the stream has ended."""
        return self._stats

    @property
    def done_reason(self) -> str | None:
        """Why generation stopped (``stop``, ``length``, ...), once it has."""
        return self._done_reason

    @property
    def partial_text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def closed(self) -> bool:
        """Whether the connection has been released (finished, failed or closed)."""
        return self._state in (_FINISHED, _FAILED, _CLOSED)

    def __aiter__(self) -> AsyncStream:
        if self._state in (_FINISHED, _CLOSED):
            raise consumed_error(self._end is None, "await stream.text()")
        return self

    async def __anext__(self) -> StreamEvent:
        state = self._state
        if state == _RUNNING:
            event = await self._next_token()
            if event is not None:
                if self._state == _FAILED:
                    await self._release()
                return event
            state = self._state
        if state == _NEW:
            self._state = _RUNNING
            return StreamEvent(EventType.START, self._model, self._server)
        if state == _FINISHING:
            self._state = _FINISHED
            await self._release(drain=True)
            assert self._end is not None
            return self._end
        if state == _FAILED:
            assert self._error is not None
            await self._release()
            raise self._error
        raise StopAsyncIteration

    async def text(self) -> str:
        """The whole text. Reads the rest of the stream first if needed.

        Raises :class:`~aicortex.StreamError` if the stream failed, or was closed
        before it finished.
        """
        if self._state == _NEW:
            self._state = _RUNNING  # nobody is left to see the START event
        if self._state == _RUNNING:
            await self._next_token(emit=False)
        if self._state == _FINISHING:
            self._state = _FINISHED
            await self._release(drain=True)
        elif self._state == _FAILED:
            await self._release()
        if self._error is not None:
            raise self._error
        if self._state == _CLOSED and self._end is None:
            raise StreamError(
                "The stream was closed before it finished; its text is incomplete.",
                partial_text=self.partial_text,
                server=self._server,
                model=self._model,
            )
        return "".join(self._parts)

    async def aclose(self) -> None:
        """Stop reading and close the connection now (the server sees the disconnect)."""
        if self._state in (_NEW, _RUNNING, _FINISHING):
            self._state = _CLOSED
        await self._release()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._released:
            return
        # Left without aclose() or `async with`: say so, like an unclosed file, and
        # close the connection now so the server stops generating for nobody.
        _warn(
            f"unclosed {self!r}: close it with aclose() or use 'async with'",
            ResourceWarning,
            source=self,
            stacklevel=2,
        )
        self._state = _CLOSED
        with contextlib.suppress(RuntimeError):  # the event loop is gone, and the socket
            run_soon(self._loop, self._release)

    def __repr__(self) -> str:
        states = ["new", "running", "finishing", "finished", "failed", "closed"]
        return f"<AsyncStream model={self._model!r} server={self._server!r} {states[self._state]}>"

    # -- reading -------------------------------------------------------------

    async def _prime(self) -> None:
        """Read until the first chunk has arrived (used before handing out the stream).

        Raises :class:`StartFailed` when the server fails before that, so the
        caller can move on to another server without anything being lost.
        """
        while True:
            while self._pos < len(self._lines) and not self._lines[self._pos].strip():
                self._pos += 1
            if self._pos < len(self._lines):
                break
            try:
                more = await self._read()
            except _ReadFailed as exc:
                raise StartFailed(
                    f"{exc.reason} before the first token",
                    timeout=exc.timeout,
                    deadline=exc.deadline,
                ) from None
            if not more:
                raise StartFailed("closed the connection before the first token")
        line = self._lines[self._pos]
        try:
            obj = decode_line(line)
        except BadChunk as exc:
            raise StartFailed(str(exc), record="failed") from None
        error = obj.get("error")
        if error:
            raise StartFailed(f"failed before the first token: {error}")
        self._first = obj  # the line at _pos, decoded once

    async def _read(self) -> bool:
        """Read the next network chunk into ``_lines``; False at the end of the body."""
        if self._overlong:
            raise _ReadFailed(self._line_too_long())
        try:
            if self._watch is not None:
                chunk = await self._read_watched(self._watch)
            elif not self._limited:
                chunk = await self._chunks.__anext__()
            else:
                chunk = await self._read_limited()
        except StopAsyncIteration:
            last = b"".join(self._tail)
            self._tail, self._tail_size = [], 0
            if last.strip():
                self._lines, self._pos = [last] if self._sse is None else self._sse.lines([last]), 0
                return True
            return False
        except _TotalExpired:
            total = self._total if self._total is not None else 0.0
            timeout = CortexTimeoutError("total", total, server=self._server)
            raise _ReadFailed(str(timeout), timeout, deadline=True) from None
        except (httpx.ReadTimeout, _IdleExpired):
            idle = self._idle
            if idle is None:  # the transport's own read limit is the idle limit
                read = self._response.request.extensions.get("timeout", {}).get("read")
                idle = read if isinstance(read, (int, float)) else 0.0
            timeout = CortexTimeoutError("idle", idle, server=self._server)
            raise _ReadFailed(f"no data for {idle:g}s", timeout) from None
        except httpx.RemoteProtocolError:
            raise _ReadFailed("the connection was cut mid-response") from None
        except httpx.HTTPError as exc:
            raise _ReadFailed(f"the connection failed ({type(exc).__name__}: {exc})") from None
        end = chunk.rfind(b"\n")
        if end < 0:  # still inside one line
            self._tail.append(chunk)
            self._tail_size += len(chunk)
            if self._tail_size > self._max_line:
                raise _ReadFailed(self._line_too_long())
            self._lines, self._pos = [], 0
            return True
        joined = bool(self._tail)
        if joined:
            lines = (b"".join(self._tail) + chunk[:end]).split(b"\n")
        else:
            lines = chunk[:end].split(b"\n")
        limit = self._max_line
        if joined or end > limit:  # only then can a line be longer than the limit
            for i, line in enumerate(lines):
                if len(line) > limit:  # the lines before it still count; then fail
                    del lines[i:]
                    self._overlong = True
                    break
        rest = chunk[end + 1 :]
        self._tail, self._tail_size = ([rest], len(rest)) if rest else ([], 0)
        self._lines = lines if self._sse is None else self._sse.lines(lines)
        self._pos = 0
        return True

    def _line_too_long(self) -> str:
        return (
            f"the server sent a line longer than {self._max_line:,} bytes "
            "(AsyncCortex(max_line_size=...) sets the limit)"
        )

    async def _read_watched(self, watch: IdleWatch) -> bytes:
        """The next chunk, or :class:`_IdleExpired` once the read waited ``idle`` s."""
        watch.start()
        try:
            return await self._chunks.__anext__()
        except anyio.get_cancelled_exc_class():
            if watch.expired():
                raise _IdleExpired from None
            raise
        finally:
            watch.stop()

    async def _read_limited(self) -> bytes:
        """The next chunk within the caller's deadline and the idle limit, whichever
        comes first; raises :class:`_TotalExpired` or :class:`_IdleExpired`."""
        deadline = math.inf if self._deadline is None else self._deadline
        idle_ends = math.inf
        if self._idle is not None:
            idle_ends = anyio.current_time() + self._idle
        with anyio.CancelScope(deadline=min(deadline, idle_ends)) as scope:
            return await self._chunks.__anext__()
        if scope.cancelled_caught and deadline <= idle_ends:
            raise _TotalExpired
        raise _IdleExpired

    def _take(self, events: list[StreamEvent]) -> None:
        """Append to ``events`` the TOKEN events whose lines have already arrived, without
        waiting for the network (the blocking ``Stream`` hands them over as one batch).
        Stops at the end of the answer, or after a failure's ERROR event; the next
        ``__anext__`` goes on from there."""
        while self._state == _RUNNING and self._pos < len(self._lines):
            event = self._decode_buffered()
            if event is None or event is _MORE:
                return
            events.append(event)

    async def _next_token(self, emit: bool = True) -> StreamEvent | None:
        """The next TOKEN event; None when the state changed (end or failure).

        With ``emit`` False, no events: read on to the end, keeping only the text,
        thinking, tool calls and stats (returns None, or the ERROR event)."""
        while True:
            event = self._decode_buffered(emit)
            if event is not _MORE:
                return event
            try:
                more = await self._read()
            except _ReadFailed as exc:
                return self._fail(exc.reason, exc.timeout)
            if not more:
                return self._fail("the response ended without a final done chunk")

    def _decode_buffered(self, emit: bool = True) -> StreamEvent | None:
        """Decode the lines already read: the next TOKEN event (with ``emit``), None
        when the answer ended, the ERROR event when it failed, or ``_MORE`` when every
        line read so far is used up."""
        lines = self._lines
        pos = self._pos
        while pos < len(lines):
            line = lines[pos]
            pos += 1
            if not line or line.isspace():
                continue
            self._pos = pos
            try:
                obj: dict[str, Any]
                if self._first is not None:
                    obj, self._first = self._first, None
                else:
                    obj = from_json(line)
                message = obj.get("message")
                if message is not None:
                    content = message.get("content") or ""
                    thinking = message.get("thinking")
                    calls = tool_calls_from_message(message) if message.get("tool_calls") else ()
                else:
                    # /api/generate-shaped chunks carry the text in "response".
                    content = obj.get("response") or ""
                    thinking = obj.get("thinking")
                    calls = ()
                if obj.get("error"):
                    return self._fail(f"the server reported an error: {obj['error']}")
                done = obj.get("done") is True
            except (ValueError, AttributeError, TypeError):
                try:
                    decode_line(line)
                except BadChunk as exc:
                    return self._fail(str(exc))
                return self._fail("the server sent a chunk that is not a chat response")
            if done:
                self._finish(obj)
            if content or thinking or calls:
                if content:
                    self._parts.append(content)
                if thinking:
                    self._thinking.append(thinking)
                if calls:
                    self._tool_calls.extend(calls)
                index = self._index
                self._index = index + 1
                if not emit:
                    if done:
                        return None
                    continue
                return StreamEvent(
                    _TOKEN,
                    self._model,
                    self._server,
                    content,
                    index,
                    False,
                    thinking or None,
                    calls,
                    None,
                    None,
                    None,
                    obj,
                )
            if done:
                return None
        self._pos = pos
        return _MORE

    def _finish(self, obj: dict[str, Any]) -> None:
        stats = stats_from_chunk(obj)
        reason = obj.get("done_reason")
        self._stats = stats
        self._done_reason = reason if isinstance(reason, str) else None
        self._end = StreamEvent(
            EventType.END,
            self._model,
            self._server,
            done=True,
            done_reason=self._done_reason,
            stats=stats,
            raw=obj,
        )
        self._state = _FINISHING

    def _fail(self, reason: str, timeout: CortexTimeoutError | None = None) -> StreamEvent:
        partial = "".join(self._parts)
        message = (
            f"The stream from {self._server} broke after {self._index} tokens: {reason}. "
            + PARTIAL_TEXT_ADVICE
        )
        error = StreamError(
            message,
            partial_text=partial,
            server=self._server,
            model=self._model,
            reason=f"broke after {self._index} tokens: {reason}",
        )
        if timeout is not None:
            error.__cause__ = timeout
        self._error = error
        self._state = _FAILED
        # The caller's own deadline says nothing about the server's health.
        caller_limit = timeout is not None and timeout.phase == "total"
        if self._lease is not None and not caller_limit:
            self._lease.failed(reason)
        return StreamEvent(
            EventType.ERROR,
            self._model,
            self._server,
            done=True,
            error=message,
        )

    async def _release(self, *, drain: bool = False) -> None:
        """Give the connection back: after a clean end, read the (empty) rest of the
        body so the connection can be reused; otherwise close it. Runs once."""
        if self._released:
            return
        self._released = True
        if self._watch is not None:
            self._watch.close()
        try:
            with anyio.CancelScope(shield=True):
                if drain:
                    with anyio.move_on_after(1.0):
                        try:
                            async for _ in self._chunks:
                                pass
                        except httpx.HTTPError:
                            pass
                await self._response.aclose()
        finally:
            if self._lease is not None:
                self._lease.release(completed=drain)
            if self._meter is not None:
                self._meter.ended(
                    self._server, self._outcome(drain), self._stats, time.perf_counter()
                )
                self._meter = None

    def _outcome(self, completed: bool) -> Outcome:
        """How the request ended, for its record: read to its end, broken, or left."""
        if completed:
            return "ok"
        error = self._error
        if error is None:
            return "client_gone"
        return "timeout" if isinstance(error.__cause__, CortexTimeoutError) else "error"


def final_chunk(stream: AsyncStream) -> dict[str, Any] | None:
    """The last chunk of a finished stream, decoded (its statistics and ``done_reason``)."""
    end = stream._end  # pyright: ignore[reportPrivateUsage]
    return None if end is None else end.raw


def current_loop() -> asyncio.AbstractEventLoop | TrioToken:
    """The running event loop: asyncio's loop, or trio's token for it."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio
        import trio

        return trio.lowlevel.current_trio_token()


def run_soon(
    loop: asyncio.AbstractEventLoop | TrioToken, func: Callable[[], Awaitable[None]]
) -> None:
    """Run ``func()`` as a task of ``loop``, soon, from any thread or from ``__del__``."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        loop.call_soon_threadsafe(_start_task, loop, func)
    else:
        import trio

        loop.run_sync_soon(trio.lowlevel.spawn_system_task, _quietly, func)


def _start_task(loop: asyncio.AbstractEventLoop, func: Callable[[], Awaitable[None]]) -> None:
    task = loop.create_task(_quietly(func))
    _closing.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


async def _quietly(func: Callable[[], Awaitable[None]]) -> None:
    try:
        await func()
    except Exception:  # a connection that fails while closing is closed all the same
        logger.debug("Closing an abandoned stream failed", exc_info=True)


class _TotalExpired(Exception):
    pass


class _IdleExpired(Exception):
    pass


class _ReadFailed(Exception):
    def __init__(
        self, reason: str, timeout: CortexTimeoutError | None = None, *, deadline: bool = False
    ) -> None:
        self.reason = reason
        self.timeout = timeout
        self.deadline = deadline
        super().__init__(reason)
