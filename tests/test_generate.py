"""`generate()`: Ollama's raw completion, its body (pure), its translation for OpenAI-style
servers, and the same events and failover as `chat()` against fake servers."""

from __future__ import annotations

import json
from typing import Any

import pytest

import aicortex
from aicortex import AsyncCortex, Cortex, EventType, Server, StreamError, Timeout, ValidationError
from aicortex._openai import CHAT_PATH as OPENAI_CHAT
from aicortex._openai import COMPLETIONS_PATH, SSETranslator, generate_body
from aicortex._protocol import build_generate_body
from fakeollama import Exchange, FakeOllamaFactory, Script, busy, cut_after, reply

MODEL = "qwen2.5-coder:1.5b"
QUICK = Timeout(connect=1.0, first_token=3.0, idle=2.0, probe=0.5)


# -- pure ------------------------------------------------------------------------------


def test_generate_body_carries_every_native_field() -> None:
    body = build_generate_body(
        MODEL,
        "def add(a, b):",
        suffix="    return c",
        images=[b"\x89PNG"],
        system="You write Python.",
        template="{{ .Prompt }}",
        context=[1, 2, 3],
        options={"temperature": 0, "stop": "\n\n"},
        format="json",
        think=False,
        keep_alive="1m",
    )
    assert body == {
        "model": MODEL,
        "prompt": "def add(a, b):",
        "stream": True,
        "suffix": "    return c",
        "system": "You write Python.",
        "template": "{{ .Prompt }}",
        "context": [1, 2, 3],
        "images": ["iVBORw=="],
        "options": {"temperature": 0, "stop": ["\n\n"]},
        "format": "json",
        "think": False,
        "keep_alive": "1m",
    }
    assert build_generate_body(MODEL, "x", raw=True)["raw"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"raw": True, "system": "s"}, "cannot be combined with system"),
        ({"raw": True, "template": "t", "context": [1]}, "template or context; drop them"),
        ({"context": [1, "2"]}, "context must be a list of integers"),
        ({"context": "1,2"}, "context must be a list of integers"),
        ({"suffix": 3}, "suffix must be a string"),
        ({"raw": "yes"}, "raw must be true or false"),
    ],
)
def test_generate_body_refuses_what_ollama_would(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build_generate_body(MODEL, "x", **args)


def test_generate_takes_a_string_prompt_only() -> None:
    with pytest.raises(ValidationError, match="use chat\\(\\) for a list of messages"):
        build_generate_body(MODEL, [{"role": "user", "content": "hi"}])


def test_a_plain_prompt_becomes_a_chat_for_openai_servers() -> None:
    request = build_generate_body(
        MODEL, "Why?", system="Be brief.", images=[b"\xff\xd8\xff"], options={"num_predict": 9}
    )
    path, body = generate_body("served-name", request)
    assert path == OPENAI_CHAT
    assert body["model"] == "served-name"
    assert body["max_tokens"] == 9
    assert body["stream"] is True
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": "Why?"}
    assert user["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_a_raw_prompt_or_a_suffix_goes_to_completions() -> None:
    for request in (
        build_generate_body(MODEL, "<|fim_prefix|>x", raw=True, options={"temperature": 0.1}),
        build_generate_body(MODEL, "def f(", suffix="):", context=[1]),
    ):
        path, body = generate_body("m", request)
        assert path == COMPLETIONS_PATH
        assert body["prompt"] == request["prompt"]
        assert body.get("suffix") == request.get("suffix")
        assert "messages" not in body
        assert "context" not in body


def test_completion_text_reads_as_tokens() -> None:
    sse = SSETranslator(MODEL)
    chunks = [
        *sse.feed(b'data: {"choices":[{"text":" Paris","index":0,"finish_reason":null}]}'),
        *sse.feed(b'data: {"choices":[{"text":".","index":0,"finish_reason":"length"}]}'),
        *sse.feed(b"data: [DONE]"),
    ]
    assert [c["message"]["content"] for c in chunks] == [" Paris", ".", ""]
    assert chunks[-1]["done"] is True
    assert chunks[-1]["done_reason"] == "length"


# -- against servers ---------------------------------------------------------------------


async def test_generate_returns_the_text_and_sends_the_native_body(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(models=[MODEL])
    server.on("/api/generate", reply(["def ", "add"]))
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        text = await cortex.generate("x", model=MODEL, suffix="y", context=[4, 5], raw=False)
    assert text == "def add"
    [request] = [r for r in server.requests if r.path == "/api/generate"]
    assert request.json == {
        "model": MODEL,
        "prompt": "x",
        "stream": True,
        "suffix": "y",
        "raw": False,
        "context": [4, 5],
    }


async def test_generate_streams_the_same_events_as_chat(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama(models=[MODEL])
    server.on("/api/generate", reply(["a", "b", "c"]))
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        stream = await cortex.generate("go", model=MODEL, stream=True)
        async with stream:
            events = [event async for event in stream]
    assert [e.type for e in events] == [
        EventType.START,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.END,
    ]
    assert "".join(e.content or "" for e in events if e.type is EventType.TOKEN) == "abc"
    end = events[-1]
    assert end.stats is not None
    assert end.stats.completion_tokens == 3
    assert end.raw is not None
    assert end.raw["done"] is True


async def test_generate_fails_over_before_the_first_token(fake_ollama: FakeOllamaFactory) -> None:
    first = fake_ollama(models=[MODEL])
    second = fake_ollama(models=[MODEL])
    first.on("/api/generate", busy())
    second.on("/api/generate", reply("ok"))
    async with AsyncCortex([first.url, second.url], fallback=False, timeout=QUICK) as cortex:
        assert await cortex.generate("x", model=MODEL) == "ok"
    assert first.count("/api/generate") == 1
    assert second.count("/api/generate") == 1
    assert first.count("/api/chat") == second.count("/api/chat") == 0


async def test_a_generate_stream_that_breaks_raises_with_the_partial_text(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(models=[MODEL])
    server.on("/api/generate", cut_after(["one ", "two ", "three"], 2))
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        stream = await cortex.generate("x", model=MODEL, stream=True)
        with pytest.raises(StreamError) as caught:
            await stream.text()
    assert caught.value.partial_text == "one two "


class Completions(Script):
    """An OpenAI-style server: ``/v1/models`` lists ``model``; ``/v1/completions`` and
    ``/v1/chat/completions`` stream ``words``."""

    def __init__(self, model: str, words: list[str]) -> None:
        self.model = model
        self.words = words

    async def run(self, exchange: Exchange) -> None:
        path = exchange.request.path
        if path == "/v1/models":
            body = {"object": "list", "data": [{"id": self.model}]}
            await exchange.respond(200, json.dumps(body).encode(), "application/json")
            return
        await exchange.start_stream(content_type="text/event-stream")
        for i, word in enumerate(self.words):
            last = i == len(self.words) - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if last else None}
            if path == "/v1/completions":
                choice["text"] = word
            else:
                choice["delta"] = {"content": word}
            event = {"object": "chunk", "choices": [choice]}
            await exchange.send_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        await exchange.send_chunk(b"data: [DONE]\n\n")
        await exchange.end_stream()


async def test_openai_style_servers_generate_through_completions_or_chat(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(models=[])
    script = Completions(MODEL, ["fn", "()"])
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        server.on(path, script)
    async with AsyncCortex(
        [Server(server.url, api="openai")], fallback=False, timeout=QUICK
    ) as cortex:
        assert await cortex.generate("<fim>", model=MODEL, raw=True) == "fn()"
        assert await cortex.generate("hi", model=MODEL, system="s") == "fn()"
    [raw] = [r.json for r in server.requests if r.path == "/v1/completions"]
    [chat] = [r.json for r in server.requests if r.path == "/v1/chat/completions"]
    assert raw["prompt"] == "<fim>"
    assert raw["stream"] is True
    assert chat["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    ]


async def test_generate_refuses_unknown_arguments(fake_ollama: FakeOllamaFactory) -> None:
    async with AsyncCortex(["http://127.0.0.1:9"], fallback=False) as cortex:
        with pytest.raises(TypeError, match="unexpected keyword argument 'tools'"):
            await cortex.generate("x", model=MODEL, tools=[])  # type: ignore[call-arg]


def test_blocking_generate(fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake_ollama(models=[MODEL])
    server.on("/api/generate", reply(["x", "y"]))
    with Cortex([server.url], fallback=False, timeout=QUICK) as cortex:
        assert cortex.generate("p", model=MODEL) == "xy"
        with cortex.generate("p", model=MODEL, stream=True) as stream:
            assert [e.content for e in stream if e.type is EventType.TOKEN] == ["x", "y"]
    monkeypatch.setenv("AICORTEX_SERVERS", server.url)
    default = aicortex.get_default_cortex()
    try:
        assert aicortex.generate("p", model=MODEL) == "xy"
    finally:
        default.close()
