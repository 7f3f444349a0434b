"""Pulling a model onto every server: the progress decoder, the layer sums, `AsyncCortex.pull`
and `Cortex.pull` against fake servers on 127.0.0.1, and `aicortex pull`."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from aicortex import AsyncCortex, Cortex, PullProgress, Server, Timeout, ValidationError
from aicortex._cli import _PullLines, main
from aicortex._pull import PullTracker, decode_pull_line
from fakeollama import (
    PULL_LAYERS,
    Exchange,
    FakeOllama,
    FakeOllamaFactory,
    Script,
    ndjson_lines,
    page_not_found,
    refused_url,
    status,
)

# What these tests pin down holds on every transport (see conftest.py).
EVERY_TRANSPORT = True

MODEL = "qwen3:8b"
QUICK = Timeout(connect=1.0, first_token=1.0, idle=1.0, probe=0.5)
SERVER = "http://gpu-1:11434"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
MISSING = "pull model manifest: file does not exist"


def line(**fields: Any) -> bytes:
    """One NDJSON line of a pull's progress."""
    return json.dumps(fields).encode() + b"\n"


def layer(digest: str, total: int, completed: int = 0) -> bytes:
    """A layer's progress line, with `completed` left out when 0, as Ollama does."""
    fields: dict[str, Any] = {"status": f"pulling {digest[7:19]}", "digest": digest}
    fields["total"] = total
    if completed:
        fields["completed"] = completed
    return line(**fields)


def decode(data: bytes) -> PullProgress:
    progress = decode_pull_line(data, SERVER, MODEL)
    assert progress is not None
    return progress


def slow_pull(steps: int = 50, delay: float = 0.1) -> Script:
    """A pull that takes `steps * delay` seconds, one progress line per step."""
    lines = [line(status="pulling manifest")]
    lines += [layer(DIGEST_A, steps, i) for i in range(steps)]
    return ndjson_lines([*lines, line(status="success")], delay=delay)


class CutMidPull(Script):
    """Start the progress, then close the connection without ending the body."""

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream()
        await exchange.send_chunk(line(status="pulling manifest"))
        await exchange.drop()


class SilentMidPull(Script):
    """Start the progress, then say nothing more with the connection open."""

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream()
        await exchange.send_chunk(line(status="pulling manifest"))
        await exchange.hang()


def client(*servers: str | Server, **kwargs: Any) -> AsyncCortex:
    options: dict[str, Any] = {"timeout": QUICK, "fallback": False}
    options.update(kwargs)
    return AsyncCortex(list(servers), **options)


async def collect(cortex: AsyncCortex, *args: Any, **kwargs: Any) -> list[PullProgress]:
    async with cortex.pull(*args, **kwargs) as progress:
        return [p async for p in progress]


def last_events(events: list[PullProgress]) -> dict[str, PullProgress]:
    """Each server's done event; fails unless there is exactly one, and it is its last."""
    finals: dict[str, PullProgress] = {}
    for event in events:
        assert event.server not in finals, f"an event after {event.server}'s last"
        if event.done:
            finals[event.server] = event
    assert {e.server for e in events} == set(finals)
    return finals


async def disconnected(server: FakeOllama, count: int = 1) -> bool:
    return await anyio.to_thread.run_sync(server.wait_for_disconnect, 5.0, count)


# -- the decoder ----------------------------------------------------------------------------


def test_every_line_of_ollamas_pull_stream_decodes(fixtures_dir: Path) -> None:
    """The fixture's statuses come through as Ollama wrote them; only "success" is done."""
    data = (fixtures_dir / "ollama" / "pull-stream.ndjson").read_bytes()
    events = [decode(raw) for raw in data.splitlines(keepends=True)]
    assert [e.status for e in events] == [
        "pulling manifest",
        "pulling digestname",
        "verifying sha256 digest",
        "writing manifest",
        "removing any unused layers",
        "success",
    ]
    assert [e.done for e in events] == [False] * 5 + [True]
    assert {(e.server, e.model, e.error) for e in events} == {(SERVER, MODEL, None)}
    download = events[1]
    assert (download.digest, download.total, download.completed) == (
        "digestname",
        2142590208,
        241970,
    )
    assert (events[0].digest, events[0].total, events[0].completed) == (None, None, None)


def test_an_error_line_ends_the_server_with_ollamas_message(fixtures_dir: Path) -> None:
    """`{"error": ...}` mid-stream is this server's last event, with the message as sent."""
    data = (fixtures_dir / "ollama" / "pull-stream-error.ndjson").read_bytes()
    first, error = (decode(raw) for raw in data.splitlines())
    assert not first.done
    assert (error.status, error.done, error.error) == ("error", True, MISSING)
    nested = decode(line(error={"message": "quota exceeded"}))
    assert nested.error == "quota exceeded"


def test_a_layer_without_completed_has_completed_nothing() -> None:
    """Ollama leaves `completed` out while it is 0; a count that is not one is dropped."""
    started = decode(layer(DIGEST_A, 4096))
    assert (started.status, started.digest, started.total, started.completed) == (
        f"pulling {'a' * 12}",
        DIGEST_A,
        4096,
        0,
    )
    odd = decode(line(status="pulling x", digest=DIGEST_A, total=True, completed=-5))
    assert (odd.total, odd.completed) == (None, None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json at all\n", "not JSON: 'not json at all'"),
        (b"[1, 2]\n", "a JSON list where an object was expected"),
        (b'{"progress": 5}\n', "not Ollama's pull progress: '{\"progress\": 5}'"),
        (b'{"status": ""}\n', "not Ollama's pull progress"),
    ],
)
def test_a_line_that_is_not_pull_progress_fails_the_server(data: bytes, reason: str) -> None:
    """Garbage is a described failure of that server, never an exception."""
    event = decode(data)
    assert (event.status, event.done) == ("error", True)
    assert event.error is not None
    assert reason in event.error


def test_blank_lines_are_skipped() -> None:
    """Keep-alive blank lines make no event."""
    assert decode_pull_line(b"\n", SERVER, MODEL) is None
    assert decode_pull_line(b"  \r\n", SERVER, MODEL) is None


# -- the layer sums -------------------------------------------------------------------------


def test_interleaved_layers_add_up_exactly() -> None:
    """Each layer counts with its latest progress, whatever order the layers come in."""
    tracker = PullTracker(SERVER, MODEL)
    feed = [
        line(status="pulling manifest"),
        layer(DIGEST_A, 1000),
        layer(DIGEST_B, 100),
        layer(DIGEST_A, 1000, 400),
        layer(DIGEST_B, 100, 100),
        layer(DIGEST_A, 1000, 700),
    ]
    events = [tracker.feed(decode(raw)) for raw in feed]
    assert [(e.bytes_completed, e.bytes_total) for e in events] == [
        (0, 0),
        (0, 1000),
        (0, 1100),
        (400, 1100),
        (500, 1100),
        (800, 1100),
    ]
    assert events[0].fraction is None
    assert events[-1].fraction == pytest.approx(800 / 1100)
    assert not tracker.done
    assert tracker.last_status == f"pulling {'a' * 12}"


def test_success_completes_every_layer() -> None:
    """Ollama's last report of a layer may fall short of its end; success means it is all
    there."""
    tracker = PullTracker(SERVER, MODEL)
    tracker.feed(decode(layer(DIGEST_A, 1000, 990)))
    done = tracker.feed(decode(line(status="success")))
    assert (done.bytes_completed, done.bytes_total, done.fraction) == (1000, 1000, 1.0)
    assert tracker.done
    assert PullProgress(SERVER, MODEL, "success", done=True).fraction == 1.0


def test_a_failure_keeps_the_sums_and_says_why() -> None:
    """`fail()` is the server's last event: status "error", the reason, the bytes so far."""
    tracker = PullTracker(SERVER, MODEL)
    tracker.feed(decode(line(status="pulling manifest")))
    tracker.feed(decode(layer(DIGEST_A, 1000, 250)))
    failed = tracker.fail("connection refused", unreachable=True)
    assert (failed.status, failed.done, failed.error, failed.unreachable) == (
        "error",
        True,
        "connection refused",
        True,
    )
    assert failed.fraction == 0.25
    assert tracker.done
    assert tracker.unfinished() == (
        f"the stream ended before Ollama reported success (last status: pulling {'a' * 12})"
    )


# -- AsyncCortex.pull -----------------------------------------------------------------------


async def test_a_pull_reaches_every_server_at_once_and_each_ends_once(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """One server succeeds, one fails mid-stream, one refuses: one last event each, with the
    reason, and the model is installed where the pull succeeded."""
    good = fake_ollama()
    bad = fake_ollama()
    bad.on("/api/pull", ndjson_lines([line(status="pulling manifest"), line(error=MISSING)]))
    refused = refused_url()
    async with client(good.url, bad.url, refused) as cortex:
        events = await collect(cortex, MODEL)
    finals = last_events(events)
    assert finals[good.url].status == "success"
    assert finals[good.url].error is None
    assert finals[good.url].fraction == 1.0
    assert finals[good.url].bytes_total == sum(size for _, size in PULL_LAYERS)
    assert (finals[bad.url].error, finals[bad.url].unreachable) == (MISSING, False)
    assert (finals[refused].error, finals[refused].unreachable) == ("connection refused", True)
    assert good.has_model(MODEL)
    assert not bad.has_model(MODEL)
    [request] = [r for r in good.requests if r.path == "/api/pull"]
    assert (request.method, request.json) == (
        "POST",
        {"model": MODEL, "insecure": False, "stream": True},
    )
    layers = [e for e in events if e.server == good.url and e.digest is not None]
    assert len({e.digest for e in layers}) == 2
    assert [e.bytes_completed for e in layers] == sorted(e.bytes_completed for e in layers)


async def test_plain_async_for_runs_a_pull_to_its_end(fake_ollama: FakeOllamaFactory) -> None:
    """Without `async with`, iterating to the end pulls too, and leaves nothing open."""
    server = fake_ollama()
    async with client(server.url) as cortex:
        events = [p async for p in cortex.pull(MODEL)]
    assert last_events(events)[server.url].status == "success"
    assert server.has_model(MODEL)
    assert server.disconnects == 0


async def test_ollamas_http_errors_are_the_servers_reason(fake_ollama: FakeOllamaFactory) -> None:
    """An error status before any progress: Ollama's message and the status; a server with
    no /api/pull is named as maybe not Ollama."""
    rejecting = fake_ollama()
    rejecting.on("/api/pull", status(400, {"error": "invalid model name"}))
    old = fake_ollama()
    old.on("/api/pull", page_not_found())
    async with client(rejecting.url, old.url) as cortex:
        finals = last_events(await collect(cortex, "Bad Name!"))
    assert finals[rejecting.url].error == "invalid model name (HTTP 400)"
    assert finals[old.url].error == (
        "no /api/pull endpoint here (HTTP 404); is this an Ollama server?"
    )


async def test_a_stream_that_ends_or_breaks_early_fails_the_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """No "success" before the body ends, the connection cut, or silence past the idle
    limit: each fails that server, saying which."""
    unfinished = fake_ollama()
    ended = [line(status="pulling manifest"), line(status="writing manifest")]
    unfinished.on("/api/pull", ndjson_lines(ended))
    cut = fake_ollama()
    cut.on("/api/pull", CutMidPull())
    silent = fake_ollama()
    silent.on("/api/pull", SilentMidPull())
    timeout = Timeout(connect=1.0, idle=0.5)
    async with client(unfinished.url, cut.url, silent.url, timeout=timeout) as cortex:
        finals = last_events(await collect(cortex, MODEL))
    assert finals[unfinished.url].error == (
        "the stream ended before Ollama reported success (last status: writing manifest)"
    )
    assert finals[cut.url].error == "the connection was cut mid-pull"
    assert finals[silent.url].error == "sent nothing for 0.5s (Timeout.idle sets the limit)"
    assert not any(f.unreachable for f in finals.values())


async def test_an_openai_style_server_is_refused_without_a_request(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """An OpenAI-style server cannot pull: it fails at once, saying so; nothing is sent."""
    server = fake_ollama()
    async with client(Server(server.url, api="openai")) as cortex:
        finals = last_events(await collect(cortex, MODEL))
    assert finals[server.url].error == (
        "an OpenAI-style server cannot pull models; load the model on the server itself"
    )
    assert server.count("/api/pull") == 0


async def test_servers_default_to_the_configured_ones_else_the_candidates(
    fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`servers=` picks the servers; without it the configured ones, else OLLAMA_HOST."""
    configured, other, local = fake_ollama(), fake_ollama(), fake_ollama()
    monkeypatch.setenv("OLLAMA_HOST", local.url)
    async with client(configured.url, fallback=True) as cortex:
        assert cortex.candidates() == [configured.url, local.url]
        assert cortex.pull(MODEL).servers == [configured.url]
        assert last_events(await collect(cortex, MODEL, servers=[other.url])).keys() == {other.url}
        openai = last_events(await collect(cortex, MODEL, servers="openai+" + local.url))
        assert "OpenAI-style server cannot pull" in (openai[local.url].error or "")
    assert (configured.count("/api/pull"), other.count("/api/pull")) == (0, 1)
    async with AsyncCortex(timeout=QUICK) as cortex:
        assert last_events(await collect(cortex, MODEL))[local.url].status == "success"


async def test_a_model_name_is_checked_before_anything_is_sent(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """An empty or non-string name is a ValidationError from pull() itself."""
    server = fake_ollama()
    async with client(server.url) as cortex:
        for bad in ("", "   ", None):
            with pytest.raises(ValidationError, match="non-empty name"):
                cortex.pull(bad)  # type: ignore[arg-type]
    assert server.count("/api/pull") == 0


async def test_a_pull_runs_once_and_not_on_a_closed_client(fake_ollama: FakeOllamaFactory) -> None:
    """A finished pull cannot be entered again, one closed before it started yields
    nothing, and a closed client cannot start one."""
    server = fake_ollama()
    cortex = client(server.url)
    pulling = cortex.pull(MODEL)
    async with pulling:
        assert last_events([p async for p in pulling])[server.url].status == "success"
    with pytest.raises(RuntimeError, match="already started"):
        await pulling.__aenter__()
    unused = cortex.pull(MODEL)
    await unused.aclose()
    assert [p async for p in unused] == []
    await cortex.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        cortex.pull(MODEL)


# -- leaving early --------------------------------------------------------------------------


async def test_break_inside_async_with_closes_every_connection(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Leaving the block after the first event cancels both servers' requests at once."""
    first, second = fake_ollama(), fake_ollama()
    for server in (first, second):
        server.on("/api/pull", slow_pull())
    async with client(first.url, second.url) as cortex:
        with anyio.fail_after(3):
            async with cortex.pull(MODEL) as progress:
                async for event in progress:
                    assert not event.done
                    break
        assert await disconnected(first)
        assert await disconnected(second)
    assert not first.has_model(MODEL)


async def test_cancelling_the_reader_closes_every_connection(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A cancel scope around the pull ends it: the requests are cancelled with it."""
    first, second = fake_ollama(), fake_ollama()
    for server in (first, second):
        server.on("/api/pull", slow_pull())
    seen: list[PullProgress] = []
    async with client(first.url, second.url) as cortex:
        with anyio.move_on_after(0.5) as scope:
            async with cortex.pull(MODEL) as progress:
                async for event in progress:
                    seen.append(event)
        assert scope.cancelled_caught
        assert await disconnected(first)
        assert await disconnected(second)
    assert seen
    assert not any(e.done for e in seen)


async def test_an_error_in_the_block_is_raised_as_it_is(fake_ollama: FakeOllamaFactory) -> None:
    """The caller's own exception comes out of `async with` unchanged, not in a group."""
    server = fake_ollama()
    server.on("/api/pull", slow_pull())
    async with client(server.url) as cortex:
        with pytest.raises(KeyError):
            async with cortex.pull(MODEL) as progress:
                async for _ in progress:
                    raise KeyError("mine")
        assert await disconnected(server)


async def test_aclose_stops_a_plain_async_for(fake_ollama: FakeOllamaFactory) -> None:
    """aclose() during a plain `async for` cancels the requests; the loop then ends."""
    server = fake_ollama()
    server.on("/api/pull", slow_pull())
    async with client(server.url) as cortex:
        pulling = cortex.pull(MODEL)
        count = 0
        async for _ in pulling:
            count += 1
            if count == 1:
                await pulling.aclose()
        assert count == 1
        assert await disconnected(server)


async def test_a_plain_async_for_left_early_warns_and_stops(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Breaking out of a plain `async for` drops the pull: a ResourceWarning says so, and
    the requests are cancelled all the same, even one waiting on a silent server."""
    server = fake_ollama()
    server.on("/api/pull", SilentMidPull())
    async with client(server.url, timeout=Timeout(idle=60)) as cortex:

        async def leave_early() -> None:
            async for _ in cortex.pull(MODEL):
                break

        with pytest.warns(ResourceWarning, match="unclosed <PullStream"):
            await leave_early()
        assert await disconnected(server)
    assert not server.has_model(MODEL)


async def test_a_cancelled_plain_async_for_stops_its_requests(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Without `async with`, cancelling the loop cancels the requests too."""
    server = fake_ollama()
    server.on("/api/pull", slow_pull())
    async with client(server.url) as cortex:
        with anyio.move_on_after(0.5):
            async for _ in cortex.pull(MODEL):
                pass
        assert await disconnected(server)


# -- Cortex.pull ----------------------------------------------------------------------------


@contextmanager
def blocking(*servers: str, backend: str = "asyncio") -> Iterator[Cortex]:
    with Cortex(list(servers), fallback=False, timeout=QUICK, backend=backend) as cortex:  # type: ignore[arg-type]
        yield cortex


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_blocking_pull_yields_every_event(fake_ollama: FakeOllamaFactory, backend: str) -> None:
    """`Cortex.pull` is a plain iterator of the same events."""
    good = fake_ollama()
    refused = refused_url()
    with blocking(good.url, refused, backend=backend) as cortex:
        finals = last_events(list(cortex.pull(MODEL)))
        with pytest.raises(ValidationError, match="non-empty name"):
            cortex.pull("")
    assert finals[good.url].status == "success"
    assert finals[refused].unreachable
    assert good.has_model(MODEL)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_breaking_out_of_the_blocking_pull_cancels_it(
    fake_ollama: FakeOllamaFactory, backend: str
) -> None:
    """`break` in a `for` over `Cortex.pull` closes the connection at once."""
    server = fake_ollama()
    server.on("/api/pull", slow_pull())
    with blocking(server.url, backend=backend) as cortex:
        for event in cortex.pull(MODEL):
            assert not event.done
            break
        assert server.wait_for_disconnect(5.0)


@contextmanager
def ctrl_c_after(seconds: float) -> Iterator[None]:
    """A real SIGINT to the main thread after `seconds`, as Ctrl-C would send."""
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    timer = threading.Timer(seconds, signal.pthread_kill, (main_thread, signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT needs POSIX")
def test_ctrl_c_in_the_blocking_pull_closes_the_connection(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """KeyboardInterrupt while waiting for the next event reaches the caller and cancels."""
    server = fake_ollama()
    server.on("/api/pull", slow_pull())
    with blocking(server.url) as cortex, ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
        for _ in cortex.pull(MODEL):
            pass
    assert server.wait_for_disconnect(5.0)


# -- aicortex pull --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["pull", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_pulls_onto_every_server_with_plain_lines_and_a_summary(
    fake_ollama: FakeOllamaFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not on a terminal: a line per update, then which servers have the model; status 0."""
    first, second = fake_ollama(), fake_ollama()
    code, out, err = run_cli(capsys, MODEL, "--server", first.url, "-s", second.url)
    assert (code, err) == (0, "")
    assert f"{first.url}  pulling manifest\n" in out
    layer_line = re.compile(rf"{first.url}  pulling ([0-9a-f]{{12}})  (\d+)% \((.*)\)\n")
    shown = [(m[1], m[2], m[3]) for m in layer_line.finditer(out)]
    digest = shown[0][0]
    assert (digest, "0", "0 B/2.0 GB") in shown
    assert (digest, "100", "2.0 GB/2.0 GB") in shown
    assert f"{second.url}  success\n" in out
    summary = out[out.rindex("\nSERVER") + 1 :].splitlines()
    assert [row.split() for row in summary] == [
        ["SERVER", "RESULT"],
        [first.url, "pulled"],
        [second.url, "pulled"],
    ]
    assert first.has_model(MODEL)
    assert second.has_model(MODEL)


def test_some_failed_is_status_1_naming_each_reason(
    fake_ollama: FakeOllamaFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """One server failing mid-stream and one refusing, one succeeding: status 1, the summary
    says why, and stderr has one error line."""
    good = fake_ollama()
    bad = fake_ollama()
    bad.on("/api/pull", ndjson_lines([line(status="pulling manifest"), line(error=MISSING)]))
    refused = refused_url()
    code, out, err = run_cli(capsys, MODEL, "-s", f"{good.url},{bad.url},{refused}")
    assert code == 1
    assert f"{good.url}  pulled\n" in out
    assert f"{bad.url}  failed: {MISSING}\n" in out
    assert f"{refused}  unreachable: connection refused\n" in out
    assert err == (
        f"aicortex: error: could not pull {MODEL!r} onto 2 of 3 servers: "
        f"{bad.url} ({MISSING}); {refused} (connection refused)\n"
    )


def test_every_server_unreachable_is_status_3(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing reached: status 3, as for the other commands."""
    first, second = refused_url(), refused_url()
    code, out, err = run_cli(capsys, MODEL, "-s", first, "-s", second)
    assert code == 3
    assert f"{first}  unreachable: connection refused\n" in out
    assert err.startswith(f"aicortex: error: could not pull {MODEL!r} onto 2 of 2 servers: ")


def test_a_failure_on_a_reachable_server_is_status_1_even_if_others_are_down(
    fake_ollama: FakeOllamaFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unreachable plus a real failure, nothing pulled: status 1, not 3."""
    bad = fake_ollama()
    code, _, _ = run_cli(capsys, "missing-model", "-s", bad.url, "-s", refused_url())
    assert code == 1


def test_the_command_defaults_to_ollama_host(
    fake_ollama: FakeOllamaFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --server: AICORTEX_SERVERS, else OLLAMA_HOST, as the other commands."""
    local, fleet = fake_ollama(), fake_ollama()
    monkeypatch.setenv("OLLAMA_HOST", local.url)
    assert run_cli(capsys, MODEL)[0] == 0
    assert local.has_model(MODEL)
    monkeypatch.setenv("AICORTEX_SERVERS", fleet.url)
    assert run_cli(capsys, "qwen3:4b")[0] == 0
    assert fleet.has_model("qwen3:4b")
    assert not local.has_model("qwen3:4b")


def test_an_empty_model_name_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """Status 2, one line, nothing sent."""
    code, _, err = run_cli(capsys, " ", "-s", refused_url())
    assert (code, err) == (2, "aicortex: error: the model name is empty\n")


def test_plain_lines_are_rate_limited_per_layer() -> None:
    """A layer's line again only once it has advanced a point; other statuses once; each
    server's last line always."""
    lines = _PullLines([SERVER])
    tracker = PullTracker(SERVER, MODEL)
    feed = [line(status="pulling manifest")] * 2
    feed += [layer(DIGEST_A, 10_000, i * 10) for i in range(1001)]  # a step of 0.1 %
    feed += [layer(DIGEST_B, 10, 3), line(status="verifying sha256 digest")]
    feed += [line(status="verifying sha256 digest"), line(status="success")]
    shown = [lines.line(tracker.feed(decode(raw))) for raw in feed]
    printed = [text for text in shown if text is not None]
    layer_a = [text for text in printed if "aaaaaaaaaaaa" in text]
    assert len(layer_a) == 101
    assert layer_a[1] == f"{SERVER}  pulling aaaaaaaaaaaa  1% (100 B/10.0 KB)"
    assert layer_a[-1] == f"{SERVER}  pulling aaaaaaaaaaaa  100% (10.0 KB/10.0 KB)"
    assert printed.count(f"{SERVER}  pulling manifest") == 1
    assert printed.count(f"{SERVER}  verifying sha256 digest") == 1
    assert f"{SERVER}  pulling bbbbbbbbbbbb  30% (3 B/10 B)" in printed
    assert printed[-1] == f"{SERVER}  success"
    failed = PullProgress(SERVER, MODEL, "error", done=True, error="connection refused")
    assert lines.line(failed) == f"{SERVER}  failed: connection refused"


def test_a_terminal_gets_live_bars(
    fake_ollama: FakeOllamaFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal, rich draws a bar per server instead of the plain lines."""
    pytest.importorskip("rich")
    server = fake_ollama()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run_cli(capsys, MODEL, "-s", server.url)
    assert code == 0
    assert "━" in out
    assert "success" in out
    assert f"{server.url}  pulling manifest\n" not in out
    assert out.endswith(f"{server.url}  pulled\n")


def test_a_terminal_without_rich_gets_the_plain_lines(
    fake_ollama: FakeOllamaFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rich is optional: without it a terminal gets the plain lines, not an error."""
    server = fake_ollama()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich raises ImportError
    code, out, _ = run_cli(capsys, MODEL, "-s", server.url)
    assert code == 0
    assert f"{server.url}  pulling manifest\n" in out
    assert f"{server.url}  success\n" in out
