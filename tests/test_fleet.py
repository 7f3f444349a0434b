"""A fleet against real loopback servers: attribution, ejection and recovery, panic mode,
busy backoff, balancing, affinity, limits and the states a client reports."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

import anyio
import pytest

from aicortex import AsyncCortex, Server, ServerError, StreamError, Timeout
from aicortex._routing import Strategy
from fakeollama import (
    Exchange,
    FakeOllamaFactory,
    Script,
    busy,
    cut_after,
    error_after,
    refused_url,
    reply,
    stall_after,
    status,
)

MODEL = "llama3.2:3b"
OTHER = "qwen2.5:7b"
QUICK = Timeout(connect=1.0, first_token=1.0, idle=2.0, probe=0.5)


class PerModel(Script):
    """A script for each model; the server's default answer for the others."""

    def __init__(self, scripts: Mapping[str, Script], default: Script | None = None) -> None:
        self.scripts = dict(scripts)
        self.default = default or reply("fine")

    async def run(self, exchange: Exchange) -> None:
        await self.scripts.get(exchange.model, self.default).run(exchange)


def cortex(
    *servers: str | Server,
    routing: Strategy = "priority",
    timeout: Timeout = QUICK,
    **kwargs: object,
) -> AsyncCortex:
    return AsyncCortex(
        list(servers),
        routing=routing,
        timeout=timeout,
        fallback=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def fast_ejections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ejections of 0.1 s, 0.2 s, 0.4 s ... so that recovery fits in a test."""
    monkeypatch.setattr("aicortex._routing.EJECT_FIRST", 0.1)


# -- attribution -----------------------------------------------------------------


@pytest.mark.parametrize(
    "broken", [cut_after(["x", "y"], 1), error_after(["x"], 1)], ids=["cut", "error-line"]
)
async def test_one_broken_answer_does_not_stop_the_servers_other_models(
    fake_ollama: FakeOllamaFactory, broken: Script
) -> None:
    """A stream that breaks mid-answer gets the server probed, and since it answers, a
    chat for another model goes through at once."""
    server = fake_ollama(models=[MODEL, OTHER], chat=PerModel({MODEL: broken}))
    spare = fake_ollama(models=[MODEL, OTHER], chat=reply("spare"))
    async with cortex(server.url, spare.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        with pytest.raises(StreamError):
            await stream.text()
        probes = server.count("/api/tags")
        started = time.monotonic()
        assert await client.chat("hi", model=OTHER) == "fine"  # not the spare
        assert time.monotonic() - started < 0.5
        assert server.count("/api/tags") == probes + 1  # the attribution probe
        state = client.server_states()[0]
        assert state.state == "healthy"
        assert state.ejected_models == {}


async def test_three_broken_answers_eject_that_model_on_that_server_only(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """The fourth chat for the model fails fast without reaching the server; the
    server's other models still work."""
    server = fake_ollama(models=[MODEL, OTHER], chat=PerModel({MODEL: cut_after(["x"], 1)}))
    async with cortex(server.url) as client:
        for _ in range(3):
            stream = await client.chat("hi", model=MODEL, stream=True)
            with pytest.raises(StreamError):
                await stream.text()
        chats = server.count("/api/chat")
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
        assert time.monotonic() - started < 0.5
        assert server.count("/api/chat") == chats
        [attempt] = info.value.attempts
        assert attempt.kind == "ejected"
        assert "3 times in a row" in attempt.reason
        assert await client.chat("hi", model=OTHER) == "fine"
        [state] = client.server_states()
        assert state.state == "healthy"
        assert set(state.ejected_models) == {MODEL}


async def test_a_model_ejected_on_one_server_fails_over_to_the_next(
    fake_ollama: FakeOllamaFactory,
) -> None:
    flaky = fake_ollama(models=[MODEL, OTHER], chat=PerModel({MODEL: cut_after(["x"], 1)}))
    spare = fake_ollama(models=[MODEL, OTHER], chat=reply("spare"))
    async with cortex(flaky.url, spare.url) as client:
        for _ in range(3):
            stream = await client.chat("hi", model=MODEL, stream=True)
            assert stream.server == flaky.url
            with pytest.raises(StreamError):
                await stream.text()
        assert await client.chat("hi", model=MODEL) == "spare"
        assert await client.chat("hi", model=OTHER) == "fine"  # still the first server


async def test_a_broken_answer_from_a_server_that_died_ejects_the_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """If the probe after a broken answer finds nothing, the server is ejected, and the
    next request goes elsewhere without trying it."""
    dying = fake_ollama(chat=cut_after(["x"], 1))
    spare = fake_ollama(chat=reply("spare"))
    async with cortex(dying.url, spare.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        dying.stop()
        with pytest.raises(StreamError):
            await stream.text()
        assert await client.chat("hi", model=MODEL) == "spare"
        states = {s.url: s for s in client.server_states()}
        assert states[dying.url].state == "ejected"
        assert states[dying.url].retry_in is not None


async def test_a_500_counts_against_the_model_not_the_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    crash = status(500, {"error": "llama runner process has terminated: exit status 2"})
    server = fake_ollama(models=[MODEL, OTHER], chat=PerModel({MODEL: crash}))
    async with cortex(server.url) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
        assert "llama runner process has terminated" in str(info.value)
        assert "could not serve" in str(info.value)
        assert "Start Ollama" not in str(info.value)
        assert info.value.attempts[0].kind == "failed"
        assert await client.chat("hi", model=OTHER) == "fine"


# -- ejection and recovery ---------------------------------------------------------


async def test_a_refused_server_gets_traffic_again_within_its_ejection_and_one_probe(
    fake_ollama: FakeOllamaFactory, fast_ejections: None
) -> None:
    """Refused three times (ejections of 0.1, 0.2 and 0.4 s), then restarted: traffic
    returns once the ejection ends and one probe answers; no request failed meanwhile."""
    primary = fake_ollama(chat=reply("primary"))
    spare = fake_ollama(chat=reply("spare"))
    async with cortex(primary.url, spare.url) as client:
        assert await client.chat("hi", model=MODEL) == "primary"
        primary.stop()
        ejections = 0
        while ejections < 3:
            assert await client.chat("hi", model=MODEL) == "spare"
            states = {s.url: s for s in client.server_states()}
            ejections = states[primary.url].ejections
            await anyio.sleep(0.02)
        restarted = time.monotonic()
        primary.start()
        left = client.server_states()[0].retry_in or 0.0
        while (answer := await client.chat("hi", model=MODEL)) != "primary":
            assert answer == "spare"
            assert time.monotonic() - restarted < left + 0.5, "no traffic after the ejection"
            await anyio.sleep(0.01)
        assert time.monotonic() - restarted <= left + 0.5


async def test_a_server_back_from_ejection_is_probed_before_traffic_returns(
    fake_ollama: FakeOllamaFactory, fast_ejections: None
) -> None:
    """No user request pays for testing a server that is still dead: while the primary
    stays down, no chat is ever sent to it, and its probes run alongside."""
    primary = fake_ollama(chat=reply("primary"))
    spare = fake_ollama(chat=reply("spare"))
    async with cortex(primary.url, spare.url) as client:
        await client.chat("hi", model=MODEL)
        primary.stop()
        for _ in range(15):
            started = time.monotonic()
            assert await client.chat("hi", model=MODEL) == "spare"
            assert time.monotonic() - started < 0.3
            await anyio.sleep(0.03)
    assert primary.count("/api/chat") == 1


async def test_requests_do_not_wait_for_the_probe_of_a_server_back_from_ejection(
    fake_ollama: FakeOllamaFactory, fast_ejections: None
) -> None:
    """The probe that decides whether an ejected server may return runs beside the
    requests: with that probe taking half a second, no chat takes that long."""
    failing = fake_ollama(chat=status(502, "bad gateway"), probe_delay=0.0)
    spare = fake_ollama(chat=reply("spare"))
    async with cortex(failing.url, spare.url, timeout=Timeout(probe=2.0)) as client:
        for _ in range(3):  # three 502s in a row eject it
            assert await client.chat("hi", model=MODEL) == "spare"
        assert client.server_states()[0].state == "ejected"
        failing.probe_delay = 0.5
        for _ in range(20):
            started = time.monotonic()
            assert await client.chat("hi", model=MODEL) == "spare"
            assert time.monotonic() - started < 0.3
            await anyio.sleep(0.02)


async def test_with_every_server_ejected_a_chat_still_contacts_them(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Panic mode: nothing is refused from memory alone. Both servers are ejected (for a
    second), come back, and the next chat reaches them at once."""
    first = fake_ollama(chat=reply("first"))
    second = fake_ollama(chat=reply("second"))
    async with cortex(first.url, second.url) as client:
        await client.chat("hi", model=MODEL)
        first.stop()
        second.stop()
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
        assert {a.kind for a in info.value.attempts} == {"unreachable"}, info.value.attempts
        # A server that hung up is probed in the background: give that probe a moment.
        for _ in range(100):
            if {s.state for s in client.server_states()} == {"ejected"}:
                break
            await anyio.sleep(0.01)
        assert {s.state for s in client.server_states()} == {"ejected"}
        first.start()
        second.start()
        started = time.monotonic()
        assert await client.chat("hi", model=MODEL) in ("first", "second")
        assert time.monotonic() - started < 0.5


async def test_an_error_when_nothing_answers_says_to_start_ollama_or_fix_the_urls() -> None:
    async with cortex(refused_url(), refused_url()) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
    message = str(info.value)
    assert "No Ollama server answered" in message
    assert "AICORTEX_SERVERS" in message
    assert "refused" in message
    assert {a.kind for a in info.value.attempts} == {"unreachable"}


# -- busy servers --------------------------------------------------------------------


async def test_a_busy_server_is_retried_after_its_backoff(fake_ollama: FakeOllamaFactory) -> None:
    """503 is busy, not down: with nowhere else to go, the chat waits about half a
    second and asks again."""
    server = fake_ollama(chat=[busy(), reply("recovered")])
    async with cortex(server.url) as client:
        started = time.monotonic()
        assert await client.chat("hi", model=MODEL) == "recovered"
        waited = time.monotonic() - started
    assert 0.45 <= waited < 1.0
    assert server.count("/api/chat") == 2


async def test_a_429_is_busy_too(fake_ollama: FakeOllamaFactory) -> None:
    limited = fake_ollama(chat=status(429, {"error": "rate limited"}))
    good = fake_ollama(chat=reply("ok"))
    async with cortex(limited.url, good.url) as client:
        assert await client.chat("hi", model=MODEL) == "ok"
        assert client.server_states()[0].state == "busy"
        assert await client.chat("hi", model=MODEL) == "ok"
    assert limited.count("/api/chat") == 1  # inside its backoff: not asked again


async def test_when_every_server_stays_busy_the_error_says_so(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Backoff and retry until the first-token limit, then a ServerError about busy
    servers, not about starting Ollama."""
    server = fake_ollama(chat=busy())
    async with cortex(server.url) as client:
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
        waited = time.monotonic() - started
    assert 0.4 <= waited < 1.5
    assert server.count("/api/chat") >= 2
    assert "busy" in str(info.value)
    assert "Start Ollama" not in str(info.value)
    assert [a.kind for a in info.value.attempts] == ["busy"]


# -- many streams ----------------------------------------------------------------------


async def test_a_thousand_open_streams_never_get_their_server_marked_down(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Probes run on their own connections: with 1,000 streams open and the probe result
    expiring, the server stays healthy and a new chat is served."""
    server = fake_ollama(chat=[*([stall_after(["x"], 1)] * 1000), reply("still here")])
    timeout = Timeout(connect=5.0, first_token=30.0, idle=60.0, probe=1.0)
    async with cortex(server.url, timeout=timeout, health_ttl=0.2, max_connections=1100) as client:
        streams = []
        async with anyio.create_task_group() as tg:

            async def open_one() -> None:
                streams.append(await client.chat("hi", model=MODEL, stream=True))

            for _ in range(1000):
                tg.start_soon(open_one)
        try:
            await anyio.sleep(0.3)  # the probe result is stale now
            assert await client.chat("hi", model=MODEL) == "still here"
            [state] = client.server_states()
            assert state.state == "healthy"
            assert state.in_flight == 1000
            assert state.failures == 0
        finally:
            for stream in streams:
                await stream.aclose()
        assert client.server_states()[0].in_flight == 0


# -- balancing ------------------------------------------------------------------------


async def test_least_busy_spreads_concurrent_chats_over_the_servers(
    fake_ollama: FakeOllamaFactory,
) -> None:
    servers = [fake_ollama(chat=reply(["a", "b"], delay=0.05)) for _ in range(3)]
    client = cortex(*(s.url for s in servers), routing="least_busy")
    async with client, anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(client.chat, "hi")
    counts = [s.count("/api/chat") for s in servers]
    assert sum(counts) == 30
    assert all(8 <= n <= 12 for n in counts), counts


async def test_priority_keeps_everything_on_the_first_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    servers = [fake_ollama(chat=reply(["a", "b"], delay=0.05)) for _ in range(3)]
    async with cortex(*(s.url for s in servers)) as client, anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(client.chat, "hi")
    assert [s.count("/api/chat") for s in servers] == [30, 0, 0]


async def test_round_robin_takes_turns(fake_ollama: FakeOllamaFactory) -> None:
    servers = [fake_ollama() for _ in range(3)]
    async with cortex(*(s.url for s in servers), routing="round_robin") as client:
        for _ in range(9):
            await client.chat("hi", model=MODEL)
    assert [s.count("/api/chat") for s in servers] == [3, 3, 3]


async def test_max_concurrency_spills_to_the_next_server(fake_ollama: FakeOllamaFactory) -> None:
    first = fake_ollama(chat=stall_after(["x"], 1))
    second = fake_ollama(chat=reply("second"))
    async with cortex(Server(first.url, max_concurrency=2), second.url) as client:
        held = [await client.chat("hi", model=MODEL, stream=True) for _ in range(2)]
        try:
            assert {s.server for s in held} == {first.url}
            assert await client.chat("hi", model=MODEL) == "second"
            assert client.server_states()[0].max_concurrency == 2
        finally:
            for stream in held:
                await stream.aclose()


async def test_the_model_loaded_in_memory_wins_a_tie(fake_ollama: FakeOllamaFactory) -> None:
    """Probes read /api/ps; with equal load, least_busy prefers the server that has the
    model in memory over one that would have to load it."""
    cold = fake_ollama()
    warm = fake_ollama()
    warm.loaded = [MODEL]
    async with cortex(cold.url, warm.url, routing="least_busy") as client:
        for _ in range(3):
            await client.chat("hi", model=MODEL)
        states = {s.url: s for s in client.server_states()}
    assert warm.count("/api/chat") == 3
    assert states[warm.url].loaded == (MODEL,)
    assert states[cold.url].loaded == ()


async def test_affinity_sends_a_conversation_to_one_server(fake_ollama: FakeOllamaFactory) -> None:
    servers = [fake_ollama() for _ in range(4)]
    urls = [s.url for s in servers]
    async with cortex(*urls, routing="least_busy") as client:
        for _ in range(5):
            stream = await client.chat("hi", model=MODEL, stream=True, affinity="conv-1")
            async with stream:
                await stream.text()
                where = stream.server
            assert [s.count("/api/chat") for s in servers].count(0) == 3
        chosen = Counter[str]()
        for i in range(40):
            stream = await client.chat("hi", model=MODEL, stream=True, affinity=f"conv-{i}")
            async with stream:
                await stream.text()
                chosen[stream.server] += 1
    assert len(chosen) == 4  # different keys spread
    # Another client (a proxy replica) agrees without sharing any state.
    async with cortex(*urls, routing="least_busy") as other:
        stream = await other.chat("hi", model=MODEL, stream=True, affinity="conv-1")
        async with stream:
            assert stream.server == where


async def test_affinity_moves_when_its_server_is_down(fake_ollama: FakeOllamaFactory) -> None:
    servers = [fake_ollama() for _ in range(3)]
    async with cortex(*(s.url for s in servers)) as client:
        stream = await client.chat("hi", model=MODEL, stream=True, affinity="k")
        await stream.aclose()
        home = next(s for s in servers if s.url == stream.server)
        home.stop()
        moved = await client.chat("hi", model=MODEL, stream=True, affinity="k")
        await moved.aclose()
        assert moved.server != home.url


# -- configuration ----------------------------------------------------------------------


async def test_routing_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AICORTEX_ROUTING", "round_robin")
    async with AsyncCortex(["http://127.0.0.1:1"]) as client:
        assert client.routing == "round_robin"
    async with AsyncCortex(["http://127.0.0.1:1"], routing="least_busy") as client:
        assert client.routing == "least_busy"


async def test_servers_accept_urls_and_server_entries_alike() -> None:
    async with AsyncCortex(
        ["localhost:11434", Server("http://gpu:11434/", weight=2), "http://localhost:11434"]
    ) as client:
        assert client.servers == ["http://localhost:11434", "http://gpu:11434"]
        states = {s.url: s for s in client.server_states()}
        assert states["http://gpu:11434"].weight == 2
        assert states["http://gpu:11434"].state == "unknown"


async def test_server_url_takes_a_server_entry_too(fake_ollama: FakeOllamaFactory) -> None:
    """A Server given to one call is that call's only server, with its options."""
    first, second = fake_ollama(chat=stall_after(["x"], 1)), fake_ollama(chat=reply("second"))
    async with cortex(second.url) as client:
        only = Server(first.url + "/", max_concurrency=1)
        held = await client.chat("hi", model=MODEL, stream=True, server_url=only)
        try:
            assert held.server == first.url
            with pytest.raises(ServerError) as info:  # full, and no other server for it
                await client.chat(
                    "hi", model=MODEL, server_url=only, timeout=Timeout(first_token=0.3)
                )
            assert info.value.attempts[0].kind == "busy"
            assert "max_concurrency" in info.value.attempts[0].reason
        finally:
            await held.aclose()
        assert await client.chat("hi", model=MODEL) == "second"
