"""The proxy's pure translation: OpenAI requests → AsyncCortex.chat, events → OpenAI shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aicortex import Stats, ToolCall, ValidationError
from aicortex.server._errors import ProxyError, from_exception, param_of
from aicortex.server._schema import decode_json, parse_chat_request
from aicortex.server._translate import (
    DONE,
    ChatCall,
    ChunkWriter,
    completion,
    finish_reason,
    to_chat_call,
    usage,
)

PNG = "iVBORw0KGgo="


def call(**body: Any) -> ChatCall:
    body.setdefault("model", "llama3.2:3b")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return to_chat_call(parse_chat_request(body))


def rejected(body: object) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        data = body if not isinstance(body, bytes) else decode_json(body)
        to_chat_call(parse_chat_request(data))
    assert info.value.status == 400
    return info.value


def sse(frame: bytes) -> Any:
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert b"\n" not in frame[:-2]
    return json.loads(frame[len(b"data: ") : -2])


# --- requests ----------------------------------------------------------------------------


def test_the_fixture_requests_all_translate(fixtures_dir: Path) -> None:
    """Every OpenAI chat request in the fixtures is accepted."""
    for name in ("chat", "chat-json-schema", "chat-stream-usage", "chat-tool-result", "chat-tools"):
        body = (fixtures_dir / "openai" / "requests" / f"{name}.json").read_bytes()
        assert to_chat_call(parse_chat_request(decode_json(body))).messages


def test_sampling_fields_become_ollama_options(fixtures_dir: Path) -> None:
    """temperature, max_tokens, seed and stop land in options; stream and usage are kept."""
    body = (fixtures_dir / "openai" / "requests" / "chat-stream-usage.json").read_bytes()
    result = to_chat_call(parse_chat_request(decode_json(body)))
    assert result.options == {"temperature": 0.7, "num_predict": 256, "seed": 42, "stop": ["\n\n"]}
    assert result.stream is True
    assert result.include_usage is True


def test_every_openai_knob_has_its_native_place() -> None:
    """top_p, penalties, max_completion_tokens and a single stop string map to options."""
    result = call(
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        max_tokens=10,
        max_completion_tokens=20,
        stop="END",
    )
    assert result.options == {
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "num_predict": 20,
        "stop": ["END"],
    }


def test_ollama_knobs_pass_through_and_top_level_fields_win() -> None:
    """options, keep_alive, think and num_ctx are accepted; explicit fields override options."""
    result = call(
        options={"temperature": 0.1, "top_k": 20, "num_ctx": 2048},
        temperature=0.3,
        num_ctx=8192,
        keep_alive="10m",
        think="high",
    )
    assert result.options == {"temperature": 0.3, "top_k": 20, "num_ctx": 8192}
    assert result.keep_alive == "10m"
    assert result.think == "high"


def test_unset_sampling_fields_keep_the_model_defaults() -> None:
    """Unlike Ollama's /v1 layer, nothing is invented: no options at all when none are given."""
    result = call()
    assert result.options is None
    assert result.stream is False
    assert result.format is None
    assert result.tools is None


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, "json"),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}},
            {"type": "object"},
        ),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, "json"),
    ],
)
def test_response_format_becomes_native_format(
    response_format: dict[str, Any], expected: object
) -> None:
    """json_object → "json"; json_schema → the schema itself."""
    assert call(response_format=response_format).format == expected


@pytest.mark.parametrize(
    ("effort", "think"),
    [("none", False), ("minimal", "low"), ("medium", "medium"), ("xhigh", "max")],
)
def test_reasoning_effort_becomes_think(effort: str, think: object) -> None:
    """reasoning_effort maps to think the way Ollama's /v1 layer maps it."""
    assert call(reasoning_effort=effort).think == think


def test_messages_become_native_messages() -> None:
    """Parts are joined, data-URI images become base64, developer becomes system, and a tool
    result learns the name of the tool from the earlier call."""
    result = call(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "text", "text": "this?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning": "let me look",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"zoom": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ]
    )
    assert result.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is\nthis?", "images": [PNG]},
        {
            "role": "assistant",
            "content": "",
            "thinking": "let me look",
            "tool_calls": [
                {"function": {"name": "look", "arguments": {"zoom": 2}}, "id": "call_1"}
            ],
        },
        {"role": "tool", "content": "a cat", "tool_name": "look", "tool_call_id": "call_1"},
    ]


def test_tools_pass_through_as_sent_unless_tool_choice_is_none(fixtures_dir: Path) -> None:
    """Tool definitions reach Ollama unchanged; tool_choice "none" leaves them out."""
    body = json.loads((fixtures_dir / "openai" / "requests" / "chat-tools.json").read_text())
    assert to_chat_call(parse_chat_request(body)).tools == body["tools"]
    assert to_chat_call(parse_chat_request({**body, "tool_choice": "none"})).tools is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Missing required"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "string or an array",
        ),
        (
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "'robot'",
        ),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "Missing"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages[0].content[0].type",
            "'video'",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "Missing",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    },
                ],
            },
            "messages[1].content[0].image_url.url",
            "base64",
        ),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "Missing"),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                    }
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
            "JSON object",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
            "number",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5},
            "max_tokens",
            "integer",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
            "boolean",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]},
            "stop[0]",
            "string",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "think": "x"},
            "think",
            "boolean",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "one choice"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "reasoning_effort": "huge",
            },
            "reasoning_effort",
            "huge",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "yaml"},
            },
            "response_format.type",
            "'yaml'",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            "tools[0].function",
            "Missing",
        ),
    ],
)
def test_invalid_fields_are_named_in_the_error(
    body: dict[str, Any], param: str, words: str
) -> None:
    """Each invalid field gives a 400 whose param is the field path and whose message names it."""
    error = rejected(body)
    assert error.param == param
    assert param in error.message
    assert words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[1, 2]", b"null", b'"text"', b"\xff\xfe{}", b'{"a": NaN}', b"[" * 100_000],
    ids=["empty", "truncated", "array", "null", "string", "not-utf8", "nan", "deep"],
)
def test_bodies_that_are_not_a_json_object_are_400(raw: bytes) -> None:
    """Anything but a UTF-8 JSON object is a 400 with a message, never an exception."""
    error = rejected(raw)
    assert error.message


def test_an_unpaired_surrogate_escape_is_400() -> None:
    """A lone \\ud800 cannot be forwarded as UTF-8, so it is refused up front."""
    error = rejected(b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert "surrogate" in error.message
    body = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert to_chat_call(parse_chat_request(decode_json(body))).messages[0]["content"] == "😀"


def test_unknown_fields_are_allowed() -> None:
    """OpenAI clients send many fields the proxy does not use; they are ignored."""
    assert call(user="u1", metadata={"a": "b"}, logit_bias={"1": 2}, store=False).model


# --- responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_calls", "done_reason", "expected"),
    [
        (False, "stop", "stop"),
        (True, "stop", "tool_calls"),
        (False, "length", "length"),
        (True, "length", "tool_calls"),
        (False, None, "stop"),
        (False, "load", "stop"),
    ],
)
def test_finish_reason(has_calls: bool, done_reason: str | None, expected: str) -> None:
    """tool_calls when the model called tools, length when it ran out, else stop."""
    assert finish_reason(has_calls, done_reason) == expected


def test_usage_counts_missing_numbers_as_zero() -> None:
    """Ollama may leave counts out; usage still has all three numbers."""
    assert usage(Stats(prompt_tokens=26, completion_tokens=282)) == {
        "prompt_tokens": 26,
        "completion_tokens": 282,
        "total_tokens": 308,
    }
    assert usage(None) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_a_completion_has_openais_shape(fixtures_dir: Path) -> None:
    """The non-streamed answer has every key of the spec example, with the same types."""
    spec = json.loads((fixtures_dir / "openai" / "chat.openai-spec.json").read_text())
    ours = completion(
        id="chatcmpl-1",
        created=1,
        model="m",
        text="Hello",
        thinking="",
        tool_calls=[],
        done_reason="stop",
        stats=Stats(prompt_tokens=3, completion_tokens=2),
    )
    assert set(spec) - set(ours) == {"service_tier", "system_fingerprint"}
    assert set(spec["choices"][0]) == set(ours["choices"][0])
    assert ours["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
    }
    assert ours["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_tool_call_completion_has_null_content_and_string_arguments(fixtures_dir: Path) -> None:
    """Tool calls carry id, type and arguments as a JSON string; content is null."""
    spec = json.loads((fixtures_dir / "openai" / "chat-tools.openai-spec.json").read_text())
    ours = completion(
        id="chatcmpl-1",
        created=1,
        model="m",
        text="",
        thinking="hmm",
        tool_calls=[ToolCall("get_weather", {"city": "Tokyo"}, id="call_7")],
        done_reason="stop",
        stats=None,
    )
    choice = ours["choices"][0]
    assert choice["finish_reason"] == spec["choices"][0]["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["reasoning"] == "hmm"
    (call_,) = message["tool_calls"]
    assert set(call_) == set(spec["choices"][0]["message"]["tool_calls"][0])
    assert call_["id"] == "call_7"
    assert json.loads(call_["function"]["arguments"]) == {"city": "Tokyo"}


def test_chunk_frames_share_id_created_and_model() -> None:
    """Every frame is one compact `data:` line with the same id, created and model."""
    writer = ChunkWriter("chatcmpl-9", 1700000000, "llama3.2", include_usage=True)
    frames = [
        writer.role(),
        writer.text('He said "hi"\n'),
        writer.delta("", "thinking...", ()),
        writer.finish("stop"),
        writer.usage(Stats(prompt_tokens=1, completion_tokens=2)),
    ]
    chunks = [sse(f) for f in frames]
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        ("chatcmpl-9", 1700000000, "llama3.2", "chat.completion.chunk")
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": 'He said "hi"\n'}
    assert chunks[2]["choices"][0]["delta"] == {"reasoning": "thinking..."}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert chunks[3]["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:4])
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert DONE == b"data: [DONE]\n\n"


def test_chunk_frames_match_the_spec_example(fixtures_dir: Path) -> None:
    """Without include_usage, a text frame has exactly the keys of OpenAI's spec example."""
    spec_text = (fixtures_dir / "openai" / "chat-stream.openai-spec.sse").read_text()
    spec = [json.loads(line[6:]) for line in spec_text.splitlines() if line.startswith("data: {")]
    writer = ChunkWriter("chatcmpl-1", 1, "m")
    ours = [sse(writer.role()), sse(writer.text("Hello")), sse(writer.finish("stop"))]
    for mine, theirs in zip(ours, spec, strict=True):
        assert set(theirs) - set(mine) == {"system_fingerprint"}
        assert mine["choices"] == theirs["choices"]


def test_tool_call_deltas_are_numbered_across_the_stream() -> None:
    """Tool calls get increasing indexes, an id, and arguments as a JSON string; finish is
    tool_calls."""
    writer = ChunkWriter("c", 1, "m")
    first = sse(writer.delta("", None, [ToolCall("a", {"x": 1})]))
    second = sse(writer.delta("", None, [ToolCall("b", {}, id="call_b")]))
    calls = first["choices"][0]["delta"]["tool_calls"] + second["choices"][0]["delta"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1]
    assert calls[0]["id"].startswith("call_")
    assert calls[1]["id"] == "call_b"
    assert [c["type"] for c in calls] == ["function", "function"]
    assert calls[0]["function"] == {"name": "a", "arguments": '{"x":1}'}
    assert sse(writer.finish("stop"))["choices"][0]["finish_reason"] == "tool_calls"


def test_text_frames_escape_anything() -> None:
    """Quotes, newlines, non-ASCII and lone surrogates all give valid one-line JSON."""
    writer = ChunkWriter("c", 1, "módel")
    for text in ['"', "\\", "a\nb", "日本", "\ud800", "\x00"]:
        assert sse(writer.text(text))["choices"][0]["delta"]["content"] == text


# --- errors ------------------------------------------------------------------------------


def test_core_validation_errors_name_their_field() -> None:
    """The core's own messages start with the argument they are about."""
    assert param_of("options['num_ctx'] must be an integer, not 'x'.") == "options"
    assert param_of("keep_alive '3600' has no unit; write 3600s") == "keep_alive"
    error = from_exception(ValidationError("options['stop'] must be a string or a list."))
    assert (error.status, error.param) == (400, "options")


def test_an_unexpected_exception_becomes_a_500_without_details() -> None:
    """A bug is a 500 in OpenAI's shape that reveals nothing about the exception."""
    error = from_exception(KeyError("secret internals"))
    assert error.status == 500
    assert "secret" not in error.message
    assert error.body()["error"]["code"] == "internal_error"
