"""The idle limit of a stream on asyncio, without a timer per read.

httpx's own transport re-reads its read timeout at every read, so it enforces the
idle limit itself. aiohttp fixes its read timeout when the request starts, when the
longer first-token limit must apply, so a stream on it checks the gaps itself. A
cancel scope around every read would cost more than the rest of a read of one
token. :class:`IdleWatch` instead keeps one loop timer per stream that wakes at
most once per idle period: a read that has waited the whole period is cancelled the
way ``asyncio.timeout`` cancels, and the stream reports the idle limit.
"""

from __future__ import annotations

import asyncio
import sys

__all__ = ["IdleWatch"]


class IdleWatch:
    """Ends a read that waits longer than ``idle`` seconds (asyncio only).

    Around each read: ``start()`` before it, ``stop()`` after it; when the read
    raises ``CancelledError``, ``expired()`` says whether this watch caused it (and
    then takes the cancellation back, so nothing else sees it).
    """

    __slots__ = ("_fired", "_handle", "_idle", "_loop", "_started", "_task")

    def __init__(self, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle
        self._task: asyncio.Task[object] | None = None
        self._started = 0.0
        self._fired = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            self._loop.time() + idle, self._check
        )

    def start(self) -> None:
        self._started = self._loop.time()
        self._task = asyncio.current_task()

    def stop(self) -> None:
        self._task = None

    def expired(self) -> bool:
        if not self._fired:
            return False
        self._fired = False
        task = asyncio.current_task()
        if task is not None and sys.version_info >= (3, 11):
            task.uncancel()
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        task = self._task
        if task is not None and now - self._started >= self._idle:
            self._fired = True
            self._handle = None
            task.cancel()
            return
        due = self._started + self._idle if task is not None else now + self._idle
        self._handle = self._loop.call_at(due, self._check)
