"""The HTTP layer as users see it, on every transport: choice, limits, TLS, proxies, and
answers that break HTTP/1.1's rules."""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import httpx
import pytest
import trustme

from aicortex import AsyncCortex, EventType, ServerError, Timeout, ValidationError, _pools
from fakeollama import Exchange, FakeOllamaFactory, Script, reply, stall_after

# What these tests pin down holds on every transport (see conftest.py).
EVERY_TRANSPORT = True

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=1.0)


def cortex(*servers: str, **kwargs: object) -> AsyncCortex:
    options: dict[str, object] = {"timeout": QUICK, "fallback": False}
    options.update(kwargs)
    return AsyncCortex(list(servers), **options)  # type: ignore[arg-type]


def _line(content: str, *, done: bool = False) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"model": MODEL, "message": message, "done": done}).encode() + b"\n"


@dataclass(frozen=True)
class _Head(Script):
    """Answer with a complete chat whose response head carries ``extra`` header bytes."""

    extra: bytes

    async def run(self, exchange: Exchange) -> None:
        body = _line("folded") + _line("", done=True)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n%s\r\n" % self.extra
        await exchange.send_raw(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@dataclass(frozen=True)
class _Huge(Script):
    """A 64 MiB answer: one token, then lines of 64 KiB; records when all was written."""

    written: list[bool] = field(default_factory=list[bool])

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream()
        await exchange.send_chunk(_line("first"))
        filler = _line("x" * 65_000)
        for _ in range(64 * 1024 * 1024 // len(filler)):
            await exchange.send_chunk(filler)
        self.written.append(True)


# -- the transport choice -----------------------------------------------------------------


async def test_auto_picks_aiohttp_on_asyncio_and_httpx_on_trio(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``http="auto"`` is httpx-aiohttp's transport on asyncio, httpx's own on trio; the
    pool's choice is logged at debug level."""
    monkeypatch.delenv("AICORTEX_HTTP")
    async with AsyncCortex(["http://127.0.0.1:9"], fallback=False) as client:
        expected = "aiohttp" if anyio_backend == "asyncio" else "httpx"
        assert client.http == "auto"
        assert client.transport() == expected
        with caplog.at_level(logging.DEBUG, logger="aicortex"):
            await client.probe_servers()
    assert f"http://127.0.0.1:9: {expected} transport" in caplog.text


async def test_the_environment_and_the_argument_choose_the_transport(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AICORTEX_HTTP`` picks the transport; ``http=`` wins over it."""
    monkeypatch.setenv("AICORTEX_HTTP", "httpx")
    async with AsyncCortex(["http://127.0.0.1:9"]) as client:
        assert (client.http, client.transport()) == ("httpx", "httpx")
    if anyio_backend == "asyncio":
        async with AsyncCortex(["http://127.0.0.1:9"], http="aiohttp") as client:
            assert (client.http, client.transport()) == ("aiohttp", "aiohttp")


async def test_aiohttp_on_trio_is_refused_with_the_fix(anyio_backend: str) -> None:
    """aiohttp runs only on asyncio: forcing it on trio says what to pass instead."""
    if anyio_backend != "trio":
        return
    async with AsyncCortex(["http://127.0.0.1:9"], http="aiohttp") as client:
        with pytest.raises(ValidationError, match="on trio use http='httpx'"):
            await client.chat("hi", model=MODEL)


def test_a_bad_transport_choice_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown choice fails at construction, naming where it came from."""
    with pytest.raises(ValidationError, match="http must be one of"):
        AsyncCortex(http="curl")  # type: ignore[arg-type]
    monkeypatch.setenv("AICORTEX_HTTP", "requests")
    with pytest.raises(ValidationError, match=r"AICORTEX_HTTP must be one of .* not 'requests'"):
        AsyncCortex()


def test_aiohttp_without_the_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forcing aiohttp when httpx-aiohttp is missing names the extra to install; "auto"
    quietly uses httpx's transport."""
    monkeypatch.setattr(_pools, "aiohttp_installed", lambda: False)
    with pytest.raises(ValidationError, match=r"aicortex-core\[aiohttp\]"):
        AsyncCortex(http="aiohttp")

    async def pick() -> str:
        return AsyncCortex(["http://127.0.0.1:9"]).transport()

    assert anyio.run(pick) == "httpx"


@pytest.mark.parametrize("http", ["httpx", "auto"])
def test_aiohttp_is_imported_only_for_its_first_pool(http: str) -> None:
    """``import aicortex`` never loads aiohttp; a chat over httpx's transport does not
    either; on asyncio with "auto", the first pool does."""
    script = f"""
import sys, anyio, aicortex
assert "aiohttp" not in sys.modules, "import aicortex loaded aiohttp"
async def main():
    async with aicortex.AsyncCortex(["http://127.0.0.1:9"], http={http!r}) as c:
        await c.probe_servers()
anyio.run(main)
print("aiohttp" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "AICORTEX_HTTP"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == str(http == "auto")


# -- connection limits --------------------------------------------------------------------


def test_each_server_allows_a_thousand_connections_by_default() -> None:
    """More than Ollama queues itself (OLLAMA_MAX_QUEUE=512); settable either way."""
    assert AsyncCortex().limits.max_connections == 1000
    assert AsyncCortex(max_connections=5).limits.max_connections == 5
    limits = httpx.Limits(max_connections=7, max_keepalive_connections=3)
    assert AsyncCortex(limits=limits).limits is limits
    with pytest.raises(ValidationError, match="not both"):
        AsyncCortex(limits=limits, max_connections=5)
    with pytest.raises(ValidationError, match="max_connections must be a whole number"):
        AsyncCortex(max_connections=0)


async def test_a_chat_past_the_limit_waits_for_a_free_connection(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """With every connection busy, the next chat waits and then runs on the freed one."""
    server = fake_ollama(chat=reply(["a", "b", "c"], delay=0.1))
    async with cortex(server.url, max_connections=1) as client:
        first = await client.chat("hi", model=MODEL, stream=True)
        results: list[str] = []

        async def second() -> None:
            results.append(await client.chat("hi", model=MODEL))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.2)
            assert results == []  # still waiting for the one connection
            assert await first.text() == "abc"
    assert results == ["abc"]


async def test_waiting_for_a_local_connection_is_not_held_against_the_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A chat that finds no free connection within its first-token limit says so, and
    the server stays in use: the next chat, once a connection is free, goes through."""
    server = fake_ollama(chat=stall_after(["t"], 1))
    async with cortex(server.url, max_connections=1) as client:
        stuck = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(ServerError, match=r"no free connection within 0\.3s") as caught:
            await client.chat("hi", model=MODEL, timeout=Timeout(first_token=0.3))
        assert [a.server for a in caught.value.attempts] == [server.url]
        await stuck.aclose()
        server.chat = reply("free again")
        assert await client.chat("hi", model=MODEL) == "free again"
    assert server.count("/api/tags") == 1  # never probed again: not marked down


# -- the wire -----------------------------------------------------------------------------


async def test_an_unread_answer_holds_the_server_back(fake_ollama: FakeOllamaFactory) -> None:
    """A 64 MiB answer the caller stops reading stays mostly in the server: its writes
    block instead of filling the client's memory, and closing the stream frees it."""
    huge = _Huge()
    server = fake_ollama(chat=huge)
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        async with stream:
            events = [await stream.__anext__(), await stream.__anext__()]
            assert [e.type for e in events] == [EventType.START, EventType.TOKEN]
            await anyio.sleep(0.5)  # not reading
            assert huge.written == []
        assert await anyio.to_thread.run_sync(server.wait_for_disconnect, 2.0)
    assert huge.written == []


@pytest.mark.parametrize("bad", [b"X-Bad: a\rb", b"X-Bad: a\x00b"], ids=["CR", "NUL"])
async def test_a_cr_or_nul_in_a_header_value_is_refused(
    fake_ollama: FakeOllamaFactory, bad: bytes
) -> None:
    """RFC 9110 section 5.5: the answer is rejected as broken HTTP, its connection is not
    reused, and the next chat (on a new connection) is served."""
    server = fake_ollama(chat=[_Head(bad), reply("clean")])
    async with cortex(server.url, health_ttl=0) as client:
        with pytest.raises(ServerError, match="broke the HTTP protocol"):
            await client.chat("hi", model=MODEL)
        connections = server.connections
        assert await client.chat("hi", model=MODEL) == "clean"
    assert server.connections > connections


async def test_an_obs_fold_header_line_is_joined_not_refused(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """RFC 9112 section 5.2: a folded header line is read as one value, the answer served."""
    server = fake_ollama(chat=_Head(b"X-Folded: one\r\n two"))
    async with cortex(server.url) as client:
        assert await client.chat("hi", model=MODEL) == "folded"


async def test_a_kept_alive_connection_the_server_closed_is_replaced(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """After the server drops its idle connections, the next chat opens a new one."""
    server = fake_ollama(chat=reply("first"))
    async with cortex(server.url) as client:
        assert await client.chat("hi", model=MODEL) == "first"
        server.drop_idle_connections()
        await anyio.sleep(0.2)
        server.chat = reply("second")
        assert await client.chat("hi", model=MODEL) == "second"


# -- TLS and proxies, over raw sockets ----------------------------------------------------

Handler = Callable[[anyio.abc.ByteStream], Awaitable[None]]


@dataclass
class RawServer:
    port: int
    scheme: str = "http"
    request_lines: list[bytes] = field(default_factory=list[bytes])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@asynccontextmanager
async def serving_tags(tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    """A server that answers every request with Ollama's tags JSON; records request lines."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server = RawServer(listener.extra(anyio.abc.SocketAttribute.local_port))
    if tls is not None:
        server.scheme = "https"
    tags = json.dumps({"models": [{"name": MODEL, "model": MODEL}]}).encode()

    async def serve(stream: anyio.abc.SocketStream) -> None:
        connection: anyio.abc.ByteStream = stream
        try:
            if tls is not None:
                from anyio.streams.tls import TLSStream

                connection = await TLSStream.wrap(stream, server_side=True, ssl_context=tls)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    buffer += await connection.receive()
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                server.request_lines.append(head.split(b"\r\n", 1)[0])
                await connection.send(_ok(tags))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except ssl.SSLError:
            pass
        finally:
            await anyio.aclose_forcefully(connection)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


@pytest.fixture
def no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_env_proxies")
async def test_tls_is_loaded_only_for_https(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain http never loads the CA bundle; the first https pool makes the shared,
    verified context once and later pools reuse it; an untrusted certificate fails."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    made: list[ssl.SSLContext] = []
    original = httpx.create_ssl_context

    def create_ssl_context(verify: object = True, **kwargs: object) -> ssl.SSLContext:
        if isinstance(verify, ssl.SSLContext):  # a context handed on as it is
            return verify
        context = ssl.create_default_context()
        ca.configure_trust(context)
        made.append(context)
        return context

    monkeypatch.setattr(_pools, "_shared_context", None)
    monkeypatch.setattr(httpx, "create_ssl_context", create_ssl_context)
    async with serving_tags() as plain, cortex(plain.url) as client:
        assert (await client.server_info()).up
    assert made == []
    async with serving_tags(tls=server_context) as secure:
        for _ in range(2):
            async with cortex(secure.url) as client:
                info = await client.server_info()
                assert info.up, info.error
    assert len(made) == 1
    monkeypatch.setattr(httpx, "create_ssl_context", original)
    monkeypatch.setattr(_pools, "_shared_context", None)
    async with serving_tags(tls=server_context) as secure, cortex(secure.url) as client:
        info = await client.server_info()
    assert not info.up
    assert info.error is not None
    assert "certificate" in info.error.lower()


async def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, requests to a server go to the proxy in absolute form."""
    async with serving_tags() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with AsyncCortex(["http://ollama.example:11434"], fallback=False) as client:
            info = await client.server_info()
    assert info.up
    assert info.models == (MODEL,)
    assert b"GET http://ollama.example:11434/api/tags HTTP/1.1" in proxy.request_lines


async def test_no_proxy_keeps_a_server_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server listed in NO_PROXY is reached directly."""
    async with serving_tags() as server:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with AsyncCortex([server.url], fallback=False) as client:
            assert (await client.server_info()).up
    assert b"GET /api/tags HTTP/1.1" in server.request_lines  # origin form: no proxy
