"""Ollama's native wire protocol, without any I/O.

Request bodies for ``POST /api/chat``, decoding of NDJSON chunks, and the
mapping from an HTTP error answer to what the client should do about it.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

from pydantic import BaseModel

from ._events import Stats, ToolCall
from ._exceptions import ValidationError

__all__ = [
    "CHAT_PATH",
    "EMBED_PATH",
    "GENERATE_PATH",
    "Failure",
    "Message",
    "Prompt",
    "build_chat_body",
    "build_embed_body",
    "build_generate_body",
    "build_messages",
    "classify_status",
    "decode_line",
    "embed_inputs",
    "embeddings_of",
    "encode_body",
    "is_vector",
    "json_int",
    "json_object",
    "json_objects",
    "model_key",
    "stats_from_chunk",
    "tool_calls_from_message",
]

CHAT_PATH = "/api/chat"
GENERATE_PATH = "/api/generate"
EMBED_PATH = "/api/embed"
TAGS_PATH = "/api/tags"
VERSION_PATH = "/api/version"


class Message(BaseModel, extra="allow"):
    """A chat message. Plain ``{"role": ..., "content": ...}`` dicts work too."""

    role: str
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


Prompt: TypeAlias = "str | Sequence[Mapping[str, Any] | Message]"

_THINK_LEVELS = ("low", "medium", "high", "max")
_FLOAT_OPTIONS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)
_INT_OPTIONS = frozenset(
    {
        "num_predict",
        "top_k",
        "repeat_last_n",
        "seed",
        "num_keep",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
    }
)
_BOOL_OPTIONS = frozenset({"use_mmap", "numa", "low_vram", "use_mlock", "penalize_newline"})


def encode_image(image: object) -> str:
    """Return an image as the raw base64 string the native API expects."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(image).decode("ascii")
    if isinstance(image, os.PathLike):
        path = os.fspath(cast("os.PathLike[str]", image))
        try:
            with open(path, "rb") as f:
                return base64.b64encode(f.read()).decode("ascii")
        except OSError as exc:
            raise ValidationError(f"Cannot read image file {path!r}: {exc.strerror}.") from None
    if isinstance(image, str):
        if image.startswith("data:"):
            # Ollama's native API rejects data URIs; keep only the payload.
            header, sep, payload = image.partition(",")
            if not sep or ";base64" not in header:
                raise ValidationError(
                    "An image data URI must be base64-encoded (data:...;base64,...)."
                )
            return payload
        return image
    raise ValidationError(
        "An image must be bytes, a base64 string (or data: URI) or a pathlib.Path, "
        f"not {type(image).__name__}."
    )


def _message_dict(item: object, position: int) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        data = item.model_dump(exclude_none=True)
    elif isinstance(item, Mapping):
        data = {str(k): v for k, v in cast("Mapping[object, Any]", item).items() if v is not None}
    else:
        raise ValidationError(
            f"Message {position} is a {type(item).__name__}; "
            'each message must be a dict like {"role": "user", "content": "..."} or a Message.'
        )
    role = data.get("role")
    if not isinstance(role, str) or not role:
        raise ValidationError(
            f"Message {position} needs a 'role' string (system, user, assistant or tool)."
        )
    content = data.setdefault("content", "")
    if not isinstance(content, str):
        raise ValidationError(
            f"Message {position} has non-string content ({type(content).__name__}); "
            "Ollama's chat API takes the text as a string and images in 'images'."
        )
    images = data.get("images")
    if images is not None:
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
            raise ValidationError(f"Message {position}: 'images' must be a list.")
        data["images"] = [encode_image(img) for img in cast("Iterable[object]", images)]
    return data


def build_messages(
    prompt: object,
    *,
    system: str | None = None,
    images: Sequence[object] | None = None,
) -> list[dict[str, Any]]:
    """Turn a prompt (text or messages) plus ``system``/``images`` into chat messages."""
    if isinstance(prompt, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise ValidationError(
            f"prompt must be a string or a list of messages, not {type(prompt).__name__}."
        )
    else:
        items = cast("Sequence[object]", prompt)
        if not items:
            raise ValidationError("prompt is an empty list; give at least one message.")
        messages: list[dict[str, Any]] = [_message_dict(item, i) for i, item in enumerate(items)]
    if system is not None:
        if not isinstance(system, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("system must be a string.")
        messages.insert(0, {"role": "system", "content": system})
    if images:
        encoded = [encode_image(img) for img in images]
        for message in reversed(messages):
            if message["role"] == "user":
                message["images"] = [*message.get("images", []), *encoded]
                break
        else:
            raise ValidationError(
                "images were given but the prompt has no user message to attach them to."
            )
    return messages


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"options keys must be strings, got {key!r}.")
        if value is None:
            continue
        if key in _FLOAT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValidationError(f"options[{key!r}] must be a number, not {value!r}.")
        elif key in _INT_OPTIONS:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(f"options[{key!r}] must be an integer, not {value!r}.")
        elif key in _BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise ValidationError(f"options[{key!r}] must be true or false, not {value!r}.")
        elif key == "stop":
            if isinstance(value, str):
                value = [value]  # the native API only accepts an array
            elif not isinstance(value, Sequence) or not all(
                isinstance(s, str) for s in cast("Sequence[object]", value)
            ):
                raise ValidationError("options['stop'] must be a string or a list of strings.")
            else:
                value = list(cast("Sequence[str]", value))
        checked[key] = value
    return checked


def _check_keep_alive(keep_alive: object) -> float | int | str:
    if isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float, str)):
        raise ValidationError(
            f"keep_alive must be seconds (a number) or a duration like '5m', not {keep_alive!r}."
        )
    if isinstance(keep_alive, str):
        text = keep_alive.strip()
        if text != "0" and text.lstrip("+-").replace(".", "", 1).isdigit():
            raise ValidationError(
                f"keep_alive {keep_alive!r} has no unit; "
                f"write {text}s, a number of seconds, or '5m'."
            )
        return text
    return keep_alive


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """``body`` as compact UTF-8 JSON, as sent to Ollama (the same bytes httpx's
    ``json=`` would send)."""
    try:
        return _ENCODER.encode(body).encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"The chat cannot be sent as JSON ({exc}). Options, format and tools may hold "
            "only strings, finite numbers, booleans, None, lists and dicts."
        ) from None


def build_chat_body(
    model: str,
    messages: list[dict[str, Any]],
    *,
    stream: bool = True,
    options: Mapping[str, Any] | None = None,
    format: str | Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    think: bool | str | None = None,
    keep_alive: float | str | None = None,
) -> dict[str, Any]:
    """Return the JSON body for ``POST /api/chat``; ``stream`` is always explicit."""
    _check_model(model)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    _add_common(body, options, format, think, keep_alive)
    if tools is not None:
        if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("tools must be a list of tool definitions.")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise ValidationError(
                    f"tools[{i}] must be a dict like "
                    '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
                )
        body["tools"] = [dict(t) for t in tools]
    return body


def build_generate_body(
    model: str,
    prompt: object,
    *,
    stream: bool = True,
    suffix: str | None = None,
    raw: bool | None = None,
    images: Sequence[object] | None = None,
    system: str | None = None,
    template: str | None = None,
    context: Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
    format: str | Mapping[str, Any] | None = None,
    think: bool | str | None = None,
    keep_alive: float | str | None = None,
) -> dict[str, Any]:
    """Return the JSON body for ``POST /api/generate`` (a completion of ``prompt``, without
    the chat's messages); ``stream`` is always explicit."""
    _check_model(model)
    if not isinstance(prompt, str):
        raise ValidationError(
            f"prompt must be a string for generate(), not {type(prompt).__name__}; "
            "use chat() for a list of messages."
        )
    body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    for name, value in (("suffix", suffix), ("system", system), ("template", template)):
        if value is not None:
            if not isinstance(value, str):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise ValidationError(f"{name} must be a string, not {value!r}.")
            body[name] = value
    if raw is not None:
        if not isinstance(raw, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"raw must be true or false, not {raw!r}.")
        if raw:
            clashing = [n for n in ("system", "template") if n in body]
            if context is not None:
                clashing.append("context")
            if clashing:
                raise ValidationError(
                    f"raw=True sends the prompt as it is, so it cannot be combined with "
                    f"{' or '.join(clashing)}; drop {'them' if len(clashing) > 1 else 'it'} "
                    "or leave raw unset."
                )
        body["raw"] = raw
    if context is not None:
        if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("context must be a list of integers from an earlier answer.")
        items = cast("Sequence[object]", context)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise ValidationError("context must be a list of integers from an earlier answer.")
        body["context"] = list(context)
    if images:
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("images must be a list.")
        body["images"] = [encode_image(img) for img in images]
    _add_common(body, options, format, think, keep_alive)
    return body


def build_embed_body(
    model: str,
    inputs: Sequence[str],
    *,
    truncate: bool | None = None,
    dimensions: int | None = None,
    keep_alive: float | str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the JSON body for ``POST /api/embed`` with ``inputs`` (already checked to be
    strings by :func:`embed_inputs`)."""
    _check_model(model)
    body: dict[str, Any] = {"model": model, "input": list(inputs)}
    if truncate is not None:
        if not isinstance(truncate, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"truncate must be true or false, not {truncate!r}.")
        body["truncate"] = truncate
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"dimensions must be a whole number >= 1, not {dimensions!r}.")
        body["dimensions"] = dimensions
    _add_common(body, options, None, None, keep_alive)
    return body


def embed_inputs(value: object) -> list[str]:
    """The texts to embed: one string, or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
        raise ValidationError(
            f"input must be a string or a list of strings, not {type(value).__name__}."
        )
    items = cast("Sequence[object]", value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValidationError(
                f"input[{i}] is a {type(item).__name__}; every input must be a string."
            )
    return list(cast("Sequence[str]", items))


def embeddings_of(body: object, count: int) -> tuple[list[list[float]], Stats]:
    """The vectors of an ``/api/embed`` answer, which must hold ``count`` of them, and
    its token count and durations; raises ``ValueError`` saying what is wrong."""
    answer = json_object(body)
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list):
        raise ValueError("the answer has no 'embeddings' list")
    rows = cast("list[object]", vectors)
    if len(rows) != count:
        raise ValueError(f"the answer holds {len(rows)} embeddings for {count} inputs")
    out: list[list[float]] = []
    for row in rows:
        if not is_vector(row):
            raise ValueError("an embedding is not a list of numbers")
        out.append(cast("list[float]", row))
    return out, Stats(
        prompt_tokens=json_int(answer.get("prompt_eval_count")),
        total_duration=json_int(answer.get("total_duration")),
        load_duration=json_int(answer.get("load_duration")),
    )


_NUMBERS = frozenset({float, int})


def is_vector(value: object) -> bool:
    """Whether ``value`` is a list of JSON numbers (not booleans). Checked by type, not
    number by number: a batch of long vectors holds tens of thousands of them."""
    return isinstance(value, list) and set(map(type, cast("list[object]", value))) <= _NUMBERS


def _check_model(model: object) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ValidationError("model must be a non-empty string such as 'llama3.2:3b'.")


def _add_common(
    body: dict[str, Any],
    options: Mapping[str, Any] | None,
    format: str | Mapping[str, Any] | None,
    think: bool | str | None,
    keep_alive: float | str | None,
) -> None:
    """Check and add the arguments chat, generate and embed share."""
    if options is not None:
        if not isinstance(options, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("options must be a dict of Ollama parameters.")
        checked = _check_options(options)
        if checked:
            body["options"] = checked
    if format is not None:
        if isinstance(format, str):
            if format not in ("json", ""):
                raise ValidationError(
                    f"format must be 'json' or a JSON schema (a dict), not {format!r}."
                )
            if format:
                body["format"] = format
        elif isinstance(format, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            body["format"] = dict(format)
        else:
            raise ValidationError("format must be 'json' or a JSON schema (a dict).")
    if think is not None:
        if not isinstance(think, bool) and think not in _THINK_LEVELS:
            raise ValidationError(
                f"think must be true, false or one of {', '.join(_THINK_LEVELS)}, not {think!r}."
            )
        body["think"] = think
    if keep_alive is not None:
        body["keep_alive"] = _check_keep_alive(keep_alive)


# --- responses ---------------------------------------------------------------


class BadChunk(Exception):
    """A line of the NDJSON body that is not a JSON object."""


def decode_line(line: bytes) -> dict[str, Any]:
    """Decode one NDJSON line into a dict, or raise :class:`BadChunk`."""
    try:
        obj = json.loads(line)
    except ValueError:
        shown = line[:80].decode("utf-8", "replace")
        raise BadChunk(f"the server sent a line that is not JSON: {shown!r}") from None
    if not isinstance(obj, dict):
        raise BadChunk(f"the server sent a JSON {type(obj).__name__} where an object was expected")
    return cast("dict[str, Any]", obj)


def tool_calls_from_message(message: Mapping[str, Any]) -> tuple[ToolCall, ...]:
    """The complete tool calls carried by a chat message, if any."""
    calls: list[ToolCall] = []
    for entry in json_objects(message.get("tool_calls")):
        function = entry.get("function")
        if not isinstance(function, dict):
            continue
        fn = cast("dict[str, Any]", function)
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            # Some servers send the arguments as a JSON string, like OpenAI does.
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {"__raw__": arguments}
        index = fn.get("index")
        calls.append(
            ToolCall(
                name=str(fn.get("name", "")),
                arguments=cast("dict[str, Any]", arguments) if isinstance(arguments, dict) else {},
                id=entry.get("id") if isinstance(entry.get("id"), str) else None,
                index=index if isinstance(index, int) else None,
            )
        )
    return tuple(calls)


def json_object(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``{}``."""
    return cast("dict[str, Any]", value) if isinstance(value, dict) else {}


def json_objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects in a JSON list (nothing for anything else)."""
    if not isinstance(value, list):
        return []
    return [cast("dict[str, Any]", v) for v in cast("list[object]", value) if isinstance(v, dict)]


def json_int(value: object) -> int | None:
    """``value`` if it is a JSON integer (not a boolean), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stats_from_chunk(chunk: Mapping[str, Any]) -> Stats:
    """Token counts and durations of a final (``done: true``) chunk."""
    return Stats(
        prompt_tokens=json_int(chunk.get("prompt_eval_count")),
        completion_tokens=json_int(chunk.get("eval_count")),
        total_duration=json_int(chunk.get("total_duration")),
        load_duration=json_int(chunk.get("load_duration")),
        prompt_eval_duration=json_int(chunk.get("prompt_eval_duration")),
        eval_duration=json_int(chunk.get("eval_duration")),
    )


# --- errors --------------------------------------------------------------------

FailureKind = Literal["invalid", "model_missing", "retry"]


@dataclass(frozen=True)
class Failure:
    """What an HTTP error answer means for the caller.

    ``invalid``: the request itself is wrong (400); no other server will do better.
    ``model_missing``: this server lacks the model; another one may have it.
    ``retry``: the server failed or is busy; try the next one.
    """

    kind: FailureKind
    message: str
    status: int


def error_text(body: bytes) -> str:
    """Ollama's ``{"error": "..."}`` message, or the body as text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    error: object = json_object(obj).get("error")
    if isinstance(error, str):
        return error
    message: object = json_object(error).get("message")
    return message if isinstance(message, str) else text


def classify_status(status: int, body: bytes, content_type: str) -> Failure:
    """Decide what an error status from ``/api/chat`` means."""
    message = error_text(body)
    is_json = "json" in content_type.lower()
    if status == 400:
        return Failure("invalid", message or "bad request", status)
    if status == 404:
        if is_json and "not found" in message:
            return Failure("model_missing", message, status)
        return Failure(
            "retry", "no /api/chat endpoint here (HTTP 404); is this an Ollama server?", status
        )
    if status == 403 and not message:
        return Failure(
            "retry",
            "HTTP 403 with an empty body: Ollama rejected the Host header "
            "(set OLLAMA_ORIGINS/OLLAMA_HOST on the server or connect by IP)",
            status,
        )
    if status == 503:
        return Failure(
            "retry", f"busy (HTTP 503): {message}" if message else "busy (HTTP 503)", status
        )
    return Failure("retry", f"HTTP {status}: {message}" if message else f"HTTP {status}", status)


@functools.lru_cache(maxsize=1024)  # looked up for every chat and probe
def model_key(name: str) -> str:
    """A model name as Ollama matches it: lower-case, ``:latest`` when no tag."""
    key = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    last = key.rsplit("/", 1)[-1]
    if ":" not in last:
        key += ":latest"
    return key
