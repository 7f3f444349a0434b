"""What a client tells about its requests: the records its observers get, the recorder
that adds them up, and ``CortexCollector`` in a program's own Prometheus registry."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aicortex import (
    AsyncCortex,
    Attempt,
    Cortex,
    CortexCollector,
    CortexTimeoutError,
    ModelNotFoundError,
    Observer,
    RequestRecord,
    ServerError,
    Stats,
    StreamError,
    Timeout,
    ValidationError,
)
from aicortex._metrics import (
    DURATION,
    TTFT,
    Histogram,
    Observers,
    Recorder,
    answer_figures,
    outcome_of,
)
from fakeollama import FakeOllamaFactory, cut_after, error_after, refused_url, reply, stall_after

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=0.5)


class Records(Observer):
    """An observer that keeps every record."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.records.append(record)


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "kind": "chat",
        "model": MODEL,
        "server": "http://a:1",
        "outcome": "ok",
        "duration": 0.2,
    }
    return RequestRecord(**(base | fields))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by (name, labels)."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


# --- the recorder, without a network ---------------------------------------------------------


def test_a_histogram_counts_each_value_into_the_first_bound_at_or_above_it() -> None:
    """Prometheus' `le`: a value equal to a bound is in that bucket; past the last, in +Inf."""
    histogram = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 9.0):
        histogram.observe(v)
    assert histogram.counts == [2, 2, 1]
    assert histogram.cumulative() == [(1.0, 2), (2.0, 4), (float("inf"), 5)]
    assert (histogram.count, histogram.sum) == (5, 14.0)
    copy = histogram.copy()
    histogram.observe(0.1)
    assert copy.count == 5


def test_the_recorder_adds_up_requests_tokens_speeds_loads_and_failovers() -> None:
    """Each record counts once under its labels; figures come from the final statistics."""
    recorder = Recorder()
    stats = Stats(
        prompt_tokens=8, completion_tokens=20, eval_duration=2 * 10**9, load_duration=3 * 10**9
    )
    tried = (
        Attempt("http://b:1", "connection refused", "unreachable"),
        Attempt("http://c:1", "503", "busy"),
    )
    recorder.request_finished(record(first_token=0.05, stats=stats, attempts=tried))
    recorder.request_finished(record(first_token=0.07, stats=stats))
    recorder.request_finished(
        record(
            kind="embed", server="", outcome="error", model="typo", duration=1.5, attempts=tried[:1]
        )
    )
    figures = recorder.snapshot()
    assert figures.requests == {
        ("chat", MODEL, "http://a:1", "ok"): 2,
        ("embed", "", "", "error"): 1,  # no server answered: the model is no label
    }
    assert figures.tokens == {
        (MODEL, "http://a:1", "prompt"): 16,
        (MODEL, "http://a:1", "completion"): 40,
    }
    speed = figures.tokens_per_second[MODEL, "http://a:1"]
    assert (speed.count, speed.sum) == (2, 20.0)  # 20 tokens in 2 s, twice
    load = figures.loads[MODEL, "http://a:1"]
    assert (load.count, load.sum) == (2, 6.0)
    first = figures.first_tokens[MODEL, "http://a:1"]
    assert first.count == 2
    assert first.sum == pytest.approx(0.12)
    assert first.bounds == TTFT.buckets
    assert figures.durations["chat", "ok"].count == 2
    assert figures.durations["embed", "error"].bounds == DURATION.buckets
    assert figures.failovers == {"unreachable": 2, "busy": 1}


def test_answer_figures_skip_what_the_server_did_not_report() -> None:
    """No statistics, or no eval_duration: no speed; load_duration is in seconds."""
    assert answer_figures(None) == (None, None, None, None)
    assert answer_figures(Stats(prompt_tokens=3, completion_tokens=4)) == (3, 4, None, None)
    assert answer_figures(
        Stats(completion_tokens=10, eval_duration=5 * 10**8, load_duration=10**6)
    ) == (
        None,
        10,
        20.0,
        0.001,
    )


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (asyncio.CancelledError(), "client_gone"),
        (CortexTimeoutError("total", 1.0), "timeout"),
        (ModelNotFoundError("x"), "model_missing"),
        (ValidationError("bad"), "invalid"),
        (ServerError("down", []), "error"),
        (StreamError("broke", partial_text=""), "error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_an_exception_says_how_a_request_ended(exc: BaseException, outcome: str) -> None:
    """Cancelled: the caller left; each of aicortex's errors has its outcome."""
    assert outcome_of(exc, asyncio.CancelledError) == outcome


def test_a_failing_observer_is_logged_and_the_others_are_still_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An observer's bug never reaches the request."""

    class Broken(Observer):
        def request_finished(self, record: RequestRecord) -> None:
            raise RuntimeError("observer bug")

    kept = Records()
    Observers([Broken(), kept]).request_finished(record())
    assert len(kept.records) == 1
    assert "observer failed" in caplog.text


def test_observers_are_added_once_removed_and_checked() -> None:
    """add_observer ignores a repeat; remove_observer forgets it; a non-observer is refused."""
    cortex = AsyncCortex(["http://127.0.0.1:9"], fallback=False)
    first, second = Records(), Records()
    cortex.add_observer(first)
    cortex.add_observer(first)
    cortex.add_observer(second)
    assert cortex.observers == (first, second)
    cortex.remove_observer(first)
    assert cortex.observers == (second,)
    with pytest.raises(ValidationError, match="request_finished"):
        cortex.add_observer(object())  # type: ignore[arg-type]
    assert AsyncCortex(["http://127.0.0.1:9"], observers=[first]).observers == (first,)


# --- what a client records ---------------------------------------------------------------------


async def test_each_kind_of_request_is_recorded_once_with_its_figures(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A chat (whole and streamed), a completion and an embedding: one record each, with
    the server, the first-token time, the final statistics, and no failover."""
    server = fake_ollama(chat=reply(["a", "b", "c"]))
    seen = Records()
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK, observers=[seen]) as cortex:
        assert await cortex.chat("hi", model=MODEL) == "abc"
        async with await cortex.chat("hi", model=MODEL, stream=True) as stream:
            assert seen.records[-1].kind == "chat"  # the whole chat only, so far
            assert len(seen.records) == 1
            await stream.text()
        await cortex.generate("hi", model=MODEL)
        await cortex.embed(["x", "y z"], model=MODEL)
    assert [r.kind for r in seen.records] == ["chat", "chat", "generate", "embed"]
    for item in seen.records:
        assert (item.model, item.server, item.outcome, item.attempts) == (
            MODEL,
            server.url,
            "ok",
            (),
        )
        assert item.duration > 0
        assert item.stats is not None
    # The completion is the fake's own answer ("Hello!", 2 tokens).
    for item, tokens in zip(seen.records[:3], (3, 3, 2), strict=True):
        assert item.first_token is not None
        assert 0 < item.first_token <= item.duration
        assert item.stats is not None
        assert (item.stats.prompt_tokens, item.stats.completion_tokens) == (8, tokens)
        assert item.stats.load_duration == 1_000_000
    embed = seen.records[3]
    assert embed.first_token is None
    assert embed.stats is not None
    assert embed.stats.prompt_tokens == 5


async def test_failovers_and_failures_are_recorded_with_their_outcome(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A refused server passed over, a model nobody has, a stream broken after its first
    token, one closed early, and a total limit that ran out."""
    server = fake_ollama(
        chat=[reply("ok"), error_after(["x", "y"], 1), reply(["t"] * 50, delay=0.02)]
    )
    plain = fake_ollama()  # has MODEL only
    down = refused_url()
    seen = Records()
    async with AsyncCortex(
        [down, server.url], fallback=False, timeout=QUICK, observers=[seen]
    ) as cortex:
        await cortex.chat("hi", model=MODEL)
        with pytest.raises(ModelNotFoundError):
            await cortex.chat("hi", model="qwen2.5:7b", server_url=plain.url)
        async with await cortex.chat("hi", model=MODEL, stream=True) as stream:
            with pytest.raises(StreamError):
                await stream.text()
        stream = await cortex.chat("hi", model=MODEL, stream=True)
        await stream.aclose()
    failover, missing, broken, left = seen.records
    assert failover.outcome == "ok"
    assert failover.attempts == (Attempt(down, "connection refused", "unreachable"),)
    assert (missing.outcome, missing.server, missing.model, missing.first_token) == (
        "model_missing",
        "",
        "qwen2.5:7b",
        None,
    )
    assert (broken.outcome, broken.server, broken.stats) == ("error", server.url, None)
    assert broken.first_token is not None
    assert (left.outcome, left.server, left.stats) == ("client_gone", server.url, None)
    # An embedding's batches fail over too, and their attempts are the request's.
    async with AsyncCortex([down, plain.url], fallback=False, timeout=QUICK) as cortex:
        cortex.add_observer(seen)
        await cortex.embed(["a", "b", "c"], model=MODEL, batch_size=1)
    embed = seen.records[-1]
    assert (embed.kind, embed.outcome, embed.server) == ("embed", "ok", plain.url)
    # Each batch that found the server down (those sent at once all did) says so.
    assert {(a.server, a.kind) for a in embed.attempts} == {(down, "unreachable")}


async def test_a_whole_answer_broken_midway_is_one_record_with_the_failed_attempt(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Asked again on the next server: one request, with the first server in its attempts."""
    first = fake_ollama(chat=cut_after(["par", "tial"], 1))
    second = fake_ollama(chat=reply(["whole"]))
    seen = Records()
    async with AsyncCortex([first.url, second.url], fallback=False, timeout=QUICK) as cortex:
        cortex.add_observer(seen)
        assert await cortex.chat("hi", model=MODEL) == "whole"
    (only,) = seen.records
    assert (only.outcome, only.server) == ("ok", second.url)
    assert [(a.server, a.kind) for a in only.attempts] == [(first.url, "failed")]


async def test_running_out_of_time_and_being_cancelled_are_their_own_outcomes(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Timeout.total passes: timeout; the caller cancels a whole answer: client_gone."""
    server = fake_ollama(chat=stall_after(["slow"], 1))
    seen = Records()
    limits = Timeout(connect=1.0, first_token=2.0, idle=5.0, total=0.3, probe=0.5)
    async with AsyncCortex(
        [server.url], fallback=False, timeout=limits, observers=[seen]
    ) as cortex:
        with pytest.raises(CortexTimeoutError):
            await cortex.chat("hi", model=MODEL)
        with anyio.move_on_after(0.3):
            await cortex.chat("hi", model=MODEL, timeout=QUICK)
    assert [r.outcome for r in seen.records] == ["timeout", "client_gone"]


async def test_without_observers_nothing_is_recorded(fake_ollama: FakeOllamaFactory) -> None:
    """The default: no observer, no record; one added later sees the requests after it."""
    server = fake_ollama()
    seen = Records()
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        await cortex.chat("hi", model=MODEL)
        cortex.add_observer(seen)
        await cortex.chat("hi", model=MODEL)
        cortex.remove_observer(seen)
        await cortex.chat("hi", model=MODEL)
    assert len(seen.records) == 1


# --- CortexCollector -----------------------------------------------------------------------------


async def test_the_collector_exposes_a_clients_requests_in_a_fresh_registry(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Registered in a program's own registry: requests by kind, tokens, speed, loads,
    first-token times, failovers, and each server's state and requests in flight."""
    server = fake_ollama()  # answers "Hello!" (2 tokens) for MODEL, 404 for any other
    down = refused_url()
    registry = CollectorRegistry()
    async with AsyncCortex([down, server.url], fallback=False, timeout=QUICK) as cortex:
        collector = CortexCollector(cortex)
        registry.register(collector)
        await cortex.chat("hi", model=MODEL)
        async with await cortex.chat("hi", model=MODEL, stream=True) as stream:
            await stream.text()
        await cortex.embed("text", model=MODEL)
        with pytest.raises(ModelNotFoundError):
            await cortex.chat("hi", model="nobody-has:1b")
        found = samples(generate_latest(registry).decode())
        collector.close()
        await cortex.chat("hi", model=MODEL)  # not counted any more
        later = samples(generate_latest(registry).decode())
    ok = {"model": MODEL, "server": server.url, "outcome": "ok"}
    assert value(later, "aicortex_requests_total", route="chat", **ok) == 2
    assert value(found, "aicortex_requests_total", route="chat", **ok) == 2
    assert value(found, "aicortex_requests_total", route="embed", **ok) == 1
    missing = {"model": "", "server": "", "outcome": "model_missing"}
    assert value(found, "aicortex_requests_total", route="chat", **missing) == 1
    pair = {"model": MODEL, "server": server.url}
    assert value(found, "aicortex_tokens_total", kind="prompt", **pair) == 8 * 2 + 2
    assert value(found, "aicortex_tokens_total", kind="completion", **pair) == 4
    assert value(found, "aicortex_time_to_first_token_seconds_count", **pair) == 2
    assert value(found, "aicortex_time_to_first_token_seconds_sum", **pair) > 0
    assert value(found, "aicortex_generation_tokens_per_second_count", **pair) == 2
    assert value(found, "aicortex_generation_tokens_per_second_sum", **pair) == 200.0
    assert value(found, "aicortex_model_load_seconds_count", **pair) == 3
    assert value(found, "aicortex_model_load_seconds_bucket", le="0.001", **pair) == 3
    assert value(found, "aicortex_request_duration_seconds_count", route="chat", outcome="ok") == 2
    assert value(found, "aicortex_failovers_total", reason="unreachable") >= 1
    assert value(found, "aicortex_in_flight", server=server.url) == 0
    assert value(found, "aicortex_server_state", server=server.url, state="healthy") == 1
    assert value(found, "aicortex_server_state", server=down, state="ejected") == 1
    assert value(found, "aicortex_server_state", server=down, state="healthy") == 0


async def test_requests_in_flight_are_read_when_collected(fake_ollama: FakeOllamaFactory) -> None:
    """A stream being read counts against its server until it is closed."""
    server = fake_ollama(chat=reply(["t"] * 20, delay=0.05))
    registry = CollectorRegistry()
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        registry.register(CortexCollector(cortex))
        async with await cortex.chat("hi", model=MODEL, stream=True):
            during = samples(generate_latest(registry).decode())
        after = samples(generate_latest(registry).decode())
    assert value(during, "aicortex_in_flight", server=server.url) == 1
    assert value(after, "aicortex_in_flight", server=server.url) == 0
    assert (
        value(
            after,
            "aicortex_requests_total",
            route="chat",
            model=MODEL,
            server=server.url,
            outcome="client_gone",
        )
        == 1
    )


def test_the_collector_works_with_the_blocking_client_and_names_its_metrics(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A Cortex, read from another thread; describe() names every metric; a closed
    Cortex still collects, without servers."""
    server = fake_ollama()
    registry = CollectorRegistry()
    with Cortex([server.url], fallback=False, timeout=QUICK) as cortex:
        collector = CortexCollector(cortex)
        registry.register(collector)
        cortex.chat("hi", model=MODEL)
        found = samples(generate_latest(registry).decode())
    assert (
        value(
            found,
            "aicortex_requests_total",
            route="chat",
            model=MODEL,
            server=server.url,
            outcome="ok",
        )
        == 1
    )
    assert value(found, "aicortex_server_state", server=server.url, state="healthy") == 1
    names = {family.name for family in collector.describe()}
    assert names == {
        "aicortex_requests",
        "aicortex_request_duration_seconds",
        "aicortex_time_to_first_token_seconds",
        "aicortex_tokens",
        "aicortex_generation_tokens_per_second",
        "aicortex_model_load_seconds",
        "aicortex_failovers",
        "aicortex_in_flight",
        "aicortex_server_state",
    }
    closed = samples(generate_latest(registry).decode())
    assert not [key for key in closed if key[0] == "aicortex_server_state"]
