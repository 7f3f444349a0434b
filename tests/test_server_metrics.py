"""The proxy's ``/metrics`` and access log, after real traffic through uvicorn: counts that
match what was sent, keys, several worker processes, and nothing secret in a log line."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aicortex import AsyncCortex
from aicortex.server import create_app
from aicortex.server._observe import format_line
from fakeollama import FakeOllama, FakeOllamaFactory, refused_url, reply
from test_server_app import HI, MODEL, QUICK, ServeFactory, sse_events
from test_server_app import serve as serve  # the fixture
from test_server_cli import SRC, Proxy
from test_server_cli import run_proxy as run_proxy  # the fixture

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels`` (scrapes
    themselves, ``route="/metrics"``, left out)."""
    wanted = set(labels.items())
    scrapes = ("route", "/metrics")
    return sum(
        v for (n, got), v in found.items() if n == name and wanted <= got and scrapes not in got
    )


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """``check()`` once it returns something true (a request is counted and logged just
    after its response went out)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def scrape(url: str, **headers: str) -> Samples:
    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def scrape_until(url: str, name: str, expected: float, **labels: str) -> Samples:
    """A scrape in which ``name`` (summed over the series with ``labels``) is ``expected``."""
    found: list[Samples] = []

    def check() -> bool:
        found[:] = [scrape(url)]
        return total(found[0], name, **labels) == expected

    eventually(check)
    return found[0]


# --- /metrics ------------------------------------------------------------------------------


def test_metrics_count_the_traffic_of_both_apis(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Chats streamed and not on /v1 and /api, embeddings, a failover from a refused
    server: requests, tokens, first tokens, speeds, loads and durations as sent."""
    upstream = fake_ollama(chat=reply(["a", "b", "c"]))
    down = refused_url()
    url = serve(servers=[down, upstream.url])
    chat = url + "/v1/chat/completions"
    assert httpx.post(chat, json=HI).status_code == 200  # fails over from the refused server
    assert sse_events(httpx.post(chat, json={**HI, "stream": True}).text)[-1] == "[DONE]"
    assert httpx.post(chat, json={**HI, "stream": True}).status_code == 200
    assert httpx.post(url + "/api/chat", json=HI).status_code == 200  # streamed NDJSON
    assert httpx.post(url + "/api/chat", json={**HI, "stream": False}).status_code == 200
    embed = {"model": MODEL, "input": ["one", "two words"]}
    assert httpx.post(url + "/api/embed", json=embed).status_code == 200
    assert httpx.post(url + "/v1/embeddings", json=embed).status_code == 200
    assert httpx.post(chat, json={**HI, "model": "nobody-has:1b"}).status_code == 200
    assert httpx.get(url + "/nowhere").status_code == 404
    found = scrape_until(url, "aicortex_requests_total", 9)

    ok = {"model": MODEL, "server": upstream.url, "outcome": "ok"}
    assert value(found, "aicortex_requests_total", route="/v1/chat/completions", **ok) == 3
    assert value(found, "aicortex_requests_total", route="/api/chat", **ok) == 2
    assert value(found, "aicortex_requests_total", route="/api/embed", **ok) == 1
    assert value(found, "aicortex_requests_total", route="/v1/embeddings", **ok) == 1
    unmatched = {"route": "unmatched", "model": "", "server": "", "outcome": "invalid"}
    assert value(found, "aicortex_requests_total", **unmatched) == 1
    assert value(found, "aicortex_failovers_total", reason="unreachable") == 1
    pair = {"model": MODEL, "server": upstream.url}
    # Five chats of 8 prompt tokens, two embeddings of 2 + 3; 3 answer tokens each.
    assert value(found, "aicortex_tokens_total", kind="prompt", **pair) == 5 * 8 + 2 * 5
    assert value(found, "aicortex_tokens_total", kind="completion", **pair) == 5 * 3
    assert value(found, "aicortex_time_to_first_token_seconds_count", **pair) == 5
    assert value(found, "aicortex_time_to_first_token_seconds_sum", **pair) > 0
    assert value(found, "aicortex_generation_tokens_per_second_count", **pair) == 5
    assert value(found, "aicortex_generation_tokens_per_second_sum", **pair) == 5 * 100.0
    assert value(found, "aicortex_model_load_seconds_count", **pair) == 7
    route = {"route": "/v1/chat/completions", "outcome": "ok"}  # with nobody-has:1b's
    assert value(found, "aicortex_request_duration_seconds_count", **route) == 4
    assert value(found, "aicortex_request_duration_seconds_bucket", le="+Inf", **route) == 4
    assert value(found, "aicortex_client_disconnects_total") == 0
    assert value(found, "aicortex_in_flight", server=upstream.url) == 0
    assert value(found, "aicortex_server_state", server=upstream.url, state="healthy") == 1
    assert value(found, "aicortex_server_state", server=down, state="ejected") == 1
    assert total(found, "aicortex_server_state", server=down) == 1


async def test_a_client_that_leaves_is_counted_and_its_stream_closed(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A client that disconnects mid-stream: client_gone, and one disconnect."""
    upstream = fake_ollama(chat=reply([f"t{i}" for i in range(200)], delay=0.05))
    url = serve(servers=[upstream.url])
    async with (
        httpx.AsyncClient() as client,
        client.stream(
            "POST", url + "/v1/chat/completions", json={**HI, "stream": True}
        ) as response,
    ):
        async for line in response.aiter_lines():
            if '"content":"t' in line:
                break
    assert await anyio.to_thread.run_sync(upstream.wait_for_disconnect, 2.0)
    found = await anyio.to_thread.run_sync(
        lambda: scrape_until(url, "aicortex_client_disconnects_total", 1)
    )
    gone = {"route": "/v1/chat/completions", "model": MODEL, "server": upstream.url}
    assert value(found, "aicortex_requests_total", outcome="client_gone", **gone) == 1
    assert (
        value(found, "aicortex_time_to_first_token_seconds_count", model=MODEL, server=upstream.url)
        == 1
    )
    assert (
        value(found, "aicortex_tokens_total", kind="completion", model=MODEL, server=upstream.url)
        == 0
    )
    assert value(found, "aicortex_in_flight", server=upstream.url) == 0


def test_a_client_that_leaves_while_sending_its_body_is_counted(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """No answer was started and none recorded: the request still counts as client_gone."""
    url = serve(servers=[fake_ollama().url])
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
        )
        time.sleep(0.1)
    found = scrape_until(url, "aicortex_client_disconnects_total", 1)
    gone = {"route": "/v1/chat/completions", "model": "", "server": ""}
    assert value(found, "aicortex_requests_total", outcome="client_gone", **gone) == 1


def test_a_stream_in_flight_is_counted_while_it_runs(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """aicortex_in_flight is the fleet's count when scraped."""
    upstream = fake_ollama(chat=reply([f"t{i}" for i in range(20)], delay=0.05))
    url = serve(servers=[upstream.url])
    with httpx.stream("POST", url + "/v1/chat/completions", json={**HI, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        assert value(scrape(url), "aicortex_in_flight", server=upstream.url) == 1
        for _ in lines:
            pass
    assert value(scrape(url), "aicortex_in_flight", server=upstream.url) == 0


def test_metrics_need_a_key_unless_open(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """/metrics is behind the keys like every route; metrics_open serves it without one.
    Requests refused for their key are counted, under the route they asked for."""
    upstream = fake_ollama()
    guarded = serve(servers=[upstream.url], api_keys=["sk-right"])
    assert httpx.get(guarded + "/metrics").status_code == 401
    assert httpx.post(guarded + "/v1/chat/completions", json=HI).status_code == 401
    found = scrape(guarded, authorization="Bearer sk-right")
    refused = {
        "route": "/v1/chat/completions",
        "model": "",
        "server": "",
        "outcome": "unauthorized",
    }
    assert value(found, "aicortex_requests_total", **refused) == 1
    opened = serve(servers=[upstream.url], api_keys=["sk-right"], metrics_open=True)
    assert httpx.get(opened + "/metrics").status_code == 200
    assert httpx.get(opened + "/ready").status_code == 401
    assert httpx.get(opened + "/health").status_code == 200


def test_metrics_off_serves_no_route_and_imports_no_prometheus(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """create_app(metrics=False): /metrics is an unknown URL, and prometheus_client is
    never imported; with the access log off too, nothing wraps the requests."""
    url = serve(servers=[fake_ollama().url], metrics=False)
    assert httpx.get(url + "/metrics").status_code == 404
    code = (
        "import sys\n"
        "from aicortex.server import create_app\n"
        "app = create_app(servers=['http://127.0.0.1:9'], metrics=False, access_log=False)\n"
        "app.build_middleware_stack()\n"
        "names = [m.cls.__name__ for m in app.user_middleware]\n"
        "print('prometheus_client' in sys.modules, names)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False ['Gateway']"


async def test_metrics_and_the_log_work_in_process_on_either_event_loop(
    fake_ollama: FakeOllamaFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Driven on the test's own loop (asyncio or trio), through a cortex passed in."""
    caplog.set_level(logging.INFO, logger="aicortex.access")
    upstream = fake_ollama(chat=reply(["in", "-process"]))
    async with AsyncCortex([upstream.url], fallback=False, timeout=QUICK) as cortex:
        app = create_app(cortex, log_format="json")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            await client.post("/v1/chat/completions", json={**HI, "stream": True})
            await client.post("/api/chat", json=HI)
            await cortex.chat("not through the proxy", model=MODEL)
            found = parse((await client.get("/metrics")).text)
    ok = {"model": MODEL, "server": upstream.url, "outcome": "ok"}
    assert value(found, "aicortex_requests_total", route="/v1/chat/completions", **ok) == 1
    assert value(found, "aicortex_requests_total", route="/api/chat", **ok) == 1
    # The cortex's own chat is not the proxy's: not counted, not logged.
    assert (
        value(found, "aicortex_tokens_total", kind="completion", model=MODEL, server=upstream.url)
        == 4
    )
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "aicortex.access"]
    assert [line["route"] for line in lines] == ["/v1/chat/completions", "/api/chat", "/metrics"]


# --- several worker processes ------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_several_workers_sharing_a_directory_add_up(
    run_proxy: type[Proxy],
    fake_ollama: FakeOllamaFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two `aicortex serve` processes with one PROMETHEUS_MULTIPROC_DIR: a scrape of
    either sums both; a worker that stops takes its in-flight counts and server states
    with it, and its requests still count."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    upstream = fake_ollama(chat=reply(["x", "y"]))
    first = run_proxy("--server", upstream.url, "--no-access-log")
    second = run_proxy("--server", upstream.url, "--no-access-log")
    first.wait_until_up()
    second.wait_until_up()
    for proxy, count in ((first, 3), (second, 5)):
        for _ in range(count):
            response = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
            assert response.status_code == 200
    chats = {"route": "/v1/chat/completions"}
    for proxy in (first, second):
        found = scrape_until(proxy.url, "aicortex_requests_total", 8, **chats)
        pair = {"model": MODEL, "server": upstream.url}
        assert value(found, "aicortex_requests_total", outcome="ok", **chats, **pair) == 8
        assert value(found, "aicortex_tokens_total", kind="completion", **pair) == 16
        assert value(found, "aicortex_time_to_first_token_seconds_count", **pair) == 8
        assert value(found, "aicortex_request_duration_seconds_count", outcome="ok", **chats) == 8
        # One series each, added up over the workers (no series per process).
        assert found["aicortex_in_flight", frozenset({("server", upstream.url)})] == 0
        assert len([key for key in found if key[0] == "aicortex_in_flight"]) == 1
        assert value(found, "aicortex_server_state", server=upstream.url, state="healthy") == 1
        assert len([key for key in found if key[0] == "aicortex_server_state"]) == 5
    second_pid = second.process.pid
    code, err = second.stop()
    assert code == 0, err
    assert not list(tmp_path.glob(f"gauge_live*_{second_pid}.db"))
    assert list(tmp_path.glob(f"counter_{second_pid}.db"))
    found = scrape(first.url)
    assert total(found, "aicortex_requests_total", outcome="ok", **chats) == 8
    assert value(found, "aicortex_server_state", server=upstream.url, state="healthy") == 1


def test_a_multiprocess_directory_that_is_missing_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PROMETHEUS_MULTIPROC_DIR names no directory: create_app says so."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="is not a directory"):
        create_app(servers=["http://127.0.0.1:9"])


def test_a_multiprocess_directory_set_too_late_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """prometheus_client (imported by this test process) keeps its figures in memory: the
    app refuses to pretend that several workers add up."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before the process starts"):
        create_app(servers=["http://127.0.0.1:9"])


# --- the access log -----------------------------------------------------------------------------

SECRETS = ("sk-key-secret-1", "sk-key-secret-2", "PROMPT-SECRET", "ANSWER-SECRET", "THINK-SECRET")


@pytest.fixture
def access_lines(
    caplog: pytest.LogCaptureFixture,
) -> Callable[[int], list[logging.LogRecord]]:
    """``lines(n)``: the access-log records, once there are ``n`` of them."""
    caplog.set_level(logging.DEBUG)

    def lines(count: int) -> list[logging.LogRecord]:
        def found() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "aicortex.access"]

        eventually(lambda: len(found()) >= count)
        return found()

    return lines


def secret_traffic(url: str, upstream: FakeOllama) -> None:
    """Requests with keys, prompts and answers that must never be logged: good and bad
    keys, whole and streamed chats on both APIs, a stream the client leaves."""
    good = {"authorization": "Bearer sk-key-secret-1"}
    prompt = {"model": MODEL, "messages": [{"role": "user", "content": "PROMPT-SECRET"}]}
    chat = url + "/v1/chat/completions"
    assert httpx.post(chat, json=prompt, headers=good).status_code == 200
    assert httpx.post(chat, json={**prompt, "stream": True}, headers=good).status_code == 200
    assert httpx.post(url + "/api/chat", json=prompt, headers=good).status_code == 200
    assert (
        httpx.post(
            url + "/api/generate", json={"model": MODEL, "prompt": "PROMPT-SECRET"}, headers=good
        ).status_code
        == 200
    )
    bad = {"authorization": "Bearer sk-key-secret-2"}
    assert httpx.post(chat, json=prompt, headers=bad).status_code == 401
    upstream.chat = reply(["ANSWER-SECRET"] * 100, delay=0.05)
    with httpx.stream("POST", chat, json={**prompt, "stream": True}, headers=good) as response:
        next(response.iter_lines())


def test_the_text_log_has_one_line_per_request_with_its_fields(
    serve: ServeFactory,
    fake_ollama: FakeOllamaFactory,
    access_lines: Callable[[int], list[logging.LogRecord]],
) -> None:
    """key=value pairs: request id, method, route, model, server, status, first token,
    tokens, duration, outcome and whether the client left; no key, prompt or answer."""
    upstream = fake_ollama(chat=reply(["ANSWER-SECRET", " more"], thinking=["THINK-SECRET"]))
    url = serve(servers=[upstream.url], api_keys=["sk-key-secret-1"])
    secret_traffic(url, upstream)
    records = access_lines(6)
    assert len(records) == 6
    texts = [r.getMessage() for r in records]
    first = dict(part.split("=", 1) for part in texts[0].split(" "))
    assert list(first) == [
        "request_id",
        "method",
        "route",
        "model",
        "server",
        "status",
        "first_token_ms",
        "prompt_tokens",
        "completion_tokens",
        "duration_ms",
        "outcome",
        "client_gone",
    ]
    assert len(first["request_id"]) == 32
    assert (first["method"], first["route"], first["model"], first["server"]) == (
        "POST",
        "/v1/chat/completions",
        MODEL,
        upstream.url,
    )
    assert (first["status"], first["prompt_tokens"], first["completion_tokens"]) == (
        "200",
        "8",
        "2",
    )
    assert float(first["first_token_ms"]) > 0
    assert float(first["duration_ms"]) >= float(first["first_token_ms"])
    assert (first["outcome"], first["client_gone"]) == ("ok", "false")
    refused = texts[4]
    assert "status=401" in refused
    assert "model=- server=-" in refused
    assert "outcome=unauthorized" in refused
    left = texts[5]
    assert "client_gone=true" in left
    assert "outcome=client_gone" in left
    assert records[0].request_id == first["request_id"]  # type: ignore[attr-defined]
    for record in records:
        logged = record.getMessage() + json.dumps(record.access)  # type: ignore[attr-defined]
        assert not [s for s in SECRETS if s in logged], logged


def test_the_json_log_has_one_object_per_request_and_nothing_secret(
    serve: ServeFactory,
    fake_ollama: FakeOllamaFactory,
    access_lines: Callable[[int], list[logging.LogRecord]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """log_format="json": each line a JSON object with its time; none holds a secret,
    nor does anything else logged at any level."""
    upstream = fake_ollama(chat=reply(["ANSWER-SECRET", " more"], thinking=["THINK-SECRET"]))
    url = serve(servers=[upstream.url], api_keys=["sk-key-secret-1"], log_format="json")
    secret_traffic(url, upstream)
    records = access_lines(6)
    lines = [json.loads(r.getMessage()) for r in records]
    assert len(lines) == 6
    first = lines[0]
    assert first["time"].endswith("Z")
    assert first["method"] == "POST"
    assert first["route"] == "/v1/chat/completions"
    assert (first["model"], first["server"], first["status"]) == (MODEL, upstream.url, 200)
    assert (first["prompt_tokens"], first["completion_tokens"]) == (8, 2)
    assert first["first_token_ms"] > 0
    assert first["client_gone"] is False
    assert [line["route"] for line in lines] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/api/chat",
        "/api/generate",
        "/v1/chat/completions",
        "/v1/chat/completions",
    ]
    assert lines[4]["status"] == 401
    assert lines[4]["model"] is None
    assert lines[5]["client_gone"] is True
    assert caplog.records
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert not [s for s in SECRETS if s in everything]


def test_a_line_stays_one_line_whatever_the_client_sends() -> None:
    """A value with spaces, quotes or newlines is quoted and escaped; a long one is cut."""
    line = format_line(
        {"model": 'evil\nrequest_id=x "quoted"', "route": "/v1/models/" + "a" * 500, "n": None},
        "text",
    )
    assert "\n" not in line
    assert line.startswith('model="evil\\nrequest_id=x \\"quoted\\"" route=/v1/models/aaa')
    assert line.endswith("... n=-")
    assert len(line) < 300


def test_access_log_off_logs_nothing(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """create_app(access_log=False): no line, and the metrics still count."""
    caplog.set_level(logging.INFO)
    url = serve(servers=[fake_ollama().url], access_log=False)
    assert httpx.post(url + "/v1/chat/completions", json=HI).status_code == 200
    scrape_until(url, "aicortex_requests_total", 1)
    assert not [r for r in caplog.records if r.name == "aicortex.access"]


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_serve_writes_one_json_line_per_request_to_stderr(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """`aicortex serve --log-format json`: the lines on stderr, and none of uvicorn's."""
    upstream = fake_ollama()
    proxy = run_proxy("--server", upstream.url, "--log-format", "json")
    proxy.wait_until_up()  # one GET /health
    assert httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10).status_code == 200
    assert httpx.post(proxy.url + "/api/chat", json=HI, timeout=10).status_code == 200
    time.sleep(0.2)
    proxy.process.send_signal(signal.SIGINT)
    out, err = proxy.process.communicate(timeout=10)
    assert proxy.process.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(line["method"], line["route"]) for line in lines][-2:] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/api/chat"),
    ]
    assert all(line["route"] == "/health" for line in lines[:-2])
    assert "HTTP/1.1" not in out + err  # uvicorn's own access log is off


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_serve_text_lines_and_no_access_log(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """The text lines follow a timestamp; --no-access-log writes none."""
    upstream = fake_ollama()
    proxy = run_proxy("--server", upstream.url)
    quiet = run_proxy("--server", upstream.url, "--no-access-log")
    proxy.wait_until_up()
    quiet.wait_until_up()
    for target in (proxy, quiet):
        assert (
            httpx.post(target.url + "/v1/chat/completions", json=HI, timeout=10).status_code == 200
        )
    time.sleep(0.2)
    _, err = proxy.stop()
    lines = [line for line in err.splitlines() if "route=/v1/chat/completions" in line]
    assert len(lines) == 1
    assert lines[0][:4].isdigit()  # the time first
    assert "request_id=" in lines[0]
    _, quiet_err = quiet.stop()
    assert "request_id=" not in quiet_err
