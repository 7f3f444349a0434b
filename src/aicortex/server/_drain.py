"""Graceful shutdown: running answers may finish for a grace period; past it, each one
still running is ended with an error frame in its own format, never cut mid-line.

:class:`Drain` holds the cancel scope of every request in flight. :meth:`Drain.start`
(called when the server is told to stop) gives each of them, and every request that
starts later, a deadline ``grace`` seconds away. The :class:`Draining` middleware runs
each request in its scope and, when the deadline ends it, finishes the response: an
SSE error frame, an NDJSON ``{"error": ...}`` line, or a 503 when nothing was sent yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio

from ._gateway import Receive, Send, is_native, route_path

__all__ = ["SHUTDOWN_MESSAGE", "Drain", "Draining"]

logger = logging.getLogger("aicortex.server")

SHUTDOWN_MESSAGE = "The proxy is shutting down; retry the request."


class Drain:
    """The requests in flight, and the deadline that shutdown gives them."""

    def __init__(self, grace: float | None) -> None:
        # grace: seconds a running answer may take once shutdown starts; None: this app
        # does not drain on signals (it is mounted, or served by someone else).
        self.grace = grace
        self._scopes: set[anyio.CancelScope] = set()
        self._deadline: float | None = None  # on the event loop's clock
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def draining(self) -> bool:
        """Whether shutdown has started."""
        return self._deadline is not None

    @property
    def in_flight(self) -> int:
        """The requests running now."""
        return len(self._scopes)

    @contextlib.contextmanager
    def scope(self) -> Generator[anyio.CancelScope]:
        """A cancel scope for one request, ended at the shutdown deadline."""
        deadline = self._deadline
        cancel = anyio.CancelScope() if deadline is None else anyio.CancelScope(deadline=deadline)
        self._scopes.add(cancel)
        try:
            with cancel:
                yield cancel
        finally:
            self._scopes.discard(cancel)

    def start(self, grace: float | None = None) -> None:
        """Begin draining: every request gets ``grace`` (else :attr:`grace`, else 0) more
        seconds. Safe to call from a signal handler: the deadlines are set on the event
        loop that serves the requests."""
        seconds = grace if grace is not None else (self.grace or 0.0)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._begin(time.monotonic() + seconds)
        else:
            loop.call_soon_threadsafe(self._begin_in, seconds)

    def _begin_in(self, seconds: float) -> None:
        assert self._loop is not None
        self._begin(self._loop.time() + seconds)  # anyio's clock on asyncio

    def _begin(self, deadline: float) -> None:
        if self._deadline is not None and self._deadline <= deadline:
            return
        self._deadline = deadline
        if self._scopes:
            logger.info("Shutting down: %d requests may finish first", len(self._scopes))
        for cancel in self._scopes:
            cancel.deadline = min(cancel.deadline, deadline)

    def watch_signals(self) -> None:
        """On SIGTERM and SIGINT, start draining, then let the handler that was there
        (the server's own, which stops accepting and waits) run as before."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                signal.signal(sig, self._chain(previous))

    def _chain(self, previous: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
        def handler(sig: int, frame: Any) -> Any:
            self.start()
            return previous(sig, frame)

        return handler


def _error_frame(content_type: bytes) -> bytes:
    """The end of a streamed body that shutdown cut: in the stream's own format."""
    if content_type.startswith(b"text/event-stream"):
        error = {
            "error": {
                "message": SHUTDOWN_MESSAGE,
                "type": "api_error",
                "param": None,
                "code": "shutting_down",
            }
        }
        return b"data: " + json.dumps(error).encode() + b"\n\n"
    if content_type.startswith(b"application/x-ndjson"):
        return json.dumps({"error": SHUTDOWN_MESSAGE}).encode() + b"\n"
    return b""


class Draining:
    """Pure ASGI middleware: each request runs in its :class:`Drain` scope; a request the
    shutdown deadline ends gets its response finished properly."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self.drain.grace is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # no asyncio, not main thread
                self.drain.watch_signals()
        if kind != "http":
            await self.app(scope, receive, send)
            return
        head: list[bytes] = []  # the content type, once the response has started
        ended = False

        def tracked(message: dict[str, Any]) -> Awaitable[None]:
            # Hands back send's own awaitable: no coroutine of its own per chunk.
            nonlocal ended
            if message["type"] == "http.response.start":
                types = [v for k, v in message.get("headers", ()) if k.lower() == b"content-type"]
                head.append(types[0] if types else b"")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            return send(message)

        with self.drain.scope() as cancel:
            await self.app(scope, receive, tracked)
        if not cancel.cancelled_caught or ended:
            return
        with anyio.CancelScope(shield=True):
            if head:
                frame = _error_frame(head[0])
                await send({"type": "http.response.body", "body": frame, "more_body": False})
                return
            if is_native(route_path(scope)):
                body = json.dumps({"error": SHUTDOWN_MESSAGE}).encode()
            else:
                error = {
                    "message": SHUTDOWN_MESSAGE,
                    "type": "api_error",
                    "param": None,
                    "code": "shutting_down",
                }
                body = json.dumps({"error": error}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
