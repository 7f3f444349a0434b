"""The httpx transport under every ``AsyncCortex`` pool: lean HTTP/1.1.

Ollama speaks plain HTTP/1.1 and streams one chunk per token. httpx's default
transport decodes each chunk as a separate h11 event through several layers, which
caps a stream at roughly 20,000 tokens/s on a modest CPU. This transport reads
64 KiB at a time and hands every complete chunk in that read to httpx at once, and
sends a small request in one write. Pooling, keep-alive, timeouts and httpx's
exception types behave as with httpx's own transport.

On asyncio (and uvloop) a connection is an ``asyncio.Protocol``: writes go straight
to the socket and timeouts are loop timers, which makes a small exchange about a
third cheaper than through anyio's socket streams and cancel scopes. Other event
loops (trio) use anyio streams. Both race a host's addresses (happy eyeballs).

When a test double has replaced httpx's or httpcore's transport methods (respx,
pytest-httpx), requests go through httpx's default transport so the double sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import anyio.abc
import httpcore
import httpx
from anyio.streams.tls import TLSStream

from ._http11 import (
    MAX_HEAD,
    BodyDecoder,
    ProtocolError,
    ResponseHead,
    closes,
    parse_head,
    request_head,
)

__all__ = [
    "BODY_EXTENSION",
    "DEADLINE_EXTENSION",
    "Body",
    "DeadlineExceeded",
    "PoolClient",
    "Transport",
    "shared_ssl_context",
]

_READ_SIZE = 65536
_READ_LIMIT = 4 * _READ_SIZE  # unread bytes at which an asyncio connection stops reading
_SMALL_BODY = 65536  # bodies up to this size go out in the same write as the head
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

BODY_EXTENSION = "aicortex.body"
"""The response extension that holds the raw body stream (httpx wraps
``response.stream``); reading it directly skips a generator layer per chunk."""

_HTTPX_SEND = httpx.AsyncHTTPTransport.handle_async_request
_HTTPCORE_SEND = httpcore.AsyncConnectionPool.handle_async_request

Origin = tuple[bytes, str, int]

_shared_context: ssl.SSLContext | None = None


def shared_ssl_context() -> ssl.SSLContext:
    """The verified TLS context every pool shares, made on first use (loading the CA
    bundle takes tens of milliseconds)."""
    global _shared_context
    if _shared_context is None:
        _shared_context = httpx.create_ssl_context()
    return _shared_context


def _mocked() -> bool:
    """Whether a test double has patched httpx's or httpcore's transport."""
    return (
        httpx.AsyncHTTPTransport.handle_async_request is not _HTTPX_SEND
        or httpcore.AsyncConnectionPool.handle_async_request is not _HTTPCORE_SEND
    )


DEADLINE_EXTENSION = "aicortex.deadline"
"""The request extension that may hold a deadline on anyio's clock
(``anyio.current_time()``): every wait of the request, for a free connection, to
connect, to send or to read, ends by then with :class:`DeadlineExceeded`. It is read
at each wait, so the caller may move it while the body is being read."""


class DeadlineExceeded(httpx.TimeoutException):
    """The deadline in the request's ``aicortex.deadline`` extension passed."""


def _limits(request: httpx.Request, kind: str) -> tuple[float | None, float | None]:
    """The request's ``kind`` timeout (seconds per wait) and its deadline, if any."""
    extensions = request.extensions
    timeouts = cast("dict[str, float | None]", extensions.get("timeout") or {})
    return timeouts.get(kind), extensions.get(DEADLINE_EXTENSION)


def _scope(timeout: float | None, deadline: float | None) -> tuple[anyio.CancelScope | None, bool]:
    """A cancel scope that ends after ``timeout`` or at ``deadline``, whichever is
    first (None: neither is set), and whether the deadline is the one that counts."""
    if timeout is None and deadline is None:
        return None, False
    when = math.inf if timeout is None else anyio.current_time() + timeout
    if deadline is not None and deadline < when:
        return anyio.CancelScope(deadline=deadline), True
    return anyio.CancelScope(deadline=when), False


_NO_LIMIT = contextlib.nullcontext()  # stands in for a scope when a wait has no limit


def _expired(request: httpx.Request | None = None) -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed", request=request)


def _readable(sock: Any) -> bool:
    """Whether an idle socket has something to read: the peer closed it (or sent junk)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _Connection:
    """One TCP (or TLS) connection and the bytes read from it but not yet used.

    :meth:`send` and :meth:`receive` wait at most ``timeout`` seconds and not past
    ``deadline`` (None: no limit).
    """

    __slots__ = ("buffer", "expires", "origin", "pos", "reused")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buffer = b""
        self.pos = 0
        self.expires = 0.0
        self.reused = False

    def stale(self, now: float) -> bool:
        """Whether an idle connection may no longer be used (expired, or closed by the
        peer). Only connections with nothing left unread are pooled."""
        raise NotImplementedError

    async def send(self, data: bytes, timeout: float | None, deadline: float | None) -> None:
        raise NotImplementedError

    async def receive(self, timeout: float | None, deadline: float | None) -> bool:
        """Append one network read to the buffer; False when the peer has closed."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def _append(self, data: bytes) -> None:
        if self.pos < len(self.buffer):
            self.buffer = self.buffer[self.pos :] + data
        else:
            self.buffer = data
        self.pos = 0


class _StreamConnection(_Connection):
    """A connection over an anyio byte stream (every event loop but asyncio's)."""

    __slots__ = ("socket", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, origin: Origin) -> None:
        super().__init__(origin)
        self.stream = stream
        self.socket: Any = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)

    def stale(self, now: float) -> bool:
        return now >= self.expires or self.socket is None or _readable(self.socket)

    async def send(self, data: bytes, timeout: float | None, deadline: float | None) -> None:
        scope, by_deadline = _scope(timeout, deadline)
        try:
            with scope or _NO_LIMIT:
                await self.stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        if scope is not None and scope.cancelled_caught:
            if by_deadline:
                raise _expired()
            raise httpx.WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, timeout: float | None, deadline: float | None) -> bool:
        scope, by_deadline = _scope(timeout, deadline)
        data = b""
        try:
            with scope or _NO_LIMIT:
                data = await self.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            return False
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if scope is not None and scope.cancelled_caught:
            if by_deadline:
                raise _expired()
            raise httpx.ReadTimeout(f"no data for {timeout:g}s")
        self._append(data)
        return True

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


_TIMEOUT = object()
_DEADLINE = object()


def _wake(waiter: asyncio.Future[object] | None, result: object = None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(result)


class _ProtocolConnection(_Connection, asyncio.Protocol):
    """A connection as an asyncio protocol, on asyncio's event loop (uvloop included).

    Writes go straight to the transport and timeouts are loop timers, so an exchange
    costs no task switches and no cancel scopes beyond the wait for the answer.
    """

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_loop",
        "_paused",
        "_size",
        "_transport",
        "_waiter",
        "_writable",
    )

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(origin)
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: Exception | None = None
        self._paused = False  # reading paused: unread data reached _READ_LIMIT
        self._writable = True  # False while the transport's write buffer is full
        self._waiter: asyncio.Future[object] | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= _READ_LIMIT and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        _wake(self._waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._waiter)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._writable = True
        _wake(self._waiter)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        _wake(self._waiter)

    # -- _Connection -----------------------------------------------------------

    def stale(self, now: float) -> bool:
        transport = self._transport
        if now >= self.expires or self._eof or self._chunks or transport is None:
            return True
        if transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        return sock is None or _readable(sock)

    async def send(self, data: bytes, timeout: float | None, deadline: float | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise httpx.WriteError(self._lost("the connection is closed"))
        transport.write(data)
        while not self._writable and not self._eof:
            expired = await self._wait(timeout, deadline)
            if expired is _DEADLINE:
                raise _expired()
            if expired:
                raise httpx.WriteTimeout(f"sending the request took over {timeout:g}s")
        if self._eof and self._error is not None:
            raise httpx.WriteError(self._lost("the connection was closed"))

    async def receive(self, timeout: float | None, deadline: float | None) -> bool:
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise httpx.ReadError(self._lost("the connection was closed"))
                return False
            expired = await self._wait(timeout, deadline)
            if expired is _DEADLINE:
                raise _expired()
            if expired:
                raise httpx.ReadTimeout(f"no data for {timeout:g}s")
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._append(data)
        return True

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self, timeout: float | None, deadline: float | None) -> object:
        """Wait for data, the end or room to write (then None), or until ``timeout``
        (then _TIMEOUT) or ``deadline`` (then _DEADLINE) passes, whichever is first."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        expiry: object = _TIMEOUT
        when = None if timeout is None else loop.time() + timeout
        if deadline is not None and (when is None or deadline < when):
            when, expiry = deadline, _DEADLINE
        timer = None if when is None else loop.call_at(when, _wake, waiter, expiry)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _lost(self, what: str) -> str:
        error = self._error
        return f"{what} ({error})" if error is not None and str(error) else what


class Body(httpx.AsyncByteStream):
    """A response body read straight off its connection."""

    def __init__(
        self,
        transport: Transport,
        conn: _Connection,
        decoder: BodyDecoder,
        request: httpx.Request,
        keep_alive: bool,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._decoder = decoder
        self._request = request
        self._keep_alive = keep_alive and decoder.reusable

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        decoder = self._decoder
        try:
            while True:
                data, conn.pos = decoder.take(conn.buffer, conn.pos)
                if decoder.done:
                    self._conn = None
                    await self._transport.release(conn, reusable=self._keep_alive)
                    if data:
                        return data
                    raise StopAsyncIteration
                if data:
                    return data
                if not await conn.receive(*_limits(self._request, "read")):
                    decoder.eof()
        except StopAsyncIteration:
            raise
        except ProtocolError as exc:
            await self._drop()
            raise httpx.RemoteProtocolError(str(exc), request=self._request) from None
        except BaseException:
            await self._drop()
            raise

    @property
    def finished(self) -> bool:
        """Whether the whole body was read (or dropped) and the connection let go."""
        return self._conn is None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._transport.release(conn, reusable=False)

    async def aclose(self) -> None:
        await self._drop()


class Transport(httpx.AsyncBaseTransport):
    """A pooled HTTP/1.1 transport for ``http://`` and ``https://`` servers.

    ``max_connections`` bounds the connections in use at once; up to
    ``max_keepalive_connections`` idle ones are kept for ``keepalive_expiry`` seconds.
    ``https://`` servers are verified with ``ssl_context``, by default
    :func:`shared_ssl_context`.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
        max_keepalive_connections: int = 20,
        keepalive_expiry: float = 30.0,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._slots: anyio.Semaphore | None = None
        self._fallback: httpx.AsyncHTTPTransport | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if _mocked():
            return await self._fallback_transport().handle_async_request(request)
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        port = url.port or _DEFAULT_PORTS.get(scheme)
        if port is None:
            raise httpx.UnsupportedProtocol(
                f"aicortex speaks http:// and https://, not {url.scheme}://", request=request
            )
        if not url.host:
            raise httpx.UnsupportedProtocol(f"the URL {url} has no host", request=request)
        fields = request.headers.raw
        try:
            head = request_head(request.method.encode("ascii"), url.raw_path, fields)
        except (ProtocolError, UnicodeEncodeError) as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        stream = request.stream
        # read(): a request httpx rebuilt to follow a redirect has not read its body yet
        body = request.read() if isinstance(stream, httpx.ByteStream) else None
        if body is not None and len(body) <= _SMALL_BODY:
            head, body = head + body, b""
        origin: Origin = (scheme, url.host, port)
        while True:
            conn = await self._acquire(origin, request)
            try:
                return await self._exchange(conn, request, head, body, closes(fields))
            except _StaleConnection as stale:
                # The server closed an idle keep-alive connection as we reused it:
                # it processed nothing, so the request goes out again on a new one
                # (unless its body was a stream that cannot be sent twice).
                await self.release(conn, reusable=False)
                if body is None:
                    raise stale.error from None
            except BaseException:
                await self.release(conn, reusable=False)
                raise

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        head: bytes,
        body: bytes | None,
        close: bool,
    ) -> httpx.Response:
        """Send the request and read the response head; ``close``: the request asked for
        the connection to be closed afterwards."""
        write_timeout, deadline = _limits(request, "write")
        try:
            await conn.send(head, write_timeout, deadline)
            if body:
                await conn.send(body, write_timeout, deadline)
            elif body is None:
                await self._send_stream(conn, request, write_timeout, deadline)
        except httpx.WriteError as exc:
            if conn.reused:
                raise _StaleConnection(exc) from None
            raise
        read_timeout, deadline = _limits(request, "read")
        while True:
            response_head = await self._read_head(conn, request, read_timeout, deadline)
            if response_head.status >= 200 or response_head.status == 101:
                break  # 1xx interim responses come before the real one
        if response_head.status == 101:
            raise httpx.RemoteProtocolError(
                "the server switched protocols, which aicortex does not support",
                request=request,
            )
        try:
            decoder = response_head.body(request.method.encode("ascii"))
        except ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None
        keep_alive = response_head.keep_alive and not close
        if decoder is None:
            stream: httpx.AsyncByteStream = httpx.ByteStream(b"")
            await self.release(conn, reusable=keep_alive)
        else:
            stream = Body(self, conn, decoder, request, keep_alive)
        return httpx.Response(
            response_head.status,
            headers=response_head.headers,
            stream=stream,
            extensions={
                "http_version": response_head.http_version,
                "reason_phrase": response_head.reason,
                BODY_EXTENSION: stream,
            },
        )

    async def _send_stream(
        self,
        conn: _Connection,
        request: httpx.Request,
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        stream = cast("AsyncIterator[bytes]", request.stream)
        async for part in stream:
            if not part:
                continue
            data = b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
            await conn.send(data, timeout, deadline)
        if chunked:
            await conn.send(b"0\r\n\r\n", timeout, deadline)

    async def _read_head(
        self,
        conn: _Connection,
        request: httpx.Request,
        timeout: float | None,
        deadline: float | None,
    ) -> ResponseHead:
        """Read a response head, waiting up to ``timeout`` for each network read and
        not past ``deadline``."""
        received_any = conn.pos < len(conn.buffer)
        while True:
            end = conn.buffer.find(b"\r\n\r\n", conn.pos)
            if end >= 0:
                break
            if len(conn.buffer) - conn.pos > MAX_HEAD:
                raise httpx.RemoteProtocolError(
                    f"the response head is larger than {MAX_HEAD} bytes", request=request
                )
            try:
                more = await conn.receive(timeout, deadline)
            except httpx.ReadError as exc:
                if conn.reused and not received_any:
                    raise _StaleConnection(exc) from None
                raise
            if not more:
                cut = httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                )
                if conn.reused and not received_any:
                    raise _StaleConnection(cut)
                raise cut
            received_any = True
        data = conn.buffer[conn.pos : end]
        conn.pos = end + 4
        try:
            return parse_head(data)
        except ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None

    # -- the pool -------------------------------------------------------------

    async def _acquire(self, origin: Origin, request: httpx.Request) -> _Connection:
        slots = self._slots
        if slots is None:
            slots = self._slots = anyio.Semaphore(self._max_connections)
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            pool_timeout, deadline = _limits(request, "pool")
            scope, by_deadline = _scope(pool_timeout, deadline)
            with scope or _NO_LIMIT:
                await slots.acquire()
            if scope is not None and scope.cancelled_caught:
                if by_deadline:
                    raise _expired(request) from None
                raise httpx.PoolTimeout(
                    f"no free connection within {pool_timeout:g}s ({self._max_connections} in use)",
                    request=request,
                ) from None
        try:
            idle = self._idle.get(origin)
            if idle:
                now = time.monotonic()
                while idle:
                    conn = idle.pop()
                    self._idle_count -= 1
                    if not conn.stale(now):
                        conn.reused = True
                        return conn
                    await conn.aclose()
            return await self._connect(origin, request)
        except BaseException:
            slots.release()
            raise

    async def _connect(self, origin: Origin, request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        timeout, deadline = _limits(request, "connect")
        tls = self._tls() if scheme == b"https" else None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        scope, by_deadline = _scope(timeout, deadline)
        try:
            with scope or _NO_LIMIT:
                if loop is not None:
                    return await _open_protocol(loop, origin, tls)
                return _StreamConnection(await _open_stream(host, port, tls), origin)
        except (OSError, anyio.BrokenResourceError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        if by_deadline:
            raise _expired(request)
        raise httpx.ConnectTimeout(
            f"connecting to {host}:{port} took over {timeout:g}s", request=request
        )

    async def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Give back a connection's slot; keep the connection for reuse if it can be."""
        try:
            if (
                reusable
                and not self._closed
                and conn.pos == len(conn.buffer)
                and self._idle_count < self._max_keepalive
            ):
                conn.expires = time.monotonic() + self._keepalive_expiry
                conn.reused = False
                self._idle.setdefault(conn.origin, []).append(conn)
                self._idle_count += 1
            else:
                await conn.aclose()
        finally:
            if self._slots is not None:
                self._slots.release()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = shared_ssl_context()
        return self._ssl_context

    def _fallback_transport(self) -> httpx.AsyncHTTPTransport:
        if self._fallback is None:
            self._fallback = httpx.AsyncHTTPTransport(
                verify=self._tls(),
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_keepalive,
                    keepalive_expiry=self._keepalive_expiry,
                ),
            )
        return self._fallback

    async def aclose(self) -> None:
        self._closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        self._idle_count = 0
        for conn in idle:
            await conn.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()


async def _open_stream(host: str, port: int, tls: ssl.SSLContext | None) -> anyio.abc.ByteStream:
    stream: anyio.abc.ByteStream = await anyio.connect_tcp(host, port)
    if tls is not None:
        try:
            stream = await TLSStream.wrap(
                stream, hostname=host, ssl_context=tls, standard_compatible=False
            )
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
    return stream


_HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address is tried alongside (RFC 8305)


async def _open_protocol(
    loop: asyncio.AbstractEventLoop, origin: Origin, tls: ssl.SSLContext | None
) -> _ProtocolConnection:
    """Connect to ``origin`` on asyncio, racing its addresses as anyio.connect_tcp does."""
    _, host, port = origin
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = _interleave([(info[0], str(info[4][0])) for info in infos])

    async def attempt(address: str) -> _ProtocolConnection:
        _, conn = await loop.create_connection(
            lambda: _ProtocolConnection(origin, loop),
            address,
            port,
            ssl=tls,
            server_hostname=host if tls is not None else None,
        )
        return conn

    if len(addresses) == 1:
        return await attempt(addresses[0])
    winner: list[_ProtocolConnection] = []
    errors: list[tuple[str, OSError]] = []

    async def race(address: str, finished: anyio.Event) -> None:
        try:
            conn = await attempt(address)
        except OSError as exc:
            errors.append((address, exc))
            return
        finally:
            finished.set()
        if winner:
            await conn.aclose()
        else:
            winner.append(conn)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for address in addresses:
            finished = anyio.Event()
            tg.start_soon(race, address, finished)
            with anyio.move_on_after(_HAPPY_EYEBALLS_DELAY):
                await finished.wait()
    if winner:
        return winner[0]
    details = "; ".join(f"{address}: {exc}" for address, exc in errors)
    raise OSError(f"all addresses of {host} failed ({details})") from errors[-1][1]


def _interleave(addresses: list[tuple[int, str]]) -> list[str]:
    """Unique addresses, alternating between families, the resolver's first family first."""
    by_family: dict[int, list[str]] = {}
    for family, address in addresses:
        if address not in by_family.setdefault(family, []):
            by_family[family].append(address)
    queues = list(by_family.values())
    ordered: list[str] = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


class _StaleConnection(Exception):
    """A reused keep-alive connection turned out to be closed by the server."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class _Cookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        # httpx builds urllib request and message objects for every response before
        # looking for cookies; Ollama sets none, so look for the header first.
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


class PoolClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` of one server: cookie bookkeeping only for responses
    that set a cookie, and :meth:`send_streaming` for the chat's hot path."""

    def __init__(self, **kwargs: Any) -> None:
        cookies = kwargs.pop("cookies", None)
        transport = kwargs.get("transport")
        super().__init__(**kwargs)
        self.cookies = cookies
        self._pool = transport if isinstance(transport, Transport) else None

    @property
    def cookies(self) -> httpx.Cookies:
        return self._jar

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._jar = _Cookies(cookies)

    @property
    def enforces_deadlines(self) -> bool:
        """Whether :meth:`send_streaming` honours a request's ``aicortex.deadline``
        (aicortex's own transport does; httpx's, behind a proxy or a test double, not)."""
        return self._pool is not None and not _mocked()

    async def send_streaming(self, request: httpx.Request) -> httpx.Response:
        """What ``send(request, stream=True)`` returns, handed straight to the pool.

        For a client with no auth and no event hooks over aicortex's own transport,
        httpx's send adds an auth flow, a redirect loop and per-response bookkeeping
        that cost more than a small exchange itself. A redirect is handed to
        :meth:`send`, which follows it as usual; any other client uses :meth:`send`.
        """
        pool = self._pool
        hooks = self.event_hooks
        if pool is None or self.auth is not None or hooks["request"] or hooks["response"]:
            return await self.send(request, stream=True)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await pool.handle_async_request(request)
        response.request = request
        if response.has_redirect_location and self.follow_redirects:
            await response.aclose()
            return await self.send(request, stream=True)
        self.cookies.extract_cookies(response)
        return response
