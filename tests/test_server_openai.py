"""The official openai client (sync and async) against the proxy served on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from aicortex.server import create_app
from fakeollama import (
    FakeOllamaFactory,
    embedding_of,
    error_after,
    model_not_found,
    refused_url,
    reply,
    status,
)
from test_server_app import QUICK, Served, ServeFactory
from test_server_app import serve as serve  # the fixture

# openai's AsyncStream leaves its inner SSE generators (and httpx2's) to the garbage
# collector after [DONE], which trio reports: the pattern of encode/httpx#3686, which
# pyproject.toml already ignores for httpx and httpcore.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator '(openai|httpx2|httpcore2)\\.:ResourceWarning"
)

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Tokyo?"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOKYO = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=10)


def async_client(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
def proxy(serve: ServeFactory, fake_ollama: FakeOllamaFactory) -> tuple[Any, str]:
    """A fake Ollama and the proxy in front of it: `(server, url)`."""
    server = fake_ollama(models=[MODEL])
    return server, serve(servers=[server.url])


# --- sync ----------------------------------------------------------------------------------


def test_a_chat_completion(proxy: Any) -> None:
    """client.chat.completions.create returns the text, usage and finish reason."""
    server, url = proxy
    server.chat = reply(["Sunny", " and", " mild."])
    with client(url) as c:
        answer = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.1)
    assert answer.object == "chat.completion"
    assert answer.model == MODEL
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Sunny and mild."
    assert choice.finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (8, 3)
    (sent,) = [r.json for r in server.requests if r.path == "/api/chat"]
    assert sent["options"] == {"temperature": 0.1}


def test_a_streamed_chat_completion_with_usage(proxy: Any) -> None:
    """Streaming yields the role, the text, a finish reason and, when asked, usage."""
    server, url = proxy
    server.chat = reply(["Sunny", " and", " mild."], delay=0.01)
    with client(url) as c:
        chunks = list(
            c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Sunny and mild."
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 11
    assert len({ch.id for ch in chunks}) == 1


def test_tool_calls_with_arguments_as_a_json_string(proxy: Any) -> None:
    """A tool call comes back in OpenAI's shape, finish_reason tool_calls."""
    server, url = proxy
    server.chat = reply([], tool_calls=[TOKYO])
    with client(url) as c:
        answer = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"  # pyright: ignore[reportAttributeAccessIssue]
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}  # pyright: ignore[reportAttributeAccessIssue]
    (sent,) = [r.json for r in server.requests if r.path == "/api/chat"]
    assert sent["tools"] == [WEATHER_TOOL]


def test_streamed_tool_calls_and_the_tool_result_turn(proxy: Any) -> None:
    """Streamed tool calls accumulate by index; sending the result back reaches Ollama natively."""
    server, url = proxy
    server.chat = [reply([], tool_calls=[TOKYO]), reply(["It is 11 degrees."])]
    with client(url) as c:
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
            )
        )
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        (call,) = calls
        assert call.index == 0
        assert call.function is not None
        assert call.function.arguments == '{"city":"Tokyo"}'
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        follow_up = c.chat.completions.create(
            model=MODEL,
            messages=[
                *MESSAGES,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id or "",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": call.function.arguments or "",
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call.id or "", "content": "11 degrees celsius"},
            ],
        )
    assert follow_up.choices[0].message.content == "It is 11 degrees."
    sent = [r.json for r in server.requests if r.path == "/api/chat"][-1]
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Tokyo"}
    assert sent["messages"][2]["tool_name"] == "get_weather"


def test_an_unknown_model_raises_not_found(proxy: Any) -> None:
    """A model no server has → openai.NotFoundError with code model_not_found."""
    _, url = proxy
    with client(url) as c, pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="llama3.2:3", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "llama3.2:3b" in info.value.message


def test_a_wrong_or_missing_key_raises_authentication_error(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """With keys configured a wrong key is refused; the right one works."""
    url = serve(servers=[fake_ollama().url], api_keys=["sk-good"])
    with client(url, "sk-bad") as c, pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.code == "invalid_api_key"
    with client(url, "sk-good") as c:
        assert c.chat.completions.create(model=MODEL, messages=MESSAGES).choices
        assert c.models.list().data


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"temperature": "warm"}, "temperature"),
    ],
)
def test_invalid_requests_raise_bad_request(proxy: Any, kwargs: dict[str, Any], param: str) -> None:
    """Invalid fields → openai.BadRequestError whose param is the field path."""
    _, url = proxy
    arguments: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, **kwargs}
    with client(url) as c, pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(**arguments)
    assert info.value.param == param


def test_ollamas_own_400_raises_bad_request(proxy: Any) -> None:
    """Ollama's rejection surfaces as BadRequestError with Ollama's message."""
    server, url = proxy
    server.chat = status(400, {"error": 'invalid format: expected "json" or a JSON schema'})
    with client(url) as c, pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "invalid format" in info.value.message


def test_every_upstream_down_raises_internal_server_error(serve: ServeFactory) -> None:
    """503 from the proxy is openai.InternalServerError (which the client would retry)."""
    url = serve(servers=[refused_url()])
    with client(url) as c, pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.code == "upstream_unavailable"


def test_a_mid_stream_failure_raises_api_error_after_the_text(proxy: Any) -> None:
    """The error frame makes the client raise openai.APIError once the text so far is out."""
    server, url = proxy
    server.chat = error_after(["Sunny"], 1, "out of memory", delay=0.01)
    received: list[str] = []
    with client(url) as c, pytest.raises(openai.APIError) as info:
        for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Sunny"
    assert "out of memory" in info.value.message


def test_models_list_and_retrieve(proxy: Any) -> None:
    """client.models.list() and .retrieve() work against /v1/models."""
    _, url = proxy
    with client(url) as c:
        ids = [m.id for m in c.models.list()]
        assert MODEL in ids
        assert c.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("no-such-model:1b")


def test_the_client_works_through_a_prefix_mount(fake_ollama: FakeOllamaFactory) -> None:
    """base_url with the mount prefix is all a client needs; the host closes the cortex."""
    proxy = create_app(servers=[fake_ollama(chat=reply(["via mount"])).url], timeout=QUICK)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.state.aicortex.aclose()

    host = Starlette(routes=[Mount("/api/llm", app=proxy)], lifespan=lifespan)
    with Served(host) as url, client(url + "/api/llm") as c:
        answer = c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert answer.choices[0].message.content == "via mount"
    assert not proxy.state.aicortex.created


# --- async ---------------------------------------------------------------------------------


async def test_async_client_chat_and_stream(proxy: Any) -> None:
    """AsyncOpenAI: a completion and a stream, on asyncio and trio."""
    server, url = proxy
    server.chat = reply(["async", " ok"], delay=0.01)
    c = async_client(url)
    try:
        answer = await c.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert answer.choices[0].message.content == "async ok"
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await c.close()
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "async ok"
    assert chunks[-1].usage is not None


async def test_async_client_tool_calls_and_errors(proxy: Any) -> None:
    """AsyncOpenAI: tool calls, and NotFoundError / BadRequestError."""
    server, url = proxy
    server.chat = [reply([], tool_calls=[TOKYO]), model_not_found()]
    c = async_client(url)
    try:
        answer = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL]
        )
        (call,) = answer.choices[0].message.tool_calls or []
        assert json.loads(call.function.arguments) == {"city": "Tokyo"}  # pyright: ignore[reportAttributeAccessIssue]
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="missing:1b", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model=MODEL, messages=[])
    finally:
        await c.close()


async def test_async_client_with_keys(serve: ServeFactory, fake_ollama: FakeOllamaFactory) -> None:
    """AsyncOpenAI: AuthenticationError without the right key."""
    url = serve(servers=[fake_ollama().url], api_keys=["sk-async"])
    bad = async_client(url, "sk-nope")
    try:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    finally:
        await bad.close()
    good = async_client(url, "sk-async")
    try:
        assert (await good.chat.completions.create(model=MODEL, messages=MESSAGES)).choices
    finally:
        await good.close()


# --- embeddings ----------------------------------------------------------------------------


@pytest.fixture
def embedder(serve: ServeFactory, fake_ollama: FakeOllamaFactory) -> tuple[list[Any], str]:
    """Two fake Ollamas with an embedding model, and the proxy in front of them."""
    servers = [fake_ollama(models=[EMBED]) for _ in range(2)]
    return servers, serve(servers=[s.url for s in servers], routing="round_robin")


def test_embeddings_with_the_openai_client(embedder: tuple[list[Any], str]) -> None:
    servers, url = embedder
    texts = [f"passage {i}" for i in range(100)]
    with client(url) as c:
        # The client asks for base64 unless told otherwise, and decodes it itself.
        answer = c.embeddings.create(model=EMBED, input=texts)
        as_floats = c.embeddings.create(model=EMBED, input="one", encoding_format="float")
        shorter = c.embeddings.create(model=EMBED, input=["a", "b"], dimensions=4)
    assert [d.index for d in answer.data] == list(range(100))
    for item, text in zip(answer.data, texts, strict=True):
        assert item.embedding == pytest.approx(embedding_of(text), abs=1e-6)
    assert answer.model == EMBED
    assert answer.usage.prompt_tokens == sum(len(t.split()) + 1 for t in texts)
    assert as_floats.data[0].embedding == embedding_of("one")
    assert [d.embedding for d in shorter.data] == [
        pytest.approx(embedding_of("a", 4), abs=1e-6),
        pytest.approx(embedding_of("b", 4), abs=1e-6),
    ]
    batches = [len(r.json["input"]) for s in servers for r in s.requests if r.path == "/api/embed"]
    assert sorted(batches) == [1, 2, 36, 64]
    assert all(s.count("/api/embed") >= 1 for s in servers)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": EMBED}, "input"),
        ({"model": EMBED, "input": [[1, 2, 3]]}, "input"),
        ({"model": EMBED, "input": ["a", ""]}, "input"),
        ({"model": EMBED, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": EMBED, "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_embedding_requests_are_400(
    embedder: tuple[list[Any], str], body: dict[str, Any], param: str
) -> None:
    _, url = embedder
    response = httpx.post(url + "/v1/embeddings", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_embeddings_of_an_unknown_model_raise_not_found(embedder: tuple[list[Any], str]) -> None:
    _, url = embedder
    with client(url) as c, pytest.raises(openai.NotFoundError, match="nope-embed"):
        c.embeddings.create(model="nope-embed", input="x")


async def test_async_client_embeddings(embedder: tuple[list[Any], str]) -> None:
    _, url = embedder
    async with async_client(url) as c:
        answer = await c.embeddings.create(model=EMBED, input=["x", "y"])
    assert [d.embedding for d in answer.data] == [
        pytest.approx(embedding_of("x"), abs=1e-6),
        pytest.approx(embedding_of("y"), abs=1e-6),
    ]
