"""OpenAI-style servers with respx at the HTTP boundary: the exact requests aicortex sends
to ``/v1/*`` and how llama.cpp's captured answers come back as aicortex's events and errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from aicortex import (
    AsyncCortex,
    EventType,
    ModelNotFoundError,
    Server,
    ServerError,
    StreamError,
    Timeout,
    ToolCall,
    ValidationError,
)

LLAMACPP = Path(__file__).parent / "fixtures" / "llamacpp"
OLLAMA = Path(__file__).parent / "fixtures" / "ollama"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=0.5)

A = "http://llama-box:8080"  # llama.cpp
B = "http://vllm-box:8000"  # another OpenAI-style server
OLLAMA_URL = "http://cpu-box:11434"
GEMMA = "gemma3:270m"  # what models.http lists
LLAMA = "llama3.2:3b"
CHAT = "/v1/chat/completions"
NOT_FOUND = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    """respx on httpx's transport; afterwards, no request may have missed every route."""
    monkeypatch.setenv("AICORTEX_HTTP", "httpx")
    with respx.mock(assert_all_called=False, assert_all_mocked=False) as router:
        yield router
        routed = {id(call) for route in router.routes for call in route.calls}
        stray = [str(call.request.url) for call in router.calls if id(call) not in routed]
        assert not stray, f"requests no route answers: {stray}"


# -- the captured answers --------------------------------------------------------------


def exchange(name: str) -> tuple[int, str, str]:
    """The status, content type and body of a captured answer."""
    response = (LLAMACPP / name).read_text(encoding="utf-8").split("\n### HTTP ", 1)[1]
    head, body = response.split("\n\n", 1)
    status = int(head.split(" ", 1)[0])
    headers = dict(line.split(": ", 1) for line in head.split("\n")[1:] if ": " in line)
    return status, headers.get("Content-Type", ""), body


def events_of(name: str) -> list[bytes]:
    """The SSE events of a captured stream, each with its blank line (the marker where
    a long capture was shortened is not an event)."""
    body = exchange(name)[2]
    return [line.encode() + b"\n\n" for line in body.split("\n") if line.startswith("data:")]


def deltas_of(name: str) -> list[str]:
    """The non-empty ``delta.content`` texts of a captured stream, in order."""
    texts: list[str] = []
    for event in events_of(name):
        data = event[len(b"data:") :].strip()
        if data == b"[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            content = choice["delta"].get("content")
            if content:
                texts.append(content)
    return texts


class Chunks(httpx.AsyncByteStream):
    """A response body sent as these chunks, then ``error`` raised (a dropped
    connection) if one is given."""

    def __init__(self, chunks: Sequence[bytes], error: Exception | None = None) -> None:
        self.chunks = list(chunks)
        self.error = error
        self._left = iter(self.chunks)

    # An iterator, not an async generator: a body left unread (as aicortex leaves an
    # answer it gives up on) then needs no finalizing by the event loop.
    def __aiter__(self) -> Chunks:
        self._left = iter(self.chunks)
        return self

    async def __anext__(self) -> bytes:
        for chunk in self._left:
            return chunk
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration


def sse(events: Sequence[bytes], error: Exception | None = None) -> httpx.Response:
    """A 200 event stream, one event per chunk."""
    return httpx.Response(
        200, stream=Chunks(events, error), headers={"content-type": "text/event-stream"}
    )


def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def captured(name: str) -> httpx.Response:
    """A captured answer: a stream event by event, any other body as it was."""
    status, content_type, body = exchange(name)
    if content_type.startswith("text/event-stream"):
        return sse(events_of(name))
    return httpx.Response(status, content=body.encode(), headers={"content-type": content_type})


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": status, "message": message}})


def model_list(*ids: str) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [{"id": i} for i in ids]})


# -- mocked servers --------------------------------------------------------------------


def llamacpp(
    mock: respx.MockRouter,
    base: str,
    chat: str | list[httpx.Response] = "chat_stream_usage.http",
    models: Sequence[str] | None = None,
) -> dict[str, respx.Route]:
    """Mock ``base`` as llama.cpp: 404 on Ollama's routes, its model list (models.http,
    or ``models``), ``/health`` and the chat, which answers with a captured answer (a
    fresh one each time) or with ``chat``'s responses in turn. Returns the routes by path."""
    routes = {
        path: mock.get(base + path).mock(return_value=httpx.Response(404, json=NOT_FOUND))
        for path in ("/api/tags", "/api/version", "/api/ps")
    }
    listing = captured("models.http") if models is None else model_list(*models)
    routes["/v1/models"] = mock.get(base + "/v1/models").mock(return_value=listing)
    routes["/health"] = mock.get(base + "/health").respond(200, json={"status": "ok"})
    route = mock.post(base + CHAT)
    if isinstance(chat, str):
        name = chat
        route.mock(side_effect=lambda request: captured(name))
    else:
        route.mock(side_effect=chat)
    routes[CHAT] = route
    return routes


def ollama(mock: respx.MockRouter, base: str, *models: str) -> list[respx.Route]:
    """Mock ``base`` as Ollama listing ``models``; returns its routes."""
    tags = {"models": [{"name": m, "model": m} for m in models]}
    return [
        mock.get(base + "/api/tags").respond(200, json=tags),
        mock.get(base + "/api/version").respond(200, json={"version": "0.12.0"}),
        mock.get(base + "/api/ps").respond(200, json={"models": []}),
        mock.post(base + "/api/chat").mock(
            side_effect=lambda request: httpx.Response(
                200, content=(OLLAMA / "chat-stream.ndjson").read_bytes()
            )
        ),
    ]


def cortex(*servers: str | Server, timeout: Timeout = QUICK) -> AsyncCortex:
    return AsyncCortex(list(servers), timeout=timeout, fallback=False)


def sent(route: respx.Route) -> Any:
    """The JSON body of the last request ``route`` answered."""
    return json.loads(route.calls.last.request.content)


# -- which servers, which URLs ---------------------------------------------------------


async def test_a_bare_url_answering_404_at_api_tags_is_probed_at_v1_models_and_chats_there(
    mock: respx.MockRouter,
) -> None:
    routes = llamacpp(mock, A)
    routes["/api/tags"].mock(return_value=captured("error_unknown_route_api_tags.http"))
    ollama_chat = mock.post(f"{A}/api/chat").respond(404, json=NOT_FOUND)
    async with cortex(A) as client:
        assert await client.chat("Say hello.", model=GEMMA)
        [state] = client.server_states()
    assert state.api == "openai"
    assert state.models == (GEMMA,)
    assert routes["/api/tags"].call_count == 1
    assert routes["/v1/models"].call_count == 1
    assert routes[CHAT].call_count == 1
    assert not ollama_chat.called


async def test_a_server_named_openai_is_never_asked_for_ollamas_routes(
    mock: respx.MockRouter,
) -> None:
    routes = llamacpp(mock, A)
    async with cortex(Server(A, api="openai")) as client:
        assert await client.chat("hi", model=GEMMA)
    assert [routes[p].call_count for p in ("/api/tags", "/api/version", "/api/ps")] == [0, 0, 0]
    assert routes["/v1/models"].call_count == 1
    assert routes[CHAT].call_count == 1


@pytest.mark.parametrize(
    "spec",
    [
        "openai+http://host:8000",
        "http://host:8000/v1",
        Server("http://host:8000", api="openai"),
    ],
    ids=["shorthand", "trailing-v1", "api-openai"],
)
async def test_the_shorthand_a_trailing_v1_and_api_openai_chat_at_the_same_url(
    mock: respx.MockRouter, spec: str | Server
) -> None:
    routes = llamacpp(mock, "http://host:8000")
    async with cortex(spec) as client:
        assert client.servers == ["http://host:8000"]
        assert await client.chat("hi", model=GEMMA)
    assert str(routes[CHAT].calls.last.request.url) == "http://host:8000/v1/chat/completions"
    assert [str(c.request.url) for c in mock.calls if c.request.method == "POST"] == [
        "http://host:8000/v1/chat/completions"
    ]


# -- keys ------------------------------------------------------------------------------


async def test_a_servers_api_key_goes_to_its_probe_and_chat_and_nowhere_else(
    mock: respx.MockRouter,
) -> None:
    keyed = llamacpp(mock, A)
    other = ollama(mock, OLLAMA_URL, LLAMA)
    async with cortex(Server(A, api="openai", api_key="sk-secret-1"), OLLAMA_URL) as client:
        await client.chat("hi", model=GEMMA)
        await client.chat("hi", model=LLAMA)
    for path in ("/v1/models", "/health", CHAT):
        assert keyed[path].calls.last.request.headers["authorization"] == "Bearer sk-secret-1"
    assert all(route.called for route in other)
    assert all(
        "authorization" not in call.request.headers for route in other for call in route.calls
    )


async def test_the_key_can_come_from_the_environment_variable_it_names(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_KEY", "sk-from-env")
    keyed = llamacpp(mock, A)
    unkeyed = llamacpp(mock, B)
    servers = (Server(A, api="openai", api_key_env="VLLM_KEY"), Server(B, api="openai"))
    async with AsyncCortex(servers, timeout=QUICK, fallback=False, routing="round_robin") as c:
        for _ in range(2):
            stream = await c.chat("hi", model=GEMMA, stream=True)
            async with stream:
                await stream.text()
    assert keyed[CHAT].called
    assert unkeyed[CHAT].called
    assert {c.request.headers["authorization"] for c in keyed[CHAT].calls} == {"Bearer sk-from-env"}
    assert keyed["/v1/models"].calls.last.request.headers["authorization"] == "Bearer sk-from-env"
    assert all("authorization" not in c.request.headers for r in unkeyed.values() for c in r.calls)


async def test_the_key_is_not_in_the_repr_the_error_or_the_logs(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong key: llama.cpp lists its models without one, and refuses the chat."""
    caplog.set_level(logging.DEBUG)
    llamacpp(mock, A, chat=[captured("auth_chat_no_key.http")])
    entry = Server(A, api="openai", api_key="sk-wrong-4242")
    assert "sk-wrong-4242" not in repr(entry)
    async with cortex(entry) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
        states = client.server_states()
    assert "sk-wrong" not in str(info.value)
    assert "sk-wrong" not in repr(info.value.attempts)
    assert "sk-wrong" not in repr(states)
    assert caplog.records
    assert not [r for r in caplog.records if "sk-wrong" in r.getMessage()]


# -- model names -----------------------------------------------------------------------


async def test_a_mapped_model_is_sent_under_the_servers_own_name(
    mock: respx.MockRouter,
) -> None:
    routes = llamacpp(mock, A, models=["ggml-org/gemma-3-270m"])
    entry = Server(A, api="openai", models={LLAMA: "ggml-org/gemma-3-270m"})
    async with cortex(entry) as client:
        stream = await client.chat("hi", model=LLAMA, stream=True)
        async with stream:
            events = [e async for e in stream]
    assert sent(routes[CHAT])["model"] == "ggml-org/gemma-3-270m"
    assert stream.model == LLAMA
    assert {e.model for e in events} == {LLAMA}


async def test_a_model_the_server_does_not_list_is_not_sent_to_it_unless_named(
    mock: respx.MockRouter,
) -> None:
    openai_style = llamacpp(mock, A)
    other = ollama(mock, OLLAMA_URL, LLAMA)
    async with cortex(A, OLLAMA_URL) as client:
        stream = await client.chat("hi", model=LLAMA, stream=True)
        async with stream:
            assert await stream.text() == "The"
        assert stream.server == OLLAMA_URL
        assert not openai_style[CHAT].called
        assert await client.chat("hi", model=LLAMA, server_url=A)
    assert openai_style[CHAT].call_count == 1
    assert sent(openai_style[CHAT])["model"] == LLAMA
    assert other[3].call_count == 1
    async with cortex(A) as alone:
        with pytest.raises(ModelNotFoundError) as info:
            await alone.chat("hi", model=LLAMA)
    assert info.value.servers == [A]
    assert openai_style[CHAT].call_count == 1


# -- the request body ------------------------------------------------------------------


async def test_ollamas_options_map_to_openais_fields_and_the_rest_is_dropped_and_logged(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aicortex")
    routes = llamacpp(mock, A)
    options = {
        "num_predict": 8,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
        "num_ctx": 4096,
    }
    async with cortex(A) as client:
        stream = await client.chat("hi", model=GEMMA, options=options, keep_alive="5m", stream=True)
        async with stream:
            await stream.text()
    assert sent(routes[CHAT]) == {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 8,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
    }
    dropped = [r for r in caplog.records if r.name == "aicortex" and "Not sent" in r.message]
    assert [(r.levelno, r.getMessage()) for r in dropped] == [
        (
            logging.DEBUG,
            "Not sent to an OpenAI-style server (no such field): options.num_ctx, keep_alive",
        )
    ]


SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string"}}}


@pytest.mark.parametrize(
    ("given", "wanted"),
    [
        ("json", {"type": "json_object"}),
        (SCHEMA, {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
    ],
    ids=["json", "schema"],
)
async def test_format_becomes_a_response_format(
    mock: respx.MockRouter, given: str | dict[str, Any], wanted: dict[str, Any]
) -> None:
    routes = llamacpp(mock, A)
    async with cortex(A) as client:
        await client.chat("hi", model=GEMMA, format=given)
    body = sent(routes[CHAT])
    assert body["response_format"] == wanted
    assert "format" not in body


async def test_think_as_an_effort_is_sent_and_as_a_flag_is_dropped(
    mock: respx.MockRouter,
) -> None:
    routes = llamacpp(mock, A)
    async with cortex(A) as client:
        await client.chat("hi", model=GEMMA, think="low")
        assert sent(routes[CHAT])["reasoning_effort"] == "low"
        await client.chat("hi", model=GEMMA, think=True)
    body = sent(routes[CHAT])
    assert "reasoning_effort" not in body
    assert "think" not in body


async def test_images_are_sent_as_image_url_data_parts(mock: respx.MockRouter) -> None:
    routes = llamacpp(mock, A)
    messages = [{"role": "user", "content": "what is it?", "images": [PNG]}]
    async with cortex(A) as client:
        await client.chat(messages, model=GEMMA, system="be brief")
    assert sent(routes[CHAT])["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
    ]


async def test_a_non_streamed_chat_streams_upstream_and_returns_the_text(
    mock: respx.MockRouter,
) -> None:
    """aicortex always streams from the server and joins the text itself."""
    routes = llamacpp(mock, A)
    async with cortex(A) as client:
        text = await client.chat("Say hello in five words.", model=GEMMA)
    assert text == "".join(deltas_of("chat_stream_usage.http"))
    body = sent(routes[CHAT])
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    request = routes[CHAT].calls.last.request
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers


# -- the answer ------------------------------------------------------------------------


async def test_a_captured_stream_becomes_tokens_and_an_end_with_usage_counts_and_speed(
    mock: respx.MockRouter,
) -> None:
    llamacpp(mock, A)
    async with cortex(A) as client:
        stream = await client.chat("Say hello in five words.", model=GEMMA, stream=True)
        async with stream:
            events = [e async for e in stream]
    start, *tokens, end = events
    assert (start.type, start.model, start.server) == (EventType.START, GEMMA, A)
    assert {e.type for e in tokens} == {EventType.TOKEN}
    assert [e.content for e in tokens] == deltas_of("chat_stream_usage.http")
    assert [e.index for e in tokens] == list(range(len(tokens)))
    assert end.type is EventType.END
    assert end.done_reason == "length"
    assert end.stats is not None
    assert end.stats == stream.stats
    # usage: 15 prompt tokens (10 of them cached), 24 completion tokens; timings: ms.
    assert (end.stats.prompt_tokens, end.stats.completion_tokens) == (15, 24)
    assert end.stats.eval_duration == 495_033_000
    assert end.stats.prompt_eval_duration == 44_539_000
    assert end.stats.tokens_per_second == pytest.approx(24 / 0.495033)
    assert stream.done_reason == "length"


async def test_without_a_usage_chunk_the_counts_come_from_timings(
    mock: respx.MockRouter,
) -> None:
    llamacpp(mock, A, chat="chat_stream.http")
    async with cortex(A) as client:
        stream = await client.chat("Say hello in five words.", model=GEMMA, stream=True)
        async with stream:
            assert await stream.text() == "".join(deltas_of("chat_stream.http"))
    assert stream.stats is not None
    # timings.prompt_n counts the prompt tokens evaluated, not the 10 found in the cache.
    assert (stream.stats.prompt_tokens, stream.stats.completion_tokens) == (5, 24)
    assert stream.stats.eval_duration == 486_086_000
    assert stream.stats.tokens_per_second == pytest.approx(24 / 0.486086)
    assert stream.done_reason == "length"


async def test_reasoning_content_arrives_as_thinking(mock: respx.MockRouter) -> None:
    answer = [
        event({"role": "assistant", "content": None}),
        event({"reasoning_content": "The user "}),
        event({"reasoning_content": "greets."}),
        event({"content": "Hello"}),
        event({"content": "!"}),
        event({}, finish="stop"),
        b"data: [DONE]\n\n",
    ]
    llamacpp(mock, A, chat=[sse(answer)])
    async with cortex(A) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            tokens = [e async for e in stream if e.type is EventType.TOKEN]
    assert [(e.thinking, e.content) for e in tokens] == [
        ("The user ", ""),
        ("greets.", ""),
        (None, "Hello"),
        (None, "!"),
    ]
    assert stream.thinking == "The user greets."
    assert stream.partial_text == "Hello!"
    assert stream.done_reason == "stop"


async def test_a_streamed_tool_call_arrives_whole_and_typed(mock: respx.MockRouter) -> None:
    routes = llamacpp(mock, A, chat="chat_tools_fewshot_stream.http")
    request = json.loads((LLAMACPP / "tool_request.json").read_text())
    async with cortex(A) as client:
        stream = await client.chat(
            request["messages"][-1]["content"], model=GEMMA, tools=request["tools"], stream=True
        )
        async with stream:
            events = [e async for e in stream]
    [with_call] = [e for e in events if e.tool_calls]
    assert with_call.type is EventType.TOKEN
    assert with_call.content == ""
    call = ToolCall(
        "get_weather", {"city": "Paris"}, id="ipGNRPqRntNgE6YKOFxV0KabuZbmOdZo", index=0
    )
    assert with_call.tool_calls == (call,)
    assert stream.tool_calls == [call]
    assert stream.done_reason == "tool_calls"
    assert stream.partial_text == ""
    assert sent(routes[CHAT])["tools"] == request["tools"]


async def test_an_answer_split_at_any_byte_gives_the_same_tokens(mock: respx.MockRouter) -> None:
    body = b"".join(events_of("chat_stream_usage.http"))
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    llamacpp(mock, A, chat=[sse(pieces)])
    async with cortex(A) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            tokens = [e.content async for e in stream if e.type is EventType.TOKEN]
    assert tokens == deltas_of("chat_stream_usage.http")
    assert stream.stats is not None
    assert stream.stats.completion_tokens == 24


# -- errors ----------------------------------------------------------------------------


async def test_a_401_names_the_server_and_says_the_key_is_missing_or_wrong(
    mock: respx.MockRouter,
) -> None:
    llamacpp(mock, A, chat=[captured("auth_chat_no_key.http")])
    async with cortex(A) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    [attempt] = info.value.attempts
    assert attempt.server == A
    assert attempt.kind == "failed"
    assert attempt.reason == (
        "HTTP 401: its API key is missing or wrong (set api_key= or api_key_env= on the "
        f"Server for {A}): Invalid API Key"
    )
    assert A in str(info.value)
    assert "API key is missing or wrong" in str(info.value)


async def test_a_401_on_the_model_list_marks_the_server_down_and_says_why(
    mock: respx.MockRouter,
) -> None:
    routes = llamacpp(mock, A)
    routes["/v1/models"].mock(return_value=captured("auth_chat_no_key.http"))
    async with cortex(Server(A, api="openai")) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    [attempt] = info.value.attempts
    assert attempt.kind == "unreachable"
    assert "answered HTTP 401: its API key is missing or wrong" in attempt.reason
    assert not routes[CHAT].called


async def test_a_404_naming_the_model_is_model_not_found(mock: respx.MockRouter) -> None:
    """vLLM's answer for a model it does not serve (it listed it a moment ago)."""
    missing = httpx.Response(
        404,
        json={
            "object": "error",
            "message": f"The model `{GEMMA}` does not exist.",
            "type": "NotFoundError",
            "code": 404,
        },
    )
    llamacpp(mock, B, chat=[missing])
    async with cortex(B) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat("hi", model=GEMMA)
    assert info.value.model == GEMMA
    assert info.value.servers == [B]


async def test_a_404_not_naming_a_model_says_there_is_no_chat_endpoint(
    mock: respx.MockRouter,
) -> None:
    llamacpp(mock, A, chat=[httpx.Response(404, json=NOT_FOUND)])
    async with cortex(A) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    [attempt] = info.value.attempts
    assert attempt.reason == (
        "no /v1/chat/completions endpoint here (HTTP 404); is this an OpenAI-compatible server?"
    )


async def test_a_prompt_over_the_context_is_a_validation_error_and_no_one_else_is_asked(
    mock: respx.MockRouter,
) -> None:
    """llama.cpp answers a streamed request that is too long with plain JSON."""
    first = llamacpp(mock, A, chat=[captured("error_too_long_prompt_stream.http")])
    second = llamacpp(mock, B)
    async with cortex(A, B) as client:
        with pytest.raises(ValidationError) as info:
            await client.chat("hello " * 3000, model=GEMMA)
    assert str(info.value) == (
        "The server rejected the request: request (3010 tokens) exceeds the available "
        "context size (2048 tokens), try increasing it"
    )
    assert first[CHAT].call_count == 1
    assert sent(first[CHAT])["stream"] is True
    assert not second[CHAT].called


@pytest.mark.parametrize("status", [429, 503])
async def test_a_busy_answer_fails_over_to_the_next_server(
    mock: respx.MockRouter, status: int
) -> None:
    busy = llamacpp(mock, A, chat=[error(status, "slow down")])
    spare = llamacpp(mock, B)
    async with cortex(A, B) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            assert await stream.text() == "".join(deltas_of("chat_stream_usage.http"))
        state = client.server_states()[0]
    assert stream.server == B
    assert busy[CHAT].call_count == 1
    assert spare[CHAT].call_count == 1
    assert state.state == "busy"
    assert state.error == f"busy (HTTP {status}): slow down"


@pytest.mark.parametrize("status", [429, 503])
async def test_a_single_busy_server_ends_in_an_error_that_says_busy(
    mock: respx.MockRouter, status: int
) -> None:
    llamacpp(mock, A, chat=[error(status, "slow down")] * 20)
    fast = Timeout(connect=1.0, first_token=0.3, idle=2.0, probe=0.5)
    async with cortex(A, timeout=fast) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    assert str(info.value).startswith(f"Every server for model '{GEMMA}' was busy")
    assert {(a.server, a.kind) for a in info.value.attempts} == {(A, "busy")}
    assert f"busy (HTTP {status}): slow down" in str(info.value)


ROLE_ONLY = event({"role": "assistant", "content": None})


@pytest.mark.parametrize(
    "broken",
    [
        [ROLE_ONLY],
        [ROLE_ONLY, b'data: {"error": {"code": 500, "message": "model crashed"}}\n\n'],
        [ROLE_ONLY, b"data: [DO"],
    ],
    ids=["ended", "error-event", "cut-in-a-line"],
)
async def test_a_stream_that_breaks_before_any_token_fails_over_invisibly(
    mock: respx.MockRouter, broken: list[bytes]
) -> None:
    first = llamacpp(mock, A, chat=[sse(broken)])
    llamacpp(mock, B)
    async with cortex(A, B) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            events = [e async for e in stream]
    assert first[CHAT].call_count == 1
    assert stream.server == B
    assert [e.type for e in events if e.type is not EventType.TOKEN] == [
        EventType.START,
        EventType.END,
    ]
    assert "".join(e.content or "" for e in events) == "".join(deltas_of("chat_stream_usage.http"))


@pytest.mark.parametrize(
    "drop", [None, httpx.ReadError("connection reset")], ids=["ended", "read-error"]
)
async def test_a_stream_cut_after_a_token_raises_stream_error_with_the_partial_text(
    mock: respx.MockRouter, drop: Exception | None
) -> None:
    """No [DONE] and no finish reason after three tokens: an ERROR event, then StreamError
    with what had arrived; the second server is not asked (the text cannot be restarted)."""
    events = events_of("chat_stream_usage.http")[:4]  # the role delta and three tokens
    llamacpp(mock, A, chat=[sse(events, drop)])
    spare = llamacpp(mock, B)
    async with cortex(A, B) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        assert stream.server == A
        seen: list[EventType] = []
        with pytest.raises(StreamError) as info:
            async for e in stream:
                seen.append(e.type)
                if e.type is EventType.ERROR:
                    assert e.error is not None
                    assert e.error.startswith(f"The stream from {A} broke after 3 tokens")
    assert seen == [EventType.START, *[EventType.TOKEN] * 3, EventType.ERROR]
    assert info.value.partial_text == "Say hello in"
    assert info.value.server == A
    assert info.value.model == GEMMA
    assert not spare[CHAT].called


async def test_a_non_streamed_chat_cut_mid_answer_is_served_by_the_next_server(
    mock: respx.MockRouter,
) -> None:
    """Nothing had reached the caller, so the whole answer comes from the next server."""
    llamacpp(mock, A, chat=[sse(events_of("chat_stream_usage.http")[:4])])
    spare = llamacpp(mock, B)
    async with cortex(A, B) as client:
        assert await client.chat("hi", model=GEMMA) == "".join(deltas_of("chat_stream_usage.http"))
    assert spare[CHAT].call_count == 1


async def test_a_finish_reason_without_done_is_still_a_broken_stream(
    mock: respx.MockRouter,
) -> None:
    """The final chunk (with the counts) comes at [DONE]; an answer cut before it fails."""
    answer = [event({"content": "Hi"}), event({}, finish="stop")]
    llamacpp(mock, A, chat=[sse(answer)])
    async with cortex(A) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        with pytest.raises(StreamError) as info:
            await stream.text()
    assert info.value.partial_text == "Hi"
    assert (
        info.value.reason == "broke after 1 tokens: the response ended without a final done chunk"
    )
