"""aicortex's OpenAI wire adapter against a real model server: llama.cpp serving Gemma 3
270M on 127.0.0.1. The model writes nonsense, so these tests assert on shape, counts and
timing, never on words."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from aicortex import AsyncCortex, Cortex, EventType, StreamError, Timeout
from aicortex._openai import CHAT_PATH, MODELS_PATH, SSETranslator, chat_body, model_ids
from aicortex._protocol import build_messages, stats_from_chunk, tool_calls_from_message
from llamacpp import MODEL_ALIAS, LlamaServer, free_port

FIXTURES = Path(__file__).parent.parent / "fixtures" / "llamacpp"


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    with LlamaServer(slots=4) as running:
        yield running


def endless(prompt: str) -> dict[str, Any]:
    """A streamed chat that runs for seconds: 400 tokens, the end-of-text token ignored
    (llama.cpp's ``ignore_eos``), so that it is still running when a test acts."""
    body, _ = chat_body(MODEL_ALIAS, build_messages(prompt), options={"num_predict": 400})
    body["ignore_eos"] = True
    return body


def stream(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], SSETranslator]:
    """POST a streamed chat; every chunk the translator makes of the answer."""
    translator = SSETranslator(MODEL_ALIAS)
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", url + CHAT_PATH, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            chunks.extend(translator.feed(line.encode()))
    return chunks, translator


def test_the_model_list_names_the_served_model(server: LlamaServer) -> None:
    assert model_ids(httpx.get(server.url + MODELS_PATH).json()) == [MODEL_ALIAS]


def test_a_real_stream_reads_as_tokens_and_a_final_chunk_with_its_counts(
    server: LlamaServer,
) -> None:
    body, dropped = chat_body(
        MODEL_ALIAS,
        build_messages("Say hello.", system="Be brief."),
        options={"num_predict": 12, "temperature": 0, "num_ctx": 4096},
        keep_alive="5m",
    )
    assert dropped == ["options.num_ctx", "keep_alive"]
    chunks, translator = stream(server.url, body)
    assert translator.done
    *tokens, final = chunks
    assert final["done"] is True
    assert final["done_reason"] in ("length", "stop")
    stats = stats_from_chunk(final)
    assert stats.completion_tokens == 12
    assert stats.prompt_tokens is not None
    assert stats.prompt_tokens > 0
    assert stats.eval_duration is not None
    assert stats.eval_duration > 0
    # About one delta per token; a token may be empty text (never sent) or split.
    assert 8 <= len(tokens) <= 14
    assert all(chunk["message"]["content"] for chunk in tokens)


def test_a_real_streamed_tool_call_is_joined_into_one_typed_call(server: LlamaServer) -> None:
    request = json.loads((FIXTURES / "tool_request.json").read_text())
    body, _ = chat_body(
        MODEL_ALIAS,
        request["messages"],
        tools=request["tools"],
        options={"num_predict": 64, "temperature": 0},
    )
    body["logit_bias"] = request["logit_bias"]  # the few-shot request's nudge
    chunks, translator = stream(server.url, body)
    assert translator.done
    calls = [call for chunk in chunks for call in tool_calls_from_message(chunk["message"])]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert set(calls[0].arguments) == {"city"}
    assert chunks[-1]["done_reason"] == "tool_calls"


def test_a_server_killed_mid_stream_leaves_the_answer_without_its_final_chunk() -> None:
    """kill -9: complete events, then the connection closes; the translator never sees
    [DONE], so the answer counts as broken, as an Ollama stream cut short does."""
    with LlamaServer(slots=1) as doomed:
        body = endless("Count.")
        translator = SSETranslator(MODEL_ALIAS)
        chunks: list[dict[str, Any]] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", doomed.url + CHAT_PATH, json=body, timeout=30) as response,
        ):
            for line in response.iter_lines():
                chunks.extend(translator.feed(line.encode()))
                if len(chunks) == 3:
                    doomed.kill()
        assert len(chunks) >= 3
        assert not translator.done
        assert not any(chunk["done"] for chunk in chunks)


def processing(server: LlamaServer) -> float:
    """How many requests llama.cpp is processing now (``/metrics``)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("llamacpp:requests_processing"):
            return float(line.split()[-1])
    raise AssertionError("no llamacpp:requests_processing in /metrics")


def test_a_client_that_leaves_frees_its_slot_within_a_second(server: LlamaServer) -> None:
    with httpx.stream(
        "POST", server.url + CHAT_PATH, json=endless("Count."), timeout=30
    ) as response:
        lines = response.iter_lines()
        for _ in zip(range(6), lines, strict=False):
            pass
        for _ in range(100):  # the server reports the request (it may take a moment)
            if processing(server) >= 1:
                break
            next(lines, None)
        else:
            pytest.fail("the server never reported the stream as processing")
    left = time.monotonic()
    while time.monotonic() - left < 1.0:
        if processing(server) == 0:
            assert not any(
                slot["is_processing"] for slot in httpx.get(server.url + "/slots").json()
            )
            return
        time.sleep(0.02)
    pytest.fail("the request was still processing 1 s after the client left")


# -- aicortex end to end ---------------------------------------------------------------

QUICK = Timeout(connect=2.0, first_token=30.0, idle=10.0, probe=2.0)
SHORT = {"num_predict": 8, "temperature": 0}


async def test_async_cortex_streams_and_answers_from_the_real_server(server: LlamaServer) -> None:
    async with AsyncCortex([server.url], timeout=QUICK, fallback=False) as cortex:
        stream = await cortex.chat("Say hello.", model=MODEL_ALIAS, stream=True, options=SHORT)
        async with stream:
            events = [event async for event in stream]
        text = await cortex.chat("Say hello.", model=MODEL_ALIAS, options=SHORT)
        [state] = cortex.server_states()
    assert next(e.type for e in events) is EventType.START
    assert events[-1].type is EventType.END
    assert 4 <= sum(e.type is EventType.TOKEN for e in events) <= 8
    assert stream.stats is not None
    assert stream.stats.completion_tokens == 8
    assert isinstance(text, str)
    assert text
    assert state.models == (MODEL_ALIAS,)
    assert state.state == "healthy"


def test_the_blocking_cortex_streams_a_real_tool_call(server: LlamaServer) -> None:
    request = json.loads((FIXTURES / "tool_request.json").read_text())
    with (
        Cortex([server.url], timeout=QUICK, fallback=False) as cortex,
        cortex.chat(
            request["messages"],
            model=MODEL_ALIAS,
            tools=request["tools"],
            stream=True,
            options={"num_predict": 64, "temperature": 0},
        ) as stream,
    ):
        stream.text()
    # Without the request's logit_bias nudge the model may call the tool more than once.
    assert stream.tool_calls
    assert {call.name for call in stream.tool_calls} == {"get_weather"}


async def test_a_mixed_pool_fails_over_from_a_dead_ollama_to_the_real_server(
    server: LlamaServer,
) -> None:
    dead = f"ollama+http://127.0.0.1:{free_port()}"
    async with AsyncCortex([dead, server.url], timeout=QUICK, fallback=False) as cortex:
        stream = await cortex.chat("hi", model=MODEL_ALIAS, stream=True, options=SHORT)
        async with stream:
            assert stream.server == server.url
            assert await stream.text()
        assert cortex.server_states()[0].state == "ejected"


async def test_a_real_server_killed_mid_stream_ends_it_with_stream_error() -> None:
    with LlamaServer(slots=1) as doomed:
        async with AsyncCortex([doomed.url], timeout=QUICK, fallback=False) as cortex:
            stream = await cortex.chat(
                "Count.", model=MODEL_ALIAS, stream=True, options={"num_predict": 400}
            )
            events = []
            with pytest.raises(StreamError) as info:
                async for event in stream:
                    events.append(event)
                    if len(events) == 3:
                        doomed.kill()
    assert events[-1].type is EventType.ERROR
    assert info.value.partial_text
    assert info.value.server == doomed.url


async def test_two_real_servers_under_least_busy_both_serve(server: LlamaServer) -> None:
    with LlamaServer(slots=2) as second:
        urls = [server.url, second.url]
        async with AsyncCortex(urls, routing="least_busy", timeout=QUICK, fallback=False) as cortex:
            used: list[str] = []

            async def one() -> None:
                stream = await cortex.chat("hi", model=MODEL_ALIAS, stream=True, options=SHORT)
                async with stream:
                    await stream.text()
                used.append(stream.server)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one)
    assert set(used) == set(urls)


def test_the_proxy_serves_the_official_openai_client_from_the_real_server(
    server: LlamaServer,
) -> None:
    import openai
    import uvicorn

    from aicortex.server import create_app

    port = free_port()
    app = create_app(servers=[server.url], timeout=QUICK)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    proxy = uvicorn.Server(config)
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    try:
        while not proxy.started:
            time.sleep(0.01)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = client.chat.completions.create(
            model=MODEL_ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 8
        chunks = list(
            client.chat.completions.create(
                model=MODEL_ALIAS,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                stream=True,
            )
        )
        # Streamed, not one frame at the end; text that arrived while the client was
        # still reading the last frame is merged into the next one (by design), so a
        # loaded machine may see fewer frames than tokens.
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        proxy.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[LlamaServer]:
    with LlamaServer(slots=2, embeddings=True) as running:
        yield running


def test_the_gateway_serves_the_official_ollama_client_from_the_real_server(
    embedding_server: LlamaServer,
) -> None:
    """An Ollama client against the native gateway in front of llama.cpp: every answer
    translated from OpenAI's API."""
    import ollama
    import uvicorn

    from aicortex.server import create_app

    port = free_port()
    app = create_app(servers=[embedding_server.url], timeout=QUICK)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    gateway = uvicorn.Server(config)
    thread = threading.Thread(target=gateway.run, daemon=True)
    thread.start()
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=60)
    try:
        while not gateway.started:
            time.sleep(0.01)
        assert [m.model for m in client.list().models] == [MODEL_ALIAS]
        hi = [{"role": "user", "content": "hi"}]
        answer = client.chat(MODEL_ALIAS, messages=hi, options={"num_predict": 8})
        assert answer.message.content
        assert answer.eval_count == 8
        assert answer.done_reason == "length"
        parts = list(client.chat(MODEL_ALIAS, messages=hi, options={"num_predict": 8}, stream=True))
        assert sum(1 for p in parts if p.message.content) >= 4
        assert parts[-1].done
        assert parts[-1].eval_count == 8
        generated = client.generate(
            MODEL_ALIAS, "The capital of France is", raw=True, options={"num_predict": 6}
        )
        assert generated.response
        assert generated.eval_count == 6
        embedded = client.embed(MODEL_ALIAS, input=["hello world", "goodbye"])
        assert len(embedded.embeddings) == 2
        assert all(len(v) == 640 for v in embedded.embeddings)
        assert embedded.embeddings[0] != embedded.embeddings[1]
    finally:
        client._client.close()  # pyright: ignore[reportPrivateUsage]
        gateway.should_exit = True
        thread.join(10)
