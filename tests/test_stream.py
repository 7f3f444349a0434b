"""AsyncStream against real servers: event order, live delivery, mid-stream failures, cleanup."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from aicortex import (
    AICortexError,
    AsyncCortex,
    CortexTimeoutError,
    EventType,
    ServerError,
    StreamConsumedError,
    StreamError,
    StreamEvent,
    Timeout,
    ToolCall,
    ValidationError,
)
from fakeollama import (
    FakeOllamaFactory,
    cut_after,
    error_after,
    ndjson_lines,
    reply,
    stall_after,
)

# What these tests pin down holds on every transport (see conftest.py).
EVERY_TRANSPORT = True

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=1.0, idle=1.0, probe=0.5)


def cortex(*servers: str, timeout: Timeout = QUICK) -> AsyncCortex:
    return AsyncCortex(list(servers), timeout=timeout, fallback=False)


async def collect(cortex_: AsyncCortex, **kwargs: object) -> list[StreamEvent]:
    stream = await cortex_.chat("hi", model=MODEL, stream=True, **kwargs)  # type: ignore[call-overload]
    async with stream:
        return [event async for event in stream]


async def test_a_stream_yields_start_tokens_and_end(fake_ollama: FakeOllamaFactory) -> None:
    """START, one TOKEN per chunk with its index, then END with stats; all name model and server."""
    server = fake_ollama(chat=reply(["Hel", "lo", "!"]))
    async with cortex(server.url) as client:
        events = await collect(client)
    assert [e.type for e in events] == [
        EventType.START,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.END,
    ]
    tokens = events[1:-1]
    assert [e.content for e in tokens] == ["Hel", "lo", "!"]
    assert [e.index for e in tokens] == [0, 1, 2]
    end = events[-1]
    assert end.done
    assert end.done_reason == "stop"
    assert end.stats is not None
    assert end.stats.completion_tokens == 3
    assert end.stats.tokens_per_second is not None
    assert all(e.model == MODEL and e.server == server.url for e in events)
    assert not any(e.done for e in events[:-1])


async def test_text_works_before_during_and_after_iteration(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """stream.text() returns the whole text whenever it is called."""
    server = fake_ollama(chat=reply(["a", "b", "c", "d"]))
    async with cortex(server.url) as client:
        before = await client.chat("hi", model=MODEL, stream=True)
        assert await before.text() == "abcd"
        during = await client.chat("hi", model=MODEL, stream=True)
        seen = [await during.__anext__(), await during.__anext__()]
        assert seen[1].content == "a"
        assert await during.text() == "abcd"
        after = await client.chat("hi", model=MODEL, stream=True)
        async for _ in after:
            pass
        assert await after.text() == "abcd"
        assert after.closed
    for stream in (before, during):
        assert stream.closed
        assert stream.stats is not None
        assert stream.stats.completion_tokens == 4
        assert stream.done_reason == "stop"
        with pytest.raises(StreamConsumedError, match=r"Call await stream\.text\(\)"):
            [event async for event in stream]  # text() read everything
        assert await stream.text() == "abcd"  # and can be asked again


async def test_events_arrive_as_the_server_produces_them(fake_ollama: FakeOllamaFactory) -> None:
    """The first token is delivered long before the answer is finished: nothing buffers."""
    server = fake_ollama(chat=reply(["t"] * 10, delay=0.15))
    async with cortex(server.url) as client:
        started = time.monotonic()
        stream = await client.chat("hi", model=MODEL, stream=True)
        async with stream:
            arrivals = [time.monotonic() - started async for e in stream if e.content]
    assert arrivals[0] < 0.6
    assert arrivals[-1] > 1.2
    assert arrivals[-1] - arrivals[0] > 1.0


async def test_a_stream_cut_midway_ends_with_an_error_event_and_the_partial_text(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """After the first token a cut is not retried: ERROR, then StreamError with the partial text."""
    cut = fake_ollama(chat=cut_after(["one ", "two ", "three"], 2))
    spare = fake_ollama(chat=reply("never used"))
    async with cortex(cut.url, spare.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        events: list[StreamEvent] = []
        with pytest.raises(StreamError) as info:
            async for event in stream:
                events.append(event)
    assert [e.type for e in events] == [
        EventType.START,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.ERROR,
    ]
    assert events[-1].error is not None
    assert "cut" in events[-1].error
    error = info.value
    assert error.partial_text == "one two "
    assert error.server == cut.url
    assert error.model == MODEL
    assert spare.count("/api/chat") == 0
    with pytest.raises(StreamError):
        await stream.text()


async def test_an_in_band_error_line_fails_the_stream(fake_ollama: FakeOllamaFactory) -> None:
    """Ollama's {"error": ...} line after chunks becomes ERROR + StreamError with its message."""
    server = fake_ollama(chat=error_after(["Yes", "."], 2, "an error was encountered"))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError, match="an error was encountered") as info:
            await stream.text()
    assert info.value.partial_text == "Yes."


async def test_the_documented_midstream_error_fixture_fails_the_stream(
    fake_ollama: FakeOllamaFactory, fixtures_dir: Path
) -> None:
    """The byte-exact fixture from Ollama's docs ends in StreamError with its partial text."""
    lines = (fixtures_dir / "ollama" / "stream-error-midstream.ndjson").read_bytes()
    server = fake_ollama(chat=ndjson_lines(lines.splitlines(keepends=True)))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError, match="running the model") as info:
            await stream.text()
    assert info.value.partial_text == " Yes.Ican"


async def test_a_body_that_ends_without_done_is_an_error(fake_ollama: FakeOllamaFactory) -> None:
    """A clean end of body without a done:true chunk still means the answer is incomplete."""
    line = b'{"model":"m","message":{"role":"assistant","content":"half"},"done":false}\n'
    server = fake_ollama(chat=ndjson_lines([line]))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError, match="without a final done chunk") as info:
            await stream.text()
    assert info.value.partial_text == "half"


async def test_garbage_after_the_first_token_is_a_stream_error(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A non-JSON line mid-stream ends the stream with StreamError."""
    good = b'{"model":"m","message":{"role":"assistant","content":"ok"},"done":false}\n'
    server = fake_ollama(chat=ndjson_lines([good, b"\x00\x01 garbage\n"]))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError, match="not JSON"):
            await stream.text()


async def test_an_idle_gap_longer_than_the_limit_fails_the_stream(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A server that goes silent mid-answer trips the idle timeout, a typed cause."""
    server = fake_ollama(chat=stall_after(["a", "b"], 2))
    timeout = Timeout(connect=1.0, first_token=5.0, idle=0.5, probe=0.5)
    async with cortex(server.url, timeout=timeout) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        started = time.monotonic()
        with pytest.raises(StreamError) as info:
            await stream.text()
    assert time.monotonic() - started < 2.0
    assert info.value.partial_text == "ab"
    cause = info.value.__cause__
    assert isinstance(cause, CortexTimeoutError)
    assert cause.phase == "idle"


async def test_a_slow_reader_is_not_an_idle_server(fake_ollama: FakeOllamaFactory) -> None:
    """The idle limit counts only time spent waiting for the server: a caller that
    pauses longer than it between events still gets the whole answer."""
    server = fake_ollama(chat=reply(["a", "b", "c"]))
    timeout = Timeout(connect=1.0, first_token=5.0, idle=0.3, probe=0.5)
    async with cortex(server.url, timeout=timeout) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        texts: list[str] = []
        async for event in stream:
            if event.type is EventType.TOKEN:
                texts.append(event.content or "")
                await anyio.sleep(0.5)
    assert "".join(texts) == "abc"


def _token_line(content: str, *, done: bool = False) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"model": MODEL, "message": message, "done": done}).encode() + b"\n"


_HUGE = 50 * 1024 * 1024  # a 50 MB line


async def test_a_line_over_the_limit_before_the_first_token_moves_on(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A 50 MB line is refused once 8 MiB of it has arrived, in linear time and without
    holding the rest; before the first token, the next server answers instead."""
    huge = fake_ollama(chat=ndjson_lines([b"x" * _HUGE]))
    good = fake_ollama(chat=reply("fine"))
    started = time.monotonic()
    async with cortex(huge.url) as client:
        with pytest.raises(ServerError, match="a line longer than 8,388,608 bytes"):
            await client.chat("hi", model=MODEL)
    async with cortex(huge.url, good.url) as client:
        assert await client.chat("hi", model=MODEL) == "fine"
    assert time.monotonic() - started < 5.0


async def test_a_line_over_the_limit_after_the_first_token_breaks_the_stream(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """After the first token a long line ends the stream with StreamError; the limit
    is max_line_size."""
    long_line = _token_line("y" * 5000)
    server = fake_ollama(chat=ndjson_lines([_token_line("a"), long_line]))
    client = AsyncCortex([server.url], timeout=QUICK, fallback=False, max_line_size=4096)
    async with client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError, match="longer than 4,096 bytes") as info:
            await stream.text()
    assert info.value.partial_text == "a"


def test_the_line_limit_must_be_a_positive_size() -> None:
    """A limit that is not a whole number of bytes >= 1 is refused by name."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValidationError, match="max_line_size must be a whole number"):
            AsyncCortex(max_line_size=bad)  # type: ignore[arg-type]


async def test_a_long_line_within_the_limit_is_read_in_linear_time(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A 40 MB token (one line over thousands of network reads) decodes in well under
    the seconds that re-copying the growing line at every read would take."""
    content = "z" * (40 * 1024 * 1024)
    server = fake_ollama(chat=ndjson_lines([_token_line(content), _token_line("", done=True)]))
    client = AsyncCortex(
        [server.url], timeout=Timeout(probe=1.0), fallback=False, max_line_size=64 << 20
    )
    started = time.monotonic()
    async with client:
        assert len(await client.chat("hi", model=MODEL)) == len(content)
    assert time.monotonic() - started < 3.0


async def test_a_failed_stream_gets_its_server_probed_not_dropped(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """One broken answer is not an outage: the server is probed, still answers, and
    the next call goes to it again rather than to the spare."""
    flaky = fake_ollama(chat=[cut_after(["x", "y"], 1), reply("fine")])
    spare = fake_ollama(chat=reply("spare"))
    async with cortex(flaky.url, spare.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError):
            await stream.text()
        probes = flaky.count("/api/tags")
        assert await client.chat("again", model=MODEL) == "fine"
        assert flaky.count("/api/tags") == probes + 1
    assert spare.count("/api/chat") == 0


async def test_thinking_and_tool_calls_are_typed_data(fake_ollama: FakeOllamaFactory) -> None:
    """Thinking arrives on TOKEN events and .thinking; tool calls as ToolCall objects."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    server = fake_ollama(
        chat=reply(["It is", " sunny"], thinking=["Let me", " check"], tool_calls=[call])
    )
    async with cortex(server.url) as client:
        stream = await client.chat("weather?", model=MODEL, stream=True, think=True)
        async with stream:
            events = [e async for e in stream]
    thinking = [e.thinking for e in events if e.thinking]
    assert thinking == ["Let me", " check"]
    calls = [c for e in events for c in e.tool_calls]
    assert calls == [ToolCall(name="get_weather", arguments={"city": "Tokyo"})]
    assert stream.thinking == "Let me check"
    assert stream.tool_calls == calls
    assert await stream.text() == "It is sunny"


async def test_the_documented_tool_call_stream_surfaces_the_call(
    fake_ollama: FakeOllamaFactory, fixtures_dir: Path
) -> None:
    """Ollama's streamed tool-call example yields one TOKEN carrying the ToolCall."""
    lines = (fixtures_dir / "ollama" / "chat-tools-stream.ndjson").read_bytes()
    server = fake_ollama(chat=ndjson_lines(lines.splitlines(keepends=True)))
    async with cortex(server.url) as client:
        events = await collect(client)
    (token,) = [e for e in events if e.type is EventType.TOKEN]
    assert token.content == ""
    assert token.tool_calls == (ToolCall(name="get_weather", arguments={"city": "Tokyo"}),)
    assert events[-1].stats is not None
    assert events[-1].stats.completion_tokens == 15


async def test_text_on_the_final_chunk_is_not_lost(
    fake_ollama: FakeOllamaFactory, fixtures_dir: Path
) -> None:
    """A done:true chunk that carries text yields that TOKEN before END."""
    lines = (fixtures_dir / "ollama" / "generate-stream-gemma4.ndjson").read_bytes()
    server = fake_ollama(chat=ndjson_lines(lines.splitlines(keepends=True)))
    async with cortex(server.url) as client:
        events = await collect(client)
    assert events[-1].type is EventType.END
    assert events[-2].type is EventType.TOKEN
    assert events[-2].content == "!"
    assert events[-1].done_reason == "stop"


async def test_the_documented_chat_stream_decodes(
    fake_ollama: FakeOllamaFactory, fixtures_dir: Path
) -> None:
    """Ollama's streamed chat example gives its token and the final stats."""
    lines = (fixtures_dir / "ollama" / "chat-stream.ndjson").read_bytes()
    server = fake_ollama(chat=ndjson_lines(lines.splitlines(keepends=True)))
    async with cortex(server.url) as client:
        events = await collect(client)
    assert [e.content for e in events if e.type is EventType.TOKEN] == ["The"]
    end = events[-1]
    assert end.stats is not None
    assert end.stats.completion_tokens == 282
    assert end.stats.eval_duration == 4535599000


async def test_closing_a_stream_early_disconnects_from_the_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """aclose() (or leaving `async with`) closes the connection now; the server sees it."""
    server = fake_ollama(chat=reply(["t"] * 100, delay=0.05))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        async with stream:
            async for event in stream:
                if event.type is EventType.TOKEN:
                    break
        assert stream.closed
        assert await anyio.to_thread.run_sync(server.wait_for_disconnect, 1.0)
        with pytest.raises(StreamError, match="closed before it finished"):
            await stream.text()
        # The client is still fine afterwards.
        server.chat = reply("again")
        assert await client.chat("hi", model=MODEL) == "again"


async def test_a_stream_dropped_unclosed_warns_and_disconnects_at_once(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """An AsyncStream left by `break` and dropped, without aclose() or `async with`,
    warns like an unclosed file and closes its connection: the server sees the
    disconnect within a second, and the connection slot is free again."""
    server = fake_ollama(chat=[reply(["t"] * 200, delay=0.05), reply("next")])
    client = AsyncCortex([server.url], timeout=QUICK, fallback=False, max_connections=1)
    async with client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        async for event in stream:
            if event.type is EventType.TOKEN:
                break
        with pytest.warns(ResourceWarning, match="unclosed <AsyncStream"):
            del stream  # no reference cycle: collected at once
        assert await anyio.to_thread.run_sync(server.wait_for_disconnect, 1.0)
        assert await client.chat("hi", model=MODEL) == "next"


async def test_a_finished_stream_gives_its_connection_back(fake_ollama: FakeOllamaFactory) -> None:
    """Reading a stream to the end leaves the connection reusable by the next call."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        await collect(client)
        before = server.connections
        for _ in range(3):
            await collect(client)
        assert server.connections == before


async def test_iterating_after_the_end_stops_again(fake_ollama: FakeOllamaFactory) -> None:
    """A finished stream keeps raising StopAsyncIteration."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        async for _ in stream:
            pass
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()


async def test_iterating_a_finished_stream_again_says_to_call_text(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A second `async for` over a finished stream raises, instead of yielding nothing."""
    server = fake_ollama(chat=reply(["ab", "cd"]))
    async with cortex(server.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        first = [event.type async for event in stream]
        assert first[-1] is EventType.END
        with pytest.raises(StreamConsumedError, match="already been read to its end") as info:
            async for _ in stream:
                pass
        assert isinstance(info.value, AICortexError)
        assert "start a new chat" in str(info.value)
        assert await stream.text() == "abcd"


async def test_iterating_a_stream_closed_early_again_says_it_was_closed(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(chat=reply(["ab", "cd", "ef"], delay=0.05))
    async with cortex(server.url) as client:
        async with await client.chat("hi", model=MODEL, stream=True) as stream:
            async for event in stream:
                if event.type is EventType.TOKEN:
                    break
        with pytest.raises(StreamConsumedError, match="closed before its end"):
            async for _ in stream:
                pass
        assert stream.partial_text == "ab"
