"""OpenAI's chat wire format, for servers that speak it (llama.cpp, vLLM, LM Studio, SGLang,
Ollama's ``/v1``): the request built from aicortex's chat arguments, the SSE answer read
back as the Ollama-shaped chunks that :class:`AsyncStream` reads, the model list, and what
an error status means.

Everything here is pure: bytes and dicts in, bytes and dicts out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from ._protocol import Failure, error_text, is_vector, json_int, json_object, json_objects

__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "EMBEDDINGS_PATH",
    "MODELS_PATH",
    "SSETranslator",
    "chat_body",
    "classify_status",
    "embeddings_body",
    "embeddings_of",
    "generate_body",
    "model_ids",
]

logger = logging.getLogger("aicortex")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"

# Ollama's options that OpenAI's API has a field for; the others have no equivalent.
_SAME_OPTIONS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_IMAGE_TYPES = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"))


def chat_body(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: bool = True,
    options: Mapping[str, Any] | None = None,
    format: str | Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    think: bool | str | None = None,
    keep_alive: float | str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The ``POST /v1/chat/completions`` body for a chat given as Ollama's arguments (the
    messages as :func:`build_messages` makes them), and the arguments it had to leave
    out because the API has no place for them (logged at debug level).

    ``options.num_predict`` becomes ``max_tokens``; ``temperature``, ``top_p``, ``stop``,
    ``seed`` and the penalties keep their names; ``format="json"`` becomes a
    ``json_object`` response format and a schema a ``json_schema`` one; ``think`` as
    ``"low"``/``"medium"``/``"high"`` becomes ``reasoning_effort``. A stream asks for
    its token counts (``stream_options.include_usage``).
    """
    dropped: list[str] = []
    body: dict[str, Any] = {"model": model, "messages": openai_messages(messages)}
    _add_sampling(body, stream, options, dropped)
    if format == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(format, Mapping):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": dict(format)},
        }
    if tools:
        body["tools"] = [dict(tool) for tool in tools]
    if think in ("low", "medium", "high"):
        body["reasoning_effort"] = think
    elif think is not None:
        dropped.append("think")
    if keep_alive is not None:
        dropped.append("keep_alive")
    _log_dropped(dropped)
    return body, dropped


def _log_dropped(dropped: Sequence[str]) -> None:
    if dropped:
        logger.debug("Not sent to an OpenAI-style server (no such field): %s", ", ".join(dropped))


def _add_sampling(
    body: dict[str, Any], stream: bool, options: Mapping[str, Any] | None, dropped: list[str]
) -> None:
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    for key, value in (options or {}).items():
        if key == "num_predict":
            body["max_tokens"] = value
        elif key in _SAME_OPTIONS:
            body[key] = value
        else:
            dropped.append(f"options.{key}")


def generate_body(model: str, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where and what to send for an Ollama ``/api/generate`` body (``request``) to an
    OpenAI-style server: the path and the body.

    A plain prompt becomes a chat of one user message (after ``system``, images
    attached), which is what Ollama's generate does with the model's template. A
    ``raw`` prompt, or one with a ``suffix`` (fill in the middle), goes to
    ``/v1/completions`` as it is. ``template`` and ``context`` have no OpenAI field and
    are left out (logged at debug level).
    """
    dropped = [name for name in ("template", "context") if request.get(name) is not None]
    prompt = request.get("prompt") or ""
    if request.get("raw") or request.get("suffix") is not None:
        body: dict[str, Any] = {"model": model, "prompt": prompt}
        if request.get("suffix") is not None:
            body["suffix"] = request["suffix"]
        _add_sampling(body, True, request.get("options"), dropped)
        if request.get("format") is not None:
            dropped.append("format")
        if request.get("images"):
            dropped.append("images")
        _log_dropped(dropped)
        return COMPLETIONS_PATH, body
    _log_dropped(dropped)
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("system"), str):
        messages.append({"role": "system", "content": request["system"]})
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if request.get("images"):
        user["images"] = request["images"]
    messages.append(user)
    body, _ = chat_body(
        model,
        messages,
        options=request.get("options"),
        format=request.get("format"),
        think=request.get("think"),
        keep_alive=request.get("keep_alive"),
    )
    return CHAT_PATH, body


def embeddings_body(
    model: str, inputs: Sequence[str], *, dimensions: int | None = None
) -> dict[str, Any]:
    """The ``POST /v1/embeddings`` body for ``inputs``."""
    body: dict[str, Any] = {"model": model, "input": list(inputs), "encoding_format": "float"}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def embeddings_of(body: object, count: int) -> tuple[list[list[float]], int | None]:
    """The vectors of a ``/v1/embeddings`` answer in input order (by each item's
    ``index``), which must hold ``count`` of them, and its prompt token count; raises
    ``ValueError`` saying what is wrong."""
    answer = json_object(body)
    items = json_objects(answer.get("data"))
    if len(items) != count:
        raise ValueError(f"the answer holds {len(items)} embeddings for {count} inputs")
    vectors: list[list[float] | None] = [None] * count
    for position, item in enumerate(items):
        index = json_int(item.get("index"))
        index = position if index is None else index
        vector = item.get("embedding")
        if not 0 <= index < count or vectors[index] is not None:
            raise ValueError(f"the answer has a wrong or repeated embedding index {index}")
        if not is_vector(vector):
            raise ValueError("an embedding is not a list of numbers (encoding_format 'float')")
        vectors[index] = cast("list[float]", vector)
    usage = json_object(answer.get("usage"))
    return [v for v in vectors if v is not None], json_int(usage.get("prompt_tokens"))


def openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's chat messages in OpenAI's shape: images as ``image_url`` data parts,
    tool calls with ids and JSON-string arguments, tool results tied to those ids."""
    out: list[dict[str, Any]] = []
    call_ids: dict[str, str] = {}  # tool name -> the id of its latest call
    for message in messages:
        role = message.get("role")
        entry: dict[str, Any] = {"role": role}
        content = message.get("content") or ""
        images: list[object] = list(message.get("images") or [])
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            parts.extend(
                {"type": "image_url", "image_url": {"url": _data_uri(str(image))}}
                for image in images
            )
            entry["content"] = parts
        else:
            entry["content"] = content
        calls = json_objects(message.get("tool_calls"))
        if calls:
            wire_calls: list[dict[str, Any]] = []
            entry["tool_calls"] = wire_calls
            for call in calls:
                function = json_object(call.get("function"))
                name = str(function.get("name", ""))
                call_id = str(call.get("id") or f"call_{len(call_ids)}_{len(out)}")
                call_ids[name] = call_id
                arguments = function.get("arguments", {})
                wire_calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else json.dumps(arguments),
                        },
                    }
                )
            if not content:
                entry["content"] = None
        if role == "tool":
            name = message.get("tool_name")
            call_id = message.get("tool_call_id") or call_ids.get(str(name))
            if call_id:
                entry["tool_call_id"] = call_id
        out.append(entry)
    return out


def _data_uri(image: str) -> str:
    """A base64 image as a ``data:`` URI, its type guessed from its first bytes."""
    if image.startswith("data:"):
        return image
    kind = next((t for prefix, t in _IMAGE_TYPES if image.startswith(prefix)), "image/png")
    return f"data:{kind};base64,{image}"


class SSETranslator:
    """One answer's SSE lines, read back as Ollama's ``/api/chat`` chunks.

    Feed it each line of the body (without its line break). Text deltas (or the
    ``text`` of a ``/v1/completions`` stream) become chunks
    with ``message.content``, ``reasoning_content`` becomes ``message.thinking``, tool
    call fragments are joined and handed out whole when the answer finishes, and
    ``[DONE]`` becomes the final ``done: true`` chunk with ``done_reason`` and the token
    counts of ``usage`` (and durations of llama.cpp's ``timings``). An answer cut off
    before ``[DONE]`` never gets its final chunk, so it fails as a broken Ollama answer
    would.
    """

    def __init__(self, model: str) -> None:
        self.model: str = model
        self._calls: dict[int, dict[str, Any]] = {}  # index -> {"id", "name", "arguments"}
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._timings: dict[str, Any] = {}
        self.done: bool = False  # [DONE] was read

    def lines(self, raw: list[bytes]) -> list[bytes]:
        """``raw`` SSE lines as the NDJSON lines of the chunks they complete."""
        return [_encode(chunk) for line in raw for chunk in self.feed(line)]

    def feed(self, line: bytes) -> list[dict[str, Any]]:
        """The chunks ``line`` completes (often one, sometimes none)."""
        line = line.strip()
        if not line.startswith(b"data:"):
            return []  # blank separators, comments (":"), "event:" and "id:" fields
        data = line[5:].strip()
        if data == b"[DONE]":
            return [self._final()]
        try:
            obj: object = json.loads(data)
        except ValueError:
            return [{"error": f"the server sent an SSE event that is not JSON: {data[:80]!r}"}]
        event = json_object(obj)
        if "error" in event:
            return [{"error": error_text(data)}]
        if usage := json_object(event.get("usage")):
            self._usage = usage
        if timings := json_object(event.get("timings")):
            self._timings = timings
        out: list[dict[str, Any]] = []
        for choice in json_objects(event.get("choices"))[:1]:
            delta = json_object(choice.get("delta"))
            message: dict[str, Any] = {}
            content = delta.get("content", choice.get("text"))  # /v1/completions: "text"
            if isinstance(content, str) and content:
                message["content"] = content
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                message["thinking"] = reasoning
            for fragment in json_objects(delta.get("tool_calls")):
                self._add_fragment(fragment)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                self._finish = finish
                if self._calls:
                    message["tool_calls"] = self._whole_calls()
            if message:
                out.append(self._chunk({"role": "assistant", "content": "", **message}))
        return out

    def _add_fragment(self, fragment: Mapping[str, Any]) -> None:
        index = json_int(fragment.get("index"))
        index = len(self._calls) if index is None else index
        call = self._calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
        if isinstance(fragment.get("id"), str):
            call["id"] = fragment["id"]
        function = json_object(fragment.get("function"))
        if isinstance(function.get("name"), str):
            call["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["arguments"] += function["arguments"]

    def _whole_calls(self) -> list[dict[str, Any]]:
        calls = [
            {
                "id": call["id"],
                "function": {"index": index, "name": call["name"], "arguments": call["arguments"]},
            }
            for index, call in sorted(self._calls.items())
        ]
        self._calls.clear()
        return calls

    def _chunk(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "message": message, "done": False}

    def _final(self) -> dict[str, Any]:
        self.done = True
        final: dict[str, Any] = {
            "model": self.model,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": self._finish or "stop",
        }
        if self._calls:  # fragments without a finish reason
            final["message"]["tool_calls"] = self._whole_calls()
        prompt = json_int(self._usage.get("prompt_tokens"))
        completion = json_int(self._usage.get("completion_tokens"))
        if prompt is None:
            prompt = json_int(self._timings.get("prompt_n"))
        if completion is None:
            completion = json_int(self._timings.get("predicted_n"))
        if prompt is not None:
            final["prompt_eval_count"] = prompt
        if completion is not None:
            final["eval_count"] = completion
        for source, target in (
            ("prompt_ms", "prompt_eval_duration"),
            ("predicted_ms", "eval_duration"),
        ):
            value = self._timings.get(source)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                final[target] = round(value * 1_000_000)
        return final


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _encode(chunk: dict[str, Any]) -> bytes:
    return _ENCODER.encode(chunk).encode()


def model_ids(body: object) -> list[str]:
    """The model ids of a ``GET /v1/models`` answer (``{"data": [{"id": ...}]}``)."""
    return [
        entry["id"]
        for entry in json_objects(json_object(body).get("data"))
        if isinstance(entry.get("id"), str)
    ]


def classify_status(status: int, body: bytes, server: str) -> Failure:
    """What an error status from ``POST /v1/chat/completions`` means."""
    message = error_text(body)
    if status == 400:
        return Failure("invalid", message or "bad request", status)
    if status in (401, 403):
        return Failure(
            "retry",
            f"HTTP {status}: its API key is missing or wrong (set api_key= or api_key_env= "
            f"on the Server for {server}){': ' + message if message else ''}",
            status,
        )
    if status == 404:
        if "model" in message.lower():
            return Failure("model_missing", message, status)
        return Failure(
            "retry",
            f"no {CHAT_PATH} endpoint here (HTTP 404); is this an OpenAI-compatible server?",
            status,
        )
    if status in (429, 503):
        return Failure("retry", f"busy (HTTP {status}){': ' + message if message else ''}", status)
    return Failure("retry", f"HTTP {status}: {message}" if message else f"HTTP {status}", status)
