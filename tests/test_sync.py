"""The blocking twin, `Cortex` and `Stream`, against fake Ollama servers on 127.0.0.1.

Each test proves one trap of a sync shim over an async core is handled (see STYLE.md):
one portal per client, calls from a thread that runs a loop, streams that close at once,
errors that keep their types across the thread hop, and Ctrl-C that cancels the request.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import pytest

from aicortex import (
    Cortex,
    EventType,
    ModelNotFoundError,
    Server,
    ServerError,
    Stream,
    StreamConsumedError,
    StreamError,
    StreamEvent,
    Timeout,
)
from fakeollama import (
    Exchange,
    FakeOllamaFactory,
    Script,
    cut_after,
    delayed,
    ndjson_lines,
    refused_url,
    reply,
    stall_after,
)

MODEL = "llama3.2:3b"
FAST = Timeout(connect=1, first_token=2, idle=2, probe=1)
MANY = [f"t{i} " for i in range(60)]  # 60 tokens: 3 s at delay=0.05, 12 s at delay=0.2

START, TOKEN, END, ERROR = EventType.START, EventType.TOKEN, EventType.END, EventType.ERROR

CortexFactory = Callable[..., Cortex]


@pytest.fixture
def cortex() -> Iterator[CortexFactory]:
    """Make `Cortex(servers=[...], fallback=False)` with short timeouts; closed at teardown."""
    made: list[Cortex] = []

    def make(*servers: str | Server, **kwargs: Any) -> Cortex:
        kwargs.setdefault("timeout", FAST)
        client = Cortex(servers=list(servers), fallback=False, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aicortex-portal"]


@contextmanager
def ctrl_c_after(seconds: float) -> Iterator[None]:
    """Deliver a real SIGINT to the main thread after `seconds`, as Ctrl-C would.

    `_thread.interrupt_main()` only sets a flag, which a thread blocked on a lock does not
    see until the lock is released; a real signal interrupts the wait, like a terminal does.
    """
    assert threading.current_thread() is threading.main_thread()
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


class Echo(Script):
    """Answer with the last user message followed by "!", slowly enough to overlap."""

    async def run(self, exchange: Exchange) -> None:
        content = exchange.body["messages"][-1]["content"]
        await reply([content, "!"], delay=0.05).run(exchange)


# -- answers and streams ------------------------------------------------------------------


def test_chat_returns_the_joined_tokens_of_one_streamed_request(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """A blocking chat() sends one streamed POST /api/chat and returns the joined tokens."""
    server = fake_ollama(chat=reply(["Hel", "lo", "!"]))
    assert cortex(server.url).chat("hi", model=MODEL) == "Hello!"
    chats = [r for r in server.requests if r.path == "/api/chat"]
    assert len(chats) == 1
    assert chats[0].method == "POST"
    assert chats[0].json["stream"] is True
    assert chats[0].json["model"] == MODEL
    assert chats[0].json["messages"] == [{"role": "user", "content": "hi"}]


def test_a_stream_yields_start_tokens_and_end_naming_model_and_server(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """chat(stream=True) returns a Stream of START, indexed TOKENs and END with stats."""
    server = fake_ollama(chat=reply(["Hel", "lo", "!"]))
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    assert isinstance(stream, Stream)
    events = list(stream)
    assert [e.type for e in events] == [START, TOKEN, TOKEN, TOKEN, END]
    tokens = events[1:-1]
    assert [e.content for e in tokens] == ["Hel", "lo", "!"]
    assert [e.index for e in tokens] == [0, 1, 2]
    end = events[-1]
    assert end.done is True
    assert end.done_reason == "stop"
    assert end.stats is not None
    assert end.stats.completion_tokens == 3
    assert {(e.model, e.server) for e in events} == {(MODEL, server.url)}
    assert (stream.model, stream.server, stream.done_reason) == (MODEL, server.url, "stop")


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_stream_text_is_the_whole_text_before_during_and_after_iterating(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory, when: str
) -> None:
    """Stream.text() returns the full text whenever it is called."""
    server = fake_ollama(chat=reply(["Hel", "lo", " there", "!"]))
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    if when == "during":
        assert next(stream).type is START
        assert next(stream).content == "Hel"
    elif when == "after":
        assert len(list(stream)) == 6
    assert stream.text() == "Hello there!"
    assert stream.text() == "Hello there!"  # and again


def test_iterating_a_consumed_stream_again_raises(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """Iterating a second time raises StreamConsumedError, whether the stream ended, was
    read by text(), or was left with a break; text() still has the whole answer."""
    server = fake_ollama(chat=reply(["Hel", "lo"]))
    client = cortex(server.url)
    ended = client.chat("hi", model=MODEL, stream=True)
    assert [event.type for event in ended][-1] is EventType.END
    with pytest.raises(StreamConsumedError, match=r"Call stream\.text\(\)"):
        for _ in ended:
            pass
    assert ended.text() == "Hello"
    read = client.chat("hi", model=MODEL, stream=True)
    assert read.text() == "Hello"
    with pytest.raises(StreamConsumedError, match="already been read to its end"):
        list(read)
    left = client.chat("hi", model=MODEL, stream=True)
    for _ in left:
        break
    with pytest.raises(StreamConsumedError, match="closed before its end"):
        next(iter(left))


def test_events_arrive_as_they_are_produced_not_buffered(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """Each TOKEN reaches the caller when the server sends it, not when the reply ends."""
    # Six chunks (five tokens and the final one), 0.3 s apart: the reply takes >= 1.8 s.
    server = fake_ollama(chat=reply(["a", "b", "c", "d", "e"], delay=0.3))
    client = cortex(server.url)
    started = time.monotonic()
    arrivals: list[float] = []
    for event in client.chat("hi", model=MODEL, stream=True):
        if event.type is TOKEN:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    assert arrivals[0] < 1.0, arrivals  # the first token did not wait for the rest
    assert arrivals[-1] - arrivals[0] > 0.8, arrivals  # later tokens came later


# -- leaving a stream early ---------------------------------------------------------------


def leave_by_break(stream: Stream) -> None:
    for event in stream:
        if event.type is TOKEN:
            break


def leave_by_close(stream: Stream) -> None:
    assert next(stream).type is START
    assert next(stream).type is TOKEN
    stream.close()


def leave_by_with(stream: Stream) -> None:
    with stream:
        assert next(stream).type is START
        assert next(stream).type is TOKEN


@pytest.mark.parametrize(
    "leave",
    [leave_by_break, leave_by_close, leave_by_with],
    ids=["break", "close", "with"],
)
def test_leaving_a_stream_early_disconnects_from_the_server_at_once(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory, leave: Callable[[Stream], None]
) -> None:
    """break, close() and the end of a with block close the connection now, not at GC."""
    server = fake_ollama(chat=[reply(MANY, delay=0.05), reply(["again"])])
    client = cortex(server.url)
    stream = client.chat("hi", model=MODEL, stream=True)
    left = time.monotonic()
    leave(stream)
    assert server.wait_for_disconnect(2.0)
    assert time.monotonic() - left < 1.0
    assert client.chat("hi", model=MODEL) == "again"  # the Cortex is still usable


def test_close_inside_the_loop_ends_it_even_with_events_already_received(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """Events arrive in batches; close() in the loop's body still ends the loop at once."""
    line = b'{"message": {"role": "assistant", "content": "t"}, "done": false}\n'
    server = fake_ollama(chat=ndjson_lines([line * 2000]))  # one chunk: one large batch
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    after_close: list[StreamEvent] = []
    closed = False
    for event in stream:
        if closed:
            after_close.append(event)
        elif event.type is EventType.TOKEN:
            stream.close()
            closed = True
    assert closed
    assert after_close == []


def test_a_stream_dropped_unclosed_warns_disconnects_and_is_collected(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """A Stream dropped mid-answer warns like an unclosed file, is garbage-collected,
    and its connection closes: the server sees the disconnect within a second."""
    server = fake_ollama(chat=reply(["t"] * 200, delay=0.05))
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    assert next(stream).type is EventType.START  # next(), not a for loop that would close it
    alive = weakref.ref(stream)
    with pytest.warns(ResourceWarning, match="unclosed <Stream"):
        del stream  # no reference cycle: collected at once
    assert alive() is None
    assert server.wait_for_disconnect(1.0)


def test_a_slow_reader_bounds_the_read_ahead_and_then_gets_every_event(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """The loop reads at most about 8,192 events ahead of a reader that stops; once the
    reader goes on, the loop is woken and every event arrives."""
    line = b'{"message": {"role": "assistant", "content": "t"}, "done": false}\n'
    done = b'{"message": {"role": "assistant", "content": ""}, "done": true}\n'
    server = fake_ollama(chat=ndjson_lines([line * 30_000, done]))
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    assert next(stream).type is EventType.START
    time.sleep(0.5)  # the reader pauses; the loop runs on only as far as it may
    assert 8_192 <= len(stream.partial_text) < 12_000
    tokens: list[int] = []

    def read_the_rest() -> None:
        tokens.append(sum(1 for event in stream if event.type is EventType.TOKEN))

    reader = threading.Thread(target=read_the_rest)
    reader.start()
    reader.join(10)
    assert tokens == [30_000]


# -- failover and errors ------------------------------------------------------------------


def test_failover_moves_past_a_refused_server(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """The blocking API fails over from a refused server to the next one."""
    server = fake_ollama()
    client = cortex(refused_url(), server.url)
    assert client.chat("hi", model=MODEL) == "Hello!"
    stream = client.chat("hi", model=MODEL, stream=True)
    assert stream.server == server.url
    assert stream.text() == "Hello!"


def test_an_unknown_model_raises_model_not_found_from_chat(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """ModelNotFoundError crosses the thread hop with its type and facts."""
    server = fake_ollama(models=[MODEL])
    with pytest.raises(ModelNotFoundError) as info:
        cortex(server.url).chat("hi", model="no-such-model:1b")
    assert type(info.value) is ModelNotFoundError
    assert info.value.model == "no-such-model:1b"
    assert info.value.servers == [server.url]


def test_an_unknown_model_raises_from_chat_stream_before_iterating(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """chat(stream=True) itself raises ModelNotFoundError; no Stream is handed out."""
    server = fake_ollama(models=[MODEL])
    client = cortex(server.url)
    with pytest.raises(ModelNotFoundError) as info:
        client.chat("hi", model="no-such-model:1b", stream=True)
    assert type(info.value) is ModelNotFoundError
    assert client.chat("hi", model=MODEL) == "Hello!"


def test_a_stream_cut_midway_yields_error_then_raises_stream_error(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """A cut after two tokens gives an ERROR event, then StreamError with the partial text."""
    server = fake_ollama(chat=cut_after(["one ", "two ", "three ", "four "], 2))
    stream = cortex(server.url).chat("hi", model=MODEL, stream=True)
    events: list[StreamEvent] = []
    with pytest.raises(StreamError) as info:
        for event in stream:
            events.append(event)
    assert [e.type for e in events] == [START, TOKEN, TOKEN, ERROR]
    assert type(info.value) is StreamError
    assert info.value.partial_text == "one two "
    assert info.value.server == server.url
    with pytest.raises(StreamError):
        stream.text()


def test_all_servers_down_raises_server_error_listing_each(cortex: CortexFactory) -> None:
    """With every server refusing, ServerError names each one and why."""
    first, second = refused_url(), refused_url()
    with pytest.raises(ServerError) as info:
        cortex(first, second).chat("hi", model=MODEL)
    assert type(info.value) is ServerError
    assert info.value.servers == [first, second]
    assert first in str(info.value)
    assert second in str(info.value)


# -- threads and event loops --------------------------------------------------------------


def test_blocking_chat_works_inside_a_running_event_loop(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """Called from a coroutine (as in a notebook), chat() and streams still work."""
    server = fake_ollama()
    client = cortex(server.url)

    async def main() -> tuple[str, list[EventType]]:
        text = client.chat("hi", model=MODEL)
        events = [e.type for e in client.chat("hi", model=MODEL, stream=True)]
        return text, events

    text, events = asyncio.run(main())
    assert text == "Hello!"
    assert events == [START, TOKEN, TOKEN, END]


def test_one_cortex_serves_many_threads_at_once(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """Eight threads chatting concurrently on one Cortex each get their own answer."""
    server = fake_ollama(chat=Echo())
    client = cortex(server.url)
    client.chat("warm up", model=MODEL)
    barrier = threading.Barrier(8)

    def ask(i: int) -> str:
        barrier.wait(timeout=5)
        return client.chat(f"prompt {i}", model=MODEL)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8), timeout=10))
    assert answers == [f"prompt {i}!" for i in range(8)]


# -- Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_during_chat_cancels_the_request(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """KeyboardInterrupt in a blocking chat() reaches the caller and closes the connection."""
    server = fake_ollama(chat=[reply(MANY, delay=0.2), reply(["after"])])
    client = cortex(server.url)
    started = time.monotonic()
    with ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
        client.chat("hi", model=MODEL)
    assert time.monotonic() - started < 2.0  # interrupted, not after the 12 s reply
    assert server.wait_for_disconnect(1.0)
    assert client.chat("hi", model=MODEL) == "after"


def test_ctrl_c_while_iterating_a_stream_closes_it(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """KeyboardInterrupt while waiting for the next event closes the stream's connection."""
    server = fake_ollama(chat=[reply(MANY, delay=0.2), reply(["after"])])
    client = cortex(server.url)
    stream = client.chat("hi", model=MODEL, stream=True)
    started = time.monotonic()
    seen: list[StreamEvent] = []
    with ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
        for event in stream:
            seen.append(event)
    assert time.monotonic() - started < 2.0
    assert 1 <= len(seen) < len(MANY)
    assert server.wait_for_disconnect(1.0)
    with pytest.raises(StreamConsumedError, match="closed before its end"):
        list(stream)  # the stream is over
    assert client.chat("hi", model=MODEL) == "after"


def test_ctrl_c_while_a_stream_waits_for_its_first_token_cancels_the_request(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """KeyboardInterrupt in chat(stream=True), before the first token, closes the connection."""
    # The model "loads" for 3 s; first_token=5 so no timeout closes the connection for us.
    server = fake_ollama(chat=[delayed(3.0, reply(MANY, delay=0.05)), reply(["after"])])
    client = cortex(server.url, timeout=Timeout(connect=1, first_token=5, idle=2, probe=1))
    started = time.monotonic()
    with ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
        client.chat("hi", model=MODEL, stream=True)
    assert time.monotonic() - started < 2.0
    assert server.wait_for_disconnect(1.0)
    assert client.chat("hi", model=MODEL) == "after"


# -- lifecycle ----------------------------------------------------------------------------


def test_consecutive_chats_reuse_the_pooled_connection(
    fake_ollama: FakeOllamaFactory, cortex: CortexFactory
) -> None:
    """One portal (and one pool) lives as long as the Cortex: a second chat opens no socket."""
    server = fake_ollama()
    client = cortex(server.url)
    assert client.chat("hi", model=MODEL) == "Hello!"
    threads = portal_threads()
    before = server.connections
    assert client.chat("hi", model=MODEL) == "Hello!"
    assert "".join(e.content or "" for e in client.chat("hi", model=MODEL, stream=True)) == (
        "Hello!"
    )
    assert server.connections == before
    assert portal_threads() == threads


def test_close_is_idempotent_and_stops_the_portal_thread(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """close() stops the background loop; a second close() is harmless."""
    server = fake_ollama()
    threads = set(portal_threads())
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST)
    assert len(set(portal_threads()) - threads) == 1
    assert client.chat("hi", model=MODEL) == "Hello!"
    assert not client.closed
    client.close()
    client.close()
    assert client.closed
    assert set(portal_threads()) <= threads


def test_a_cortex_dropped_unclosed_is_closed_when_collected(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Its connections are closed (the server sees them go) and its loop thread stops."""
    server = fake_ollama()
    threads = set(portal_threads())
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST)
    assert client.chat("hi", model=MODEL) == "Hello!"
    open_connections = server._writers  # pyright: ignore[reportPrivateUsage]
    assert open_connections  # kept alive in the pool
    del client
    gc.collect()
    assert set(portal_threads()) <= threads
    deadline = time.monotonic() + 2
    while open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not open_connections


def test_a_closed_cortex_refuses_to_work(fake_ollama: FakeOllamaFactory) -> None:
    """Every call on a closed Cortex raises RuntimeError saying it is closed."""
    server = fake_ollama()
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.chat("hi", model=MODEL)
    with pytest.raises(RuntimeError, match="closed"):
        client.chat("hi", model=MODEL, stream=True)
    with pytest.raises(RuntimeError, match="closed"):
        client.server_info(server_url=server.url)
    assert server.count("/api/chat") == 0


def test_a_with_block_closes_the_cortex(fake_ollama: FakeOllamaFactory) -> None:
    """Leaving `with Cortex(...)` closes it."""
    server = fake_ollama()
    with Cortex(servers=[server.url], fallback=False, timeout=FAST) as client:
        assert client.chat("hi", model=MODEL) == "Hello!"
    assert client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.chat("hi", model=MODEL)


def test_the_trio_backend_works_too(fake_ollama: FakeOllamaFactory, cortex: CortexFactory) -> None:
    """Cortex(backend="trio") chats, streams and closes streams early."""
    server = fake_ollama(chat=[reply(["Hel", "lo"]), reply(MANY, delay=0.05), reply(["ok"])])
    client = cortex(server.url, backend="trio")
    assert client.chat("hi", model=MODEL) == "Hello"
    with client.chat("hi", model=MODEL, stream=True) as stream:
        assert next(stream).type is START
        assert next(stream).type is TOKEN
    assert server.wait_for_disconnect(1.0)
    assert [e.type for e in client.chat("hi", model=MODEL, stream=True)] == [START, TOKEN, END]


# -- a stream that outlives its Cortex ----------------------------------------------------


def read_in_thread(stream: Stream, timeout: float = 5.0) -> dict[str, Any]:
    """Read the rest of `stream` in a daemon thread; fail the test if that hangs."""
    result: dict[str, Any] = {"events": []}

    def read() -> None:
        try:
            for event in stream:
                result["events"].append(event.type)
        except BaseException as exc:
            result["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "reading the stream hung"
    return result


def wait_for_partial_text(stream: Stream, text: str, timeout: float = 2.0) -> None:
    """Wait until the stream's background reader has received `text`."""
    deadline = time.monotonic() + timeout
    while stream.partial_text != text:
        assert time.monotonic() < deadline, f"received only {stream.partial_text!r}"
        time.sleep(0.01)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stream_left_unread_ends_when_its_cortex_closes(
    fake_ollama: FakeOllamaFactory, backend: Literal["asyncio", "trio"]
) -> None:
    """Closing the Cortex under an unread, stalled stream ends it with StreamError; no hang."""
    server = fake_ollama(chat=stall_after(["one ", "two ", "three "], 2))
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST, backend=backend)
    stream = client.chat("hi", model=MODEL, stream=True)
    assert next(stream).type is START
    wait_for_partial_text(stream, "one two ")  # both tokens are read ahead, none taken
    client.close()
    result = read_in_thread(stream)
    assert isinstance(result.get("error"), StreamError)
    assert result["error"].partial_text == "one two "
    assert result["events"][:2] == [TOKEN, TOKEN]
    assert server.wait_for_disconnect(1.0)


def test_a_reader_blocked_on_a_stream_wakes_when_the_cortex_closes(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A thread waiting for the next event is released by close() from another thread."""
    server = fake_ollama(chat=stall_after(["one ", "two "], 1))
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST)
    stream = client.chat("hi", model=MODEL, stream=True)
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["events"] = [e.type for e in stream]
        except BaseException as exc:
            result["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.2)  # the reader is now waiting for a token that never comes
    assert reader.is_alive()
    client.close()
    reader.join(5.0)
    assert not reader.is_alive(), "the reader hung after close()"
    assert isinstance(result.get("error"), StreamError)


def test_closing_the_cortex_under_a_stream_says_so(fake_ollama: FakeOllamaFactory) -> None:
    """The StreamError of a stream cut by Cortex.close() blames the close, not the server."""
    server = fake_ollama(chat=stall_after(["one ", "two "], 2))
    client = Cortex(servers=[server.url], fallback=False, timeout=FAST)
    stream = client.chat("hi", model=MODEL, stream=True)
    wait_for_partial_text(stream, "one two ")
    client.close()
    result = read_in_thread(stream)
    error = result.get("error")
    assert isinstance(error, StreamError)
    assert "closed" in str(error)
    assert ERROR not in result["events"]  # the server did not fail


def test_a_finished_stream_keeps_its_text_after_the_cortex_closes(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """text() of a stream read to its end needs no loop: it works after close()."""
    server = fake_ollama(chat=reply(["Hel", "lo"]))
    with Cortex(servers=[server.url], fallback=False, timeout=FAST) as client:
        stream = client.chat("hi", model=MODEL, stream=True)
        assert [e.type for e in stream] == [START, TOKEN, TOKEN, END]
    assert stream.partial_text == "Hello"
    assert stream.text() == "Hello"


def test_the_blocking_twin_routes_and_reports_states_like_the_async_one(
    cortex: CortexFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """routing=, Server entries, affinity= and server_states() work the same blocking."""
    servers = [fake_ollama() for _ in range(3)]
    client = cortex(
        servers[0].url,
        Server(servers[1].url, weight=2),
        servers[2].url,
        routing="round_robin",
    )
    assert client.routing == "round_robin"
    for _ in range(4):
        client.chat("hi", model=MODEL)
    assert [s.count("/api/chat") for s in servers] == [1, 2, 1]
    with client.chat("hi", model=MODEL, stream=True, affinity="conversation-7") as first:
        first.text()
    with client.chat("hi", model=MODEL, stream=True, affinity="conversation-7") as again:
        again.text()
    assert again.server == first.server
    states = client.server_states()
    assert [s.url for s in states] == [s.url for s in servers]
    assert all(s.state == "healthy" and s.in_flight == 0 for s in states)
    assert states[1].weight == 2


def test_an_unknown_keyword_argument_fails_at_once_even_for_a_stream(
    cortex: CortexFactory,
) -> None:
    client = cortex("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sytem'"):
        client.chat("hi", model=MODEL, stream=True, sytem="x")  # type: ignore[call-overload]
