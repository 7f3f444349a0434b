"""aicortex's OpenAI wire adapter against a real model server: llama.cpp serving Gemma 3
270M on 127.0.0.1. The model writes nonsense, so these tests assert on shape, counts and
timing, never on words."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aicortex._openai import CHAT_PATH, MODELS_PATH, SSETranslator, chat_body, model_ids
from aicortex._protocol import build_messages, stats_from_chunk, tool_calls_from_message
from llamacpp import MODEL_ALIAS, LlamaServer

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


def test_a_client_that_leaves_frees_its_slot_within_a_second(server: LlamaServer) -> None:
    with httpx.stream(
        "POST", server.url + CHAT_PATH, json=endless("Count."), timeout=30
    ) as response:
        for _ in zip(range(6), response.iter_lines(), strict=False):
            pass
        busy = [slot["is_processing"] for slot in httpx.get(server.url + "/slots").json()]
        assert any(busy)
    left = time.monotonic()
    while time.monotonic() - left < 1.0:
        if not any(slot["is_processing"] for slot in httpx.get(server.url + "/slots").json()):
            return
        time.sleep(0.02)
    pytest.fail("the slot was still processing 1 s after the client left")
