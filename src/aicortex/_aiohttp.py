"""httpx-aiohttp's transport, with every aiohttp failure raised as httpx's own type.

httpx-aiohttp maps only some aiohttp errors: a response head it cannot parse
escapes as a bare ``aiohttp`` exception, and a server that hangs up before
answering, or resets the connection, comes out as ``httpx.ConnectTimeout``. Here
each one becomes the exception httpx's own transport raises for the same event,
so the rest of aicortex (and its error messages) see one set of types whichever
transport runs. Imported only when the first aiohttp pool is made.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Generator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

__all__ = ["aiohttp_transport", "as_httpx_error"]


def as_httpx_error(exc: BaseException) -> httpx.TransportError | None:
    """httpx's exception for the aiohttp failure behind ``exc``; None if it is not one."""
    source = exc
    if isinstance(exc, httpx.TransportError) and isinstance(exc.__cause__, aiohttp.ClientError):
        source = exc.__cause__
    if not isinstance(source, aiohttp.ClientError):
        return None
    message = str(source) or type(source).__name__
    error: httpx.TransportError
    if isinstance(source, aiohttp.ConnectionTimeoutError):
        error = httpx.ConnectTimeout(message)
    elif isinstance(source, aiohttp.ServerTimeoutError):
        error = httpx.ReadTimeout(message)
    elif isinstance(source, aiohttp.ClientConnectorError):
        error = httpx.ConnectError(message)
    elif isinstance(source, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        error = httpx.RemoteProtocolError(message)
    elif isinstance(source, aiohttp.ClientResponseError):  # a head that does not parse
        # Its str() leads with a made-up "400, message=": keep the parser's own words.
        error = httpx.RemoteProtocolError(source.message or message)
    elif isinstance(source, aiohttp.ClientOSError):
        error = httpx.ReadError(message)
    elif isinstance(source, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        error = httpx.UnsupportedProtocol(message)
    else:
        error = httpx.TransportError(message)
    error.__cause__ = source
    return error


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request | None = None) -> Generator[None]:
    """Raise aiohttp's failures inside the block as httpx's types."""
    try:
        yield
    except (aiohttp.ClientError, httpx.TransportError) as exc:
        mapped = as_httpx_error(exc)
        if mapped is None:
            raise
        if request is not None:
            mapped.request = request
        raise mapped from mapped.__cause__


class _Body(httpx.AsyncByteStream):
    """A response body whose read errors come out as httpx's types."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors(request):
            response = await super().handle_async_request(request)
        stream = response.stream
        if isinstance(stream, httpx.AsyncByteStream):
            response.stream = _Body(stream)
        return response


def aiohttp_transport(*, verify: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """An aiohttp transport for one server's pool."""
    return _Transport(verify=verify, limits=limits, trust_env=False)
