"""The ASGI edge of every request: request ids, API keys, the body, and error answers.

Pure ASGI (no Starlette request objects), because it runs for every request.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ._auth import KeyChecker
from ._errors import ProxyError, from_exception, native_error

__all__ = [
    "REQUEST_ID",
    "ClientGone",
    "Gateway",
    "Receive",
    "Send",
    "dumps",
    "is_native",
    "read_body",
    "request_id",
    "send_error",
    "send_json",
]

logger = logging.getLogger("aicortex.server")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REQUEST_ID = "aicortex.request_id"  # the scope key that holds a request's id
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = (b"content-type", b"application/json")


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


def _route_path(scope: dict[str, Any]) -> str:
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
    """Pure ASGI middleware: request id, API keys, and OpenAI-shaped errors for anything
    that escapes a route (never a traceback)."""

    def __init__(
        self, app: Any, keys: KeyChecker, open_paths: Iterable[str] = ("/health",)
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)  # served without a key

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        text = incoming.decode("latin-1") if incoming else ""
        request_id = text if _SANE_ID.fullmatch(text) else secrets.token_hex(16)
        scope[REQUEST_ID] = request_id
        id_header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        path = _route_path(scope)
        try:
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


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f"The request body is larger than this proxy accepts ({limit:,} bytes).",
        code="request_too_large",
        headers={"connection": "close"},
    )


async def read_body(scope: dict[str, Any], receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes and 400 unless JSON."""
    length = _header(scope, b"content-length")
    if length is not None:
        if not length.isdigit():
            raise ProxyError(400, "The Content-Length header is not a number.")
        if int(length) > limit:
            raise _too_large(limit)
    content_type = _header(scope, b"content-type")
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != b"application/json" and not media.endswith(b"+json"):
            raise ProxyError(
                400,
                f"Unsupported Content-Type {content_type.decode('latin-1')!r}; "
                "send the body as application/json.",
            )
    chunks: list[bytes] = []
    size = 0
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


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""
