"""The fake Ollama harness does what the library's tests rely on, shown with plain httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sniffio

from fakeollama import (
    BUSY_MESSAGE,
    STREAM_ERROR_MESSAGE,
    BlackHoleFactory,
    FakeOllama,
    FakeOllamaFactory,
    busy,
    cut_after,
    delayed,
    drop_connection,
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

CHAT = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]}
QUICK = httpx.Timeout(2.0, read=0.3)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A synchronous client with short timeouts."""
    # Plain HTTP only: verify=False skips loading the CA bundle, which costs ~0.1 s per client.
    with httpx.Client(timeout=QUICK, verify=False) as c:
        yield c


@pytest.fixture
def server(fake_ollama: FakeOllamaFactory) -> FakeOllama:
    """One fake Ollama with the default model installed."""
    return fake_ollama()


def lines_of(response: httpx.Response) -> list[dict[str, Any]]:
    """Decode an NDJSON body."""
    return [json.loads(line) for line in response.text.splitlines()]


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def test_version_and_root_answer_like_ollama(server: FakeOllama, client: httpx.Client) -> None:
    """GET /api/version reports the configured version and GET / says Ollama is running."""
    server.version = "0.5.1"
    assert client.get(f"{server.url}/api/version").json() == {"version": "0.5.1"}
    root = client.get(server.url + "/")
    assert root.text == "Ollama is running"
    assert root.headers["content-type"] == "text/plain; charset=utf-8"


def test_tags_lists_models_in_ollama_shape_and_follows_changes(
    server: FakeOllama, client: httpx.Client
) -> None:
    """GET /api/tags returns every configured model with Ollama's fields, live."""
    first = client.get(f"{server.url}/api/tags").json()
    assert [m["name"] for m in first["models"]] == ["llama3.2:3b"]
    entry = first["models"][0]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["model"] == "llama3.2:3b"
    assert len(entry["digest"]) == 64
    assert entry["details"]["family"] == "llama"
    assert entry["details"]["parameter_size"] == "3B"
    server.models = ["qwen3:8b", "gemma3"]
    second = client.get(f"{server.url}/api/tags").json()
    assert [m["name"] for m in second["models"]] == ["qwen3:8b", "gemma3"]


def test_unknown_paths_and_wrong_methods_get_gin_plain_text_errors(
    server: FakeOllama, client: httpx.Client
) -> None:
    """Unrouted paths answer 404 `404 page not found`, wrong methods 405, as text/plain."""
    missing = client.post(f"{server.url}/api/blobs/sha256-0", json={"model": "x"})
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert missing.headers["content-type"] == "text/plain"
    wrong = client.get(f"{server.url}/api/chat")
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")


def test_default_chat_streams_a_short_reply_with_final_stats(
    server: FakeOllama, client: httpx.Client
) -> None:
    """POST /api/chat streams one NDJSON chunk per token, then a done line with stats."""
    response = client.post(f"{server.url}/api/chat", json={**CHAT, "model": "LLAMA3.2:3b"})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["transfer-encoding"] == "chunked"
    chunks = lines_of(response)
    assert [c["message"]["content"] for c in chunks] == ["Hello", "!", ""]
    assert [c["done"] for c in chunks] == [False, False, True]
    assert {c["model"] for c in chunks} == {"LLAMA3.2:3b"}
    final = chunks[-1]
    assert final["done_reason"] == "stop"
    assert final["eval_count"] == 2
    for stat in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration"):
        assert isinstance(final[stat], int)


def test_each_ndjson_line_is_its_own_http_chunk(server: FakeOllama) -> None:
    """The chunked body carries exactly one NDJSON line per HTTP chunk."""
    server.chat = reply(["a", "b", "c"])
    body = json.dumps(CHAT).encode()
    received = raw_exchange(
        server.url,
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    _, _, rest = received.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        rest = rest[size + 2 :]
    assert len(chunks) == 4
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks)


def test_non_streamed_reply_is_one_json_object_with_content_length(
    server: FakeOllama, client: httpx.Client
) -> None:
    """With "stream": false the reply is a single JSON object with the joined content."""
    server.chat = reply(["Hel", "lo"], model="other", thinking=["hm"], done_reason="length")
    response = client.post(f"{server.url}/api/chat", json={**CHAT, "stream": False})
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert int(response.headers["content-length"]) == len(response.content)
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "Hello", "thinking": "hm"}
    assert body["model"] == "other"
    assert (body["done"], body["done_reason"], body["eval_count"]) == (True, "length", 2)


def test_reply_streams_thinking_first_and_tool_calls_before_the_final_chunk(
    server: FakeOllama, client: httpx.Client
) -> None:
    """Thinking chunks come first and tool calls arrive in a non-final chunk."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    server.chat = reply("It is", thinking=["Let me", " think"], tool_calls=[call])
    chunks = lines_of(client.post(f"{server.url}/api/chat", json=CHAT))
    messages = [c["message"] for c in chunks]
    assert [m.get("thinking") for m in messages[:2]] == ["Let me", " think"]
    assert messages[2]["content"] == "It is"
    assert messages[3]["tool_calls"] == [call]
    assert chunks[3]["done"] is False
    assert chunks[4]["done"] is True


def test_generate_replies_use_the_response_field(server: FakeOllama, client: httpx.Client) -> None:
    """POST /api/generate streams text in `response`, like Ollama's generate endpoint."""
    body = {"model": "llama3.2:3b", "prompt": "hi"}
    chunks = lines_of(client.post(f"{server.url}/api/generate", json=body))
    assert [c["response"] for c in chunks] == ["Hello", "!", ""]


def test_default_chat_rejects_missing_and_uninstalled_models(
    server: FakeOllama, client: httpx.Client
) -> None:
    """The default chat answers 400 without a model and 404 for an uninstalled one."""
    missing = client.post(f"{server.url}/api/chat", json={"messages": []})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})
    unknown = client.post(f"{server.url}/api/chat", json={**CHAT, "model": "nope:1b"})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "model 'nope:1b' not found"})


def test_chat_without_messages_loads_or_unloads_the_model(
    server: FakeOllama, client: httpx.Client
) -> None:
    """A chat with no messages answers one JSON object with done_reason load or unload."""
    url = f"{server.url}/api/chat"
    loaded = client.post(url, json={"model": "llama3.2:3b"}).json()
    unloaded = client.post(url, json={"model": "llama3.2:3b", "keep_alive": 0}).json()
    assert (loaded["done_reason"], unloaded["done_reason"]) == ("load", "unload")


def test_show_and_ps_describe_installed_and_loaded_models(
    server: FakeOllama, client: httpx.Client
) -> None:
    """POST /api/show describes an installed model; GET /api/ps lists `loaded` ones."""
    show = client.post(f"{server.url}/api/show", json={"model": "llama3.2:3b"}).json()
    assert show["model_info"]["llama.context_length"] == 4096
    absent = client.post(f"{server.url}/api/show", json={"model": "nope"})
    assert absent.json() == {"error": "model 'nope:latest' not found"}
    assert client.get(f"{server.url}/api/ps").json() == {"models": []}
    server.loaded = ["llama3.2:3b"]
    assert [m["name"] for m in client.get(f"{server.url}/api/ps").json()["models"]] == [
        "llama3.2:3b"
    ]


def test_pull_streams_ollama_progress_then_installs_the_model(
    server: FakeOllama, client: httpx.Client
) -> None:
    """POST /api/pull: manifest, two interleaved layers (no `completed` while 0), the checks,
    success; then the model is in /api/tags."""
    body = {"model": "qwen3:8b", "insecure": False, "stream": True}
    response = client.post(f"{server.url}/api/pull", json=body)
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = lines_of(response)
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-4:] == [
        "verifying sha256 digest",
        "writing manifest",
        "removing unused layers",
        "success",
    ]
    layers = [line for line in lines if "digest" in line]
    digests = [line["digest"] for line in layers]
    assert digests[:2] != [digests[0]] * 2  # interleaved
    assert all(line["status"] == f"pulling {line['digest'][7:19]}" for line in layers)
    assert "completed" not in layers[0]
    assert {line["digest"]: line["completed"] for line in layers[-2:]} == {
        line["digest"]: line["total"] for line in layers[-2:]
    }
    assert "qwen3:8b" in [m["name"] for m in client.get(f"{server.url}/api/tags").json()["models"]]
    again = client.post(f"{server.url}/api/pull", json={"model": "qwen3:8b", "stream": False})
    assert again.json() == {"status": "success"}
    assert server.models.count("qwen3:8b") == 1


def test_pull_of_a_missing_model_fails_mid_stream_and_bad_names_up_front(
    server: FakeOllama, client: httpx.Client
) -> None:
    """A name with "missing" gets Ollama's in-band error line (status 200); no name is 400."""
    response = client.post(f"{server.url}/api/pull", json={"model": "missing-model"})
    assert response.status_code == 200
    assert lines_of(response) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    assert not server.has_model("missing-model")
    empty = client.post(f"{server.url}/api/pull", json={"model": ""})
    assert (empty.status_code, empty.json()) == (400, {"error": "invalid model name"})


def test_delete_removes_an_installed_model_and_404s_otherwise(
    server: FakeOllama, client: httpx.Client
) -> None:
    """DELETE /api/delete: 200 with an empty body, then 404 with Ollama's message."""
    url = f"{server.url}/api/delete"
    deleted = client.request("DELETE", url, json={"model": "llama3.2:3b"})
    assert (deleted.status_code, deleted.content) == (200, b"")
    assert server.models == []
    again = client.request("DELETE", url, json={"model": "llama3.2:3b"})
    assert (again.status_code, again.json()) == (404, {"error": "model 'llama3.2:3b' not found"})
    assert client.post(url, json={"model": "x"}).status_code == 405


def test_a_pull_script_overrides_the_builtin_pull(server: FakeOllama, client: httpx.Client) -> None:
    """`server.on("/api/pull", ...)` answers instead of the builtin progress."""
    server.on("/api/pull", status(500, {"error": "disk full"}))
    response = client.post(f"{server.url}/api/pull", json={"model": "qwen3:8b"})
    assert (response.status_code, response.json()) == (500, {"error": "disk full"})
    assert not server.has_model("qwen3:8b")


def test_a_script_list_is_consumed_per_request_and_its_last_script_repeats(
    server: FakeOllama, client: httpx.Client
) -> None:
    """`chat = [a, b]` answers the first request with a, then b for every later request."""
    server.chat = [busy(), reply("ok")]
    codes = [client.post(f"{server.url}/api/chat", json=CHAT).status_code for _ in range(3)]
    assert codes == [503, 200, 200]
    assert server.chat == (reply("ok"),)
    server.chat = None
    assert lines_of(client.post(f"{server.url}/api/chat", json=CHAT))[0]["message"]["content"] == (
        "Hello"
    )


def test_status_scripts_send_ollama_error_bodies(server: FakeOllama, client: httpx.Client) -> None:
    """busy(), model_not_found(), page_not_found() and status() send the exact bodies."""
    url = f"{server.url}/api/chat"
    server.chat = [
        busy(),
        model_not_found(),
        page_not_found(),
        status(500, {"error": "boom"}),
        status(400, b"raw", content_type="application/x-custom"),
    ]
    answers = [client.post(url, json={**CHAT, "model": "ghost"}) for _ in range(5)]
    assert [r.status_code for r in answers] == [503, 404, 404, 500, 400]
    assert answers[0].json() == {"error": BUSY_MESSAGE}
    assert answers[1].json() == {"error": "model 'ghost' not found"}
    assert (answers[2].text, answers[2].headers["content-type"]) == (
        "404 page not found",
        "text/plain",
    )
    assert answers[3].json() == {"error": "boom"}
    assert (answers[4].content, answers[4].headers["content-type"]) == (
        b"raw",
        "application/x-custom",
    )


def test_keep_alive_serves_several_requests_on_one_connection(
    server: FakeOllama, client: httpx.Client
) -> None:
    """A pooled client reuses one TCP connection for streamed and plain responses."""
    for _ in range(3):
        client.get(f"{server.url}/api/tags").raise_for_status()
        client.post(f"{server.url}/api/chat", json=CHAT).raise_for_status()
    assert server.connections == 1
    assert server.count("/api/chat") == 3


def test_requests_are_recorded_with_headers_body_and_json(
    server: FakeOllama, client: httpx.Client
) -> None:
    """Every request is kept: method, path, query, lower-case headers, raw body, parsed JSON."""
    client.post(f"{server.url}/api/chat?x=1", json=CHAT, headers={"X-Trace": "abc"})
    client.post(f"{server.url}/api/chat", content=b"not json")
    first, second = server.requests
    assert (first.method, first.path, first.query) == ("POST", "/api/chat", "x=1")
    assert first.headers["x-trace"] == "abc"
    assert first.json == CHAT
    assert json.loads(first.body) == CHAT
    assert (second.body, second.json) == (b"not json", None)
    assert server.count("/api/chat", method="POST") == 2
    assert server.count("/api/tags") == 0


def test_chunked_request_bodies_are_decoded(server: FakeOllama, client: httpx.Client) -> None:
    """A request body sent with Transfer-Encoding: chunked is reassembled."""
    parts = [json.dumps(CHAT).encode()[:10], json.dumps(CHAT).encode()[10:]]
    client.post(f"{server.url}/api/chat", content=iter(parts)).raise_for_status()
    assert server.requests[0].headers["transfer-encoding"] == "chunked"
    assert server.requests[0].json == CHAT


def test_cut_after_drops_the_connection_mid_stream(
    server: FakeOllama, client: httpx.Client
) -> None:
    """cut_after streams n chunks, then closes without ending the chunked body."""
    server.chat = cut_after(["a", "b", "c"], 2)
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", f"{server.url}/api/chat", json=CHAT) as response,
    ):
        received.extend(response.iter_lines())
    assert [json.loads(line)["message"]["content"] for line in received] == ["a", "b"]


def test_cut_after_with_reset_is_a_network_error(server: FakeOllama, client: httpx.Client) -> None:
    """cut_after(reset=True) resets the connection, which httpx reports as an error."""
    server.chat = cut_after(["a", "b"], 1, reset=True)
    with (
        pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)),
        client.stream("POST", f"{server.url}/api/chat", json=CHAT) as response,
    ):
        for _ in response.iter_lines():
            pass


def test_drop_connection_closes_before_any_response(
    server: FakeOllama, client: httpx.Client
) -> None:
    """drop_connection() reads the request and hangs up without a status line."""
    server.chat = drop_connection()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{server.url}/api/chat", json=CHAT)


def test_error_after_sends_an_in_band_error_and_ends_the_body_cleanly(
    server: FakeOllama, client: httpx.Client
) -> None:
    """error_after streams n chunks, then {"error": ...}, with status 200 and no done line."""
    server.chat = error_after(["a", "b", "c"], 1)
    response = client.post(f"{server.url}/api/chat", json=CHAT)
    assert response.status_code == 200
    chunks = lines_of(response)
    assert chunks[0]["message"]["content"] == "a"
    assert chunks[1:] == [{"error": STREAM_ERROR_MESSAGE}]


def test_failure_scripts_without_streaming_fail_like_ollama(
    server: FakeOllama, client: httpx.Client
) -> None:
    """With "stream": false, error_after answers 500 and cut_after hangs up."""
    server.chat = [error_after("a", 0, "oom"), cut_after("a", 0)]
    body = {**CHAT, "stream": False}
    failed = client.post(f"{server.url}/api/chat", json=body)
    assert (failed.status_code, failed.json()) == (500, {"error": "oom"})
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{server.url}/api/chat", json=body)


def test_stall_before_headers_times_out_the_client_and_counts_the_disconnect(
    server: FakeOllama, client: httpx.Client
) -> None:
    """A stalled server never answers; the client's read timeout ends it, seen as a disconnect."""
    server.chat = stall_before_headers()
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"{server.url}/api/chat", json=CHAT)
    assert server.wait_for_disconnect(timeout=2)
    assert server.disconnects == 1


def test_stall_after_sends_headers_and_chunks_then_goes_silent(
    server: FakeOllama, client: httpx.Client
) -> None:
    """stall_after sends the headers and n chunks, then nothing, so the next read times out."""
    server.chat = stall_after(["a", "b"], 1)
    with client.stream("POST", f"{server.url}/api/chat", json=CHAT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert json.loads(next(lines))["message"]["content"] == "a"
        with pytest.raises(httpx.ReadTimeout):
            next(lines)


def test_client_leaving_during_a_slow_stream_is_counted_once(
    server: FakeOllama, client: httpx.Client
) -> None:
    """Closing a response between delayed chunks is noticed and counted as one disconnect."""
    server.chat = reply(["a", "b", "c", "d"], delay=0.1)
    with client.stream("POST", f"{server.url}/api/chat", json=CHAT) as response:
        next(response.iter_lines())
    started = time.monotonic()
    assert server.wait_for_disconnect(timeout=2)
    assert time.monotonic() - started < 0.5
    time.sleep(0.15)
    assert server.disconnects == 1


def test_a_finished_response_is_not_a_disconnect(server: FakeOllama, client: httpx.Client) -> None:
    """Reading a stream to the end and closing the client counts no disconnect."""
    server.chat = reply(["a", "b"], delay=0.01)
    client.post(f"{server.url}/api/chat", json=CHAT).raise_for_status()
    client.close()
    assert not server.wait_for_disconnect(timeout=0.2)


def test_ndjson_lines_sends_fixture_bytes_verbatim(
    server: FakeOllama, client: httpx.Client, fixtures_dir: Path
) -> None:
    """ndjson_lines streams raw lines as given, e.g. a fixture file."""
    data = (fixtures_dir / "ollama" / "stream-error-midstream.ndjson").read_bytes()
    server.chat = ndjson_lines(data.splitlines(keepends=True), delay=0.01)
    response = client.post(f"{server.url}/api/chat", json=CHAT)
    assert response.content == data
    server.chat = ndjson_lines([b"{not json\n", b'{"done":'])
    assert client.post(f"{server.url}/api/chat", json=CHAT).content == b'{not json\n{"done":'


def test_garbage_response_is_a_protocol_error(server: FakeOllama, client: httpx.Client) -> None:
    """garbage_response answers with bytes that are not HTTP."""
    server.chat = garbage_response()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{server.url}/api/chat", json=CHAT)


def test_probe_delay_slows_the_probe_endpoints_only(
    fake_ollama: FakeOllamaFactory, client: httpx.Client
) -> None:
    """probe_delay is slept before /api/tags and /api/version, but not before /api/chat."""
    server = fake_ollama(probe_delay=0.2)
    started = time.monotonic()
    client.get(f"{server.url}/api/tags").raise_for_status()
    client.get(f"{server.url}/api/version").raise_for_status()
    probes = time.monotonic() - started
    client.post(f"{server.url}/api/chat", json=CHAT).raise_for_status()
    assert 0.4 <= probes < 1.0
    assert time.monotonic() - started - probes < 0.2


def test_probe_endpoints_can_be_scripted_to_fail(server: FakeOllama, client: httpx.Client) -> None:
    """on("/api/tags", ...) replaces the built-in answer; on(path, None) restores it."""
    server.on("/api/tags", [status(500, {"error": "boom"}), delayed(0.5, status(200, {}))])
    assert client.get(f"{server.url}/api/tags").status_code == 500
    with pytest.raises(httpx.ReadTimeout):
        client.get(f"{server.url}/api/tags")
    server.on("/api/tags", None)
    assert client.get(f"{server.url}/api/tags").json()["models"][0]["name"] == "llama3.2:3b"


def test_refused_url_refuses_connections(client: httpx.Client) -> None:
    """refused_url() points at a port where nothing listens."""
    with pytest.raises(httpx.ConnectError):
        client.get(refused_url() + "/api/tags")


def test_black_hole_accepts_connections_and_never_answers(
    black_hole: BlackHoleFactory, client: httpx.Client
) -> None:
    """A BlackHole completes the TCP handshake and then stays silent."""
    hole = black_hole()
    with pytest.raises(httpx.ReadTimeout):
        client.get(f"{hole.url}/api/tags")
    assert hole.wait_for_connection(timeout=1)
    assert hole.accepted == 1


def test_stop_ends_open_connections_promptly(fake_ollama: FakeOllamaFactory) -> None:
    """stop() closes a connection waiting on a stalled request at once and does not hang."""
    server = fake_ollama(chat=stall_before_headers())

    def stop_once_the_request_arrived() -> None:
        assert server.wait_for_request("/api/chat", timeout=2)
        server.stop()

    stopper = threading.Thread(target=stop_once_the_request_arrived)
    stopper.start()
    started = time.monotonic()
    with httpx.Client(timeout=5, verify=False) as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{server.url}/api/chat", json=CHAT)
    stopper.join()
    assert time.monotonic() - started < 1
    assert server.disconnects == 0


def test_context_manager_starts_and_stops_a_server() -> None:
    """`with FakeOllama() as server` serves inside the block and refuses connections after."""
    with FakeOllama(version="1.2.3") as server:
        assert httpx.get(f"{server.url}/api/version").json() == {"version": "1.2.3"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/api/version")


def test_reference_fixtures_are_present_and_parse(fixtures_dir: Path) -> None:
    """The copied wire fixtures are there, and every JSON and NDJSON one parses."""
    for name in ("ollama/chat-stream.ndjson", "ollama/tags.json", "ollama/requests/chat.json"):
        assert (fixtures_dir / name).is_file()
    assert (fixtures_dir / "openai" / "requests" / "chat.json").is_file()
    for path in fixtures_dir.rglob("*.json"):
        json.loads(path.read_bytes())
    for path in fixtures_dir.rglob("*.ndjson"):
        assert all(json.loads(line) for line in path.read_bytes().splitlines())


async def test_twenty_slow_servers_answer_concurrently(
    fake_ollama: FakeOllamaFactory, anyio_backend: str
) -> None:
    """Twenty servers with a 0.3 s probe answer concurrently, on asyncio and trio alike."""
    assert sniffio.current_async_library() == anyio_backend
    started = time.monotonic()
    servers = [fake_ollama(probe_delay=0.3) for _ in range(20)]
    versions: list[str] = []

    async def probe(client: httpx.AsyncClient, url: str) -> None:
        versions.append((await client.get(f"{url}/api/version")).json()["version"])

    async with httpx.AsyncClient(timeout=5) as client, anyio.create_task_group() as tg:
        for server in servers:
            tg.start_soon(probe, client, server.url)
    assert versions == ["0.33.0"] * 20
    assert time.monotonic() - started < 1.5


async def test_async_client_closing_a_slow_stream_is_counted_as_a_disconnect(
    server: FakeOllama,
) -> None:
    """An async client that closes a slow stream after its headers shows up in disconnects."""
    # Not iterating: on trio, breaking out of httpx's aiter_* leaves its inner async
    # generators to the GC, and trio's ResourceWarning fails the test under -W error.
    server.chat = reply(["a", "b", "c"], delay=0.1)
    async with (
        httpx.AsyncClient(timeout=5) as client,
        client.stream("POST", f"{server.url}/api/chat", json=CHAT) as response,
    ):
        assert response.status_code == 200
    assert await anyio.to_thread.run_sync(server.wait_for_disconnect, 2.0)
    assert server.count("/api/chat") == 1
