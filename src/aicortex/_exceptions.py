"""The exceptions aicortex raises.

Everything derives from :class:`AICortexError`, so one ``except`` clause catches
all of them::

    AICortexError
    ├── ModelNotFoundError      the model is not in the catalog / on any server
    ├── ServerError             no server could serve the request (``.attempts``)
    ├── ValidationError         bad input; also a ``ValueError``
    ├── StreamError             a stream broke after its first token (``.partial_text``)
    ├── StreamConsumedError     a stream was iterated again after its end
    └── CortexTimeoutError      the call's total deadline passed; also a ``TimeoutError``

The other limits are part of failover: a connect, first-token or probe timeout
is one server's reason in ``ServerError.attempts``, and an idle gap after the
first token is the ``__cause__`` of the ``StreamError`` it ends.

Programming mistakes (for example using a closed client) raise the usual
built-in exceptions instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AICortexError",
    "Attempt",
    "AttemptKind",
    "CortexTimeoutError",
    "ModelNotFoundError",
    "ServerError",
    "StreamConsumedError",
    "StreamError",
    "TimeoutPhase",
    "ValidationError",
]

TimeoutPhase = Literal["connect", "first_token", "idle", "total", "probe"]


class AICortexError(Exception):
    """Base class of every error aicortex raises on purpose."""


class ModelNotFoundError(AICortexError):
    """The requested model is unknown to the catalog or missing on every server.

    ``suggestions`` holds close matches, best first: the models the servers that were
    asked have, then catalog models that none of them has (also in ``not_pulled``).
    ``servers`` are the servers that were asked. ``hint`` says how to get the model
    itself: pull it (``aicortex pull``, ``ollama pull``); for OpenAI-style servers,
    load it or map the name. ``advice`` is both, as the message ends.
    """

    def __init__(
        self,
        model: str,
        suggestions: Sequence[str] = (),
        *,
        servers: Sequence[str] = (),
        hint: str | None = None,
        not_pulled: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.suggestions: list[str] = list(dict.fromkeys([*suggestions, *not_pulled]))
        self.not_pulled: list[str] = [name for name in not_pulled if name not in suggestions]
        self.servers: list[str] = list(servers)
        self.hint: str | None = hint or (pull_hint(model, self.servers) if servers else None)
        where = f" on {', '.join(self.servers)}" if self.servers else ""
        message = f"Model {model!r} was not found{where}."
        if self.advice:
            message += " " + self.advice
        super().__init__(message)

    @property
    def advice(self) -> str:
        """The close matches (``(not pulled)`` marks catalog-only ones) and the hint."""
        parts: list[str] = []
        if self.suggestions:
            names = ", ".join(
                repr(name) + (" (not pulled)" if name in self.not_pulled else "")
                for name in self.suggestions
            )
            parts.append(f"Did you mean: {names}?")
        if self.hint:
            parts.append(self.hint)
        return " ".join(parts)


def pull_hint(model: str, servers: Sequence[str]) -> str:
    """How to pull ``model`` onto ``servers``."""
    flags = " ".join(f"--server {url}" for url in servers)
    where = "that machine" if len(servers) == 1 else "those machines"
    return (
        f"To use it, pull it: `aicortex pull {model} {flags}`, or `ollama pull {model}` on {where}."
    )


AttemptKind = Literal["unreachable", "failed", "busy", "model_missing", "ejected"]


@dataclass(frozen=True)
class Attempt:
    """One server that was tried (or skipped) and why it could not serve.

    ``kind`` sorts the reason: ``unreachable`` (no connection, or its probe failed),
    ``failed`` (it answered, but with an error or a broken answer), ``busy`` (HTTP 503
    or 429, or no free local connection), ``model_missing`` (it lacks the model),
    ``ejected`` (skipped: it failed recently and was not contacted this time).
    """

    server: str
    reason: str
    kind: AttemptKind = "failed"

    def __str__(self) -> str:
        return f"{self.server}: {self.reason}"


class ServerError(AICortexError):
    """No server could serve the request.

    ``attempts`` lists every server that was considered, in preference order,
    with the reason it was skipped or failed.
    """

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        self.attempts: list[Attempt] = list(attempts)
        if self.attempts:
            message += " Tried: " + "; ".join(str(a) for a in self.attempts) + "."
        super().__init__(message)

    @property
    def servers(self) -> list[str]:
        """The servers tried, in preference order."""
        return [a.server for a in self.attempts]


class ValidationError(AICortexError, ValueError):
    """The input was rejected, by aicortex or by Ollama (HTTP 400)."""


class StreamError(AICortexError):
    """A stream failed after its first token had been delivered.

    The output cannot be restarted elsewhere without repeating text, so the
    stream ends here. ``partial_text`` is what had arrived, ``server`` is the
    server that was streaming, ``reason`` what broke (when known).
    """

    def __init__(
        self,
        message: str,
        *,
        partial_text: str = "",
        server: str | None = None,
        model: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.partial_text = partial_text
        self.server = server
        self.model = model
        self.reason = reason
        super().__init__(message)


class StreamConsumedError(AICortexError):
    """A stream was iterated again after it had ended or been closed.

    A stream is the server's answer as it arrives, read once. Its whole text
    stays available from ``text()``; for another answer, start a new chat.
    """


def consumed_error(closed_early: bool, text_call: str) -> StreamConsumedError:
    """The error for iterating a stream again; ``text_call`` is how its text is read."""
    if closed_early:
        return StreamConsumedError(
            "This stream was closed before its end (break, close() or the end of its "
            "'with' block), so it has no more events to give. What arrived is in "
            ".partial_text; start a new chat for a whole answer."
        )
    return StreamConsumedError(
        "This stream has already been read to its end; a stream can be iterated once. "
        f"Call {text_call} for its whole text, or start a new chat for another answer."
    )


# How a broken stream's message ends: advice that only a Python caller can follow.
PARTIAL_TEXT_ADVICE = (
    "The partial text is in .partial_text; retry the request to get a full answer."
)


def without_advice(exc: StreamError) -> str:
    """``exc``'s message without :data:`PARTIAL_TEXT_ADVICE`, for the command line and
    API clients, which say what to do in their own words."""
    return str(exc).removesuffix(" " + PARTIAL_TEXT_ADVICE)


class CortexTimeoutError(AICortexError, TimeoutError):
    """A time limit expired.

    ``phase`` says which one: ``total`` (the whole call; raised to the caller),
    ``idle`` (gap between two chunks; the cause of a ``StreamError``), or
    ``connect``, ``first_token`` and ``probe``. ``timeout`` is the limit in
    seconds and ``server`` the server it happened on, when known.
    """

    def __init__(self, phase: TimeoutPhase, timeout: float, *, server: str | None = None) -> None:
        self.phase: TimeoutPhase = phase
        self.timeout = timeout
        self.server = server
        label = {
            "connect": "connecting",
            "first_token": "waiting for the first token",
            "idle": "waiting for the next chunk",
            "total": "the whole request",
            "probe": "the health probe",
        }[phase]
        where = f" from {server}" if server else ""
        super().__init__(
            f"Timed out after {timeout:g}s {label}{where}. "
            f"Raise Timeout({phase}=...) if the server is just slow."
        )


# Tracebacks and reprs name the classes where users import them from: aicortex.ModelNotFoundError.
for _public in (
    AICortexError,
    ModelNotFoundError,
    Attempt,
    ServerError,
    ValidationError,
    StreamError,
    StreamConsumedError,
    CortexTimeoutError,
):
    _public.__module__ = "aicortex"
del _public
