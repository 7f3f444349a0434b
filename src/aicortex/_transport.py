"""The httpx transport under every ``AsyncCortex`` pool: lean HTTP/1.1 over anyio.

Ollama speaks plain HTTP/1.1 and streams one chunk per token. httpx's default
transport decodes each chunk as a separate h11 event through several layers, which
caps a stream at roughly 20,000 tokens/s on a modest CPU. This transport reads
64 KiB at a time and hands every complete chunk in that read to httpx at once, and
sends a small request in one write. Pooling, keep-alive, timeouts and httpx's
exception types behave as with httpx's own transport.

When a test double has replaced httpx's or httpcore's transport methods (respx,
pytest-httpx), requests go through httpx's default transport so the double sees them.
"""

from __future__ import annotations

import math
import select
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import anyio.abc
import httpcore
import httpx
from anyio.streams.tls import TLSStream

from ._http11 import MAX_HEAD, BodyDecoder, ProtocolError, ResponseHead, parse_head, request_head

__all__ = ["BODY_EXTENSION", "Body", "PoolClient", "Transport", "shared_ssl_context"]

_READ_SIZE = 65536
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


def _timeout(request: httpx.Request, kind: str) -> float | None:
    timeouts = cast("dict[str, float | None]", request.extensions.get("timeout") or {})
    return timeouts.get(kind)


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else anyio.current_time() + timeout


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
    """One TCP (or TLS) connection and the bytes read from it but not yet used."""

    __slots__ = ("buffer", "expires", "origin", "pos", "reused", "socket", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, origin: Origin) -> None:
        self.stream = stream
        self.socket: Any = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self.origin = origin
        self.buffer = b""
        self.pos = 0
        self.expires = 0.0
        self.reused = False

    def stale(self, now: float) -> bool:
        # Only connections with nothing left unread are pooled (see Transport.release).
        if now >= self.expires:
            return True
        return self.socket is None or _readable(self.socket)

    async def send(self, data: bytes, timeout: float | None) -> None:
        """Send ``data``; with ``timeout`` None the caller enforces any limit."""
        scope = None if timeout is None else anyio.CancelScope(deadline=_deadline(timeout))
        try:
            if scope is None:
                await self.stream.send(data)
            else:
                with scope:
                    await self.stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
        if scope is not None and scope.cancelled_caught:
            raise httpx.WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, timeout: float | None) -> bool:
        """Append one network read to the buffer; False when the peer has closed.
        With ``timeout`` None the caller enforces any limit."""
        scope = None if timeout is None else anyio.CancelScope(deadline=_deadline(timeout))
        data = b""
        try:
            if scope is None:
                data = await self.stream.receive(_READ_SIZE)
            else:
                with scope:
                    data = await self.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            return False
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if scope is not None and scope.cancelled_caught:
            raise httpx.ReadTimeout(f"no data for {timeout:g}s")
        if self.pos < len(self.buffer):
            self.buffer = self.buffer[self.pos :] + data
        else:
            self.buffer = data
        self.pos = 0
        return True

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


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
                if not await conn.receive(_timeout(self._request, "read")):
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
        try:
            head = request_head(request.method.encode("ascii"), url.raw_path, request.headers.raw)
        except (ProtocolError, UnicodeEncodeError) as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        stream = request.stream
        body = request.content if isinstance(stream, httpx.ByteStream) else None
        if body is not None and len(body) <= _SMALL_BODY:
            head, body = head + body, b""
        origin: Origin = (scheme, url.host, port)
        while True:
            conn = await self._acquire(origin, request)
            try:
                return await self._exchange(conn, request, head, body)
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
        self, conn: _Connection, request: httpx.Request, head: bytes, body: bytes | None
    ) -> httpx.Response:
        write_timeout = _timeout(request, "write")
        read_timeout = _timeout(request, "read")
        response_head: ResponseHead | None = None
        writing = True
        # One scope covers the request and the response head (a scope costs more than
        # a small exchange): its deadline moves from the write to the read timeout.
        with anyio.CancelScope(deadline=_deadline(write_timeout)) as scope:
            try:
                await conn.send(head, None)
                if body:
                    await conn.send(body, None)
                elif body is None:
                    scope.deadline = math.inf  # each part of a streamed body has its own
                    await self._send_stream(conn, request, write_timeout)
            except httpx.WriteError as exc:
                if conn.reused:
                    raise _StaleConnection(exc) from None
                raise
            writing = False
            scope.deadline = _deadline(read_timeout)
            while True:
                response_head = await self._read_head(conn, request)
                if response_head.status >= 200 or response_head.status == 101:
                    break  # 1xx interim responses come before the real one
        if response_head is None:  # the scope's deadline passed
            if writing:
                raise httpx.WriteTimeout(
                    f"sending the request took over {write_timeout:g}s", request=request
                )
            raise httpx.ReadTimeout(f"no response within {read_timeout:g}s", request=request)
        if response_head.status == 101:
            raise httpx.RemoteProtocolError(
                "the server switched protocols, which aicortex does not support",
                request=request,
            )
        try:
            decoder = response_head.body(request.method.encode("ascii"))
        except ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None
        keep_alive = response_head.keep_alive and b"close" not in (
            request.headers.get("connection", "").lower().encode("latin-1")
        )
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
        self, conn: _Connection, request: httpx.Request, timeout: float | None
    ) -> None:
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        stream = cast("AsyncIterator[bytes]", request.stream)
        async for part in stream:
            if not part:
                continue
            await conn.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part, timeout)
        if chunked:
            await conn.send(b"0\r\n\r\n", timeout)

    async def _read_head(self, conn: _Connection, request: httpx.Request) -> ResponseHead:
        """Read a response head; the caller's scope enforces the read timeout."""
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
                more = await conn.receive(None)
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
            pool_timeout = _timeout(request, "pool")
            try:
                with anyio.fail_after(pool_timeout):
                    await slots.acquire()
            except TimeoutError:
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
        timeout = _timeout(request, "connect")
        stream: anyio.abc.ByteStream
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
                if scheme == b"https":
                    try:
                        stream = await TLSStream.wrap(
                            stream,
                            hostname=host,
                            ssl_context=self._tls(),
                            standard_compatible=False,
                        )
                    except BaseException:
                        await anyio.aclose_forcefully(stream)
                        raise
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} took over {timeout:g}s", request=request
            ) from None
        except (OSError, anyio.BrokenResourceError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return _Connection(stream, origin)

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
    that set a cookie."""

    def __init__(self, **kwargs: Any) -> None:
        cookies = kwargs.pop("cookies", None)
        super().__init__(**kwargs)
        self.cookies = cookies

    @property
    def cookies(self) -> httpx.Cookies:
        return self._jar

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._jar = _Cookies(cookies)
