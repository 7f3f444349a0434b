"""Ollama's answer shapes, written from a stream's events: NDJSON lines for a streamed
``/api/chat`` or ``/api/generate``, one object for a whole answer, model list entries.

Pure: events and dicts in, bytes and dicts out. An Ollama upstream's own chunks pass
through as they came (every field kept); answers of an OpenAI-style upstream are written
in Ollama's shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .._events import StreamEvent, ToolCall
from .._protocol import model_key

__all__ = ["NativeWriter", "created_at", "model_entries"]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_EPOCH = "1970-01-01T00:00:00Z"


def created_at() -> str:
    """Now, as Ollama writes its timestamps (RFC 3339, UTC)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line(obj: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(obj).encode() + b"\n"


def wire_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as Ollama sends them: arguments as an object, never a JSON string."""
    out: list[dict[str, Any]] = []
    for call in calls:
        function: dict[str, Any] = {"name": call.name, "arguments": call.arguments}
        if call.index is not None:
            function = {"index": call.index, **function}
        entry: dict[str, Any] = {"function": function}
        if call.id is not None:
            entry = {"id": call.id, **entry}
        out.append(entry)
    return out


class NativeWriter:
    """Writes one answer in Ollama's shape for ``/api/chat`` (``generate=False``) or
    ``/api/generate``. ``passthrough``: the upstream is Ollama, whose chunks are sent as
    they are."""

    __slots__ = ("_generate", "_model", "_passthrough")

    def __init__(self, model: str, *, generate: bool, passthrough: bool) -> None:
        self._model = model
        self._generate = generate
        self._passthrough = passthrough

    def _chunk(
        self, content: str, thinking: str | None, calls: Sequence[ToolCall]
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self._model, "created_at": created_at()}
        if self._generate:
            chunk["response"] = content
            if thinking:
                chunk["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = wire_tool_calls(calls)
            chunk["message"] = message
        chunk["done"] = False
        return chunk

    def token(self, event: StreamEvent) -> bytes:
        """The NDJSON line of a TOKEN event."""
        if self._passthrough and event.raw is not None:
            return _line(event.raw)
        return _line(self._chunk(event.content or "", event.thinking, event.tool_calls))

    def _final(self, raw: Mapping[str, Any] | None) -> dict[str, Any]:
        """The final chunk's fields, in this route's shape, without the last text."""
        final = {k: v for k, v in (raw or {}).items() if k not in ("message", "response")}
        final.setdefault("model", self._model)
        final.setdefault("created_at", created_at())
        final["done"] = True
        return final

    def end(self, event: StreamEvent) -> bytes:
        """The NDJSON line of the END event: the statistics and ``done_reason``."""
        if self._passthrough and event.raw is not None:
            return _line(event.raw)
        final = self._final(event.raw)
        if self._generate:
            final = {"model": final.pop("model"), "created_at": final.pop("created_at")} | {
                "response": "",
                **final,
            }
        else:
            final = {
                "model": final.pop("model"),
                "created_at": final.pop("created_at"),
                "message": {"role": "assistant", "content": ""},
                **final,
            }
        return _line(final)

    @staticmethod
    def error(message: str) -> bytes:
        """The line that ends a stream that broke after its first chunk."""
        return _line({"error": message})

    def whole(
        self,
        end: Mapping[str, Any] | None,
        text: str,
        thinking: str,
        calls: Sequence[ToolCall],
    ) -> dict[str, Any]:
        """The one object of a non-streamed answer: the final chunk's statistics with the
        whole text (and thinking and tool calls)."""
        final = self._final(end)
        head = {"model": final.pop("model"), "created_at": final.pop("created_at")}
        if self._generate:
            body = head | {"response": text}
            if thinking:
                body["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = wire_tool_calls(calls)
            body = head | {"message": message}
        return body | final


def _synthetic(name: str, loaded: bool) -> dict[str, Any]:
    """An entry for a model of a server that does not describe its models as Ollama does."""
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        "size": 0,
        "digest": "",
        "details": {
            "parent_model": "",
            "format": "",
            "family": "",
            "families": None,
            "parameter_size": "",
            "quantization_level": "",
        },
    }
    if loaded:
        entry |= {"expires_at": _EPOCH, "size_vram": 0}
    else:
        entry["modified_at"] = _EPOCH
    return entry


def model_entries(
    names: Iterable[str],
    entries: Sequence[Mapping[str, Any]] | None,
    names_here: Mapping[str, str],
    *,
    loaded: bool = False,
) -> list[dict[str, Any]]:
    """Ollama's entries (``/api/tags``, or with ``loaded`` ``/api/ps``) for the models
    ``names`` a server is known by: its own entry for each, as it sent it; for a mapped
    name (``names_here``: key to the server's own name), a copy of its model's entry
    under that name; and a bare entry where the server sent none (an OpenAI-style one)."""
    own = {model_key(str(e.get("model") or e.get("name"))): e for e in entries or ()}
    out: list[dict[str, Any]] = []
    for name in names:
        key = model_key(name)
        entry = own.get(key)
        if entry is None and key in names_here:
            entry = own.get(model_key(names_here[key]))
            if entry is not None:
                entry = {**entry, "name": name, "model": name}
        out.append(dict(entry) if entry is not None else _synthetic(name, loaded))
    return out
