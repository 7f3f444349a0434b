"""The HTTP/1.1 transport against real sockets on 127.0.0.1 that behave well or badly."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import httpx
import pytest
import respx
import trustme

from aicortex import AsyncCortex, Timeout, _transport
from aicortex._router import describe_error
from aicortex._transport import (
    DEADLINE_EXTENSION,
    Body,
    DeadlineExceeded,
    PoolClient,
    Transport,
    _interleave,
)

Handler = Callable[["Peer"], Awaitable[None]]
CONTEXT = ssl.create_default_context()


@dataclass
class Server:
    """A raw TCP server; counts connections and records what each one sent."""

    port: int
    connections: int = 0
    closed: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list[tuple[bytes, bytes]])
    gone: anyio.Event = field(default_factory=anyio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Peer:
    """The server side of one connection."""

    def __init__(self, stream: anyio.abc.ByteStream, server: Server) -> None:
        self.stream = stream
        self.server = server
        self.buffer = b""

    async def _fill(self) -> None:
        self.buffer += await self.stream.receive()

    async def request(self) -> tuple[bytes, bytes]:
        """Read one request: its head and its (length-framed or chunked) body."""
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"transfer-encoding: chunked" in lower:
            while True:
                while b"\r\n" not in self.buffer:
                    await self._fill()
                size_line, _, self.buffer = self.buffer.partition(b"\r\n")
                size = int(size_line, 16)
                while len(self.buffer) < size + 2:
                    await self._fill()
                body += self.buffer[:size]
                self.buffer = self.buffer[size + 2 :]
                if size == 0:
                    break
        else:
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                    while len(self.buffer) < length:
                        await self._fill()
                    body, self.buffer = self.buffer[:length], self.buffer[length:]
        self.server.requests.append((head, body))
        return head, body

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def wait_closed(self) -> None:
        """Wait until the client closes the connection."""
        try:
            while True:
                await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return


def ok(body: bytes = b"hello", *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunked(*pieces: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server = Server(listener.extra(anyio.abc.SocketAttribute.local_port))

    async def serve(stream: anyio.abc.SocketStream) -> None:
        server.connections += 1
        connection: anyio.abc.ByteStream = stream
        try:
            if tls is not None:
                from anyio.streams.tls import TLSStream

                connection = await TLSStream.wrap(stream, server_side=True, ssl_context=tls)
            await handler(Peer(connection, server))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            server.closed += 1
            server.gone.set()
            await anyio.aclose_forcefully(connection)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def answer_each(response: bytes, *, close_after: int | None = None) -> Handler:
    """A handler that answers every request on a connection with ``response``."""

    async def handle(peer: Peer) -> None:
        served = 0
        while close_after is None or served < close_after:
            await peer.request()
            await peer.send(response)
            served += 1

    return handle


def client(**kwargs: object) -> httpx.AsyncClient:
    transport = Transport(ssl_context=CONTEXT, **kwargs)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, timeout=5)


# -- bodies and keep-alive -----------------------------------------------------------


async def test_length_framed_answers_reuse_one_connection() -> None:
    """Two requests in a row travel over the same kept-alive connection."""
    async with serving(answer_each(ok(b"hello"))) as server, client() as http:
        first = await http.get(server.url + "/a")
        second = await http.post(server.url + "/b", json={"x": 1})
    assert (first.text, second.text) == ("hello", "hello")
    assert server.connections == 1
    head, body = server.requests[1]
    assert head.startswith(b"POST /b HTTP/1.1\r\n")
    assert body == b'{"x":1}'


async def test_chunks_in_one_read_arrive_as_one_piece() -> None:
    """Many small chunks sent at once reach the reader in far fewer pieces."""
    tokens = [b"tok%d " % i for i in range(500)]
    async with serving(answer_each(chunked(*tokens))) as server, client() as http:
        async with http.stream("GET", server.url) as response:
            pieces = [piece async for piece in response.aiter_raw()]
        again = await http.get(server.url)
    assert b"".join(pieces) == b"".join(tokens)
    assert len(pieces) < 20
    assert again.content == b"".join(tokens)
    assert server.connections == 1


async def test_a_body_without_framing_ends_with_the_connection() -> None:
    """No length and no chunks: the body is read to EOF and the connection not reused."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    async with serving(handle) as server, client() as http:
        assert (await http.get(server.url)).text == "all of it"
        assert (await http.get(server.url)).text == "all of it"
    assert server.connections == 2


async def test_connection_close_is_honoured() -> None:
    """A response with ``Connection: close`` is never followed by another request."""
    async with serving(answer_each(ok(b"x", b"Connection: close"))) as server, client() as http:
        await http.get(server.url)
        await http.get(server.url)
    assert server.connections == 2


async def test_head_and_no_content_answers_have_no_body() -> None:
    """HEAD and 204 carry no body even with a length, and the connection stays usable."""
    async with (
        serving(answer_each(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")) as server,
        client() as http,
    ):
        assert (await http.head(server.url)).content == b""
        assert (await http.delete(server.url)).status_code == 204
    assert server.connections == 1


async def test_interim_100_continue_is_skipped() -> None:
    """A ``100 Continue`` before the real response is read past."""
    async with (
        serving(answer_each(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real"))) as server,
        client() as http,
    ):
        assert (await http.get(server.url)).text == "real"


async def test_large_and_streamed_request_bodies_arrive_whole() -> None:
    """A body past 64 KiB and a chunked upload from an async iterator both arrive intact."""
    big = bytes(range(256)) * 1024

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"", b"two,", b"three"):
            yield part

    async with serving(answer_each(ok())) as server, client() as http:
        await http.post(server.url, content=big)
        await http.post(server.url, content=parts())
    assert server.requests[0][1] == big
    assert server.requests[1][1] == b"one,two,three"
    assert b"transfer-encoding: chunked" in server.requests[1][0].lower()


async def test_a_client_that_stops_reading_holds_the_server_back() -> None:
    """Unread response bytes are bounded: the server's writes block until the client
    reads again, and then every byte arrives in order."""
    size = 64 * 1024 * 1024
    sent = anyio.Event()
    block = bytes(range(256)) * 4096  # 1 MiB

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            await peer.send(block)
        sent.set()

    async with (
        serving(handle) as server,
        client() as http,
        http.stream("GET", server.url) as response,
    ):
        await anyio.sleep(0.5)  # not reading
        assert not sent.is_set()
        received = 0
        async for data in response.aiter_raw():
            start = received % 256  # byte i of the body is i % 256
            assert data == (bytes(range(256)) * (len(data) // 256 + 2))[start : start + len(data)]
            received += len(data)
        assert received == size
        with anyio.fail_after(2):
            await sent.wait()


async def test_an_upload_larger_than_the_socket_buffers_waits_for_the_server() -> None:
    """A request body the server reads slowly is sent in full once it reads."""
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB

    async def handle(peer: Peer) -> None:
        await anyio.sleep(0.3)
        await peer.request()
        await peer.send(ok(b"got it"))

    async with serving(handle) as server, client() as http:
        assert (await http.post(server.url, content=big)).text == "got it"
    assert server.requests[0][1] == big


def test_addresses_alternate_between_families() -> None:
    """Happy eyeballs order: the resolver's first family first, then alternating."""
    v4, v6 = socket.AF_INET, socket.AF_INET6
    resolved = [(v6, "::1"), (v6, "::2"), (v6, "::1"), (v4, "10.0.0.1"), (v4, "10.0.0.2")]
    assert _interleave(resolved) == ["::1", "10.0.0.1", "::2", "10.0.0.2"]


def test_on_asyncio_a_refused_address_gives_way_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host name with several addresses is connected through the first that answers;
    when none does, the error names every address and the refusal is its cause."""

    async def resolve(host: str, port: int, **kwargs: object) -> list[tuple[object, ...]]:
        assert host == "ollama.test"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses
        ]

    monkeypatch.setattr(anyio, "getaddrinfo", resolve)

    async def main() -> None:
        async with serving(answer_each(ok(b"through the second"))) as server, client() as http:
            url = f"http://ollama.test:{server.port}"
            close = {"Connection": "close"}  # the next request needs a new connection
            assert (await http.get(url, headers=close)).text == "through the second"
            addresses[-1] = "127.0.0.3"
            with pytest.raises(httpx.ConnectError) as caught:
                await http.get(url)
        assert "127.0.0.2" in str(caught.value)
        assert "127.0.0.3" in str(caught.value)
        assert describe_error(caught.value, Timeout()) == "connection refused"

    addresses = ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2 or .3
    anyio.run(main, backend="asyncio")


async def test_a_stale_kept_alive_connection_is_replaced_silently() -> None:
    """If the server closed an idle connection, the request goes out on a new one."""
    async with serving(answer_each(ok(b"fine"), close_after=1)) as server, client() as http:
        assert (await http.get(server.url)).text == "fine"
        await server.gone.wait()  # the server closed the idle connection
        assert (await http.post(server.url, json={"again": True})).text == "fine"
    assert server.connections == 2


async def test_a_connection_closed_as_it_is_reused_is_retried_once() -> None:
    """A reused connection that dies before any byte of the answer is retried."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        if peer.server.connections == 1:
            await peer.send(ok(b"first"))
            await peer.request()  # read the second request, then hang up on it
            return
        await peer.send(ok(b"second"))

    async with serving(handle) as server:
        transport = Transport(ssl_context=CONTEXT)
        async with httpx.AsyncClient(transport=transport, timeout=5) as http:
            assert (await http.get(server.url)).text == "first"
            assert (await http.get(server.url)).text == "second"
    assert server.connections == 2


# -- failures ------------------------------------------------------------------------


async def test_a_refused_port_is_a_connect_error() -> None:
    """Nothing listening gives ``httpx.ConnectError`` caused by the refusal."""
    with socket_port() as port:
        pass
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"http://127.0.0.1:{port}")
    assert describe_error(caught.value, Timeout()) == "connection refused"


async def test_a_server_that_closes_without_answering_is_a_protocol_error() -> None:
    """A fresh connection closed before any response byte is not retried."""

    async def handle(peer: Peer) -> None:
        await peer.request()

    async with serving(handle) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.get(server.url)
    assert server.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_garbage_is_a_protocol_error(reply: bytes) -> None:
    """Whatever is not HTTP/1.1 raises ``httpx.RemoteProtocolError``, never hangs."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        await peer.wait_closed()

    async with serving(handle) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url)
        await server.gone.wait()  # the broken connection was closed, not pooled


async def test_an_endless_head_is_refused() -> None:
    """A response head past 64 KiB is an error, not unbounded memory."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: aaaaaaaaaaaaaaaa\r\n" * 5000)
        await peer.wait_closed()

    async with serving(handle) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
            await http.get(server.url)


async def test_a_body_cut_midway_is_a_protocol_error() -> None:
    """A chunked body that stops before its last chunk says so."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async with (
        serving(handle) as server,
        client() as http,
        http.stream("GET", server.url) as response,
    ):
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            async for _ in response.aiter_raw():
                pass


async def test_a_silent_server_is_a_read_timeout() -> None:
    """No answer within the read timeout raises ``httpx.ReadTimeout`` promptly."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.wait_closed()

    async with serving(handle) as server, client() as http:
        with anyio.fail_after(3):
            with pytest.raises(httpx.ReadTimeout):
                await http.get(server.url, timeout=httpx.Timeout(5, read=0.2))
        await server.gone.wait()


async def test_the_read_timeout_is_looked_up_at_every_read() -> None:
    """Changing the request's read timeout mid-body applies to the next read."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await peer.wait_closed()

    async with serving(handle) as server, client() as http:
        request = http.build_request("GET", server.url, timeout=httpx.Timeout(5, read=30))
        response = await http.send(request, stream=True)
        request.extensions["timeout"]["read"] = 0.2
        with anyio.fail_after(3):
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.aiter_raw():
                    pass
        await response.aclose()


async def test_a_deadline_ends_every_wait_of_the_request() -> None:
    """With ``aicortex.deadline`` set, waiting for the head, for the body and for a free
    connection each end at the deadline, however long their own timeouts are; the
    deadline can be moved while the body is read."""
    release = anyio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()  # 1: silent
        await peer.wait_closed()

    async def handle_body(peer: Peer) -> None:
        await peer.request()  # 2: head and a first chunk, then silent
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await release.wait()

    slow = httpx.Timeout(30)
    async with serving(handle) as server, client() as http:
        request = http.build_request("GET", server.url, timeout=slow)
        request.extensions[DEADLINE_EXTENSION] = anyio.current_time() + 0.2
        with anyio.fail_after(3), pytest.raises(DeadlineExceeded):
            await http.send(request)
    async with serving(handle_body) as server, client(max_connections=1) as http:
        request = http.build_request("GET", server.url, timeout=slow)
        request.extensions[DEADLINE_EXTENSION] = anyio.current_time() + 30
        response = await http.send(request, stream=True)
        other = http.build_request("GET", server.url, timeout=slow)
        other.extensions[DEADLINE_EXTENSION] = anyio.current_time() + 0.2
        with anyio.fail_after(3), pytest.raises(DeadlineExceeded):
            await http.send(other)  # the only connection is in use
        request.extensions[DEADLINE_EXTENSION] = anyio.current_time() + 0.2
        with anyio.fail_after(3), pytest.raises(DeadlineExceeded):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        release.set()


# -- the pool and its resources ---------------------------------------------------


async def test_closing_a_response_midway_closes_its_connection() -> None:
    """Leaving a body early hangs up, so the server sees the client go."""
    closed = anyio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await peer.wait_closed()
        closed.set()

    async with serving(handle) as server, client() as http:
        async with http.stream("GET", server.url) as response:
            async for _ in response.aiter_raw():
                break
        with anyio.fail_after(2):
            await closed.wait()
    assert server.connections == 1


async def test_a_full_pool_waits_then_times_out() -> None:
    """Past ``max_connections`` in use, a request waits for the pool timeout."""
    release = anyio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await release.wait()
        await peer.send(b"0\r\n\r\n")
        await peer.request()
        await peer.send(ok(b"after"))

    async with serving(handle) as server, client(max_connections=1) as http:
        async with http.stream("GET", server.url) as held:
            with pytest.raises(httpx.PoolTimeout):
                await http.get(server.url, timeout=httpx.Timeout(5, pool=0.2))
            release.set()
            await held.aread()
        assert (await http.get(server.url)).text == "after"
    assert server.connections == 1


async def test_cancelling_mid_body_frees_the_connection_slot() -> None:
    """A cancelled read closes the connection and gives its slot back."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        if peer.server.connections == 1:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
            await peer.wait_closed()
            return
        await peer.send(ok(b"next"))

    async with serving(handle) as server, client(max_connections=1) as http:
        with anyio.move_on_after(0.2):
            async with http.stream("GET", server.url) as response:
                async for _ in response.aiter_raw():
                    pass
        with anyio.fail_after(2):
            assert (await http.get(server.url)).text == "next"
    assert server.connections == 2


async def test_closing_the_transport_closes_idle_connections() -> None:
    """``aclose`` hangs up every kept-alive connection."""
    async with serving(answer_each(ok())) as server:
        async with client() as http:
            await http.get(server.url)
        with anyio.fail_after(2):
            await server.gone.wait()


async def test_a_finished_body_has_already_let_its_connection_go() -> None:
    """Once the last byte is read, the body reports itself finished."""
    async with (
        serving(answer_each(ok(b"whole"))) as server,
        client() as http,
        http.stream("GET", server.url) as response,
    ):
        body = response.extensions["aicortex.body"]
        assert isinstance(body, Body)
        assert not body.finished
        await response.aread()
        assert body.finished


async def test_https_with_a_trusted_certificate() -> None:
    """``https://`` URLs get TLS with the transport's context and work the same way."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serving(answer_each(ok(b"secret")), tls=server_context) as server:
        transport = Transport(ssl_context=client_context)
        async with httpx.AsyncClient(transport=transport, timeout=5) as http:
            url = f"https://127.0.0.1:{server.port}"
            assert (await http.get(url)).text == "secret"
            assert (await http.get(url)).text == "secret"
        untrusted = Transport(ssl_context=ssl.create_default_context())
        async with httpx.AsyncClient(transport=untrusted, timeout=5) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(url)
    assert server.connections == 2


async def test_the_shared_tls_context_is_made_only_for_https(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain http never loads the CA bundle; the first https connection makes the shared
    context once, and later transports reuse it."""
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    made: list[ssl.SSLContext] = []

    def create_ssl_context() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        made.append(context)
        return context

    monkeypatch.setattr(_transport, "_shared_context", None)
    monkeypatch.setattr(httpx, "create_ssl_context", create_ssl_context)
    async with (
        serving(answer_each(ok(b"plain"))) as server,
        AsyncCortex([server.url], fallback=False) as cortex,
    ):
        pool = cortex._router.client(server.url)  # pyright: ignore[reportPrivateUsage]
        assert (await pool.get("/")).text == "plain"
    assert made == []
    async with serving(answer_each(ok(b"secret")), tls=server_context) as server:
        for _ in range(2):
            async with httpx.AsyncClient(transport=Transport(), timeout=5) as http:
                assert (await http.get(f"https://127.0.0.1:{server.port}")).text == "secret"
    assert len(made) == 1


async def test_unsupported_schemes_and_bad_headers_fail_before_any_io() -> None:
    """Only http and https are spoken; a header that could split the head is refused."""
    async with client() as http:
        transport = Transport(ssl_context=CONTEXT)
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(httpx.Request("GET", "ftp://127.0.0.1/"))
        request = httpx.Request("GET", "http://127.0.0.1:9/", headers={"X-A": "ok"})
        request.headers["X-Bad"] = "a\r\nInjected: 1"
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request)
        await http.aclose()


async def test_test_doubles_that_patch_httpx_still_see_the_requests() -> None:
    """Under ``respx.mock`` the requests go through httpx's transport to the mock."""
    async with client() as http:
        with respx.mock(assert_all_called=True) as mock:
            mock.get("http://127.0.0.1:9/mocked").respond(200, text="from respx")
            assert (await http.get("http://127.0.0.1:9/mocked")).text == "from respx"


async def test_the_pool_client_keeps_cookies_only_when_they_are_set() -> None:
    """Cookies set by a server are kept and sent back; other answers skip the jar."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"a", b"Set-Cookie: session=abc; Path=/"))
        await peer.request()
        await peer.send(ok(b"b"))
        await peer.request()
        await peer.send(ok(b"c"))

    async with serving(handle) as server:
        transport = Transport(ssl_context=CONTEXT)
        async with PoolClient(transport=transport, timeout=5) as http:
            await http.get(server.url)
            await http.get(server.url)
            await http.get(server.url)
            assert http.cookies.get("session") == "abc"
    assert b"cookie: session=abc" in server.requests[1][0].lower()
    assert b"cookie: session=abc" in server.requests[2][0].lower()


class socket_port:
    """A port that was free a moment ago (for a refused connection)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# -- proxies from the environment -------------------------------------------------


async def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, requests to a server go to the proxy in absolute form."""
    tags = b'{"models":[{"name":"llama3.2:3b","model":"llama3.2:3b"}]}'
    async with serving(answer_each(ok(tags, b"Content-Type: application/json"))) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with AsyncCortex(["http://ollama.example:11434"], fallback=False) as cortex:
            info = await cortex.server_info()
    assert info.up
    assert info.models == ("llama3.2:3b",)
    request_lines = [head.split(b"\r\n", 1)[0] for head, _ in proxy.requests]
    assert b"GET http://ollama.example:11434/api/tags HTTP/1.1" in request_lines


async def test_no_proxy_keeps_a_server_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server listed in NO_PROXY is reached directly, through aicortex's transport."""
    tags = b'{"models":[]}'
    async with serving(answer_each(ok(tags, b"Content-Type: application/json"))) as server:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with AsyncCortex([server.url], fallback=False) as cortex:
            assert (await cortex.server_info()).up
    request_lines = {head.split(b"\r\n", 1)[0] for head, _ in server.requests}
    assert b"GET /api/tags HTTP/1.1" in request_lines  # origin form: no proxy between


async def test_a_double_that_patches_httpx_transport_sees_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pytest-httpx style: patching ``httpx.AsyncHTTPTransport`` reroutes the requests."""
    seen: list[str] = []

    async def fake(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text="from the double")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", fake)
    async with client() as http:
        assert (await http.get("http://127.0.0.1:9/x")).text == "from the double"
    assert seen == ["http://127.0.0.1:9/x"]
