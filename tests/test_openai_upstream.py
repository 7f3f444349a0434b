"""OpenAI-style servers in the pool, against loopback servers that answer with llama.cpp's
captured answers: kind detection, shorthands, keys, model names, events and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aicortex import (
    AsyncCortex,
    EventType,
    ModelNotFoundError,
    Server,
    ServerError,
    StreamError,
    Timeout,
    ValidationError,
)
from fakeollama import Exchange, FakeOllama, FakeOllamaFactory, Script, refused_url, status

LLAMACPP = Path(__file__).parent / "fixtures" / "llamacpp"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=0.5)

# What these tests pin down holds on every transport (see conftest.py).
EVERY_TRANSPORT = True
GEMMA = "gemma3:270m"
NOT_FOUND = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
MODELS = {"object": "list", "data": [{"id": GEMMA, "object": "model", "owned_by": "llamacpp"}]}


def events_of(name: str) -> list[bytes]:
    """The SSE events of a captured stream, each with its blank line."""
    body = (LLAMACPP / name).read_text().split("\n### HTTP ", 1)[1].split("\n\n", 1)[1]
    return [line.encode() + b"\n\n" for line in body.split("\n") if line.startswith("data:")]


def error_of(name: str) -> tuple[int, Any]:
    response = (LLAMACPP / name).read_text().split("\n### HTTP ", 1)[1]
    return int(response.split(" ", 1)[0]), json.loads(response.split("\n\n", 1)[1])


class SSE(Script):
    """Stream captured SSE events, one HTTP chunk each; ``cut`` stops after that many
    events and closes the connection (as a killed llama.cpp does)."""

    def __init__(self, name: str, cut: int | None = None) -> None:
        self.events = events_of(name)
        self.cut = cut

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream(content_type="text/event-stream")
        for i, event in enumerate(self.events):
            if i == self.cut:
                await exchange.drop()
                return
            await exchange.send_chunk(event)
        await exchange.end_stream()


def llamacpp(server: FakeOllama, chat: Script | None = None) -> FakeOllama:
    """Make a fake answer as llama.cpp does: no Ollama routes, OpenAI's instead."""
    for path in ("/api/tags", "/api/version", "/api/ps", "/api/chat"):
        server.on(path, status(404, NOT_FOUND))
    server.on("/v1/models", status(200, MODELS))
    server.on("/health", status(200, {"status": "ok"}))
    server.on("/v1/chat/completions", chat or SSE("chat_stream_usage.http"))
    return server


def cortex(*servers: str | Server) -> AsyncCortex:
    return AsyncCortex(list(servers), timeout=QUICK, fallback=False)


async def test_a_bare_url_is_detected_as_openai_style_and_streams_typed_events(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = llamacpp(fake_ollama())
    async with cortex(server.url) as client:
        stream = await client.chat("Say hello.", model=GEMMA, stream=True)
        async with stream:
            events = [event async for event in stream]
        [state] = client.server_states()
    kinds = [e.type for e in events]
    assert kinds[0] is EventType.START
    assert kinds[-1] is EventType.END
    assert kinds.count(EventType.TOKEN) >= 5
    assert stream.done_reason == "length"
    assert stream.stats is not None
    assert (stream.stats.prompt_tokens, stream.stats.completion_tokens) == (15, 24)
    assert state.models == (GEMMA,)
    assert state.api == "openai"
    [sent] = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert sent.json["model"] == GEMMA
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}


async def test_shorthands_and_a_trailing_v1_name_the_same_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = llamacpp(fake_ollama())
    async with cortex(f"openai+{server.url}/v1") as client:
        assert client.servers == [server.url]
        assert await client.chat("hi", model=GEMMA)
    assert server.count("/api/tags") == 0  # named openai: no Ollama probe


async def test_a_servers_api_key_goes_to_it_alone_and_never_into_repr(
    fake_ollama: FakeOllamaFactory,
) -> None:
    keyed = llamacpp(fake_ollama())
    ollama = fake_ollama()
    entry = Server(keyed.url, api="openai", api_key="sk-secret-1")
    assert "sk-secret" not in repr(entry)
    async with cortex(entry, ollama.url) as client:
        await client.chat("hi", model=GEMMA)
        await client.chat("hi", model="llama3.2:3b")
    assert {r.headers.get("authorization") for r in keyed.requests} == {"Bearer sk-secret-1"}
    assert all("authorization" not in r.headers for r in ollama.requests)


async def test_the_key_can_come_from_an_environment_variable(
    fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_KEY", "sk-from-env")
    server = llamacpp(fake_ollama())
    async with cortex(Server(server.url, api_key_env="VLLM_KEY")) as client:
        await client.chat("hi", model=GEMMA)
    assert server.requests[-1].headers["authorization"] == "Bearer sk-from-env"


async def test_a_model_goes_only_to_openai_style_servers_that_list_it(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """llama.cpp answers any model name with its own model: it must not get chats for
    models it does not list, unless the caller names it."""
    openai_style = llamacpp(fake_ollama())
    ollama = fake_ollama()
    async with cortex(openai_style.url, ollama.url) as client:
        assert await client.chat("hi", model="llama3.2:3b") == "Hello!"
        assert openai_style.count("/v1/chat/completions") == 0
        assert await client.chat("hi", model="llama3.2:3b", server_url=openai_style.url)
        assert openai_style.count("/v1/chat/completions") == 1
    async with cortex(openai_style.url) as alone:
        with pytest.raises(ModelNotFoundError) as info:
            await alone.chat("hi", model="llama3.2:3b")
    assert info.value.servers == [openai_style.url]
    async with cortex(openai_style.url) as alone:
        with pytest.raises(ModelNotFoundError) as info:
            await alone.chat("hi", model="qqzx-nothing-like-it")
    assert info.value.hint is not None
    assert info.value.hint.startswith("Load it on the server")
    assert "ollama pull" not in str(info.value)


async def test_models_map_a_public_name_to_the_servers_own(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = llamacpp(fake_ollama())
    entry = Server(server.url, api="openai", models={"tiny": GEMMA})
    async with cortex(entry) as client:
        assert await client.chat("hi", model="tiny")
        info = await client.server_info("tiny")
        [state] = client.server_states()
    [sent] = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert sent.json["model"] == GEMMA
    assert info.has_model
    assert state.models == (GEMMA, "tiny")  # listed under both names
    assert state.loaded is not None
    assert set(state.loaded) == {GEMMA, "tiny:latest"}


async def test_a_streamed_tool_call_arrives_typed(fake_ollama: FakeOllamaFactory) -> None:
    server = llamacpp(fake_ollama(), SSE("chat_tools_fewshot_stream.http"))
    request = json.loads((LLAMACPP / "tool_request.json").read_text())
    async with cortex(server.url) as client:
        stream = await client.chat(
            request["messages"][-1]["content"], model=GEMMA, tools=request["tools"], stream=True
        )
        async with stream:
            await stream.text()
    [call] = stream.tool_calls
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
    assert stream.done_reason == "tool_calls"
    [sent] = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert sent.json["tools"] == request["tools"]


async def test_ollamas_options_are_mapped_and_the_others_dropped(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = llamacpp(fake_ollama())
    async with cortex(server.url) as client:
        await client.chat(
            "hi",
            model=GEMMA,
            options={"num_predict": 8, "temperature": 0, "num_ctx": 4096},
            keep_alive="5m",
            format="json",
        )
    [sent] = [r for r in server.requests if r.path == "/v1/chat/completions"]
    assert sent.json["max_tokens"] == 8
    assert sent.json["temperature"] == 0
    assert sent.json["response_format"] == {"type": "json_object"}
    assert "num_ctx" not in sent.json
    assert "keep_alive" not in sent.json


async def test_a_missing_or_wrong_key_names_the_server_and_the_fix(
    fake_ollama: FakeOllamaFactory,
) -> None:
    code, body = error_of("auth_chat_no_key.http")
    server = llamacpp(fake_ollama(), status(code, body))
    async with cortex(server.url) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    assert "API key is missing or wrong" in str(info.value)
    assert server.url in str(info.value)


async def test_a_prompt_over_the_context_is_a_validation_error_with_its_message(
    fake_ollama: FakeOllamaFactory,
) -> None:
    code, body = error_of("error_too_long_prompt_stream.http")
    server = llamacpp(fake_ollama(), status(code, body))
    async with cortex(server.url) as client:
        with pytest.raises(ValidationError, match="exceeds the available context size"):
            await client.chat("hi", model=GEMMA)


async def test_a_busy_answer_fails_over(fake_ollama: FakeOllamaFactory) -> None:
    busy = llamacpp(fake_ollama(), status(503, {"error": {"message": "Loading model"}}))
    spare = llamacpp(fake_ollama())
    async with cortex(busy.url, spare.url) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            assert stream.server == spare.url
        assert client.server_states()[0].state == "busy"


async def test_a_server_whose_health_says_it_is_loading_is_down(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """llama.cpp lists its model while it loads it, and answers /health with 503."""
    loading = llamacpp(fake_ollama())
    loading.on("/health", status(503, LOADING))
    spare = llamacpp(fake_ollama())
    async with cortex(loading.url, spare.url) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        async with stream:
            assert stream.server == spare.url
        state = client.server_states()[0]
    assert state.state == "ejected"
    assert state.error is not None
    assert "Loading model" in state.error
    assert loading.count("/v1/chat/completions") == 0
    assert spare.count("/health") == 1


async def test_a_stream_cut_without_done_follows_the_mid_stream_rules(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Cut before the first token: the next server answers. Cut after it: StreamError
    with the partial text."""
    early = llamacpp(fake_ollama(), SSE("chat_stream_usage.http", cut=1))
    late = llamacpp(fake_ollama(), SSE("chat_stream_usage.http", cut=4))
    async with cortex(early.url, late.url) as client:
        stream = await client.chat("hi", model=GEMMA, stream=True)
        assert stream.server == late.url
        with pytest.raises(StreamError) as info:
            await stream.text()
    assert info.value.partial_text
    assert info.value.server == late.url


async def test_the_error_for_a_pool_with_openai_style_servers_does_not_say_ollama() -> None:
    async with cortex(refused_url(), Server(refused_url(), api="openai")) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    message = str(info.value)
    assert message.startswith("No server answered for model 'gemma3:270m'. Start the servers,")
    assert "Ollama" not in message


async def test_every_busy_openai_style_server_is_said_to_be_busy(
    fake_ollama: FakeOllamaFactory,
) -> None:
    busy = llamacpp(fake_ollama(), status(429, {"error": {"message": "slow down"}}))
    fast = Timeout(connect=1.0, first_token=0.3, idle=2.0, probe=0.5)
    async with AsyncCortex([busy.url], timeout=fast, fallback=False) as client:
        with pytest.raises(ServerError) as info:
            await client.chat("hi", model=GEMMA)
    message = str(info.value)
    assert message.startswith("Every server for model 'gemma3:270m' was busy")
    assert "OLLAMA_MAX_QUEUE" not in message
    assert "slow down" in message


async def test_balancing_and_affinity_span_both_kinds(fake_ollama: FakeOllamaFactory) -> None:
    ollama = fake_ollama(models=[GEMMA])
    openai_style = llamacpp(fake_ollama())
    both = {ollama.url, openai_style.url}
    async with AsyncCortex(
        [ollama.url, openai_style.url], timeout=QUICK, fallback=False, routing="round_robin"
    ) as client:
        served: list[str] = []
        for _ in range(4):
            stream = await client.chat("hi", model=GEMMA, stream=True)
            async with stream:
                await stream.text()
            served.append(stream.server)
        assert set(served) == both
        assert served[0] != served[1]
        by_key: dict[str, set[str]] = {}
        for key in [f"user-{i // 3}" for i in range(36)]:  # each key 3 times in a row
            stream = await client.chat("hi", model=GEMMA, stream=True, affinity=key)
            async with stream:
                await stream.text()
            by_key.setdefault(key, set()).add(stream.server)
    assert all(len(servers) == 1 for servers in by_key.values())  # each key sticks
    assert set().union(*by_key.values()) == both  # and the keys spread over both kinds


class SSEThenClose(SSE):
    """As llama.cpp does after a stream: the whole answer, then the connection closed
    although the response said keep-alive."""

    async def run(self, exchange: Exchange) -> None:
        await super().run(exchange)
        await exchange.drop()


async def test_a_connection_the_server_closes_after_a_stream_is_not_a_failure(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """The next chat reuses the pooled connection just as the server closes it; aicortex
    sends it again on a fresh connection instead of failing the server."""
    server = llamacpp(fake_ollama(), SSEThenClose("chat_stream.http"))
    async with cortex(server.url) as client:
        for _ in range(5):
            assert await client.chat("hi", model=GEMMA)
        assert client.server_states()[0].state == "healthy"


def test_the_command_line_takes_the_shorthand(fake_ollama: FakeOllamaFactory) -> None:
    """`aicortex chat --server openai+http://...` chats with an OpenAI-style server."""
    import subprocess
    import sys

    server = llamacpp(fake_ollama())
    result = subprocess.run(
        [sys.executable, "-m", "aicortex", "chat", "hi", "-m", GEMMA, "-s", f"openai+{server.url}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert server.count("/v1/chat/completions") == 1
    assert server.count("/api/tags") == 0
