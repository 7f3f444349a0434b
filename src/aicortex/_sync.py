"""The blocking twin: ``Cortex`` and ``Stream``, driving an ``AsyncCortex`` through a portal.

One event loop runs in a daemon thread per :class:`Cortex` and owns its
``AsyncCortex`` (and so its connection pools). Blocking calls hand coroutines to
that loop, so they work from any thread, including one that already runs an
event loop (a notebook cell).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import httpx
from anyio.from_thread import BlockingPortal

from ._catalog import Catalog, ModelInfo, ServerEntry
from ._client import (
    CHAT_ARGS,
    DEFAULT_BATCH_SIZE,
    GENERATE_ARGS,
    ApiRequest,
    AsyncCortex,
    ChatArgs,
    GenerateArgs,
    Prompt,
    RequestArgs,
    check_args,
)
from ._config import DEFAULT_HEALTH_TTL, Timeout
from ._embed import EmbedResult
from ._events import Stats, StreamEvent, ToolCall
from ._exceptions import AICortexError, StreamError, consumed_error
from ._health import ServerInfo
from ._metrics import Observer
from ._pools import HttpChoice, TransportName
from ._pull import PullProgress, PullStream
from ._routing import Ejection, Server, ServerState, Strategy
from ._stream import DEFAULT_MAX_LINE, AsyncStream

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Cortex", "Stream"]

T = TypeVar("T")

_BATCH = 8192  # events the loop may read ahead of a blocking consumer


class _PortalThread:
    """An event loop in a daemon thread and a portal into it."""

    def __init__(self, backend: str) -> None:
        ready: Future[BlockingPortal] = Future()

        async def main() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(main, backend=backend)
            except BaseException as exc:  # pragma: no cover - loop failed to start
                if not ready.done():
                    ready.set_exception(exc)

        self._thread = threading.Thread(target=run, name="aicortex-portal", daemon=True)
        self._thread.start()
        self.portal = ready.result()
        self.thread_id = self._thread.ident

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.portal.call(self.portal.stop, True)
        self._thread.join(timeout=10)


def _shutdown(cortex: AsyncCortex, loop: _PortalThread, streams: Iterable[Stream]) -> None:
    """Close ``cortex`` on its loop, then stop the loop."""
    if threading.get_ident() == loop.thread_id:
        # Collected on its own loop: closing would wait for itself. The loop thread is a
        # daemon; let it go.
        return
    try:
        # Streams still being read end with "the Cortex was closed", not
        # with a connection error blamed on their server.
        for stream in list(streams):
            stream._cancel()  # pyright: ignore[reportPrivateUsage]
        with contextlib.suppress(RuntimeError):  # the loop already stopped
            loop.portal.call(cortex.aclose)
    finally:
        loop.stop()


class Cortex:
    """The blocking twin of :class:`~aicortex.AsyncCortex`: same methods, same arguments.

    Safe to share between threads; use it as a context manager or call
    :meth:`close`. ``backend`` picks the event loop that runs it in the background
    (``"asyncio"`` or ``"trio"``); ``routing``, ``http``, ``limits``,
    ``max_connections``, ``max_line_size`` and ``observers`` are
    :class:`~aicortex.AsyncCortex`'s (observers are told in the background thread)::

        with Cortex(servers=["http://gpu-box:11434"]) as cortex:
            print(cortex.chat("Why is the sky blue?", model="llama3.2:3b"))
    """

    def __init__(
        self,
        servers: Sequence[str | Server] | str | None = None,
        *,
        model: str | None = None,
        routing: Strategy | None = None,
        timeout: Timeout | None = None,
        health_ttl: float = DEFAULT_HEALTH_TTL,
        fallback: bool = True,
        headers: Mapping[str, str] | None = None,
        catalog: Catalog | None = None,
        backend: Literal["asyncio", "trio"] = "asyncio",
        http: HttpChoice | None = None,
        limits: httpx.Limits | None = None,
        max_connections: int | None = None,
        max_line_size: int = DEFAULT_MAX_LINE,
        observers: Iterable[Observer] = (),
        ejection: Ejection | None = None,
    ) -> None:
        self._async = AsyncCortex(
            servers,
            model=model,
            routing=routing,
            timeout=timeout,
            health_ttl=health_ttl,
            fallback=fallback,
            headers=headers,
            catalog=catalog,
            http=http,
            limits=limits,
            max_connections=max_connections,
            max_line_size=max_line_size,
            observers=observers,
            ejection=ejection,
        )
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._loop: _PortalThread | None = _PortalThread(backend)
        # A Cortex left open is closed when it is collected, or at the latest when the
        # interpreter exits, so its connections are closed properly, not abandoned.
        self._finalizer = weakref.finalize(self, _shutdown, self._async, self._loop, self._streams)

    @classmethod
    def from_config(cls, path: str | PathLike[str] | None = None, **arguments: Any) -> Cortex:
        """The blocking twin of :meth:`AsyncCortex.from_config`: configured by the TOML
        file, then the ``AICORTEX_*`` variables, then ``arguments`` (this class's own,
        ``backend=`` included)."""
        from ._settings import load_settings

        options = load_settings(path).settings.cortex_arguments()
        options.update(arguments)
        return cls(**options)

    # -- plumbing ------------------------------------------------------------

    def _portal(self) -> BlockingPortal:
        loop = self._loop
        if loop is None:
            raise RuntimeError("This Cortex is closed; create a new one.")
        return loop.portal

    def _run(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` on the loop and wait; Ctrl-C (or any interruption) cancels it."""
        __tracebackhide__ = True  # pytest and IPython: show the caller's frames
        future = self._portal().start_task_soon(func)
        try:
            return future.result()
        except AICortexError as exc:
            error = exc  # raised below, out of this block: with its own cause chain only
        except BaseException:
            future.cancel()
            raise
        raise here(error)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close every connection and stop the background loop. Safe to call twice."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None or self._finalizer.detach() is None:
            return  # closed already (by the finalizer, at exit)
        _shutdown(self._async, loop, self._streams)

    @property
    def closed(self) -> bool:
        return self._loop is None

    def __enter__(self) -> Cortex:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Cortex servers={self._async.servers!r}>"

    @property
    def servers(self) -> list[str]:
        """The configured servers, normalised, in preference order."""
        return self._async.servers

    @property
    def timeout(self) -> Timeout:
        """The default timeouts of this client."""
        return self._async.timeout

    @property
    def routing(self) -> Strategy:
        """How servers are chosen: ``"priority"``, ``"least_busy"`` or ``"round_robin"``."""
        return self._async.routing

    @property
    def http(self) -> HttpChoice:
        """The transport choice: ``"auto"``, ``"httpx"`` or ``"aiohttp"``."""
        return self._async.http

    @property
    def limits(self) -> httpx.Limits:
        """The connection limits of each server's pool."""
        return self._async.limits

    def transport(self) -> TransportName:
        """The transport (``"aiohttp"`` or ``"httpx"``) the pools use on this client's loop."""

        async def pick() -> TransportName:
            return self._async.transport()

        return self._run(pick)

    @property
    def catalog(self) -> Catalog:
        """The model catalog this client uses."""
        return self._async.catalog

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The observers told about each finished request."""
        return self._async.observers

    def add_observer(self, observer: Observer) -> None:
        """:meth:`AsyncCortex.add_observer`; it is told in this client's background thread."""
        self._async.add_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        """:meth:`AsyncCortex.remove_observer`."""
        self._async.remove_observer(observer)

    # -- chat ----------------------------------------------------------------

    @overload
    def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        **args: Unpack[ChatArgs],
    ) -> str: ...

    @overload
    def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[True],
        **args: Unpack[ChatArgs],
    ) -> Stream: ...

    @overload
    def chat(
        self, prompt: Prompt, *, model: str | None = None, stream: bool, **args: Unpack[ChatArgs]
    ) -> str | Stream: ...

    def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool = False,
        **args: Unpack[ChatArgs],
    ) -> str | Stream:
        """Blocking :meth:`AsyncCortex.chat`: the text, or a :class:`Stream` if ``stream=True``."""
        check_args("chat", args, CHAT_ARGS)
        if stream:

            async def opener() -> AsyncStream:
                return await self._async.chat(prompt, model=model, stream=True, **args)

            opened = Stream(self._portal(), opener)
            self._streams.add(opened)
            return opened
        chat = functools.partial(self._async.chat, prompt, model=model, stream=False, **args)
        return self._run(chat)

    # -- generate and embed --------------------------------------------------

    @overload
    def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        **args: Unpack[GenerateArgs],
    ) -> str: ...

    @overload
    def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: Literal[True],
        **args: Unpack[GenerateArgs],
    ) -> Stream: ...

    @overload
    def generate(
        self, prompt: str, *, model: str | None = None, stream: bool, **args: Unpack[GenerateArgs]
    ) -> str | Stream: ...

    def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: bool = False,
        **args: Unpack[GenerateArgs],
    ) -> str | Stream:
        """Blocking :meth:`AsyncCortex.generate`: the text, or a :class:`Stream`."""
        check_args("generate", args, GENERATE_ARGS)
        if stream:

            async def opener() -> AsyncStream:
                return await self._async.generate(prompt, model=model, stream=True, **args)

            opened = Stream(self._portal(), opener)
            self._streams.add(opened)
            return opened
        generate = functools.partial(
            self._async.generate, prompt, model=model, stream=False, **args
        )
        return self._run(generate)

    def embed(
        self,
        input: str | Sequence[str],
        *,
        model: str | None = None,
        truncate: bool | None = None,
        dimensions: int | None = None,
        keep_alive: float | str | None = None,
        server_url: str | Server | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: Timeout | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int | None = None,
    ) -> EmbedResult:
        """Blocking :meth:`AsyncCortex.embed`."""
        embed = functools.partial(
            self._async.embed,
            input,
            model=model,
            truncate=truncate,
            dimensions=dimensions,
            keep_alive=keep_alive,
            server_url=server_url,
            options=options,
            timeout=timeout,
            batch_size=batch_size,
            concurrency=concurrency,
        )
        return self._run(embed)

    # -- live information ----------------------------------------------------

    def server_info(self, model: str | None = None, server_url: str | None = None) -> ServerInfo:
        """Blocking :meth:`AsyncCortex.server_info`."""
        return self._run(functools.partial(self._async.server_info, model, server_url))

    def probe_servers(
        self, model: str | None = None, *, server_url: str | None = None
    ) -> list[ServerInfo]:
        """Blocking :meth:`AsyncCortex.probe_servers`."""
        return self._run(functools.partial(self._async.probe_servers, model, server_url=server_url))

    def server_states(self) -> list[ServerState]:
        """Blocking :meth:`AsyncCortex.server_states` (read on the client's loop)."""
        return self._portal().call(self._async.server_states)

    def pull(
        self, model: str, servers: Sequence[str | Server] | str | None = None
    ) -> Iterator[PullProgress]:
        """Blocking :meth:`AsyncCortex.pull`: iterate it for :class:`PullProgress` events as
        they arrive. Leaving the loop early (``break``, an exception, Ctrl-C) cancels every
        server's request and closes its connection."""
        portal = self._portal()
        # Made on the loop, now: a bad model name or server list is raised here.
        try:
            pulling = portal.call(functools.partial(self._async.pull, model, servers))
        except AICortexError as exc:
            error = exc
        else:
            return _pull_events(portal, pulling)
        raise here(error)

    # -- offline helpers (no I/O, so no trip through the loop) ---------------

    def build_api_request(
        self, model: str, prompt: Prompt, *, stream: bool = True, **args: Unpack[RequestArgs]
    ) -> ApiRequest:
        """See :meth:`AsyncCortex.build_api_request`."""
        return self._async.build_api_request(model, prompt, stream=stream, **args)

    def default_model(self) -> str:
        """See :meth:`AsyncCortex.default_model`."""
        return self._async.default_model()

    def candidates(
        self, model: str | None = None, server_url: str | Server | None = None
    ) -> list[str]:
        """See :meth:`AsyncCortex.candidates`."""
        return self._async.candidates(model, server_url)

    def families(self) -> list[str]:
        """Model families in the catalog."""
        return self._async.families()

    def models(self, family: str | None = None) -> list[str]:
        """Model names in the catalog, optionally of one family."""
        return self._async.models(family)

    def model_info(self, model: str) -> ModelInfo:
        """Catalog facts about ``model``."""
        return self._async.model_info(model)

    def model_servers(self, model: str) -> list[ServerEntry]:
        """The servers the catalog lists for ``model``."""
        return self._async.model_servers(model)

    def llm_params(self, model: str) -> dict[str, int | float]:
        """The catalog's default generation parameters for ``model``."""
        return self._async.llm_params(model)

    def random_llm_params(self, model: str, seed: int | None = None) -> dict[str, int | float]:
        """Generation parameters drawn within the catalog's ranges; same seed, same result."""
        return self._async.random_llm_params(model, seed=seed)


def here(exc: BaseException) -> BaseException:
    """``exc``, to raise again in the caller's thread. aicortex's own errors lose the
    frames of the background loop and the portal, so a traceback shows the caller's
    code and the error; their ``__cause__`` chain is kept."""
    if isinstance(exc, AICortexError):
        return exc.with_traceback(None)
    return exc


def _pull_events(portal: BlockingPortal, pulling: PullStream) -> Iterator[PullProgress]:
    """The events of ``pulling``, read on the loop by a task that ends with the loop's
    iteration: closing this generator cancels it, and with it every request."""
    events: queue.SimpleQueue[PullProgress | _End] = queue.SimpleQueue()

    async def pump() -> None:
        end = _End(RuntimeError("The Cortex was closed during the pull."))
        try:
            async with pulling:
                async for progress in pulling:
                    events.put(progress)
            end = _End()
        except Exception as exc:
            end = _End(exc)
        finally:
            events.put(end)

    task = portal.start_task_soon(pump)
    try:
        while not isinstance(item := events.get(), _End):
            yield item
        if item.error is not None:
            raise here(item.error)
    finally:
        task.cancel()
        with contextlib.suppress(CancelledError):
            task.result(timeout=10)


async def _call(func: Callable[[], object]) -> None:
    """``func()`` on the loop, as a task a portal can start."""
    func()


class _Pipe:
    """What a :class:`Stream` and its pump task share: batches of events one way, and
    the read-ahead count (under ``lock``) both ways. The loop waits on ``room`` (an
    anyio.Event it made) once ``ahead`` events sit unread."""

    __slots__ = ("ahead", "closing", "lock", "loop_thread", "portal", "queue", "room", "scope")

    def __init__(self, portal: BlockingPortal) -> None:
        self.portal = portal
        # put() never blocks the loop; get() blocks only the caller. A batch holds every
        # event whose data had already arrived: one thread hop per read, not per token.
        self.queue: queue.SimpleQueue[list[StreamEvent] | _End] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.ahead = 0
        self.room: anyio.Event | None = None
        self.scope: anyio.CancelScope | None = None
        self.closing = False  # the Stream was closed (or dropped) by its owner
        self.loop_thread: int | None = None

    def caught_up(self, taken: int) -> None:
        """Count ``taken`` events as read; wake the pump if it waits for room."""
        with self.lock:
            self.ahead -= taken
            room = self.room
            if room is None or self.ahead > _BATCH // 2:
                return
            self.room = None
        with contextlib.suppress(RuntimeError):  # the loop is gone
            self.portal.start_task_soon(_call, room.set)

    def cancel_soon(self) -> None:
        """Cancel the pump without waiting for it (from ``__del__``, any thread)."""
        scope = self.scope
        if scope is None:
            return
        if self.loop_thread == threading.get_ident():
            scope.cancel()
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone, and the connection
            self.portal.start_task_soon(_call, scope.cancel)


async def _pump(
    pipe: _Pipe, opener: Callable[[], Awaitable[AsyncStream]], started: Future[AsyncStream]
) -> None:
    put = pipe.queue.put
    lock = pipe.lock
    end = _End()
    stream: AsyncStream | None = None
    pipe.loop_thread = threading.get_ident()
    scope = pipe.scope = anyio.CancelScope()
    try:
        with scope:
            try:
                stream = await opener()
            except anyio.get_cancelled_exc_class():
                started.set_exception(_closed_error(None))
                raise
            except BaseException as exc:
                started.set_exception(exc)
                return
            async with stream:
                started.set_result(stream)
                del started  # the caller's Stream holds the AsyncStream now
                take = stream._take  # pyright: ignore[reportPrivateUsage]
                async for event in stream:
                    batch = [event]
                    take(batch)
                    put(batch)
                    with lock:
                        pipe.ahead += len(batch)
                        room = None
                        if pipe.ahead > _BATCH:
                            room = pipe.room = anyio.Event()
                    # Read ahead at most _BATCH events of a slow consumer; it sets the
                    # event once it has caught up.
                    if room is not None:
                        await room.wait()
    except anyio.get_cancelled_exc_class():
        # Not our own close(): the loop is shutting down under a reader.
        end = _End(_closed_error(stream))
        raise
    except Exception as exc:
        end = _End(exc)
    finally:
        if scope.cancelled_caught and not pipe.closing:
            # Cancelled by the Cortex closing, not by this stream's close().
            end = _End(_closed_error(stream))
        put(end)


class _End:
    """Marks the end of the events (``error`` set when the stream raised)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _closed_error(stream: AsyncStream | None) -> StreamError:
    return StreamError(
        "The Cortex was closed while the stream was being read.",
        partial_text=stream.partial_text if stream is not None else "",
        server=stream.server if stream is not None else None,
        model=stream.model if stream is not None else None,
    )


class Stream:
    """The blocking twin of :class:`~aicortex.AsyncStream`.

    Iterate it for :class:`StreamEvent` objects as they arrive. Leaving early —
    ``break``, :meth:`close`, or the end of a ``with`` block — closes the
    connection at once. ``text()`` returns the whole text whether called
    before, during or after iterating.
    """

    def __init__(
        self, portal: BlockingPortal, opener: Callable[[], Awaitable[AsyncStream]]
    ) -> None:
        self._pipe = pipe = _Pipe(portal)
        self._batch: list[StreamEvent] = []
        self._next = 0
        self._finished = False
        self._end: _End | None = None
        # The pump task owns the AsyncStream for its whole life, so cancel
        # scopes and the connection stay in one task. Errors before the first
        # token (no server, unknown model) are raised here, like the async API;
        # an interruption while waiting (Ctrl-C) cancels the request. The pump
        # holds the pipe, not this object, so a Stream dropped unclosed is collected.
        started: Future[AsyncStream] = Future()
        self._task = portal.start_task_soon(_pump, pipe, opener, started)
        try:
            self._stream = started.result()
            return
        except AICortexError as exc:
            error = exc
        except BaseException:
            self._task.cancel()
            raise
        raise here(error)

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._finished:
            raise consumed_error(self._end is None, "stream.text()")
        return self._events()

    def _events(self) -> Iterator[StreamEvent]:
        try:
            while (batch := self._rest()) is not None:
                for event in batch:
                    if self._finished:  # closed by the loop's body
                        return
                    yield event
        finally:
            if not self._finished:
                self.close()

    def __next__(self) -> StreamEvent:
        batch = self._batch
        if self._next < len(batch) and not self._finished:
            event = batch[self._next]
            self._next += 1
            return event
        rest = self._rest()
        if rest is None:
            raise StopIteration
        self._batch, self._next = rest, 1
        return rest[0]

    def _rest(self) -> list[StreamEvent] | None:
        """The events not yet handed out: the rest of the current batch, else the next
        batch (waiting for it); None at the end, or raises the stream's error."""
        if self._finished:
            return None
        batch, taken = self._batch, self._next
        if taken < len(batch):
            self._next = len(batch)
            return batch[taken:]
        try:
            item = self._pipe.queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, _End):
            self._finished = True
            self._end = item
            self._wait_pump()
            if item.error is not None:
                raise here(item.error)
            return None
        self._pipe.caught_up(len(item))
        self._batch, self._next = item, len(item)
        return item

    def _wait_pump(self) -> None:
        with contextlib.suppress(CancelledError):
            self._task.result(timeout=10)

    def text(self) -> str:
        """The whole text; reads the rest of the stream first if needed.

        Raises :class:`~aicortex.StreamError` if the stream failed or was closed
        before it finished.
        """
        while self._rest() is not None:
            pass
        end = self._end
        if end is not None and end.error is not None:
            raise here(end.error)
        if end is None:
            raise StreamError(
                "The stream was closed before it finished; its text is incomplete.",
                partial_text=self._stream.partial_text,
                server=self._stream.server,
                model=self._stream.model,
            )
        return self._stream.partial_text

    def close(self) -> None:
        """Stop reading and close the connection now. Safe to call twice."""
        self._finished = self._pipe.closing = True
        self._cancel()

    def _cancel(self) -> None:
        scope = self._pipe.scope
        if scope is not None and not self._task.done():
            # RuntimeError: the loop is gone, and the connection with it.
            with contextlib.suppress(RuntimeError):
                self._pipe.portal.call(scope.cancel)
        self._wait_pump()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not hasattr(self, "_stream") or self._finished or self._task.done():
            return  # never opened, or already ended
        _warn(
            f"unclosed {self!r}: close it, or iterate it to the end or in a 'with' block",
            ResourceWarning,
            source=self,
            stacklevel=2,
        )
        self._pipe.closing = True
        self._pipe.cancel_soon()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def model(self) -> str:
        """The model that answers."""
        return self._stream.model

    @property
    def server(self) -> str:
        """The base URL of the server that answers."""
        return self._stream.server

    @property
    def thinking(self) -> str:
        """The thinking text received so far."""
        return self._stream.thinking

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls received so far."""
        return self._stream.tool_calls

    @property
    def stats(self) -> Stats | None:
        """Token counts and timings, once the stream has ended."""
        return self._stream.stats

    @property
    def done_reason(self) -> str | None:
        """Why generation stopped (``stop``, ``length``, ...), once it has."""
        return self._stream.done_reason

    @property
    def partial_text(self) -> str:
        """The text received so far."""
        return self._stream.partial_text

    def __repr__(self) -> str:
        return f"<Stream model={self.model!r} server={self.server!r}>"
