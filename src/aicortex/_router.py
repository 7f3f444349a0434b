"""Concurrent health probing of Ollama servers, over each server's :class:`Pool`."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import anyio
import httpx

from ._config import Timeout
from ._health import Health, HealthCache, decided
from ._pools import DEFAULT_LIMITS, HttpChoice, Pool, TransportName, make_pool, pick_transport
from ._protocol import CHAT_PATH, TAGS_PATH, VERSION_PATH

__all__ = ["Router", "describe_error", "request_timeouts"]

logger = logging.getLogger("aicortex")


def request_timeouts(t: Timeout, transport: TransportName) -> dict[str, float | None]:
    """httpx's timeouts for a chat sent to a server over ``transport``, as a fresh dict.

    No ``pool`` limit: a chat waits for a local slot in its :class:`Pool`, bounded by the
    first-token limit. httpx's transport reads ``read`` afresh at every read, so the
    caller switches it to the idle limit once the response has started; aiohttp's fixes
    it when the request starts, so it gets the longer of the two, and unless that is the
    idle limit the stream enforces the idle limit itself.
    """
    read = t.first_token
    if transport == "aiohttp":
        read = None if read is None or t.idle is None else max(read, t.idle)
    return {"connect": t.connect, "read": read, "write": t.connect, "pool": None}


def describe_error(exc: BaseException, timeout: Timeout) -> str:
    """A short, human reason for a transport failure."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timed out after {timeout.connect:g}s"
    if isinstance(exc, httpx.ConnectError):
        causes = list(_causes(exc))
        if any(isinstance(c, ConnectionRefusedError) for c in causes):
            return "connection refused"
        if any(isinstance(c, socket.gaierror) for c in causes):
            return "cannot resolve the host name"
        for cause in reversed(causes):
            if isinstance(cause, OSError) and cause.strerror:
                return f"cannot connect ({cause.strerror})"
        return f"cannot connect ({exc})"
    if isinstance(exc, httpx.ReadTimeout):
        return "read timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"broke the HTTP protocol ({exc})"
    if isinstance(exc, httpx.ReadError):
        return f"connection dropped ({exc or 'read error'})"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from, exception groups included."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        grouped: object = getattr(current, "exceptions", None)  # an exception group
        if isinstance(grouped, tuple):
            todo.extend(
                e for e in cast("tuple[object, ...]", grouped) if isinstance(e, BaseException)
            )
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


class Router:
    """Owns one :class:`Pool` per server and the health cache.

    All methods run on the event loop that created the router.
    """

    def __init__(
        self,
        *,
        timeout: Timeout,
        health_ttl: float,
        headers: Mapping[str, str] | None = None,
        http: HttpChoice = "auto",
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self.timeout = timeout
        self.cache = HealthCache(health_ttl)
        self.http: HttpChoice = http
        self.limits = limits
        self._headers = dict(headers or {})
        self._pools: dict[str, Pool] = {}
        self._chat_templates: dict[str, tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}
        self._inflight: dict[str, anyio.Event] = {}
        self._closed = False

    @staticmethod
    def now() -> float:
        return time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This AsyncCortex is closed; create a new one.")

    def pool(self, url: str) -> Pool:
        """The pool for ``url``, created on first use."""
        self.check_open()
        pool = self._pools.get(url)
        if pool is None:
            t = self.timeout
            pool = self._pools[url] = make_pool(
                url,
                choice=self.http,
                limits=self.limits,
                timeout=httpx.Timeout(
                    connect=t.connect, read=t.first_token, write=t.connect, pool=t.first_token
                ),
                headers=self._headers,
            )
        return pool

    def client(self, url: str) -> httpx.AsyncClient:
        """The pooled client for chats (and other requests) to ``url``."""
        return self.pool(url).client

    def transport(self) -> TransportName:
        """The transport a new pool gets on the running event loop."""
        return pick_transport(self.http)

    def chat_request(
        self, url: str, content: bytes, timeouts: dict[str, float | None]
    ) -> httpx.Request:
        """A ``POST /api/chat`` of the JSON ``content`` to ``url``.

        The same request ``client.build_request(..., json=...)`` makes, from a template
        built once per server: httpx re-merges and re-validates every header on each
        call, which costs more than the rest of a small exchange. With cookies in the
        jar (a load balancer that pins sessions), httpx builds it as usual.
        """
        client = self.client(url)
        if client.cookies:
            return client.build_request(
                "POST",
                CHAT_PATH,
                content=content,
                headers={"Content-Type": "application/json"},
                extensions={"timeout": timeouts},
            )
        template = self._chat_templates.get(url)
        if template is None:
            sample = client.build_request("POST", CHAT_PATH, json={})
            headers = [(k, v) for k, v in sample.headers.raw if k.lower() != b"content-length"]
            template = self._chat_templates[url] = (sample.url, headers)
        return _json_request(*template, content, timeouts)

    def mark_down(self, url: str, reason: str) -> None:
        """Record a failed real request: ``url`` is skipped until its next probe."""
        logger.warning("Ollama server %s failed: %s; marking it down", url, reason)
        self.cache.mark_down(url, reason, self.now())

    async def probe(self, url: str) -> Health:
        """Probe one server (``GET /api/tags`` and ``/api/version`` at once, on the probe
        connections of its pool); cache the result."""
        client = self.pool(url).probes
        probe_timeout = self.timeout.probe
        started = self.now()
        tags: dict[str, Any] = {}
        version: list[str] = []
        failure: list[str] = []

        async def get_tags() -> None:
            try:
                response = await client.get(TAGS_PATH)
            except Exception as exc:  # a probe reports; it never raises
                failure.append(describe_error(exc, self.timeout))
                return
            if response.status_code != 200:
                failure.append(f"probe GET {TAGS_PATH} answered HTTP {response.status_code}")
                return
            try:
                data = response.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                failure.append(f"probe GET {TAGS_PATH} did not answer with Ollama's JSON")
                return
            tags.update(cast("dict[str, Any]", data))

        async def get_version() -> None:
            try:
                response = await client.get(VERSION_PATH)
                data = response.json() if response.status_code == 200 else None
            except Exception:  # the version is optional
                return
            if isinstance(data, dict):
                value = cast("dict[str, Any]", data).get("version")
                if isinstance(value, str):
                    version.append(value)

        health: Health
        with anyio.move_on_after(probe_timeout) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(get_tags)
                tg.start_soon(get_version)
        now = self.now()
        if scope.cancelled_caught and not tags and not failure:
            health = Health.down(url, f"probe timed out after {probe_timeout:g}s", checked_at=now)
        elif failure or not tags:
            health = Health.down(url, failure[0] if failure else "probe failed", checked_at=now)
        else:
            health = Health.ok(
                url,
                checked_at=now,
                latency=now - started,
                version=version[0] if version else None,
                models=_model_names(tags.get("models")),
            )
        self.cache.put(health)
        if not health.up:
            logger.warning("Ollama server %s is down: %s", url, health.error)
        return health

    async def _probe_once(self, url: str) -> Health | None:
        """Probe ``url``, or wait for a probe of it that is already running."""
        running = self._inflight.get(url)
        if running is not None:
            await running.wait()
            return self.cache.latest(url)
        done = anyio.Event()
        self._inflight[url] = done
        try:
            return await self.probe(url)
        finally:
            del self._inflight[url]
            done.set()

    async def health(
        self, candidates: Sequence[str], model: str | None, *, fresh: bool = False
    ) -> dict[str, Health]:
        """Health of ``candidates``, probing stale ones concurrently.

        Unless ``fresh`` is set, probing stops as soon as the first choice is
        settled: a server that is up and lists the model, with every server
        preferred over it already known.
        """
        now = self.now()
        known: dict[str, Health] = {}
        if not fresh:
            for url in candidates:
                entry = self.cache.get(url, now)
                if entry is not None:
                    known[url] = entry
            if decided(candidates, known, model):
                return known
        stale = [u for u in candidates if u not in known]
        for url in stale:
            # Pools are made here, not in the probe tasks, so that a transport that
            # cannot run on this loop raises its own ValidationError, not a group.
            self.pool(url)

        async with anyio.create_task_group() as tg:

            async def run(url: str) -> None:
                entry = await self._probe_once(url)
                if entry is not None:
                    known[url] = entry
                if not fresh and decided(candidates, known, model):
                    tg.cancel_scope.cancel()

            for url in stale:
                tg.start_soon(run, url)
        return known

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        with anyio.CancelScope(shield=True):
            for pool in pools:
                await pool.aclose()


def _json_request(
    url: httpx.URL,
    headers: list[tuple[bytes, bytes]],
    content: bytes,
    timeouts: dict[str, float | None],
) -> httpx.Request:
    request = httpx.Request(
        "POST",
        url,
        headers=[*headers, (b"Content-Length", b"%d" % len(content))],
        stream=httpx.ByteStream(content),
        extensions={"timeout": timeouts},
    )
    request.read()  # as with content=: the body is known, so request.content works
    return request


def _model_names(models: object) -> list[str]:
    names: list[str] = []
    if isinstance(models, list):
        for item in cast("list[object]", models):
            if isinstance(item, dict):
                entry = cast("dict[str, Any]", item)
                name = entry.get("model") or entry.get("name")
                if isinstance(name, str):
                    names.append(name)
    return names
