"""The exceptions aicortex raises.

Everything derives from :class:`AICortexError`, so one ``except`` clause catches
all of them::

    AICortexError
    ├── ModelNotFoundError      the model is not in the catalog / on any server
    ├── ServerError             no server could serve the request (``.attempts``)
    ├── ValidationError         bad input; also a ``ValueError``
    ├── StreamError             a stream broke after its first token (``.partial_text``)
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
    "StreamError",
    "TimeoutPhase",
    "ValidationError",
]

TimeoutPhase = Literal["connect", "first_token", "idle", "total", "probe"]


class AICortexError(Exception):
    """Base class of every error aicortex raises on purpose."""


class ModelNotFoundError(AICortexError):
    """The requested model is unknown to the catalog or missing on every server.

    ``suggestions`` holds close matches (from the catalog and from the models the
    live servers list), best first. ``servers`` are the servers that were asked.
    ``hint`` says how to get the model, when there is no close match: by default
    ``ollama pull``; for OpenAI-style servers, loading it or mapping the name.
    """

    def __init__(
        self,
        model: str,
        suggestions: Sequence[str] = (),
        *,
        servers: Sequence[str] = (),
        hint: str | None = None,
    ) -> None:
        self.model = model
        self.suggestions: list[str] = list(suggestions)
        self.servers: list[str] = list(servers)
        self.hint: str | None = None
        where = f" on {', '.join(self.servers)}" if self.servers else ""
        message = f"Model {model!r} was not found{where}."
        if self.suggestions:
            message += " Did you mean: " + ", ".join(repr(s) for s in self.suggestions) + "?"
        elif self.servers:
            self.hint = hint or f"Pull it first (`ollama pull {model}`) or pick another model."
            message += " " + self.hint
        super().__init__(message)


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
