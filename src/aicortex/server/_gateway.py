"""The ASGI edge of every request: request ids, the browser checks (see ``_browser``),
API keys, the body, and error answers.

Pure ASGI (no Starlette request objects), because it runs for every request.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from ._auth import KeyChecker
from ._browser import (
    HostPolicy,
    OriginPolicy,
    cors_headers,
    host_refused,
    origin_refused,
    preflight_headers,
)
from ._errors import ProxyError, from_exception, native_error

__all__ = [
    "BODY_TIMEOUT",
    "DEFAULT_BODY_TIMEOUT",
    "REQUEST_ID",
    "ClientGone",
    "Gateway",
    "Receive",
    "Send",
    "dumps",
    "is_native",
    "read_body",
    "request_id",
    "route_path",
    "send_error",
    "send_json",
]

logger = logging.getLogger("aicortex.server")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REQUEST_ID = "aicortex.request_id"  # the scope key that holds a request's id
BODY_TIMEOUT = "aicortex.body_timeout"  # the scope key that holds the app's body_timeout
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = (b"content-type", b"application/json")
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive


def request_id(scope: dict[str, Any]) -> str:
    """The id of the request in ``scope`` (set by :class:`Gateway`)."""
    return scope.get(REQUEST_ID) or "-"


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: object) -> bytes:
    """Compact JSON bytes."""
    return _ENCODER.encode(obj).encode()


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a complete JSON body."""
    head = [_JSON, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: ProxyError, *, native: bool = False) -> None:
    """Answer with the error's status and headers, and an OpenAI error body (with
    ``native``, Ollama's ``{"error": "..."}``)."""
    headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    body = dumps({"error": error.message}) if native else error.encode()
    await send_json(send, error.status, body, headers)


def is_native(path: str) -> bool:
    """Whether ``path`` (inside the app) is one of Ollama's routes, answered in its shapes."""
    return path == "/" or path.startswith("/api/")


def route_path(scope: dict[str, Any]) -> str:
    """The path inside this app, whether it is mounted under a prefix or not."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class Gateway:
    """Pure ASGI middleware: request id, the browser checks (``Host`` on a loopback
    listener, ``Origin``, CORS and preflights), API keys, the body time limit (for
    :func:`read_body`), and errors in the route's shape for anything that escapes a
    route (never a traceback).

    A request without an ``Origin`` header costs one look at each header."""

    def __init__(
        self,
        app: Any,
        keys: KeyChecker,
        origins: OriginPolicy | None = None,
        hosts: HostPolicy | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        open_paths: Iterable[str] = ("/health",),
    ) -> None:
        self.app = app
        self.keys = keys
        self.origins = origins or OriginPolicy()
        self.hosts = hosts or HostPolicy()
        self.body_timeout = body_timeout
        self.open_paths = frozenset(open_paths)  # served without a key

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        check_host = self.hosts.guards(scope.get("server"))
        incoming: bytes | None = None
        origin: bytes | None = None
        refused_origin: bytes | None = None
        refused_host: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"host":
                if check_host and refused_host is None and not self.hosts.allows(value):
                    refused_host = value
            elif key == b"origin":
                if not self.origins.allows(value.decode("latin-1")):
                    refused_origin = refused_origin or value
                elif origin is None:
                    origin = value
            elif key == b"x-request-id" and incoming is None:
                incoming = value
        text = incoming.decode("latin-1") if incoming else ""
        request_id = text if _SANE_ID.fullmatch(text) else secrets.token_hex(16)
        scope[REQUEST_ID] = request_id
        scope[BODY_TIMEOUT] = self.body_timeout
        if refused_origin is not None:
            origin = None  # no CORS headers on the refusal
        added = [(b"x-request-id", request_id.encode())]
        if origin is not None:
            added += cors_headers(origin)
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        path = route_path(scope)
        try:
            if refused_host is not None:
                raise self._refuse(host_refused(refused_host.decode("latin-1")), request_id)
            if refused_origin is not None:
                raise self._refuse(origin_refused(refused_origin.decode("latin-1")), request_id)
            if origin is not None and scope["method"] == "OPTIONS":
                asked = _header(scope, b"access-control-request-method")
                if asked is not None:  # a preflight: answered here, with no key needed
                    private = _header(scope, b"access-control-request-private-network")
                    headers = preflight_headers(
                        origin,
                        _header(scope, b"access-control-request-headers"),
                        private_network=private is not None and private.lower() == b"true",
                    )
                    headers.append(added[0])
                    await send({"type": "http.response.start", "status": 204, "headers": headers})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
            if self.keys.enabled and path not in self.open_paths:
                self.keys.check(_header(scope, b"authorization"))
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            native = is_native(path)
            error = native_error(exc) if native else from_exception(exc)
            if error.status >= 500 and not isinstance(exc, ProxyError):
                if error.code == "internal_error":
                    logger.exception(
                        "[%s] unexpected error", request_id, extra={"request_id": request_id}
                    )
                else:
                    logger.warning("[%s] %s", request_id, exc, extra={"request_id": request_id})
            if not started:
                await send_error(send_with_id, error, native=native)

    @staticmethod
    def _refuse(error: ProxyError, request_id: str) -> ProxyError:
        logger.info("[%s] refused: %s", request_id, error.message, extra={"request_id": request_id})
        return error


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f"The request body is larger than this proxy accepts ({limit:,} bytes).",
        code="request_too_large",
        headers={"connection": "close"},
    )


def _too_slow(timeout: float) -> ProxyError:
    return ProxyError(
        408,
        f"The request body did not arrive within {timeout:g} seconds, so the connection is "
        "closed. Send the whole body without pausing (the proxy's body_timeout, "
        "aicortex serve --body-timeout, sets the limit).",
        code="request_timeout",
        headers={"connection": "close"},
    )


async def read_body(
    scope: dict[str, Any], receive: Receive, limit: int, timeout: float | None = None
) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes and with 408 when it has
    not all arrived within ``timeout`` seconds (by default the app's ``body_timeout``,
    which :class:`Gateway` puts in the scope). Its Content-Type is not checked: the body
    is parsed as JSON whatever it says (curl's ``-d`` sends a form type)."""
    seconds: float = scope.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT) if timeout is None else timeout
    length = _header(scope, b"content-length")
    if length is not None:
        if not length.isdigit():
            raise ProxyError(400, "The Content-Length header is not a number.")
        if int(length) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    raise _too_slow(seconds)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""
