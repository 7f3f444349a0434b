"""Serving one answer: SSE out of an :class:`AsyncStream`, or the whole answer at once,
always watching for a client that leaves.

A client that disconnects cancels the work at once and the upstream connection is
closed, so Ollama stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from .._client import AsyncCortex, whole_answer
from .._events import EventType
from .._exceptions import StreamError
from .._stream import AsyncStream
from ._errors import API_ERROR, error_body, stream_error_text
from ._gateway import Receive, Send
from ._translate import DONE, ChatCall, ChunkWriter, frame

__all__ = ["SSEResponse", "collect", "open_stream", "stream_response", "unless_disconnected"]

logger = logging.getLogger("aicortex.server")

_T = TypeVar("_T")

_TOKEN = EventType.TOKEN
_END = EventType.END


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# A request that is still working after this long starts watching for its client.
# Most answers take less: they pay for a timer instead of a watcher task.
_WATCH_AFTER = 0.05


async def unless_disconnected(
    receive: Receive, work: Callable[[], Awaitable[_T]]
) -> tuple[_T] | None:
    """Run ``work`` unless the client disconnects first; then cancel it and return None.

    Call it only once the request body has been read. A client that leaves is noticed
    within ``_WATCH_AFTER`` seconds plus the time the server takes to report it.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return await _unless_disconnected(receive, work)
    task = asyncio.current_task()
    assert task is not None
    watch = _Watch(loop, task, receive)
    try:
        return (await work(),)
    except asyncio.CancelledError:
        # Ours only if the client left and nobody else cancelled the task as well.
        if not watch.gone or (sys.version_info >= (3, 11) and task.uncancel() > 0):
            raise
        return None
    finally:
        watch.stop()


class _Watch:
    """On asyncio: after ``_WATCH_AFTER``, a task that waits for ``http.disconnect``
    and then cancels ``task``, the way ``asyncio.timeout`` does (no cancel scope,
    and no task at all for work that ends sooner)."""

    __slots__ = ("_receive", "_task", "_timer", "_watcher", "gone")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], receive: Receive
    ) -> None:
        self.gone = False
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = loop.call_later(_WATCH_AFTER, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._watcher = loop.create_task(self._watch())
        self._watcher.add_done_callback(_retrieve)

    async def _watch(self) -> None:
        await _wait_for_disconnect(self._receive)
        self.gone = True
        self._task.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a watcher's outcome as seen, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


async def _unless_disconnected(
    receive: Receive, work: Callable[[], Awaitable[_T]]
) -> tuple[_T] | None:
    result: list[_T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await anyio.sleep(_WATCH_AFTER)  # as on asyncio
            await _wait_for_disconnect(receive)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:  # re-raised below, outside the task group
            failure.append(exc)
        tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (result[0],) if result else None


async def open_stream(cortex: AsyncCortex, call: ChatCall) -> AsyncStream:
    """Start the chat; returns once the first token arrived (failover happens before)."""
    return await cortex.chat(
        call.messages,
        model=call.model,
        stream=True,
        options=call.options,
        format=call.format,
        tools=call.tools,
        think=call.think,
        keep_alive=call.keep_alive,
        affinity=call.affinity,
    )


async def collect(cortex: AsyncCortex, call: ChatCall) -> AsyncStream:
    """The whole answer, as a finished stream. Nothing has reached the client yet, so
    an answer that breaks midway is asked again on the next server."""
    return await whole_answer(
        cortex,
        call.messages,
        model=call.model,
        options=call.options,
        format=call.format,
        tools=call.tools,
        think=call.think,
        keep_alive=call.keep_alive,
        affinity=call.affinity,
    )


async def stream_response(
    stream: AsyncStream,
    headers: Sequence[tuple[bytes, bytes]],
    request_id: str,
    receive: Receive,
    send: Send,
    relay: Callable[[], Awaitable[None]],
) -> None:
    """Start a 200 answer with ``headers`` and ``relay()`` the stream's body into it,
    unless the client leaves first; the upstream stream is closed however this ends."""
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if await unless_disconnected(receive, relay) is None:
            logger.info(
                "[%s] the client went away; closing the upstream stream",
                request_id,
                extra={"request_id": request_id},
            )
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


class SSEResponse:
    """An ASGI response that streams ``chat.completion.chunk`` frames out of a stream.

    One task reads and writes: each write carries every event that had already
    arrived, with consecutive text merged into one frame, so a client slower than the
    model gets fewer, larger chunks, and while a write waits for the client the
    upstream is not read (its server is held back rather than buffered for). A
    failure after the first token ends the stream with an error frame and no
    ``[DONE]``. The upstream stream is closed however this ends.
    """

    def __init__(
        self,
        stream: AsyncStream,
        writer: ChunkWriter,
        *,
        headers: Sequence[tuple[bytes, bytes]],
        include_usage: bool,
        request_id: str,
    ) -> None:
        self._stream = stream
        self._writer = writer
        self._headers = list(headers)
        self._include_usage = include_usage
        self._request_id = request_id

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        relay = self._relay
        await stream_response(
            self._stream, self._headers, self._request_id, receive, send, lambda: relay(send)
        )

    async def _relay(self, send: Send) -> None:
        writer = self._writer
        text = writer.text
        stream = self._stream
        take = stream._take  # pyright: ignore[reportPrivateUsage]
        out: list[bytes] = [writer.role()]
        try:
            async for event in stream:
                events = [event]
                take(events)
                run: list[str] = []  # consecutive plain text, merged into one frame
                for event in events:
                    if event.type is _TOKEN and event.thinking is None and not event.tool_calls:
                        run.append(event.content or "")
                        continue
                    if run:
                        out.append(text("".join(run)))
                        run = []
                    if event.type is _TOKEN:
                        out.append(writer.delta(event.content, event.thinking, event.tool_calls))
                    elif event.type is _END:
                        out.append(writer.finish(event.done_reason))
                        if self._include_usage:
                            out.append(writer.usage(event.stats))
                        out.append(DONE)
                if run:
                    out.append(text("".join(run)))
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                out = []
        except StreamError as exc:
            out.append(frame(error_body(stream_error_text(exc), API_ERROR, None, "upstream_error")))
        except Exception as exc:
            logger.exception(
                "[%s] the stream failed unexpectedly",
                self._request_id,
                extra={"request_id": self._request_id},
            )
            message = f"The proxy failed while streaming ({type(exc).__name__})."
            out.append(frame(error_body(message, API_ERROR, None, "internal_error")))
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})
