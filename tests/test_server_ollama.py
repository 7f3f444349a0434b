"""The native gateway (`/api/*`) served by uvicorn in front of fake servers, used through the
official `ollama` client (sync `Client` and `AsyncClient`) as any Ollama app would."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from aicortex import Server
from aicortex.server import create_app
from fakeollama import (
    STREAM_ERROR_MESSAGE,
    Exchange,
    FakeOllamaFactory,
    Script,
    busy,
    cut_after,
    embedding_of,
    error_after,
    refused_url,
    reply,
    stall_after,
    status,
)
from test_server_app import QUICK, ServeFactory
from test_server_app import serve as serve  # the fixture

MODEL = "llama3.2:3b"
EMBED = "nomic-embed-text"
HI = [{"role": "user", "content": "hi"}]


_open: list[ollama.Client] = []


def client(url: str) -> ollama.Client:
    made = ollama.Client(host=url, timeout=10)
    _open.append(made)
    return made


def async_client(url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, timeout=10)


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the sync clients a test made (their connection pools)."""
    yield
    while _open:
        _open.pop()._client.close()  # pyright: ignore[reportPrivateUsage]


@pytest.fixture
def gateway(serve: ServeFactory, fake_ollama: FakeOllamaFactory) -> tuple[Any, str]:
    """A fake Ollama with a chat and an embedding model, and the gateway in front of it."""
    server = fake_ollama(models=[MODEL, EMBED])
    return server, serve(servers=[server.url])


def sent(server: Any, path: str) -> list[dict[str, Any]]:
    return [r.json for r in server.requests if r.path == path]


# --- what an Ollama client probes first ----------------------------------------------------


def test_root_and_version_answer_as_ollama_does(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    root = httpx.get(url + "/")
    assert root.status_code == 200
    assert root.text == "Ollama is running"
    assert httpx.head(url + "/").status_code == 200
    # The first request of a client: the fleet is probed to answer it.
    assert httpx.get(url + "/api/version").json() == {"version": server.version}
    assert httpx.head(url + "/api/version").status_code == 200


def test_version_is_the_lowest_of_the_fleet(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    servers = [fake_ollama(version=v) for v in ("1.0.0", "0.10.0", "0.9.1", "0.12.3-rc1")]
    url = serve(servers=[s.url for s in servers])
    assert httpx.get(url + "/api/version").json() == {"version": "0.9.1"}


def test_list_is_the_union_of_the_healthy_servers(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    first = fake_ollama(models=[MODEL, "qwen2.5:7b"])
    second = fake_ollama(models=["qwen2.5:7b", EMBED])
    url = serve(servers=[first.url, refused_url(), second.url])
    listed = client(url).list()
    names = [m.model for m in listed.models]
    assert names == [MODEL, "qwen2.5:7b", EMBED]
    entry = listed.models[0]
    assert entry.digest
    assert entry.details is not None
    assert entry.details.family == "llama"
    assert entry.size is not None
    assert entry.size > 0


def test_ps_is_the_union_of_loaded_models(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    first = fake_ollama(models=[MODEL, EMBED])
    second = fake_ollama(models=[EMBED])
    first.loaded = [MODEL]
    second.loaded = [EMBED]
    url = serve(servers=[first.url, second.url])
    assert sorted(m.model for m in client(url).ps().models) == sorted([MODEL, EMBED])


def test_show_is_answered_by_a_server_that_has_the_model(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    without = fake_ollama(models=[EMBED])
    holder = fake_ollama(models=[MODEL])
    url = serve(servers=[without.url, holder.url])
    shown = client(url).show(MODEL)
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert sent(holder, "/api/show") == [{"model": MODEL}]
    assert sent(without, "/api/show") == []
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).show("nope:1b")
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


# --- chat and generate -----------------------------------------------------------------------


def test_chat_passes_every_native_field_through(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    response = client(url).chat(
        MODEL,
        messages=HI,
        options={"temperature": 0.1, "num_ctx": 2048},
        format="json",
        tools=[tool],
        think=False,
        keep_alive="10m",
    )
    assert response.message.content == "Hello!"
    assert response.done
    assert response.eval_count == 2
    [body] = sent(server, "/api/chat")
    assert body["messages"] == HI
    assert body["options"] == {"temperature": 0.1, "num_ctx": 2048}
    assert body["format"] == "json"
    assert body["tools"] == [tool]
    assert body["think"] is False
    assert body["keep_alive"] == "10m"
    assert body["stream"] is True  # the gateway always streams from its upstreams


def test_chat_streamed(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    server.chat = reply(["The", " sky", " is blue."])
    parts = list(client(url).chat(MODEL, messages=HI, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "The sky is blue."
    assert [p.done for p in parts] == [False, False, False, True]
    assert parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == 3


def test_generate_streamed_and_not_with_its_own_fields(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    server.on("/api/generate", reply(["def", " f():"]))
    whole = client(url).generate(
        MODEL, "write f", suffix="return 1", raw=False, context=[1, 2], system="be terse"
    )
    assert whole.response == "def f():"
    assert whole.done
    streamed = list(client(url).generate(MODEL, "write f", stream=True))
    assert "".join(p.response for p in streamed) == "def f():"
    assert streamed[-1].done
    first = sent(server, "/api/generate")[0]
    assert first["suffix"] == "return 1"
    assert first["context"] == [1, 2]
    assert first["system"] == "be terse"
    assert first["raw"] is False


def test_failover_before_the_first_byte_is_invisible(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    first = fake_ollama(models=[MODEL], chat=busy())
    second = fake_ollama(models=[MODEL], chat=reply(["from", " two"]))
    url = serve(servers=[first.url, second.url])
    assert client(url).chat(MODEL, messages=HI).message.content == "from two"
    parts = list(client(url).chat(MODEL, messages=HI, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "from two"
    assert first.count("/api/chat") >= 1


def test_a_break_after_the_first_byte_raises_the_clients_error(
    gateway: tuple[Any, str],
) -> None:
    server, url = gateway
    server.chat = error_after(["one", " two", " three"], 2)
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as caught:
        for part in client(url).chat(MODEL, messages=HI, stream=True):
            received.append(part.message.content or "")
    assert "".join(received) == "one two"
    assert STREAM_ERROR_MESSAGE in caught.value.error
    server.chat = cut_after(["one", " two", " three"], 1)
    with pytest.raises(ollama.ResponseError, match="broke after 1 tokens"):
        list(client(url).chat(MODEL, messages=HI, stream=True))


def test_a_client_that_leaves_cancels_the_upstream(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    server.chat = stall_after(["first"], 1)
    with httpx.stream(
        "POST", url + "/api/chat", json={"model": MODEL, "messages": HI}, timeout=10
    ) as response:
        first = next(response.iter_lines())
        assert json.loads(first)["message"]["content"] == "first"
    assert server.wait_for_disconnect(1.0)  # well before the idle limit (2 s) would end it


def test_errors_come_in_ollamas_shape(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).chat("nope:1b", messages=HI)
    assert caught.value.status_code == 404
    assert "model 'nope:1b' not found" in caught.value.error
    response = httpx.post(url + "/api/chat", json={"messages": HI})
    assert (response.status_code, response.json()) == (400, {"error": "model is required"})
    response = httpx.post(url + "/api/generate", json={"prompt": "x"})
    assert (response.status_code, response.json()) == (404, {"error": "model '' not found"})
    response = httpx.post(
        url + "/api/chat", content=b"", headers={"content-type": "application/json"}
    )
    assert (response.status_code, response.json()) == (400, {"error": "missing request body"})
    server.chat = status(400, {"error": 'invalid format: expected "json" or a JSON schema'})
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).chat(MODEL, messages=HI, format="json")
    assert caught.value.status_code == 400
    assert caught.value.error == 'invalid format: expected "json" or a JSON schema'
    response = httpx.get(url + "/api/nothing")
    assert response.status_code == 404
    assert "404 page not found" in response.json()["error"]


def test_every_server_down_is_503(serve: ServeFactory) -> None:
    url = serve(servers=[refused_url()])
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).chat(MODEL, messages=HI)
    assert caught.value.status_code == 503
    assert "connection refused" in caught.value.error


# --- embeddings --------------------------------------------------------------------------


def test_embed_and_the_legacy_embeddings(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    texts = [f"line {i}" for i in range(70)]  # more than one batch upstream
    answer = client(url).embed(EMBED, input=texts)
    assert answer.embeddings == [embedding_of(t) for t in texts]
    assert answer.prompt_eval_count is not None
    assert sorted(len(b["input"]) for b in sent(server, "/api/embed")) == [6, 64]
    one = client(url).embed(EMBED, input="single", dimensions=4, truncate=False)
    assert one.embeddings == [embedding_of("single", 4)]
    legacy = client(url).embeddings(EMBED, prompt="old style")
    assert list(legacy.embedding) == embedding_of("old style")
    response = httpx.post(url + "/api/embed", json={"model": EMBED, "input": [1, 2]})
    assert (response.status_code, response.json()) == (400, {"error": "invalid input type"})
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).embed("nope-embed", input="x")
    assert caught.value.status_code == 404


# --- model management --------------------------------------------------------------------


def test_management_routes_are_refused_and_name_aicortex_pull(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).pull(MODEL)
    assert caught.value.status_code == 403
    assert "aicortex pull" in caught.value.error
    for call in (
        lambda: client(url).delete(MODEL),
        lambda: client(url).copy(MODEL, "copy"),
        lambda: client(url).push(MODEL),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 403
    assert server.count("/api/pull") == server.count("/api/delete") == 0


# --- the async client --------------------------------------------------------------------


async def test_async_client_chat_generate_embed_list(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    server.chat = reply(["a", "b"])
    cli = async_client(url)
    async with cli._client:  # pyright: ignore[reportPrivateUsage]
        await _async_tour(cli, server)


async def _async_tour(cli: ollama.AsyncClient, server: Any) -> None:
    answer = await cli.chat(MODEL, messages=HI)
    assert answer.message.content == "ab"
    parts = [p async for p in await cli.chat(MODEL, messages=HI, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "ab"
    assert (await cli.generate(MODEL, "x")).response == "Hello!"
    embedded = await cli.embed(EMBED, input=["p", "q"])
    assert embedded.embeddings == [embedding_of("p"), embedding_of("q")]
    assert {m.model for m in (await cli.list()).models} == {MODEL, EMBED}
    with pytest.raises(ollama.ResponseError) as caught:
        await cli.pull(MODEL)
    assert caught.value.status_code == 403


async def test_async_client_sees_a_break_after_the_first_byte(gateway: tuple[Any, str]) -> None:
    server, url = gateway
    server.chat = error_after(["x", "y", "z"], 1)
    received: list[str] = []
    cli = async_client(url)
    async with cli._client:  # pyright: ignore[reportPrivateUsage]
        with pytest.raises(ollama.ResponseError):
            async for part in await cli.chat(MODEL, messages=HI, stream=True):
                received.append(part.message.content or "")
    assert received == ["x"]


# --- OpenAI-style upstreams, translated -----------------------------------------------------


class OpenAIChat(Script):
    """An OpenAI-style server: lists ``model``; streams ``words`` (then a tool call)."""

    def __init__(self, model: str, words: list[str], tool: bool = False) -> None:
        self.model = model
        self.words = words
        self.tool = tool

    async def run(self, exchange: Exchange) -> None:
        if exchange.request.path == "/v1/models":
            body = {"object": "list", "data": [{"id": self.model}]}
            await exchange.respond(200, json.dumps(body).encode(), "application/json")
            return
        await exchange.start_stream(content_type="text/event-stream")
        deltas: list[dict[str, Any]] = [{"content": w} for w in self.words]
        if self.tool:
            call = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}}
            deltas.append({"tool_calls": [call]})
        for delta in deltas:
            event = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await exchange.send_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
        for event in (final, usage):
            await exchange.send_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        await exchange.send_chunk(b"data: [DONE]\n\n")
        await exchange.end_stream()


def test_an_ollama_client_uses_an_openai_style_server(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    upstream = fake_ollama(models=[])
    script = OpenAIChat("served/model", ["Bon", "jour"], tool=True)
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions"):
        upstream.on(path, script)
    target = Server(upstream.url, api="openai", models={MODEL: "served/model"})
    url = serve(servers=[target])
    answer = client(url).chat(MODEL, messages=HI, options={"num_predict": 5})
    assert answer.message.content == "Bonjour"
    assert answer.model == MODEL
    assert answer.eval_count == 2
    assert answer.message.tool_calls is not None
    assert answer.message.tool_calls[0].function.arguments == {"a": 1}
    parts = list(client(url).chat(MODEL, messages=HI, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Bonjour"
    assert parts[-1].done
    generated = list(client(url).generate(MODEL, "<fim>", raw=True, stream=True))
    assert "".join(p.response for p in generated) == "Bonjour"
    [chat_body, _] = sent(upstream, "/v1/chat/completions")
    assert chat_body["model"] == "served/model"
    assert chat_body["max_tokens"] == 5
    assert sent(upstream, "/v1/completions")[0]["prompt"] == "<fim>"
    assert [m.model for m in client(url).list().models] == ["served/model", MODEL]


def test_mounted_under_a_prefix(fake_ollama: FakeOllamaFactory, serve: ServeFactory) -> None:
    server = fake_ollama(models=[MODEL])
    proxy = create_app(servers=[server.url], timeout=QUICK)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.router.lifespan_context(proxy):
            yield

    url = serve(Starlette(routes=[Mount("/ollama", app=proxy)], lifespan=lifespan))
    assert client(url + "/ollama").chat(MODEL, messages=HI).message.content == "Hello!"
    missing = httpx.get(url + "/ollama/api/missing")
    assert missing.status_code == 404
    assert "404 page not found" in missing.json()["error"]


@pytest.fixture
def managed(serve: ServeFactory, fake_ollama: FakeOllamaFactory) -> tuple[list[Any], str]:
    """Two fake Ollamas and a gateway that lets clients pull and delete models."""
    servers = [fake_ollama(models=[MODEL]) for _ in range(2)]
    return servers, serve(servers=[s.url for s in servers], allow_management=True)


def test_pull_goes_to_every_server_with_each_ones_progress(
    managed: tuple[list[Any], str],
) -> None:
    servers, url = managed
    steps = list(client(url).pull("qwen2.5:7b", stream=True))
    assert steps[-1].status == "success"
    ended = [s.status for s in steps if s.status and s.status.startswith("success on ")]
    assert sorted(ended) == sorted(f"success on {s.url}" for s in servers)
    layers = [s for s in steps if s.digest]
    assert layers
    assert all(s.total for s in layers)
    assert all(server.has_model("qwen2.5:7b") for server in servers)
    assert all(server.count("/api/pull") == 1 for server in servers)
    whole = client(url).pull("gemma3:1b")  # not streamed: the last line only
    assert whole.status == "success"


def test_a_pull_that_fails_somewhere_ends_with_an_error(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    good = fake_ollama(models=[])
    url = serve(servers=[good.url, refused_url()], allow_management=True)
    with pytest.raises(ollama.ResponseError) as caught:
        list(client(url).pull("qwen2.5:7b", stream=True))
    assert "failed on 1 of 2 servers (it succeeded on 1)" in caught.value.error
    assert "connection refused" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).pull("missing-model")
    assert caught.value.status_code == 500
    assert "file does not exist" in caught.value.error


def test_delete_goes_to_every_server(managed: tuple[list[Any], str]) -> None:
    servers, url = managed
    servers[1].models.append("qwen2.5:7b")
    assert client(url).delete("qwen2.5:7b").status == "success"
    assert not servers[1].has_model("qwen2.5:7b")
    assert all(s.count("/api/delete") == 1 for s in servers)
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).delete("qwen2.5:7b")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client(url).copy(MODEL, "backup")
    assert caught.value.status_code == 403
