"""Typed stream events: what an :class:`~aicortex.AsyncStream` yields."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventType", "Stats", "StreamEvent", "ToolCall"]


class EventType(str, enum.Enum):
    """The kind of a :class:`StreamEvent`.

    A stream yields one ``START``, then ``TOKEN`` events, then either ``END``
    or ``ERROR``.
    """

    START = "start"
    TOKEN = "token"
    END = "end"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for, complete (Ollama never sends fragments)."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """Token counts and timings of a finished generation.

    Durations are integer nanoseconds as Ollama reports them; a field Ollama
    left out is ``None``.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_duration: int | None = None
    eval_duration: int | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed, ``completion_tokens / eval_duration``."""
        if not self.completion_tokens or not self.eval_duration:
            return None
        return self.completion_tokens / self.eval_duration * 1e9


@dataclass(slots=True)
class StreamEvent:
    """One event of a streamed chat (plain data: treat it as read-only).

    * ``START``: ``model`` and ``server`` say who answers.
    * ``TOKEN``: ``content`` is the new text (``""`` when the chunk only carried
      ``thinking`` or ``tool_calls``); ``index`` counts TOKEN events from 0.
    * ``END``: ``done`` is true; ``done_reason`` and ``stats`` describe the finish.
    * ``ERROR``: ``error`` says what broke; the stream then raises
      :class:`~aicortex.StreamError`.
    """

    type: EventType
    model: str
    server: str
    content: str | None = None
    index: int | None = None
    done: bool = False
    thinking: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    done_reason: str | None = None
    stats: Stats | None = None
    error: str | None = None
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)
