"""The wire protocol: request bodies, chunk decoding and error mapping, with no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from aicortex import Message, ToolCall, ValidationError
from aicortex._protocol import (
    BadChunk,
    build_chat_body,
    build_messages,
    classify_status,
    decode_line,
    error_text,
    model_key,
    stats_from_chunk,
    tool_calls_from_message,
)


def _load(fixtures_dir: Path, name: str) -> Any:
    return json.loads((fixtures_dir / "ollama" / name).read_text())


def test_a_string_prompt_becomes_one_user_message() -> None:
    """A plain string is sent as a single user message."""
    assert build_messages("hi") == [{"role": "user", "content": "hi"}]


def test_system_is_prepended_and_images_attach_to_the_last_user_message() -> None:
    """`system=` comes first; `images=` are base64-encoded onto the last user turn."""
    messages = build_messages(
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "look"},
        ],
        system="be brief",
        images=[b"\x89PNG", "data:image/png;base64,QUJD"],
    )
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert "images" not in messages[1]
    assert messages[3]["images"] == [base64.b64encode(b"\x89PNG").decode(), "QUJD"]


def test_message_models_and_dicts_mix_and_drop_none_fields() -> None:
    """Message models are dumped without None fields; dicts pass through."""
    messages = build_messages(
        [Message(role="user", content="hi"), {"role": "tool", "content": "11", "tool_name": "w"}]
    )
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "11", "tool_name": "w"},
    ]


def test_image_files_are_read_and_encoded(tmp_path: Path) -> None:
    """A path to an image file is read and sent as base64."""
    picture = tmp_path / "p.png"
    picture.write_bytes(b"pixels")
    messages = build_messages("what is this", images=[picture])  # type: ignore[list-item]
    assert messages[0]["images"] == [base64.b64encode(b"pixels").decode()]


def test_a_missing_image_file_says_which() -> None:
    """An unreadable image path raises ValidationError naming the file."""
    with pytest.raises(ValidationError, match=r"nope\.png"):
        build_messages("x", images=[Path("/nonexistent/nope.png")])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty list"),
        (42, "string or a list of messages"),
        (b"bytes", "string or a list of messages"),
        ([{"content": "no role"}], "needs a 'role'"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "non-string content"),
        (["just a string in a list"], "each message must be a dict"),
        ([{"role": "user", "content": "x", "images": "abc"}], "'images' must be a list"),
    ],
)
def test_bad_prompts_raise_validation_errors_that_say_what_to_do(prompt: Any, match: str) -> None:
    """Malformed prompts are refused before anything is sent."""
    with pytest.raises(ValidationError, match=match):
        build_messages(prompt)


def test_images_without_a_user_message_are_refused() -> None:
    """Images need a user message to ride on."""
    with pytest.raises(ValidationError, match="no user message"):
        build_messages([{"role": "system", "content": "s"}], images=[b"x"])


def test_the_chat_body_matches_the_documented_request(fixtures_dir: Path) -> None:
    """The body for a simple chat equals Ollama's documented request (stream explicit)."""
    expected = _load(fixtures_dir, "requests/chat.json")
    body = build_chat_body(expected["model"], expected["messages"], stream=expected["stream"])
    assert body == expected


def test_structured_output_and_tools_pass_through(fixtures_dir: Path) -> None:
    """`format` schemas and `tools` reach the body unchanged."""
    structured = _load(fixtures_dir, "requests/chat-structured.json")
    body = build_chat_body(
        structured["model"], structured["messages"], stream=False, format=structured["format"]
    )
    assert body["format"] == structured["format"]
    tools_req = _load(fixtures_dir, "requests/chat-tools.json")
    body = build_chat_body(tools_req["model"], tools_req["messages"], tools=tools_req["tools"])
    assert body["tools"] == tools_req["tools"]
    assert body["stream"] is True


def test_options_are_checked_and_stop_becomes_a_list() -> None:
    """Known options are type-checked; a bare `stop` string becomes an array."""
    body = build_chat_body(
        "m",
        [],
        options={"temperature": 0.2, "num_ctx": 8192.0, "stop": "###", "seed": None, "x": 1},
        keep_alive="5m",
        think="high",
    )
    assert body["options"] == {"temperature": 0.2, "num_ctx": 8192, "stop": ["###"], "x": 1}
    assert body["keep_alive"] == "5m"
    assert body["think"] == "high"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"options": {"temperature": "0.5"}}, "must be a number"),
        ({"options": {"num_ctx": 1.5}}, "must be an integer"),
        ({"options": {"use_mmap": "yes"}}, "true or false"),
        ({"options": {"stop": [1, 2]}}, "list of strings"),
        ({"keep_alive": "3600"}, "has no unit"),
        ({"keep_alive": True}, "keep_alive must be"),
        ({"think": "extreme"}, "think must be"),
        ({"format": "xml"}, "format must be"),
        ({"tools": {"type": "function"}}, "tools must be a list"),
        ({"tools": ["get_weather"]}, r"tools\[0\] must be a dict"),
    ],
)
def test_values_ollama_would_reject_fail_early(kwargs: dict[str, Any], match: str) -> None:
    """Values Ollama answers with a 400/500 are refused with a clear ValidationError."""
    with pytest.raises(ValidationError, match=match):
        build_chat_body("m", [], **kwargs)


def test_an_empty_model_is_refused() -> None:
    """A model name is required."""
    with pytest.raises(ValidationError, match="model must be"):
        build_chat_body("  ", [])


def test_every_line_of_the_documented_streams_decodes(fixtures_dir: Path) -> None:
    """The NDJSON fixtures decode line by line into dicts."""
    for name in ("chat-stream.ndjson", "chat-tools-stream.ndjson", "stream-error-midstream.ndjson"):
        for line in (fixtures_dir / "ollama" / name).read_bytes().splitlines():
            assert isinstance(decode_line(line), dict)


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_garbage_lines_raise_bad_chunk(line: bytes) -> None:
    """Anything but a JSON object is a BadChunk."""
    with pytest.raises(BadChunk):
        decode_line(line)


def test_tool_calls_are_read_from_the_documented_answer(fixtures_dir: Path) -> None:
    """The tool call in Ollama's example becomes a typed ToolCall with object arguments."""
    answer = _load(fixtures_dir, "chat-tools.json")
    assert tool_calls_from_message(answer["message"]) == (
        ToolCall(name="get_weather", arguments={"city": "Tokyo"}),
    )


def test_tool_call_ids_indexes_and_string_arguments_are_kept() -> None:
    """Newer servers' ids and indexes are kept; JSON-string arguments are decoded."""
    message = {
        "tool_calls": [
            {"id": "call_ab12cd34", "function": {"index": 0, "name": "f", "arguments": '{"a": 1}'}},
            {"function": "broken"},
        ]
    }
    assert tool_calls_from_message(message) == (
        ToolCall(name="f", arguments={"a": 1}, id="call_ab12cd34", index=0),
    )


def test_final_chunk_stats_come_from_the_fixture(fixtures_dir: Path) -> None:
    """Token counts and nanosecond durations are read from the done chunk."""
    final = decode_line(
        (fixtures_dir / "ollama" / "chat-stream.ndjson").read_bytes().splitlines()[-1]
    )
    stats = stats_from_chunk(final)
    assert stats.completion_tokens == 282
    assert stats.prompt_tokens == 26
    assert stats.eval_duration == 4535599000
    assert stats.tokens_per_second == pytest.approx(282 / 4.535599)


def test_missing_stats_are_none_not_zero() -> None:
    """Ollama omits zero metrics; they stay None and tokens/s is None."""
    stats = stats_from_chunk({"done": True})
    assert stats.completion_tokens is None
    assert stats.tokens_per_second is None


@pytest.mark.parametrize(
    ("status", "body", "ctype", "kind"),
    [
        (400, b'{"error":"model is required"}', "application/json", "invalid"),
        (
            404,
            b'{"error":"model \'x\' not found"}',
            "application/json; charset=utf-8",
            "model_missing",
        ),
        (404, b"404 page not found", "text/plain", "retry"),
        (
            503,
            b'{"error":"server busy, please try again.  maximum pending requests exceeded"}',
            "application/json",
            "retry",
        ),
        (500, b'{"error":"llama runner process has terminated"}', "application/json", "retry"),
        (403, b"", "", "retry"),
        (502, b"<html>bad gateway</html>", "text/html", "retry"),
    ],
)
def test_error_statuses_map_to_what_the_client_should_do(
    status: int, body: bytes, ctype: str, kind: str
) -> None:
    """400 is the caller's fault, a JSON 404 means the model is missing, the rest fail over."""
    assert classify_status(status, body, ctype).kind == kind


def test_error_fixtures_yield_ollamas_own_message(fixtures_dir: Path) -> None:
    """The `error` string of Ollama's error bodies is what users see."""
    for name in (
        "error-model-not-found.json",
        "error-server-busy.json",
        "error-model-required.json",
    ):
        raw = (fixtures_dir / "ollama" / name).read_bytes()
        assert error_text(raw) == json.loads(raw)["error"]
    assert error_text(b'{"error": {"message": "nested"}}') == "nested"
    assert error_text(b"plain words") == "plain words"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("Llama3.2:3B", "llama3.2:3b"),
        ("registry.ollama.ai/library/qwen2.5:7b", "qwen2.5:7b"),
        ("library/gemma3", "gemma3:latest"),
        ("user/model", "user/model:latest"),
        ("host:5000/user/model", "host:5000/user/model:latest"),
    ],
)
def test_model_names_compare_like_ollama(name: str, key: str) -> None:
    """Names are matched case-insensitively with the default tag and namespace."""
    assert model_key(name) == key
