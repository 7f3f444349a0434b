"""AsyncCortex against real servers on 127.0.0.1: selection, failover, errors, health cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from aicortex import (
    AsyncCortex,
    Catalog,
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    Timeout,
    ValidationError,
)
from fakeollama import (
    BlackHoleFactory,
    Exchange,
    FakeOllamaFactory,
    Script,
    busy,
    cut_after,
    error_after,
    garbage_response,
    model_not_found,
    ndjson_lines,
    page_not_found,
    refused_url,
    reply,
    stall_after,
    stall_before_headers,
    status,
)

# What these tests pin down holds on every transport (see conftest.py).
EVERY_TRANSPORT = True

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=1.0, idle=1.0, probe=0.5)


def cortex(*servers: str, **kwargs: object) -> AsyncCortex:
    options: dict[str, object] = {"timeout": QUICK, "fallback": False}
    options.update(kwargs)
    return AsyncCortex(list(servers), **options)  # type: ignore[arg-type]


async def test_chat_returns_the_whole_answer_and_sends_stream_explicitly(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A non-streamed chat joins the tokens; the request names the model and streams."""
    server = fake_ollama(chat=reply(["The", " sky", " scatters", " blue."]))
    async with cortex(server.url) as client:
        text = await client.chat("Why is the sky blue?", model=MODEL, system="be brief")
    assert text == "The sky scatters blue."
    (sent,) = [r for r in server.requests if r.path == "/api/chat"]
    assert sent.json == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        "stream": True,
    }


async def test_options_and_ollama_knobs_reach_the_server(fake_ollama: FakeOllamaFactory) -> None:
    """options, format, keep_alive and think pass through to /api/chat."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        await client.chat(
            [{"role": "user", "content": "hi"}],
            model=MODEL,
            options={"temperature": 0.1, "num_ctx": 8192},
            format="json",
            keep_alive="10m",
            think=False,
        )
    (sent,) = [r for r in server.requests if r.path == "/api/chat"]
    assert sent.json["options"] == {"temperature": 0.1, "num_ctx": 8192}
    assert sent.json["format"] == "json"
    assert sent.json["keep_alive"] == "10m"
    assert sent.json["think"] is False


async def test_the_chat_request_carries_the_usual_headers(fake_ollama: FakeOllamaFactory) -> None:
    """Host, JSON type, exact length and the client's own headers, on every request."""
    server = fake_ollama(chat=[reply("one"), reply("two")])
    async with cortex(server.url, headers={"X-Team": "search"}) as client:
        await client.chat("first", model=MODEL)
        await client.chat("second, with é", model=MODEL)
    sent = [r for r in server.requests if r.path == "/api/chat"]
    assert [r.json["messages"][0]["content"] for r in sent] == ["first", "second, with é"]
    for request in sent:
        assert request.headers["host"] == server.url.removeprefix("http://")
        assert request.headers["content-type"] == "application/json"
        assert request.headers["content-length"] == str(len(request.body))
        assert request.headers["accept"] == "application/json"
        assert request.headers["x-team"] == "search"
        assert "cookie" not in request.headers


class _SetsCookie(Script):
    async def run(self, exchange: Exchange) -> None:
        line = {"model": MODEL, "message": {"role": "assistant", "content": "hi"}, "done": True}
        body = json.dumps(line).encode() + b"\n"
        headers = {"Set-Cookie": "route=gpu-2; Path=/"}
        await exchange.respond(200, body, "application/x-ndjson", headers=headers)


async def test_a_cookie_the_server_sets_is_sent_back(fake_ollama: FakeOllamaFactory) -> None:
    """A load balancer's session cookie comes back on the next chat to that server."""
    server = fake_ollama(chat=[_SetsCookie(), reply("again")])
    async with cortex(server.url) as client:
        assert await client.chat("first", model=MODEL) == "hi"
        assert await client.chat("second", model=MODEL) == "again"
    first, second = [r for r in server.requests if r.path == "/api/chat"]
    assert "cookie" not in first.headers
    assert second.headers["cookie"] == "route=gpu-2"
    assert second.headers["content-length"] == str(len(second.body))
    assert second.json["messages"][0]["content"] == "second"


class _Redirect(Script):
    def __init__(self, to: str) -> None:
        self.to = to

    async def run(self, exchange: Exchange) -> None:
        await exchange.respond(307, b"", "text/plain", headers={"Location": self.to})


async def test_a_redirected_chat_is_followed(fake_ollama: FakeOllamaFactory) -> None:
    """A 307 from a server in front of Ollama is followed with the same body."""
    target = fake_ollama(chat=reply("moved here"))
    front = fake_ollama(chat=_Redirect(target.url + "/api/chat"))
    async with cortex(front.url) as client:
        assert await client.chat("where?", model=MODEL) == "moved here"
    (sent,) = [r for r in target.requests if r.path == "/api/chat"]
    assert sent.json["messages"][0]["content"] == "where?"


@pytest.mark.parametrize(
    ("options", "match"),
    [({"temperature": float("nan")}, "Out of range float"), ({"mirostat": {1}}, "not JSON")],
)
async def test_a_chat_that_is_not_json_fails_before_any_request(
    fake_ollama: FakeOllamaFactory, options: dict[str, object], match: str
) -> None:
    """NaN or an arbitrary object in the options is a ValidationError, and nothing is sent."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        with pytest.raises(ValidationError, match=match):
            await client.chat("hi", model=MODEL, options=options)
    assert server.count("/api/chat") == 0


async def test_a_refused_port_fails_over_to_the_next_server(fake_ollama: FakeOllamaFactory) -> None:
    """A server that refuses connections is skipped for the next one."""
    server = fake_ollama(chat=reply("ok"))
    async with cortex(refused_url(), server.url) as client:
        assert await client.chat("hi", model=MODEL) == "ok"


async def test_a_server_that_accepts_but_never_answers_is_skipped(
    fake_ollama: FakeOllamaFactory, black_hole: BlackHoleFactory
) -> None:
    """A black-hole server fails its probe within the probe timeout and is skipped."""
    hole = black_hole()
    server = fake_ollama(chat=reply("ok"))
    started = time.monotonic()
    async with cortex(hole.url, server.url) as client:
        assert await client.chat("hi", model=MODEL) == "ok"
    assert time.monotonic() - started < QUICK.probe + 1.0
    assert hole.accepted >= 1


async def test_a_chat_that_never_answers_times_out_and_fails_over(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A server that probes fine but stalls on /api/chat hits first_token and moves on."""
    stalled = fake_ollama(chat=stall_before_headers())
    good = fake_ollama(chat=reply("ok"))
    async with cortex(stalled.url, good.url) as client:
        started = time.monotonic()
        assert await client.chat("hi", model=MODEL) == "ok"
        assert QUICK.first_token is not None
        assert time.monotonic() - started < QUICK.first_token + 1.0
    assert stalled.count("/api/chat") == 1


async def test_a_busy_503_fails_over(fake_ollama: FakeOllamaFactory) -> None:
    """503 'server busy' moves on to the next server."""
    busy_server = fake_ollama(chat=busy())
    good = fake_ollama(chat=reply("ok"))
    async with cortex(busy_server.url, good.url) as client:
        assert await client.chat("hi", model=MODEL) == "ok"
    assert busy_server.count("/api/chat") == 1


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(status(500, {"error": "llama runner process has terminated"}), id="500"),
        pytest.param(page_not_found(), id="404-text"),
        pytest.param(garbage_response(), id="garbage"),
        pytest.param(error_after(["never"], 0), id="error-first-line"),
        pytest.param(cut_after(["never"], 0), id="cut-before-first-token"),
        pytest.param(ndjson_lines([b"<html>\n"]), id="not-json"),
    ],
)
async def test_failures_before_the_first_token_move_on_invisibly(
    fake_ollama: FakeOllamaFactory, script: object
) -> None:
    """Every failure before the first token is retried on the next server."""
    bad = fake_ollama(chat=script)
    good = fake_ollama(chat=reply(["all", " good"]))
    async with cortex(bad.url, good.url) as client:
        stream = await client.chat("hi", model=MODEL, stream=True)
        async with stream:
            assert stream.server == good.url
            assert await stream.text() == "all good"


async def test_when_every_server_is_down_the_error_names_each_one(
    fake_ollama: FakeOllamaFactory, black_hole: BlackHoleFactory
) -> None:
    """ServerError lists every server tried in preference order, with why it could not
    serve and what kind of failure it was."""
    refused = refused_url()
    hole = black_hole()
    busy_server = fake_ollama(chat=busy())
    async with cortex(refused, hole.url, busy_server.url) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL)
    error = info.value
    assert error.servers == [refused, hole.url, busy_server.url]
    assert [a.kind for a in error.attempts] == ["unreachable", "unreachable", "busy"]
    reasons = {a.server: a.reason for a in error.attempts}
    assert "refused" in reasons[refused]
    assert "timed out" in reasons[hole.url]
    assert "503" in reasons[busy_server.url]
    for url in (refused, hole.url, busy_server.url):
        assert url in str(error)


async def test_an_unknown_model_raises_model_not_found_with_suggestions(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Ollama's 404 becomes ModelNotFoundError with catalog and live close matches."""
    server = fake_ollama(models=["llama3.2:3b", "llama3.2:1b-custom"])
    async with cortex(server.url) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat("hi", model="llama3.2:3")
    error = info.value
    assert error.model == "llama3.2:3"
    assert "llama3.2:3b" in error.suggestions
    assert "llama3.2:1b-custom" in error.suggestions
    assert "llama3.2:3b" in str(error)
    assert error.servers == [server.url]


async def test_suggestions_put_what_the_servers_have_first_and_say_how_to_pull(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Close matches the servers have come first; catalog models that no server has are
    marked (not pulled); the message always says how to pull the model asked for."""
    first = fake_ollama(models=["qwen2.5:3b"])
    second = fake_ollama(models=["llama3.2:3b"])
    async with cortex(first.url, second.url) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat("hi", model="qwen2.5:7b")
    error = info.value
    assert error.servers == [first.url, second.url]
    assert error.suggestions[0] == "qwen2.5:3b"
    assert "qwen2.5:3b" not in error.not_pulled
    assert error.not_pulled, "the catalog's qwen models are suggested too"
    assert error.suggestions[1:] == error.not_pulled
    assert all(name.startswith("qwen") for name in error.not_pulled)
    message = str(error)
    assert "'qwen2.5:3b', " in message
    assert f"{error.not_pulled[0]!r} (not pulled)" in message
    assert f"aicortex pull qwen2.5:7b --server {first.url} --server {second.url}" in message
    assert "ollama pull qwen2.5:7b" in message


async def test_a_model_with_no_close_match_still_says_how_to_pull_it(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(models=["llama3.2:3b"])
    async with cortex(server.url) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat("hi", model="zzzz-unheard-of:1b")
    assert info.value.suggestions == []
    assert str(info.value).endswith(
        f"To use it, pull it: `aicortex pull zzzz-unheard-of:1b --server {server.url}`, "
        "or `ollama pull zzzz-unheard-of:1b` on that machine."
    )


async def test_a_server_without_the_model_is_passed_over_for_one_with_it(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A 404 on one server tries the next, which has the model."""
    lacking = fake_ollama(models=["qwen2.5:7b"], chat=model_not_found())
    having = fake_ollama(models=[MODEL], chat=reply("here"))
    async with cortex(lacking.url, having.url) as client:
        assert await client.chat("hi", model=MODEL) == "here"
    # The probe showed where the model lives, so the lacking server was not even asked.
    assert lacking.count("/api/chat") == 0


async def test_a_server_that_lists_the_model_but_lacks_it_gives_way_to_a_slower_one(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """The 404 race: the first server lists the model but answers 404 for it; the next
    one, whose probe was slower, is still probed and tried before ModelNotFoundError."""
    listed = fake_ollama(models=[MODEL], chat=model_not_found())
    slower = fake_ollama(models=[MODEL], probe_delay=0.3, chat=reply("from the slower one"))
    async with cortex(listed.url, slower.url) as client:
        assert await client.chat("hi", model=MODEL) == "from the slower one"
    assert slower.count("/api/chat") == 1


async def test_a_400_is_a_validation_error_with_ollamas_message_and_no_failover(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Ollama's own 400 message reaches the caller; no other server is tried."""
    first = fake_ollama(chat=status(400, {"error": '"llama3.2:3b" does not support thinking'}))
    second = fake_ollama(chat=reply("should not be used"))
    async with cortex(first.url, second.url) as client:
        with pytest.raises(ValidationError, match="does not support thinking"):
            await client.chat("hi", model=MODEL, think=True)
    assert second.count("/api/chat") == 0


async def test_bad_input_fails_before_any_request(fake_ollama: FakeOllamaFactory) -> None:
    """A malformed prompt raises ValidationError without touching the network."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        with pytest.raises(ValidationError, match="empty list"):
            await client.chat([], model=MODEL)
    assert server.requests == []


async def test_non_http_server_urls_are_rejected_by_name() -> None:
    """A server URL with another scheme raises ValidationError naming it."""
    with pytest.raises(ValidationError, match="ftp://x"):
        AsyncCortex(["ftp://x"])


async def test_probe_results_are_reused_within_the_ttl_and_refreshed_after(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """No re-probe inside the TTL; a new probe once it has passed."""
    server = fake_ollama()
    async with cortex(server.url, health_ttl=0.5) as client:
        await client.chat("one", model=MODEL)
        await client.chat("two", model=MODEL)
        assert server.count("/api/tags") == 1
        await anyio.sleep(0.6)
        await client.chat("three", model=MODEL)
        assert server.count("/api/tags") == 2


async def test_a_server_that_failed_a_request_is_skipped_until_its_next_probe(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """After a 503 the server is marked down at once and not tried again within the TTL."""
    flaky = fake_ollama(chat=[busy(), reply("recovered")])
    good = fake_ollama(chat=reply("ok"))
    async with cortex(flaky.url, good.url, health_ttl=30) as client:
        assert await client.chat("a", model=MODEL) == "ok"
        assert await client.chat("b", model=MODEL) == "ok"
    assert flaky.count("/api/chat") == 1


async def test_twenty_slow_servers_are_probed_concurrently(fake_ollama: FakeOllamaFactory) -> None:
    """20 servers answering the probe after 0.3 s take about 0.3 s in total, not 6 s."""
    servers = [fake_ollama(probe_delay=0.3) for _ in range(20)]
    async with AsyncCortex(
        [s.url for s in servers], fallback=False, timeout=Timeout(probe=2.0)
    ) as client:
        started = time.monotonic()
        infos = await client.probe_servers(MODEL)
        elapsed = time.monotonic() - started
    assert len(infos) == 20
    assert all(info.up and info.has_model for info in infos)
    assert elapsed < 0.9, f"probing took {elapsed:.2f}s"


async def test_probing_stops_once_the_preferred_server_is_known_good(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A fast first choice does not wait for slow lower-ranked servers."""
    fast = fake_ollama()
    slow = fake_ollama(probe_delay=2.0)
    async with AsyncCortex(
        [fast.url, slow.url], fallback=False, timeout=Timeout(probe=3.0)
    ) as client:
        started = time.monotonic()
        assert await client.chat("hi", model=MODEL) == "Hello!"
        assert time.monotonic() - started < 1.0


async def test_server_info_reports_live_facts(fake_ollama: FakeOllamaFactory) -> None:
    """server_info: reachable, latency, version and whether the model is there."""
    server = fake_ollama(models=[MODEL], version="0.33.0")
    async with cortex(server.url) as client:
        info = await client.server_info(MODEL)
        other = await client.server_info("qwen2.5:7b")
        down = await client.server_info(MODEL, server_url=refused_url())
    assert info.up
    assert info.url == server.url
    assert info.version == "0.33.0"
    assert info.latency is not None
    assert info.latency > 0
    assert info.has_model is True
    assert other.has_model is False
    assert not down.up
    assert down.error is not None
    assert "refused" in down.error


async def test_server_url_uses_that_server_only(fake_ollama: FakeOllamaFactory) -> None:
    """An explicit server_url bypasses the configured servers."""
    configured = fake_ollama(chat=reply("configured"))
    chosen = fake_ollama(chat=reply("chosen"))
    async with cortex(configured.url) as client:
        assert await client.chat("hi", model=MODEL, server_url=chosen.url) == "chosen"
    assert configured.requests == []


async def test_candidates_follow_the_documented_preference_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured servers, then the catalog's servers for the model, then OLLAMA_HOST."""
    client = AsyncCortex(["gpu:1", "http://cpu:2"])
    assert client.candidates(MODEL) == ["http://gpu:1", "http://cpu:2", "http://127.0.0.1:11434"]
    # The catalog's local entry stands for this machine's default server, OLLAMA_HOST.
    monkeypatch.setenv("OLLAMA_HOST", "ollama-box")
    assert client.candidates(MODEL) == ["http://gpu:1", "http://cpu:2", "http://ollama-box:11434"]
    assert AsyncCortex(["gpu:1"], fallback=False).candidates(MODEL) == ["http://gpu:1"]
    monkeypatch.setenv("AICORTEX_SERVERS", "a:1, b:2")
    assert AsyncCortex(fallback=False).servers == ["http://a:1", "http://b:2"]
    assert client.candidates(MODEL, server_url="x:9") == ["http://x:9"]
    await client.aclose()


async def test_the_default_model_comes_from_config_then_the_catalog(
    fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AICORTEX_MODEL picks the model when none is passed; else the catalog's default."""
    server = fake_ollama(models=["qwen2.5:7b", MODEL])
    async with cortex(server.url) as client:
        assert client.default_model() == MODEL
        monkeypatch.setenv("AICORTEX_MODEL", "qwen2.5:7b")
        await client.chat("hi")
    (sent,) = [r for r in server.requests if r.path == "/api/chat"]
    assert sent.json["model"] == "qwen2.5:7b"


async def test_a_non_streamed_chat_that_breaks_midway_is_retried_elsewhere(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """The caller saw nothing yet, so a cut answer is simply asked again of the next server."""
    cut = fake_ollama(chat=cut_after(["par", "tial"], 1))
    good = fake_ollama(chat=reply(["com", "plete"]))
    async with cortex(cut.url, good.url) as client:
        assert await client.chat("hi", model=MODEL) == "complete"


async def test_a_non_streamed_chat_broken_everywhere_names_why_without_stream_advice(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """When every server breaks mid-answer, ServerError says how each one broke, and
    nothing about .partial_text, which a non-streamed call does not have."""
    cut = fake_ollama(chat=cut_after(["par", "tial"], 1))
    with pytest.raises(ServerError, match=r"broke mid-answer \(broke after 1 tokens: ") as info:
        async with cortex(cut.url) as client:
            await client.chat("hi", model=MODEL)
    assert "partial_text" not in str(info.value)


async def test_a_total_deadline_raises_a_timeout_error(fake_ollama: FakeOllamaFactory) -> None:
    """Timeout(total=...) bounds the whole call with a CortexTimeoutError('total')."""
    slow = fake_ollama(chat=reply(["a"] * 50, delay=0.1))
    async with cortex(slow.url) as client:
        started = time.monotonic()
        with pytest.raises(CortexTimeoutError) as info:
            await client.chat("hi", model=MODEL, timeout=Timeout(total=0.5, probe=0.5))
    assert info.value.phase == "total"
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(stall_before_headers(), id="no-headers"),
        pytest.param(stall_after(["never"], 0), id="headers-then-silence"),
        pytest.param(ndjson_lines([b"\n"] * 30, delay=0.05), id="blank-lines"),
    ],
)
async def test_the_first_token_limit_counts_from_the_request(
    fake_ollama: FakeOllamaFactory, script: object
) -> None:
    """first_token bounds the wait for the first token as a whole, even when the
    server answers the head at once or keeps sending blank lines within the idle limit."""
    slow = fake_ollama(chat=script)
    good = fake_ollama(chat=reply("from the next"))
    limits = Timeout(connect=1.0, first_token=0.4, idle=5.0, probe=0.5)
    async with cortex(slow.url, good.url, timeout=limits) as client:
        started = time.monotonic()
        stream = await client.chat("hi", model=MODEL, stream=True)
        async with stream:
            assert stream.server == good.url
        assert time.monotonic() - started < 1.5
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=MODEL, server_url=slow.url)
    assert "no first token within 0.4s" in str(info.value)


async def test_a_total_limit_before_the_first_token_is_a_timeout_not_a_failover(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """When the caller's total limit ends first, the call stops with CortexTimeoutError
    instead of trying the next server, and the silent server is not marked down."""
    silent = fake_ollama(chat=[stall_after(["never"], 0), reply("later")])
    good = fake_ollama(chat=reply("unused"))
    limits = Timeout(connect=1.0, first_token=5.0, idle=5.0, total=0.3, probe=0.5)
    async with cortex(silent.url, good.url) as client:
        started = time.monotonic()
        with pytest.raises(CortexTimeoutError) as info:
            await client.chat("hi", model=MODEL, timeout=limits)
        assert info.value.phase == "total"
        assert time.monotonic() - started < 1.5
        assert good.count("/api/chat") == 0
        assert await client.chat("again", model=MODEL) == "later"


async def test_connections_are_pooled_per_server(fake_ollama: FakeOllamaFactory) -> None:
    """Consecutive chats reuse one pooled connection instead of reconnecting."""
    server = fake_ollama()
    async with cortex(server.url) as client:
        await client.chat("one", model=MODEL)
        before = server.connections
        for _ in range(5):
            await client.chat("again", model=MODEL)
        assert server.connections == before


async def test_a_closed_client_refuses_work(fake_ollama: FakeOllamaFactory) -> None:
    """After aclose(), using the client raises a clear RuntimeError."""
    server = fake_ollama()
    client = cortex(server.url)
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.chat("hi", model=MODEL)


async def test_cancelling_a_chat_drops_the_request(fake_ollama: FakeOllamaFactory) -> None:
    """A cancelled call closes its connection, so the server stops generating."""
    server = fake_ollama(chat=reply(["t"] * 100, delay=0.05))
    async with cortex(server.url) as client:
        with anyio.move_on_after(0.3):
            await client.chat("hi", model=MODEL)
        assert await anyio.to_thread.run_sync(server.wait_for_disconnect, 2.0)


async def test_a_zero_ttl_probes_before_every_call(fake_ollama: FakeOllamaFactory) -> None:
    """health_ttl=0 means never trust an old probe, not never trust any probe."""
    server = fake_ollama()
    async with cortex(server.url, health_ttl=0) as client:
        assert await client.chat("one", model=MODEL) == "Hello!"
        assert await client.chat("two", model=MODEL) == "Hello!"
        info = await client.server_info(MODEL)
    assert info.up
    assert server.count("/api/tags") == 3


async def test_the_callers_deadline_does_not_mark_a_server_down(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A total timeout is the caller's limit: the server stays in use for the next call."""
    server = fake_ollama(chat=[reply(["a"] * 50, delay=0.05), reply("next")])
    async with cortex(server.url, health_ttl=30) as client:
        with pytest.raises(CortexTimeoutError):
            await client.chat("slow", model=MODEL, timeout=Timeout(total=0.3, probe=0.5))
        assert await client.chat("again", model=MODEL) == "next"


async def test_catalog_servers_are_used_when_none_are_configured(
    fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    """With no servers configured, the catalog's servers for the model are tried first."""
    server = fake_ollama(models=["tiny:1b"], chat=reply("from the catalog"))
    family = {
        "family": "tiny",
        "models": [
            {
                "name": "tiny:1b",
                "family": "tiny",
                "size": "1GB",
                "parameters": "1B",
                "quantization": "Q4_K_M",
                "context_length": 2048,
                "description": "A test model.",
                "tags": [],
                "servers": [{"url": server.url, "status": "up"}],
            }
        ],
    }
    (tmp_path / "tiny.json").write_text(json.dumps(family))
    async with AsyncCortex(catalog=Catalog(tmp_path), timeout=QUICK) as client:
        assert client.candidates("tiny:1b") == [server.url, "http://127.0.0.1:11434"]
        assert await client.chat("hi", model="tiny:1b") == "from the catalog"


async def test_an_unknown_keyword_argument_is_a_type_error_naming_it() -> None:
    """chat() and build_api_request() take their shared arguments as **args; a typo
    still fails the way Python reports one, before anything is sent."""
    async with AsyncCortex(["http://127.0.0.1:9"], fallback=False) as client:
        with pytest.raises(
            TypeError, match="chat\\(\\) got an unexpected keyword argument 'temprature'"
        ):
            await client.chat("hi", model=MODEL, temprature=0.5)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="unexpected keyword argument 'timeout'"):
            client.build_api_request(MODEL, "hi", timeout=None)  # type: ignore[call-arg]
        request = client.build_api_request(MODEL, "hi", system="be brief", options={"seed": 1})
    assert request["json"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert request["json"]["options"] == {"seed": 1}
