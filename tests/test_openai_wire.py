"""The OpenAI wire format (pure): requests built from aicortex's chat arguments, and real
llama.cpp answers read back as Ollama-shaped chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aicortex._openai import SSETranslator, chat_body, classify_status, model_ids
from aicortex._protocol import build_messages, stats_from_chunk, tool_calls_from_message

LLAMACPP = Path(__file__).parent / "fixtures" / "llamacpp"


def capture(name: str) -> tuple[int, bytes]:
    """The status and body of a captured exchange."""
    text = (LLAMACPP / name).read_text(encoding="utf-8")
    response = text.split("\n### HTTP ", 1)[1]
    status = int(response.split(" ", 1)[0])
    body = response.split("\n\n", 1)[1]
    return status, body.encode()


def sse_lines(name: str) -> list[bytes]:
    """The body's lines, without the marker where a long stream was cut."""
    return [
        line
        for line in capture(name)[1].split(b"\n")
        if not (line.startswith(b"... (") and line.endswith(b"cut) ..."))
    ]


def translate(name: str) -> list[dict[str, Any]]:
    translator = SSETranslator("gemma3:270m")
    chunks = [chunk for line in sse_lines(name) for chunk in translator.feed(line)]
    assert translator.done
    return chunks


# -- answers ---------------------------------------------------------------------------


def test_a_real_stream_becomes_one_chunk_per_token_and_a_final_chunk() -> None:
    chunks = translate("chat_stream.http")
    *tokens, final = chunks
    assert tokens
    assert all(c["done"] is False for c in tokens)
    assert all(c["message"]["content"] for c in tokens)  # the empty role delta is skipped
    assert final["done"] is True
    assert final["done_reason"] == "length"
    assert "".join(c["message"]["content"] for c in tokens).startswith("Say hello")


def test_usage_and_timings_become_ollamas_counts_and_durations() -> None:
    final = translate("chat_stream_usage.http")[-1]
    stats = stats_from_chunk(final)
    assert (stats.prompt_tokens, stats.completion_tokens) == (15, 24)
    assert stats.eval_duration == 495_033_000
    assert stats.prompt_eval_duration == 44_539_000


def test_tool_call_fragments_are_joined_into_one_typed_call() -> None:
    chunks = translate("chat_tools_fewshot_stream.http")
    calls = [call for c in chunks for call in tool_calls_from_message(c["message"])]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == {"city": "Paris"}
    assert calls[0].id
    assert chunks[-1]["done_reason"] == "tool_calls"


def test_reasoning_content_becomes_thinking() -> None:
    translator = SSETranslator("m")
    event = {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    [chunk] = translator.feed(b"data: " + json.dumps(event).encode())
    assert chunk["message"]["thinking"] == "hmm"
    assert chunk["message"]["content"] == ""


def test_a_stream_cut_before_done_has_no_final_chunk() -> None:
    """kill -9 mid-stream: complete events, then nothing; no final chunk means the
    stream fails as a broken Ollama answer does."""
    translator = SSETranslator("gemma3:270m")
    lines = sse_lines("chat_stream.http")
    chunks = [c for line in lines[:8] for c in translator.feed(line)]
    assert chunks
    assert not any(c["done"] for c in chunks)
    assert not translator.done


def test_an_error_event_and_a_line_that_is_not_json_become_error_chunks() -> None:
    translator = SSETranslator("m")
    [error] = translator.feed(b'data: {"error": {"message": "model crashed", "code": 500}}')
    assert error == {"error": "model crashed"}
    [garbage] = translator.feed(b"data: <html>")
    assert "not JSON" in garbage["error"]
    assert translator.feed(b": keep-alive comment") == []
    assert translator.feed(b"event: message") == []


# -- requests --------------------------------------------------------------------------


def test_ollamas_arguments_map_to_openais_fields() -> None:
    messages = build_messages("hi", system="be brief")
    body, dropped = chat_body(
        "gemma3:270m",
        messages,
        options={"num_predict": 16, "temperature": 0.2, "stop": ["\n"], "seed": 7, "num_ctx": 8192},
        format="json",
        keep_alive="5m",
        think="high",
    )
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert body["max_tokens"] == 16
    assert (body["temperature"], body["stop"], body["seed"]) == (0.2, ["\n"], 7)
    assert body["response_format"] == {"type": "json_object"}
    assert body["reasoning_effort"] == "high"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "num_ctx" not in body
    assert "keep_alive" not in body
    assert dropped == ["options.num_ctx", "keep_alive"]


def test_a_schema_becomes_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"greeting": {"type": "string"}}}
    body, _ = chat_body("m", build_messages("hi"), format=schema, stream=False)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    assert "stream_options" not in body


def test_images_become_image_url_data_parts() -> None:
    png = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
        "AAAABJRU5ErkJggg=="
    )
    body, _ = chat_body("m", build_messages("what is it?", images=[png]))
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "what is it?"}
    assert content[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}


def test_tool_calls_and_results_get_ids_and_json_arguments() -> None:
    request = json.loads((LLAMACPP / "tool_request.json").read_text())
    tools = request["tools"]
    messages = build_messages(
        [
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
                ],
            },
            {"role": "tool", "tool_name": "get_weather", "content": "clouds"},
        ]
    )
    body, _ = chat_body("m", messages, tools=tools)
    call = body["messages"][1]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert body["messages"][1]["content"] is None
    assert body["messages"][2]["tool_call_id"] == call["id"]
    assert body["tools"] == tools


# -- models and errors -----------------------------------------------------------------


def test_the_model_list_is_read_from_data() -> None:
    status, body = capture("models.http")
    assert status == 200
    assert model_ids(json.loads(body)) == ["gemma3:270m"]
    assert model_ids({"data": [{"id": 3}, {}]}) == []


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("error_too_long_prompt_stream.http", "invalid", "exceeds the available context size"),
        ("auth_chat_no_key.http", "retry", "API key is missing or wrong"),
        ("error_unknown_route_api_tags.http", "retry", "is this an OpenAI-compatible server"),
    ],
)
def test_real_error_answers_are_classified(name: str, kind: str, words: str) -> None:
    status, body = capture(name)
    failure = classify_status(status, body, "http://127.0.0.1:8080")
    assert failure.kind == kind
    assert words in failure.message


def test_a_missing_model_busy_and_server_errors() -> None:
    missing = classify_status(404, b'{"error": {"message": "The model `x` does not exist."}}', "s")
    assert missing.kind == "model_missing"
    assert "busy" in classify_status(429, b"", "s").message
    assert "busy" in classify_status(503, b'{"error": "overloaded"}', "s").message
    assert classify_status(500, b"boom", "s").message == "HTTP 500: boom"
