"""Putting a model on every server of a fleet: ``POST /api/pull`` to each, concurrently.

The pure part decodes one line of a pull's NDJSON progress (:func:`decode_pull_line`)
and adds up one server's layers (:class:`PullTracker`). The I/O part,
:class:`PullStream`, runs one request per server and merges their progress into one
async iterator of :class:`PullProgress`, in arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import anyio
import httpx

from ._config import Timeout
from ._exceptions import ValidationError
from ._protocol import BadChunk, decode_line, error_text
from ._router import describe_error, read_capped
from ._stream import current_loop, run_soon

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "PULL_PATH",
    "ClientFor",
    "KindOf",
    "PullProgress",
    "PullStream",
    "PullTracker",
    "check_model",
    "decode_pull_line",
]

PULL_PATH = "/api/pull"
DEFAULT_PULL_IDLE = 300.0
"""The longest silence of a pull's stream when the client's ``Timeout.idle`` is None."""

ClientFor = Callable[[str], httpx.AsyncClient]
"""The pooled HTTP client for a server's URL."""
KindOf = Callable[[str], Literal["ollama", "openai"] | None]
"""The wire protocol a server's URL is known to speak (None: not known)."""

_MAX_LINE = 1024 * 1024  # a progress line is about 150 bytes
_BUFFER = 256  # progress events the servers may send ahead of a slow reader


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One step of a pull onto one server.

    ``status`` is Ollama's own text (``"pulling manifest"``, ``"pulling 2af3b81862c6"``,
    ``"verifying sha256 digest"``, ``"success"``...), or ``"error"`` when the pull
    failed there. A layer's download carries its ``digest`` and that layer's ``total``
    and ``completed`` bytes. ``done`` is True on the one last event of each server:
    the pull succeeded there (``status == "success"``) or failed (``error`` says why).
    ``bytes_completed`` and ``bytes_total`` add up every layer this server has reported
    so far; ``unreachable`` is True when the server could not be reached at all.
    """

    server: str
    model: str
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    done: bool = False
    error: str | None = None
    bytes_completed: int = 0
    bytes_total: int = 0
    unreachable: bool = False

    @property
    def fraction(self) -> float | None:
        """How much of this server's download is done, from 0.0 to 1.0: the bytes
        completed over the size of every layer seen so far (1.0 once the pull has
        succeeded); None while no layer's size is known."""
        if self.done and self.error is None:
            return 1.0
        if self.bytes_total <= 0:
            return None
        return min(self.bytes_completed / self.bytes_total, 1.0)


def check_model(model: object) -> str:
    """``model`` if it can name a model to pull; raises :class:`ValidationError` if not."""
    if not isinstance(model, str) or not model.strip():
        raise ValidationError(f"The model to pull must be a non-empty name, not {model!r}.")
    return model


def _count(value: object) -> int | None:
    """A byte count from the JSON, or None when absent or not a whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def decode_pull_line(line: bytes, server: str, model: str) -> PullProgress | None:
    """One line of a ``/api/pull`` stream as a :class:`PullProgress`; None for a blank line.

    ``{"error": ...}`` is the pull failing on that server (``done``, ``error`` set); a
    line that is not Ollama's progress (not JSON, not an object, no ``status``) is a
    failure too, described. A layer line without ``completed`` has completed 0 bytes
    (Ollama leaves zero out).
    """
    line = line.strip()
    if not line:
        return None
    try:
        obj = decode_line(line)
    except BadChunk as exc:
        return PullProgress(server, model, "error", done=True, error=str(exc))
    error: object = obj.get("error")
    if error is not None:
        message = error if isinstance(error, str) else error_text(line)
        return PullProgress(server, model, "error", done=True, error=message or "unknown error")
    status: object = obj.get("status")
    if not isinstance(status, str) or not status:
        shown = line[:80].decode("utf-8", "replace")
        return PullProgress(
            server,
            model,
            "error",
            done=True,
            error=f"the server sent a line that is not Ollama's pull progress: {shown!r}",
        )
    digest: object = obj.get("digest")
    digest = digest if isinstance(digest, str) and digest else None
    total = _count(obj.get("total"))
    completed = _count(obj.get("completed"))
    if digest is not None and total is not None and completed is None:
        completed = 0
    return PullProgress(
        server,
        model,
        status,
        digest=digest,
        total=total,
        completed=completed,
        done=status == "success",
    )


class PullTracker:
    """One server's pull so far, fed its decoded lines in order.

    Keeps each layer's latest size and progress by digest, so that the sums (and
    :attr:`PullProgress.fraction`) are exact when layers interleave. Pure: no I/O.
    """

    __slots__ = ("_done", "_layers", "_status", "model", "server")

    def __init__(self, server: str, model: str) -> None:
        self.server = server
        self.model = model
        self._layers: dict[str, tuple[int, int]] = {}  # digest: (completed, total)
        self._status: str | None = None
        self._done = False

    @property
    def done(self) -> bool:
        """Whether the last event of this server (success or failure) was made."""
        return self._done

    @property
    def last_status(self) -> str | None:
        """The last status Ollama sent, if any."""
        return self._status

    def feed(self, progress: PullProgress) -> PullProgress:
        """``progress`` with this server's sums so far; marks the end on ``done``."""
        if progress.digest is not None and progress.total is not None:
            self._layers[progress.digest] = (progress.completed or 0, progress.total)
        if progress.done and progress.error is None:
            # Ollama reports a layer's progress on a timer: its last report may fall
            # short of its end. Success means every layer is there.
            self._layers = {d: (total, total) for d, (_, total) in self._layers.items()}
        if progress.error is None:
            self._status = progress.status
        self._done = self._done or progress.done
        done = sum(c for c, _ in self._layers.values())
        size = sum(t for _, t in self._layers.values())
        return dataclasses.replace(progress, bytes_completed=done, bytes_total=size)

    def fail(self, reason: str, *, unreachable: bool = False) -> PullProgress:
        """The last event of a pull that failed for ``reason``."""
        failed = PullProgress(self.server, self.model, "error", done=True, error=reason)
        return dataclasses.replace(self.feed(failed), unreachable=unreachable)

    def unfinished(self) -> str:
        """Why a stream that ended without ``success`` failed."""
        last = f" (last status: {self._status})" if self._status else ""
        return f"the stream ended before Ollama reported success{last}"


class _Lines:
    """Bytes from the network cut into lines; the end of a line still arriving is kept."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk
        *lines, self._tail = data.split(b"\n")
        if len(self._tail) > _MAX_LINE:
            raise _Failed(f"the server sent a line longer than {_MAX_LINE:,} bytes")
        return lines

    def end(self) -> list[bytes]:
        tail, self._tail = self._tail, b""
        return [tail] if tail.strip() else []


class _Failed(Exception):
    """A pull failed on one server, for ``reason``."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        self.reason = reason
        self.unreachable = unreachable
        super().__init__(reason)


@dataclass(frozen=True)
class _Job:
    """What every server's request shares."""

    client: ClientFor
    kind: KindOf
    model: str
    timeout: Timeout
    idle: float

    def timeouts(self) -> dict[str, float | None]:
        """httpx's limits for a pull: no limit on the whole, ``idle`` between reads."""
        t = self.timeout
        return {"connect": t.connect, "read": self.idle, "write": t.connect, "pool": self.idle}


async def _pull_one(job: _Job, url: str, send: MemoryObjectSendStream[PullProgress]) -> None:
    """Pull onto one server; sends its events, the last one with ``done`` set."""
    tracker = PullTracker(url, job.model)
    unreachable = False
    try:
        if job.kind(url) == "openai":
            raise _Failed(
                "an OpenAI-style server cannot pull models; load the model on the server itself"
            )
        await _stream(job, url, tracker, send)
        reason = tracker.unfinished()
    except _Failed as exc:
        reason, unreachable = exc.reason, exc.unreachable
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        reason, unreachable = describe_error(exc, job.timeout), True
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        return  # nobody reads any more
    except httpx.ReadTimeout:
        reason = f"sent nothing for {job.idle:g}s (Timeout.idle sets the limit)"
    except httpx.RemoteProtocolError as exc:
        if tracker.last_status is None:
            reason = describe_error(exc, job.timeout)
        else:
            reason = "the connection was cut mid-pull"
    except Exception as exc:  # a pull reports its failure; it never raises
        reason = describe_error(exc, job.timeout)
    if not tracker.done:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await send.send(tracker.fail(reason, unreachable=unreachable))


async def _stream(
    job: _Job, url: str, tracker: PullTracker, send: MemoryObjectSendStream[PullProgress]
) -> None:
    """Send the pull to ``url`` and relay its progress until it ends."""
    client = job.client(url)
    request = client.build_request(
        "POST",
        PULL_PATH,
        json={"model": job.model, "insecure": False, "stream": True},
        extensions={"timeout": job.timeouts()},
    )
    response = await client.send(request, stream=True)
    try:
        if response.status_code != 200:
            body = await read_capped(response)
            raise _Failed(_status_reason(response, body))
        chunks = response.aiter_bytes()
        lines = _Lines()
        last = None
        async for chunk in chunks:
            last = await _relay(lines.feed(chunk), tracker, send)
            if last is not None:
                break
        else:
            last = await _relay(lines.end(), tracker, send)
        if last is None:
            return  # the body ended without the server's last word
        # The (empty) rest of the body, so that the connection can be reused.
        with anyio.move_on_after(1.0), contextlib.suppress(httpx.HTTPError):
            async for _ in chunks:
                pass
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()
    await send.send(last)  # the server's last event, once its connection is back


async def _relay(
    lines: list[bytes], tracker: PullTracker, send: MemoryObjectSendStream[PullProgress]
) -> PullProgress | None:
    """Send the events of ``lines``, but not the server's last: that one is returned."""
    for line in lines:
        progress = decode_pull_line(line, tracker.server, tracker.model)
        if progress is None:
            continue
        progress = tracker.feed(progress)
        if progress.done:
            return progress
        await send.send(progress)
    return None


def _status_reason(response: httpx.Response, body: bytes) -> str:
    """Why a pull that was answered with an error status failed."""
    status = response.status_code
    message = error_text(body)
    if status == 404 and "json" not in response.headers.get("content-type", ""):
        return f"no {PULL_PATH} endpoint here (HTTP 404); is this an Ollama server?"
    return f"{message} (HTTP {status})" if message else f"HTTP {status}"


async def _run(
    job: _Job,
    servers: Sequence[str],
    send: MemoryObjectSendStream[PullProgress],
    scope: anyio.CancelScope,
    finished: anyio.Event,
) -> None:
    """Every server's pull at once, within ``scope``; ``finished`` is set once every
    request has ended and its connection is closed."""
    try:
        with scope:
            async with anyio.create_task_group() as tg:
                for url in servers:
                    tg.start_soon(_pull_one, job, url, send)
    finally:
        send.close()
        finished.set()


class _Running(NamedTuple):
    """A pull that has started: its events, its requests' scope, and their end."""

    receive: MemoryObjectReceiveStream[PullProgress]
    scope: anyio.CancelScope
    finished: anyio.Event


class PullStream:
    """The progress of pulling one model onto several servers at once.

    An async iterator of :class:`PullProgress`, in the order the servers send them;
    each server ends with exactly one event with ``done`` set. Use it as an async
    context manager, so that leaving the block early (``break``, an exception, a
    cancellation) cancels every request and closes its connection::

        async with cortex.pull("llama3.2:3b") as progress:
            async for step in progress:
                print(step.server, step.status, step.fraction)

    Plain ``async for`` works too when the loop runs to the end (or call
    :meth:`aclose`). Nothing is sent before the iteration (or the block) starts.
    """

    def __init__(
        self,
        model: str,
        servers: Sequence[str],
        *,
        timeout: Timeout,
        client: ClientFor,
        kind: KindOf,
    ) -> None:
        self._model = check_model(model)
        if not servers:
            raise ValidationError("There is no server to pull onto: name at least one.")
        self._servers = list(servers)
        idle = timeout.idle if timeout.idle is not None else DEFAULT_PULL_IDLE
        self._job = _Job(client, kind, model, timeout, idle)
        self._running: _Running | None = None
        self._closed = False
        self._group: TaskGroup | None = None  # inside `async with`
        self._cancel_soon: Callable[[], None] | None = None  # plain `async for`

    @property
    def model(self) -> str:
        """The model being pulled."""
        return self._model

    @property
    def servers(self) -> list[str]:
        """The servers it is pulled onto, in order."""
        return list(self._servers)

    def _start(self) -> Callable[[], Coroutine[Any, Any, None]]:
        """Get ready to run: the function that runs every request (it holds nothing of
        this object, so that dropping it early can still stop them)."""
        if self._running is not None or self._closed:
            raise RuntimeError("This pull has already started; call cortex.pull() again.")
        job, servers = self._job, list(self._servers)
        for url in servers:
            # Here, not in the tasks: a closed client, or a transport that cannot run on
            # this event loop, raises its own error, not a group.
            job.client(url)
        send, receive = anyio.create_memory_object_stream[PullProgress](_BUFFER)
        running = self._running = _Running(receive, anyio.CancelScope(), anyio.Event())

        async def run() -> None:
            await _run(job, servers, send, running.scope, running.finished)

        return run

    async def __aenter__(self) -> PullStream:
        run = self._start()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        group.start_soon(run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        try:
            await self.aclose()
        finally:
            if group is not None:
                # The caller's own exception goes on as it is, not in a group.
                await group.__aexit__(None, None, None)

    def __aiter__(self) -> PullStream:
        return self

    async def __anext__(self) -> PullProgress:
        running = self._running
        if running is None:
            if self._closed:
                raise StopAsyncIteration
            running = self._start_in_background()
        try:
            return await running.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            with anyio.CancelScope(shield=True):
                await running.finished.wait()  # every connection is closed before the end
            running.receive.close()
            raise StopAsyncIteration from None
        except BaseException:
            if self._group is None:  # iterated without `async with`: nobody else will stop it
                await self.aclose()
            raise

    def _start_in_background(self) -> _Running:
        """Plain ``async for``: the requests run in a task of their own."""
        run = self._start()
        assert self._running is not None
        scope = self._running.scope
        loop = current_loop()

        async def cancel() -> None:
            scope.cancel()

        run_soon(loop, run)
        self._cancel_soon = lambda: run_soon(loop, cancel)
        return self._running

    async def aclose(self) -> None:
        """Stop now: cancel every server's request and wait until its connection is
        closed. Safe to call twice."""
        self._closed = True
        self._cancel_soon = None
        running = self._running
        if running is None:
            return
        running.scope.cancel()
        with anyio.CancelScope(shield=True):
            await running.finished.wait()
        running.receive.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # getattr: __init__ may have refused its arguments before setting them.
        cancel: Callable[[], None] | None = getattr(self, "_cancel_soon", None)
        running: _Running | None = getattr(self, "_running", None)
        if running is None:
            return
        running.receive.close()
        if cancel is None or running.finished.is_set():
            return
        # Left in the middle of a plain `async for`: say so, like an unclosed file, and
        # stop the requests now, so that no server downloads for nobody.
        _warn(
            f"unclosed {self!r}: iterate it to the end, use 'async with', or call aclose()",
            ResourceWarning,
            source=self,
            stacklevel=2,
        )
        with contextlib.suppress(RuntimeError):  # the event loop is gone, and the sockets
            cancel()

    def __repr__(self) -> str:
        return f"<PullStream model={self._model!r} servers={self._servers!r}>"
