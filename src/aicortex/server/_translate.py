"""OpenAI chat completions ⇄ Ollama's native chat, without any I/O.

* :func:`to_chat_call`: a validated OpenAI request → the arguments of
  :meth:`AsyncCortex.chat <aicortex.AsyncCortex.chat>`.
* :class:`ChunkWriter`: stream events → ``chat.completion.chunk`` SSE frames, built
  from precomputed bytes so a token costs one string escape.
* :func:`completion`: a collected answer → one ``chat.completion``.
* :func:`embedding_list`: vectors → the ``/v1/embeddings`` answer.
"""

from __future__ import annotations

import json
import secrets
import struct
from base64 import b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Literal, cast

from .._events import Stats, ToolCall
from ._errors import invalid, missing
from ._schema import ChatMessage, ChatRequest, ContentPart, ImageURL

__all__ = [
    "embedding_list",
    "DONE",
    "ChatCall",
    "ChunkWriter",
    "Think",
    "completion",
    "completion_id",
    "finish_reason",
    "frame",
    "to_chat_call",
    "tool_call_dicts",
    "usage",
]

DONE = b"data: [DONE]\n\n"

Think = bool | Literal["low", "medium", "high", "max"]

# reasoning_effort → Ollama's think, as Ollama's own /v1 layer maps it.
_EFFORT: dict[str, Think] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "max",
    "max": "max",
}


def _compact(obj: object) -> str:
    # ASCII-only output cannot fail to encode, even with a lone surrogate in a string.
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True)
class ChatCall:
    """One request for :meth:`AsyncCortex.chat`, and how to answer it."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    think: Think | None = None
    keep_alive: float | str | None = None
    affinity: str | None = None


# --- request ---------------------------------------------------------------------------


def _image(image_url: ImageURL | str | None, where: str) -> str:
    if image_url is None:
        raise missing(f"{where}.image_url")
    url = image_url if isinstance(image_url, str) else image_url.url
    param = f"{where}.image_url" + ("" if isinstance(image_url, str) else ".url")
    header, comma, payload = url.partition(",")
    if url.startswith("data:") and comma and header.endswith(";base64") and payload:
        return payload
    if url.startswith(("http://", "https://")):
        message = "Image URLs are not supported: send the image inline as a base64 data URI"
    else:
        message = "An image must be a base64 data URI"
    raise invalid(param, f"{message} (data:image/png;base64,...)")


def _content(content: str | list[ContentPart] | None, where: str) -> tuple[str | None, list[str]]:
    """The text and the base64 images of a message's content."""
    if content is None or isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if part.type == "text":
            if part.text is None:
                raise missing(f"{at}.text")
            texts.append(part.text)
        else:
            images.append(_image(part.image_url, at))
    return "\n".join(texts), images


def _arguments(arguments: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        decoded: object = json.loads(arguments)
    except (ValueError, RecursionError):
        decoded = None
    if not isinstance(decoded, dict):
        raise invalid(where, "the arguments must be a JSON object encoded as a string")
    return cast("dict[str, Any]", decoded)


def _message(message: ChatMessage, i: int, tool_names: dict[str, str]) -> dict[str, Any]:
    where = f"messages[{i}]"
    text, images = _content(message.content, f"{where}.content")
    has_calls = bool(message.tool_calls)
    if text is None and not (message.role == "assistant" and has_calls):
        raise missing(
            f"{where}.content", " (only an assistant message with tool_calls may leave it out)"
        )
    # Ollama's chat templates know system, not developer.
    role = "system" if message.role == "developer" else message.role
    native: dict[str, Any] = {"role": role, "content": text or ""}
    if images:
        native["images"] = images
    thinking = message.reasoning or message.reasoning_content or message.thinking
    if thinking and role == "assistant":
        native["thinking"] = thinking
    if message.tool_calls and role == "assistant":
        calls: list[dict[str, Any]] = []
        for k, call in enumerate(message.tool_calls):
            at = f"{where}.tool_calls[{k}].function.arguments"
            function = {
                "name": call.function.name,
                "arguments": _arguments(call.function.arguments, at),
            }
            native_call: dict[str, Any] = {"function": function}
            if call.id:
                native_call["id"] = call.id
                tool_names[call.id] = call.function.name
            calls.append(native_call)
        native["tool_calls"] = calls
    if role == "tool":
        name = message.name or tool_names.get(message.tool_call_id or "")
        if name:
            native["tool_name"] = name
        if message.tool_call_id:
            native["tool_call_id"] = message.tool_call_id
    return native


def to_chat_call(request: ChatRequest) -> ChatCall:
    """The :meth:`AsyncCortex.chat` call for an OpenAI request.

    ``max_completion_tokens`` (else ``max_tokens``) becomes ``options.num_predict``;
    ``temperature``, ``top_p``, ``seed``, ``stop``, the penalties and ``num_ctx``
    override the same keys of ``options``. Unlike Ollama's own ``/v1`` layer, unset
    sampling fields keep the model's defaults. ``developer`` messages become
    ``system`` messages; image parts must be base64 data URIs.
    """
    if request.n is not None and request.n != 1:
        raise invalid("n", "only one choice (n=1) is supported")
    tool_names: dict[str, str] = {}
    messages = [_message(m, i, tool_names) for i, m in enumerate(request.messages)]

    options: dict[str, Any] = dict(request.options or {})
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "num_ctx"):
        value = getattr(request, key)
        if value is not None:
            options[key] = value
    limit = (
        request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens
    )
    if limit is not None:
        options["num_predict"] = limit
    if request.stop is not None:
        options["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop

    fmt: str | dict[str, Any] | None = request.format
    rf = request.response_format
    if rf is not None and rf.type == "json_object":
        fmt = "json"
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        fmt = schema if schema is not None else "json"

    think: Think | None = request.think
    if think is None and request.reasoning_effort is not None:
        effort = request.reasoning_effort.lower()
        if effort not in _EFFORT:
            raise invalid(
                "reasoning_effort",
                f"{request.reasoning_effort!r}; expected one of {', '.join(_EFFORT)}",
            )
        think = _EFFORT[effort]

    tools: list[dict[str, Any]] | None = None
    if request.tools and request.tool_choice != "none":
        tools = [t.model_dump(by_alias=True, exclude_unset=True) for t in request.tools]

    return ChatCall(
        model=request.model,
        messages=messages,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        options=options or None,
        format=fmt,
        tools=tools,
        think=think,
        keep_alive=request.keep_alive,
        affinity=request.user or None,
    )


# --- response ----------------------------------------------------------------------------


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return "chatcmpl-" + secrets.token_hex(16)


def finish_reason(has_tool_calls: bool, done_reason: str | None) -> str:
    """``tool_calls`` when the model called tools, ``length`` when it hit a limit, else ``stop``."""
    if has_tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def usage(stats: Stats | None) -> dict[str, int]:
    """OpenAI's ``usage`` from Ollama's counts; a count Ollama left out is 0."""
    prompt = (stats.prompt_tokens if stats else None) or 0
    done = (stats.completion_tokens if stats else None) or 0
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def tool_call_dicts(calls: Sequence[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    """OpenAI tool calls (``arguments`` as a JSON string), numbered from ``first_index``."""
    return [
        {
            "index": first_index + k,
            "id": call.id or "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": call.name, "arguments": _compact(call.arguments)},
        }
        for k, call in enumerate(calls)
    ]


def completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    thinking: str,
    tool_calls: Sequence[ToolCall],
    done_reason: str | None,
    stats: Stats | None,
) -> dict[str, Any]:
    """A whole ``chat.completion``. ``content`` is null when the model only called tools."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if (tool_calls and not text) else text,
        "refusal": None,
    }
    if thinking:
        message["reasoning"] = thinking
    if tool_calls:
        calls = tool_call_dicts(tool_calls)
        for call in calls:
            del call["index"]  # only stream deltas carry an index
        message["tool_calls"] = calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(bool(tool_calls), done_reason),
            }
        ],
        "usage": usage(stats),
    }


class ChunkWriter:
    """The SSE frames of one streamed answer; ``id``, ``created`` and ``model`` never change.

    Frames are ``data: <compact JSON>\\n\\n``. The constant parts are encoded once,
    so a text token costs one string escape.
    """

    def __init__(self, id: str, created: int, model: str, *, include_usage: bool = False) -> None:
        head = _compact(
            {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
        )
        self._head = b"data: " + head[:-1].encode() + b',"choices":[{"index":0,"delta":'
        self._tail = (
            b',"logprobs":null,"finish_reason":null}]'
            + (b',"usage":null' if include_usage else b"")
            + b"}\n\n"
        )
        self._text_head = self._head + b'{"content":'
        self._text_tail = b"}" + self._tail
        self._usage_head = b"data: " + head[:-1].encode() + b',"choices":[],"usage":'
        self.tool_calls = 0  # how many tool calls were sent so far

    def role(self) -> bytes:
        """The first frame: ``delta: {"role": "assistant", "content": ""}``."""
        return self._head + b'{"role":"assistant","content":""}' + self._tail

    def text(self, content: str) -> bytes:
        """A frame carrying text only."""
        return self._text_head + encode_basestring_ascii(content).encode() + self._text_tail

    def delta(
        self,
        content: str | None,
        thinking: str | None = None,
        tool_calls: Sequence[ToolCall] = (),
    ) -> bytes:
        """A frame with any of text, thinking (``reasoning``) and tool calls."""
        delta: dict[str, Any] = {}
        if thinking:
            delta["reasoning"] = thinking
        if content:
            delta["content"] = content
        if tool_calls:
            delta["tool_calls"] = tool_call_dicts(tool_calls, self.tool_calls)
            self.tool_calls += len(tool_calls)
        return self._head + _compact(delta).encode() + self._tail

    def finish(self, done_reason: str | None) -> bytes:
        """The frame that ends the choice: an empty delta and the finish reason."""
        reason = finish_reason(self.tool_calls > 0, done_reason)
        tail = self._tail.replace(
            b'"finish_reason":null', b'"finish_reason":"%s"' % reason.encode()
        )
        return self._head + b"{}" + tail

    def usage(self, stats: Stats | None) -> bytes:
        """The extra frame of ``stream_options.include_usage``: no choices, the token counts."""
        return self._usage_head + _compact(usage(stats)).encode() + b"}\n\n"


def embedding_list(
    vectors: Sequence[Sequence[float]], model: str, prompt_tokens: int | None, *, base64: bool
) -> dict[str, Any]:
    """The ``/v1/embeddings`` answer: each vector as a list of floats, or with ``base64``
    as the base64 of its little-endian float32 values (what OpenAI's clients ask for)."""
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        value: object = list(vector)
        if base64:
            value = b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = prompt_tokens or 0
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def frame(obj: object) -> bytes:
    """Any JSON object as one SSE frame (used for the error frame)."""
    return b"data: " + _compact(obj).encode() + b"\n\n"
