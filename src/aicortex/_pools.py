"""Connection pools: one plain ``httpx.AsyncClient`` per server, on the transport chosen.

``http="auto"`` (the default) uses httpx-aiohttp's ``AiohttpTransport`` when the
event loop is asyncio and the package is installed, and httpx's own transport
otherwise (always on trio). aiohttp is imported only when the first such pool is
made. A server that the environment routes through a proxy (``HTTP_PROXY`` and the
like) always uses httpx's transport, which honours those variables.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Literal, cast

import anyio
import httpx

from ._exceptions import ValidationError

__all__ = [
    "DEFAULT_LIMITS",
    "HttpChoice",
    "Pool",
    "TransportName",
    "aiohttp_installed",
    "connection_limits",
    "http_choice",
    "make_pool",
    "pick_transport",
]

logger = logging.getLogger("aicortex")

HttpChoice = Literal["auto", "httpx", "aiohttp"]
TransportName = Literal["httpx", "aiohttp"]

_CHOICES: tuple[HttpChoice, ...] = ("auto", "httpx", "aiohttp")
_INSTALL_AIOHTTP = "pip install 'aicortex-core[aiohttp]'"

DEFAULT_LIMITS = httpx.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=30.0
)
"""Per server: up to 1,000 requests at once (more than Ollama queues itself,
``OLLAMA_MAX_QUEUE=512``), 100 idle connections kept for 30 s."""

# Probes get a few connections of their own, so a pool full of streams never delays one.
_PROBE_LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30.0)


def http_choice(value: str | None) -> HttpChoice:
    """The transport choice: ``value``, else ``AICORTEX_HTTP``, else ``"auto"``."""
    source = "http"
    if value is None:
        value = os.environ.get("AICORTEX_HTTP", "").strip().lower() or "auto"
        source = "AICORTEX_HTTP"
    if value not in _CHOICES:
        raise ValidationError(
            f"{source} must be one of 'auto', 'httpx' or 'aiohttp', not {value!r}."
        )
    if value == "aiohttp" and not aiohttp_installed():
        raise ValidationError(
            f"{source}='aiohttp' needs the httpx-aiohttp package: {_INSTALL_AIOHTTP}"
        )
    return value


def aiohttp_installed() -> bool:
    """Whether httpx-aiohttp can be imported (without importing it)."""
    return importlib.util.find_spec("httpx_aiohttp") is not None


def connection_limits(limits: httpx.Limits | None, max_connections: int | None) -> httpx.Limits:
    """The per-server limits from ``limits=`` or ``max_connections=`` (not both)."""
    if limits is not None and max_connections is not None:
        raise ValidationError("Pass limits= or max_connections=, not both.")
    if limits is not None:
        if not isinstance(limits, httpx.Limits):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"limits must be an httpx.Limits, not {limits!r}.")
        return limits
    if max_connections is None:
        return DEFAULT_LIMITS
    value = cast(object, max_connections)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(
            f"max_connections must be a whole number >= 1, not {max_connections!r}."
        )
    return httpx.Limits(
        max_connections=value,
        max_keepalive_connections=min(value, DEFAULT_LIMITS.max_keepalive_connections or value),
        keepalive_expiry=DEFAULT_LIMITS.keepalive_expiry,
    )


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def pick_transport(choice: HttpChoice) -> TransportName:
    """The transport ``choice`` means on the running event loop."""
    if choice == "httpx":
        return "httpx"
    on_asyncio = _on_asyncio()
    if choice == "aiohttp":
        if not on_asyncio:
            raise ValidationError(
                "http='aiohttp' needs the asyncio event loop; on trio use http='httpx' or 'auto'."
            )
        return "aiohttp"
    return "aiohttp" if on_asyncio and aiohttp_installed() else "httpx"


_shared_context: ssl.SSLContext | None = None


def _shared_ssl_context() -> ssl.SSLContext:
    """The verified TLS context every https pool shares, made on first use (loading the
    CA bundle takes tens of milliseconds)."""
    global _shared_context
    if _shared_context is None:
        _shared_context = httpx.create_ssl_context()
    return _shared_context


def _verify_for(url: str) -> ssl.SSLContext:
    """The TLS context for a pool of ``url``: the shared, verified one for ``https://``.

    A plain ``http://`` server needs no CA bundle; its pool gets a context that trusts
    no certificate, so a redirect to ``https://`` fails closed instead of unverified.
    """
    if url.startswith("https:"):
        return _shared_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _proxied(url: str) -> bool:
    """Whether the environment (``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``...) sends
    requests to ``url`` through a proxy."""
    proxies = urllib.request.getproxies()
    if not proxies:
        return False
    parts = urllib.parse.urlsplit(url)
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2])


class Pool:
    """The connections of one server.

    ``client`` carries chats; ``probes`` carries health probes on connections of its
    own. ``slots`` counts the chats in flight against ``limits.max_connections``: a
    chat waits for a slot here, where aicortex can tell that the wait is local, rather
    than inside the transport.
    """

    __slots__ = ("client", "limit", "probes", "slots", "transport")

    def __init__(
        self,
        client: httpx.AsyncClient,
        probes: httpx.AsyncClient,
        transport: TransportName,
        limit: int | None,
    ) -> None:
        self.client = client
        self.probes = probes
        self.transport: TransportName = transport
        self.limit = limit
        self.slots = None if limit is None else anyio.Semaphore(limit)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.probes.aclose()


def make_pool(
    url: str,
    *,
    choice: HttpChoice,
    limits: httpx.Limits,
    timeout: httpx.Timeout,
    headers: Mapping[str, str],
) -> Pool:
    """A :class:`Pool` for ``url`` on the running event loop."""
    proxied = _proxied(url)
    kind = "httpx" if proxied else pick_transport(choice)
    verify = _verify_for(url)

    def client(pool_limits: httpx.Limits) -> httpx.AsyncClient:
        transport: httpx.AsyncBaseTransport | None = None
        if kind == "aiohttp":
            from ._aiohttp import aiohttp_transport

            transport = aiohttp_transport(verify=verify, limits=pool_limits)
        elif not proxied:
            transport = httpx.AsyncHTTPTransport(verify=verify, limits=pool_limits)
        # transport None: httpx builds one per proxy the environment names.
        return httpx.AsyncClient(
            base_url=url,
            headers={"Accept": "application/json", **headers},
            timeout=timeout,
            limits=pool_limits,
            verify=verify,
            transport=transport,
            follow_redirects=True,
        )

    pool = Pool(client(limits), client(_PROBE_LIMITS), kind, limits.max_connections)
    logger.debug("Pool for %s: %s transport, %s connections", url, kind, limits.max_connections)
    return pool
