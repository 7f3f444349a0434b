"""OpenAI-shaped errors: the body every failure is answered with, and where each comes from.

Every error the proxy answers has OpenAI's shape, so OpenAI clients raise their usual
exceptions (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...)::

    {"error": {"message": "...", "type": "...", "param": null, "code": null}}

============================  ======  =========================  =========================
What happened                 Status  type                       code
============================  ======  =========================  =========================
invalid JSON / field          400     invalid_request_error      (field-specific) / null
an upstream rejected it       400     invalid_request_error      null
missing or wrong API key      401     invalid_request_error      invalid_api_key
a web page's origin refused   403     invalid_request_error      origin_not_allowed
Host not loopback (rebinding) 403     invalid_request_error      host_not_allowed
unknown model                 404     invalid_request_error      model_not_found
unknown URL                   404     invalid_request_error      unknown_url
body too slow to arrive       408     invalid_request_error      request_timeout
body over the size cap        413     invalid_request_error      request_too_large
no upstream could serve it    503     api_error                  upstream_unavailable
the total deadline passed     504     api_error                  upstream_timeout
a bug in the proxy            500     api_error                  internal_error
============================  ======  =========================  =========================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._exceptions import (
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    StreamError,
    ValidationError,
    without_advice,
)

__all__ = [
    "ProxyError",
    "error_body",
    "from_exception",
    "invalid",
    "missing",
    "native_error",
    "param_of",
    "stream_error_text",
]

INVALID = "invalid_request_error"
API_ERROR = "api_error"


def error_body(
    message: str, type: str = INVALID, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``; all four keys are always there."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ProxyError(Exception):
    """A failure answered to the client with ``status`` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return error_body(self.message, self.type, self.param, self.code)

    def encode(self) -> bytes:
        """The JSON body as compact bytes."""
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r}, param={self.param!r})"


def missing(param: str, note: str = "") -> ProxyError:
    """The 400 for a required request field that is absent; ``note`` ends the sentence."""
    return ProxyError(400, f"Missing required parameter: '{param}'{note}.", param=param)


def invalid(param: str, problem: str) -> ProxyError:
    """The 400 for a request field whose value is wrong; ``problem`` says how."""
    return ProxyError(400, f"Invalid value for '{param}': {problem}.", param=param or None)


# Core validation messages start with the argument they are about.
_PARAM_PREFIXES = (
    ("options", "options"),
    ("keep_alive", "keep_alive"),
    ("think", "think"),
    ("format", "response_format"),
    ("tools", "tools"),
    ("model", "model"),
    ("prompt", "messages"),
    ("message", "messages"),
    ("an image", "messages"),
)


def param_of(message: str) -> str | None:
    """The request field a core :class:`ValidationError` message is about, if it says."""
    lowered = message.lower()
    for prefix, param in _PARAM_PREFIXES:
        if lowered.startswith(prefix):
            return param
    return None


def from_exception(exc: Exception) -> ProxyError:
    """The answer for an exception that aicortex raised on purpose.

    Anything else is a bug in the proxy: a 500 that says so without any details.
    """
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        message = f"The model {exc.model!r} does not exist or is not installed"
        if exc.servers:
            message += f" on {', '.join(exc.servers)}"
        message += "."
        if exc.advice:
            message += " " + exc.advice
        return ProxyError(404, message, param="model", code="model_not_found")
    if isinstance(exc, ValidationError):
        text = str(exc)
        upstream = text.startswith(("Ollama rejected the request", "The server rejected the"))
        return ProxyError(400, text, param=None if upstream else param_of(text))
    if isinstance(exc, ServerError):
        return ProxyError(503, str(exc), type=API_ERROR, code="upstream_unavailable")
    if isinstance(exc, CortexTimeoutError):
        return ProxyError(504, str(exc), type=API_ERROR, code="upstream_timeout")
    if isinstance(exc, StreamError):
        return ProxyError(502, stream_error_text(exc), type=API_ERROR, code="upstream_error")
    return ProxyError(
        500,
        "The proxy failed unexpectedly; the error was logged with this request's x-request-id.",
        type=API_ERROR,
        code="internal_error",
    )


def native_error(exc: Exception) -> ProxyError:
    """The answer for an exception on one of Ollama's routes: Ollama's statuses, and
    messages that start the way Ollama's do (clients match ``not found``), each sent as
    ``{"error": "..."}``."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        message = f"model '{exc.model}' not found"
        if exc.servers:
            message += f" on {', '.join(exc.servers)}"
        if exc.advice:
            message += f". {exc.advice}"
        else:
            message += f"; pull it with `aicortex pull {exc.model}`"
        return ProxyError(404, message)
    if isinstance(exc, ValidationError):
        text = str(exc)
        for prefix in ("Ollama rejected the request: ", "The server rejected the request: "):
            if text.startswith(prefix):  # the upstream's own words, as Ollama would say them
                text = text[len(prefix) :]
        return ProxyError(400, text)
    return from_exception(exc)


def stream_error_text(exc: StreamError) -> str:
    """A broken answer's message for an API client: what broke, and to retry."""
    if exc.reason is None:  # not a broken answer: no advice to replace
        return str(exc)
    return without_advice(exc) + " Retry the request to get a full answer."
