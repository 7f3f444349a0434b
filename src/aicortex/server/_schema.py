"""The OpenAI chat request, as pydantic models, and errors that name the field at fault.

The models check types only (strictly: ``"0.5"`` is not a number, ``1`` is not a
boolean) and allow fields they do not know, because OpenAI clients send many.
What the fields mean, and the checks that need more than one field, live in
:mod:`._translate`.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ._errors import ProxyError, invalid, missing

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ContentPart",
    "FunctionCall",
    "FunctionDef",
    "ImageURL",
    "JsonSchemaFormat",
    "MessageToolCall",
    "ResponseFormat",
    "StreamOptions",
    "Tool",
    "decode_json",
    "parse_chat_request",
]


class _Model(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(extra="allow", strict=True)


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ContentPart(_Model):
    """``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class FunctionCall(_Model):
    name: str
    # OpenAI sends a JSON string; a few clients send the object itself.
    arguments: str | dict[str, Any] = ""


class MessageToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # Earlier thinking, sent back in a tool loop (Ollama and vLLM: reasoning; DeepSeek:
    # reasoning_content; Ollama's native name: thinking).
    reasoning: str | None = None
    reasoning_content: str | None = None
    thinking: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(_Model):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool | None = None


class ChatRequest(_Model):
    """``POST /v1/chat/completions``: OpenAI's fields plus Ollama's own knobs."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    n: int | None = None
    reasoning_effort: str | None = None
    user: str | None = None  # routes the conversation to one server (affinity)
    # Ollama's own knobs, which its /v1 layer cannot pass.
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    num_ctx: int | None = None
    format: str | dict[str, Any] | None = None


# Every field name of the request, as the client spells it.
_FIELDS = frozenset(
    info.alias or name
    for model in _Model.__subclasses__()
    for name, info in model.model_fields.items()
)

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 1, "content")`` as ``messages[1].content``.

    Union member tags (``str``, ``list[ContentPart]``) that pydantic puts in the
    location are dropped: they are not part of the request.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELDS:
            path += f".{part}" if path else part
    return path


def describe(exc: pydantic.ValidationError) -> ProxyError:
    """One 400 for the first field at fault, named as OpenAI names it (``messages[1].content``)."""
    errors = exc.errors(include_url=False)
    group = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    depth = max(len(e["loc"]) for e in group)
    # In a union the member that got furthest is the one the client meant.
    deepest = [e for e in group if len(e["loc"]) == depth]
    error = deepest[0]
    path = field_path(error["loc"])
    same = [e for e in deepest if field_path(e["loc"]) == path]
    if error["type"] == "missing":
        return missing(path)
    if all(e["type"] in _EXPECTED or e["type"] == "literal_error" for e in same):
        expected: list[str] = []
        for e in same:
            if e["type"] == "literal_error":
                ctx: dict[str, Any] = e.get("ctx") or {}
                expected.append(f"one of {ctx.get('expected', '')}")
            else:
                expected.append(_EXPECTED[e["type"]])
        wanted = " or ".join(dict.fromkeys(expected))
        got = _json_type(error["input"])
        if error["type"] == "literal_error" and isinstance(error["input"], str):
            got = repr(error["input"])
        return invalid(path, f"expected {wanted}, but got {got}")
    return invalid(path, str(error["msg"]))


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def decode_json(body: bytes) -> object:
    """Parse a request body; raises a 400 :class:`ProxyError` when it is not UTF-8 JSON."""
    try:
        text = body.decode()
        data = _decode(text)
    except RecursionError:
        raise ProxyError(400, "The request body is nested too deeply.") from None
    except ValueError as exc:
        raise ProxyError(
            400,
            f"We could not parse the JSON body of your request ({exc}). "
            "Send a UTF-8 JSON object with Content-Type: application/json.",
        ) from None
    if _SURROGATE.search(text):
        # JSON may escape half of a surrogate pair; such a string cannot be sent on as UTF-8.
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            raise ProxyError(
                400, "The request body contains an unpaired UTF-16 surrogate escape."
            ) from None
    return data


def parse_chat_request(data: object) -> ChatRequest:
    """Validate a decoded body; raises a 400 :class:`ProxyError` naming the field at fault."""
    if not isinstance(data, dict):
        raise ProxyError(400, f"The request body must be a JSON object, not {_json_type(data)}.")
    try:
        return ChatRequest.model_validate(data)
    except pydantic.ValidationError as exc:
        raise describe(exc) from None
    except RecursionError:
        raise ProxyError(400, "The request body is nested too deeply.") from None
