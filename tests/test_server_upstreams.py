"""The proxy in front of OpenAI-style upstreams (fakes that answer as llama.cpp does) and of
mixed pools of Ollama and OpenAI-style servers, tested with the official openai client."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import httpx
import openai
import pytest

from aicortex import Server
from fakeollama import (
    Exchange,
    FakeOllama,
    FakeOllamaFactory,
    Script,
    cut_after,
    refused_url,
    reply,
    stall_before_headers,
    status,
)
from test_openai_upstream import GEMMA, SSE, events_of, llamacpp
from test_openai_upstream import error_of as captured_error
from test_server_app import ServeFactory, sse_events
from test_server_app import serve as serve  # the fixture

# openai's AsyncStream leaves its inner SSE generators to the garbage collector, which
# trio reports (see test_server_openai.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator '(openai|httpx2|httpcore2)\\.:ResourceWarning"
)

CAPTURED = "chat_stream_usage.http"  # 24 tokens, finish_reason "length", with usage
MESSAGES: Any = [{"role": "user", "content": "Say hello in five words."}]
SECRET = "sk-wrong-secret-4711"
BUSY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def captured_text(name: str) -> str:
    """The text a captured llama.cpp stream carries, its deltas joined."""
    text = ""
    for event in events_of(name):
        data = event.decode()[len("data:") :].strip()
        if data != "[DONE]":
            for choice in json.loads(data)["choices"]:
                text += choice["delta"].get("content") or ""
    return text


TEXT = captured_text(CAPTURED)
FIRST_THREE = "Say hello in"  # the text of the captured stream's events 1 to 3


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)


def async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)


def model_list(*ids: str) -> Script:
    """``GET /v1/models`` as llama.cpp (or vLLM) answers it, with these ids."""
    data = [{"id": i, "object": "model", "owned_by": "llamacpp"} for i in ids]
    return status(200, {"object": "list", "data": data})


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class Paced(Script):
    """A long llama.cpp stream: the role event, then one token every ``delay`` seconds."""

    def __init__(self, tokens: int = 200, delay: float = 0.05) -> None:
        self.tokens = tokens
        self.delay = delay

    @staticmethod
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({"object": "chat.completion.chunk", "model": GEMMA, "choices": [choice]})

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream(content_type="text/event-stream")
        await exchange.send_chunk(self.event({"role": "assistant", "content": None}))
        for i in range(self.tokens):
            await exchange.pause(self.delay)
            await exchange.send_chunk(self.event({"content": f"t{i}"}))
        await exchange.send_chunk(self.event({}, "stop") + b"data: [DONE]\n\n")
        await exchange.end_stream()


def chat(url: str, stream: bool) -> tuple[str, str]:
    """A chat through the openai client: the serving upstream (x-aicortex-server) and
    the text, streamed or not."""
    with client(url) as c:
        create = c.chat.completions.with_raw_response.create
        if stream:
            streamed = create(model=GEMMA, messages=MESSAGES, stream=True)
            chunks = list(streamed.parse())
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            return streamed.headers["x-aicortex-server"], text
        whole = create(model=GEMMA, messages=MESSAGES)
        return whole.headers["x-aicortex-server"], whole.parse().choices[0].message.content or ""


# --- answers from an OpenAI-style upstream ---------------------------------------------------


def test_a_chat_completion_from_an_openai_style_upstream_has_its_text_and_usage(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Not streamed: the captured text, its finish reason and llama.cpp's token counts."""
    upstream = llamacpp(fake_ollama())
    with client(serve(servers=[upstream.url])) as c:
        answer = c.chat.completions.create(model=GEMMA, messages=MESSAGES, max_tokens=24)
    assert answer.model == GEMMA
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == TEXT
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (15, 24, 39)
    (sent,) = [r.json for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert sent["model"] == GEMMA
    assert sent["max_tokens"] == 24
    assert upstream.count("/api/chat") == 0


def test_a_stream_from_an_openai_style_upstream_joins_to_its_text_and_ends_with_usage(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Streamed: role first, deltas that join to the captured text, the finish reason,
    then the usage chunk when asked for (and none when not)."""
    upstream = llamacpp(fake_ollama())
    with client(serve(servers=[upstream.url])) as c:
        chunks = list(
            c.chat.completions.create(
                model=GEMMA,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        plain = list(c.chat.completions.create(model=GEMMA, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == TEXT
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (15, 24, 39)
    assert len({ch.id for ch in chunks}) == 1
    assert "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices) == TEXT
    assert all(ch.usage is None for ch in plain)


async def test_the_async_client_gets_answers_and_streams_from_an_openai_style_upstream(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """AsyncOpenAI, on asyncio and trio: a completion and a stream with usage."""
    upstream = llamacpp(fake_ollama())
    c = async_client(serve(servers=[f"openai+{upstream.url}"]))
    try:
        answer = await c.chat.completions.create(model=GEMMA, messages=MESSAGES)
        stream = await c.chat.completions.create(
            model=GEMMA, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await c.close()
    assert answer.choices[0].message.content == TEXT
    assert answer.usage is not None
    assert answer.usage.total_tokens == 39
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == TEXT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert upstream.count("/api/tags") == 0  # named openai: never probed as Ollama


# --- models ----------------------------------------------------------------------------------


def test_the_model_list_is_the_union_of_an_ollama_and_an_openai_style_server_each_once(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """/v1/models: each server's live models, in pool order, a model both have once,
    then the catalog; every live one can be retrieved."""
    ollama = fake_ollama(models=["llama3.2:3b", "ollama-only:1b", GEMMA])
    upstream = llamacpp(fake_ollama())
    upstream.on("/v1/models", model_list(GEMMA, "llamacpp-only:1b"))
    url = serve(servers=[ollama.url, upstream.url])
    with client(url) as c:
        models = list(c.models.list())
        retrieved = c.models.retrieve("llamacpp-only:1b")
    ids = [m.id for m in models]
    assert ids[:4] == ["llama3.2:3b", "ollama-only:1b", GEMMA, "llamacpp-only:1b"]
    assert len(ids) == len(set(ids))
    assert {m.owned_by for m in models[:4]} == {"aicortex"}
    assert retrieved.id == "llamacpp-only:1b"


def test_a_public_name_that_a_server_maps_to_its_own_is_listed_and_retrievable(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Server(models={"tiny": "gemma3:270m"}): "tiny" is served, so it is a model here."""
    upstream = llamacpp(fake_ollama())
    url = serve(servers=[Server(upstream.url, api="openai", models={"tiny": GEMMA})])
    with client(url) as c:
        assert c.chat.completions.create(model="tiny", messages=MESSAGES).choices
        assert "tiny" in [m.id for m in c.models.list()]
        assert c.models.retrieve("tiny").id == "tiny"


# --- mixed pools: failover -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("dead", ["stopped", "refused"])
def test_a_dead_ollama_server_first_in_a_mixed_pool_is_passed_over_unseen(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, dead: str, stream: bool
) -> None:
    """The Ollama server that served the last chat is stopped, or nothing ever listened
    on its port: the OpenAI-style server answers, and the client sees no error."""
    upstream = llamacpp(fake_ollama())
    if dead == "stopped":
        ollama = fake_ollama(models=[GEMMA], chat=reply(["From", " Ollama."]))
        url = serve(servers=[ollama.url, upstream.url])
        assert chat(url, stream) == (ollama.url, "From Ollama.")  # first in the pool
        ollama.stop()
    else:
        url = serve(servers=[Server(refused_url(), api="ollama"), upstream.url])
    started = time.monotonic()
    assert chat(url, stream) == (upstream.url, TEXT)
    assert time.monotonic() - started < 2
    assert upstream.count("/v1/chat/completions") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_busy_openai_style_server_first_in_a_mixed_pool_is_passed_over_unseen(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, stream: bool
) -> None:
    """The OpenAI-style server answers its chat with 503: the Ollama server serves it."""
    upstream = llamacpp(fake_ollama(), status(503, BUSY))
    ollama = fake_ollama(models=[GEMMA], chat=reply(["From", " Ollama."]))
    url = serve(servers=[upstream.url, ollama.url])
    assert chat(url, stream) == (ollama.url, "From Ollama.")
    assert upstream.count("/v1/chat/completions") == 1
    assert ollama.count("/api/chat") == 1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_upstream_context_overflow_is_a_bad_request_with_its_message(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, stream: bool
) -> None:
    """llama.cpp's 400 exceed_context_size_error → openai.BadRequestError with its words,
    before any stream starts; no other server is asked."""
    code, body = captured_error("error_too_long_prompt_stream.http")
    upstream = llamacpp(fake_ollama(), status(code, body))
    spare = fake_ollama(models=[GEMMA])
    url = serve(servers=[upstream.url, spare.url])
    with client(url) as c, pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=GEMMA, messages=MESSAGES, stream=stream)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    assert "request (3010 tokens) exceeds the available context size (2048 tokens)" in (
        info.value.message
    )
    assert spare.count("/api/chat") == 0


@pytest.mark.parametrize("model", ["gemma3:270", "nowhere-at-all:1b"])
def test_a_model_no_server_lists_is_not_found_as_with_ollama_upstreams(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, model: str
) -> None:
    """openai.NotFoundError, code model_not_found, param model, close names suggested;
    the OpenAI-style server (which would answer any name with its own model) gets no
    chat."""
    ollama = fake_ollama(models=["llama3.2:3b"])
    upstream = llamacpp(fake_ollama())
    url = serve(servers=[ollama.url, upstream.url])
    with client(url) as c, pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model=model, messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
    if model == "gemma3:270":
        assert "Did you mean" in info.value.message
        assert "'gemma3:270m'" in info.value.message
    assert upstream.count("/v1/chat/completions") == 0


def test_a_model_missing_on_openai_style_servers_is_not_advised_to_be_pulled_with_ollama(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    upstream = llamacpp(fake_ollama())
    url = serve(servers=[upstream.url])
    with client(url) as c, pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="qqzx-nothing-like-it", messages=MESSAGES)
    assert "Load it on the server" in info.value.message
    assert "ollama pull" not in info.value.message


def test_an_upstream_that_refuses_the_api_key_is_a_503_that_never_shows_the_key(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """llama.cpp's 401 → 503 upstream_unavailable saying the key is missing or wrong; the
    key that was sent appears in no answer of the proxy and no log line."""
    caplog.set_level(logging.DEBUG)
    code, body = captured_error("auth_chat_no_key.http")
    upstream = llamacpp(fake_ollama(), status(code, body))
    url = serve(servers=[Server(upstream.url, api="openai", api_key=SECRET)])
    with client(url) as c, pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model=GEMMA, messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.code == "upstream_unavailable"
    assert info.value.type == "api_error"
    message = info.value.message
    assert "API key is missing or wrong" in message
    assert "Invalid API Key" in message  # the upstream's own words
    assert upstream.url in message
    assert SECRET not in message
    raw = httpx.post(url + "/v1/chat/completions", json={"model": GEMMA, "messages": MESSAGES})
    streamed = httpx.post(
        url + "/v1/chat/completions", json={"model": GEMMA, "messages": MESSAGES, "stream": True}
    )
    ready = httpx.get(url + "/ready")
    for response in (raw, streamed, ready):
        assert SECRET not in response.text
        assert not [v for v in response.headers.values() if SECRET in v]
    assert raw.status_code == streamed.status_code == 503
    # The key did go to the upstream, so its absence above means something.
    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert {r.headers["authorization"] for r in chats} == {f"Bearer {SECRET}"}
    assert caplog.records
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


# --- broken streams --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_a_stream_the_upstream_cuts_after_tokens_ends_with_the_same_error_frame(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, kind: str
) -> None:
    """Cut after three tokens, by an Ollama or an OpenAI-style upstream: the text so far,
    then one `data: {"error": ...}` frame of the same shape and no [DONE]; the openai
    client raises APIError once the text is out."""
    if kind == "ollama":
        upstream = fake_ollama(models=[GEMMA], chat=cut_after(["Say", " hello", " in"], 3))
    else:
        upstream = llamacpp(fake_ollama(), SSE(CAPTURED, cut=4))
    url = serve(servers=[upstream.url])
    response = httpx.post(
        url + "/v1/chat/completions", json={"model": GEMMA, "messages": MESSAGES, "stream": True}
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("api_error", None, "upstream_error")
    assert f"The stream from {upstream.url} broke after 3 tokens" in error["message"]
    assert "partial_text" not in error["message"]  # Python advice, not for API clients
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == FIRST_THREE
    received: list[str] = []
    with client(url) as c, pytest.raises(openai.APIError) as info:
        for chunk in c.chat.completions.create(model=GEMMA, messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == FIRST_THREE
    assert "broke after 3 tokens" in info.value.message


@pytest.mark.parametrize(
    ("cut", "stream"),
    [(1, True), (1, False), (4, False)],
    ids=["streamed-before-any-token", "whole-before-any-token", "whole-after-tokens"],
)
def test_an_answer_the_openai_style_upstream_cuts_unseen_is_served_by_the_next_server(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, cut: int, stream: bool
) -> None:
    """Nothing reached the client yet (no token, or a whole answer still being
    collected): the Ollama server next in the pool answers, and no error shows."""
    upstream = llamacpp(fake_ollama(), SSE(CAPTURED, cut=cut))
    ollama = fake_ollama(models=[GEMMA], chat=reply(["From", " Ollama."]))
    url = serve(servers=[upstream.url, ollama.url])
    assert chat(url, stream) == (ollama.url, "From Ollama.")
    assert upstream.count("/v1/chat/completions") == 1


# --- clients that leave ----------------------------------------------------------------------


async def wait_for_disconnect(server: FakeOllama) -> bool:
    return await anyio.to_thread.run_sync(server.wait_for_disconnect, 1.0)


async def test_a_client_leaving_a_stream_closes_the_openai_style_upstreams_connection(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The openai client closes its stream after the first token: the upstream sees its
    connection go within a second, long before its answer would have ended."""
    upstream = llamacpp(fake_ollama(), Paced())
    c = async_client(serve(servers=[upstream.url]))
    try:
        stream = await c.chat.completions.create(model=GEMMA, messages=MESSAGES, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
    finally:
        await c.close()
    assert await wait_for_disconnect(upstream)
    assert upstream.disconnects == 1


async def test_a_client_leaving_before_the_first_token_closes_the_upstreams_connection(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The OpenAI-style upstream has not answered yet when the client gives up."""
    upstream = llamacpp(fake_ollama(), stall_before_headers())
    url = serve(servers=[upstream.url]) + "/v1/chat/completions"
    async with httpx.AsyncClient() as http:
        with anyio.move_on_after(0.3):
            await http.post(url, json={"model": GEMMA, "messages": MESSAGES, "stream": True})
    assert await wait_for_disconnect(upstream)


async def test_a_client_leaving_a_non_streamed_request_closes_the_upstreams_connection(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The proxy is collecting a whole answer from the OpenAI-style upstream when the
    client gives up: the upstream sees it."""
    upstream = llamacpp(fake_ollama(), Paced())
    url = serve(servers=[upstream.url]) + "/v1/chat/completions"
    async with httpx.AsyncClient() as http:
        with anyio.move_on_after(0.3):
            await http.post(url, json={"model": GEMMA, "messages": MESSAGES})
    assert await wait_for_disconnect(upstream)
