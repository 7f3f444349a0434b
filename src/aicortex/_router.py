"""The I/O side of routing: each server's :class:`Pool`, concurrent probes, and the
bookkeeping of requests in flight."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import anyio
import httpx

from ._config import Timeout
from ._health import Health
from ._openai import MODELS_PATH as OPENAI_MODELS_PATH
from ._openai import model_ids
from ._pools import DEFAULT_LIMITS, HttpChoice, Pool, TransportName, make_pool, pick_transport
from ._protocol import CHAT_PATH, TAGS_PATH, VERSION_PATH, error_text, model_key
from ._routing import Ejection, FailureKind, Fleet, Node, Server, Strategy
from ._stream import current_loop, run_soon

__all__ = [
    "Lease",
    "Router",
    "describe_error",
    "read_capped",
    "request_timeouts",
]

logger = logging.getLogger("aicortex")

PS_PATH = "/api/ps"  # the models loaded in memory
HEALTH_PATH = "/health"  # an OpenAI-style server's readiness, where it has one


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


_ERROR_BODY_LIMIT = 64 * 1024  # the most of an error answer that is read


async def read_capped(response: httpx.Response, limit: int = _ERROR_BODY_LIMIT) -> bytes:
    """The body of ``response``, or its first ``limit`` bytes or so (the chunk that
    crosses the limit is kept)."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data)


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
    """Owns one :class:`Pool` per server and the :class:`Fleet` of their states.

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
        servers: Iterable[Server] = (),
        ejection: Ejection | None = None,
    ) -> None:
        self.timeout = timeout
        self.fleet = Fleet(health_ttl, servers, ejection)
        self.http: HttpChoice = http
        self.limits = limits
        self._headers = dict(headers or {})
        self._pools: dict[str, Pool] = {}
        self._chat_templates: dict[
            tuple[str, str], tuple[httpx.URL, list[tuple[bytes, bytes]]]
        ] = {}
        self._inflight: dict[str, anyio.Event] = {}
        self._probed: dict[str, Health] = {}  # the last probe of each server
        # What the last good probe of each Ollama server listed, entry by entry as it
        # sent them (GET /api/tags, then /api/ps): the native gateway's model lists.
        self._listings: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        # Probes no request waits for, and the events set when each one has ended.
        self._background: dict[anyio.CancelScope, anyio.Event] = {}
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
                headers=self._headers_for(url),
            )
        return pool

    def _headers_for(self, url: str) -> dict[str, str]:
        """The client's headers, with the server's own API key when it has one."""
        option = self.fleet.option(url)
        key = None if option is None else option.bearer()
        if key is None:
            return self._headers
        headers = {k: v for k, v in self._headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = f"Bearer {key}"
        return headers

    def client(self, url: str) -> httpx.AsyncClient:
        """The pooled client for chats (and other requests) to ``url``."""
        return self.pool(url).client

    def transport(self) -> TransportName:
        """The transport a new pool gets on the running event loop."""
        return pick_transport(self.http)

    def chat_request(
        self,
        url: str,
        content: bytes,
        timeouts: dict[str, float | None],
        path: str = CHAT_PATH,
    ) -> httpx.Request:
        """A ``POST`` of the JSON ``content`` to ``path`` (``/api/chat`` by default) on ``url``.

        The same request ``client.build_request(..., json=...)`` makes, from a template
        built once per server and path: httpx re-merges and re-validates every header on
        each call, which costs more than the rest of a small exchange. With cookies in
        the jar (a load balancer that pins sessions), httpx builds it as usual.
        """
        client = self.client(url)
        if client.cookies:
            return client.build_request(
                "POST",
                path,
                content=content,
                headers={"Content-Type": "application/json"},
                extensions={"timeout": timeouts},
            )
        template = self._chat_templates.get((url, path))
        if template is None:
            sample = client.build_request("POST", path, json={})
            headers = [(k, v) for k, v in sample.headers.raw if k.lower() != b"content-length"]
            template = self._chat_templates[url, path] = (sample.url, headers)
        return _json_request(*template, content, timeouts)

    def failed(
        self,
        url: str,
        kind: FailureKind,
        reason: str,
        model: str | None = None,
        name: str | None = None,
    ) -> None:
        """Record a failed real request to ``url`` in its state machine."""
        if self.fleet.failed(url, kind, reason, self.now(), model, name):
            logger.warning("Ejecting %s: %s", url, reason)
        else:
            logger.info("Server %s failed (%s): %s", url, kind, reason)
        if kind == "model":
            # Did the model fail, or the server? A probe tells, before the next request.
            self.probe_soon(url)

    async def probe(self, url: str) -> Health:
        """Probe one server on the probe connections of its pool, and record the result.

        An Ollama server gets ``GET /api/tags``, ``/api/version`` and ``/api/ps`` at
        once; an OpenAI-style one ``GET /v1/models`` and ``/health`` (a 503 there, as
        while llama.cpp loads its model, means down). A server of unknown kind is
        probed as Ollama first, and as OpenAI-style when that finds no Ollama.
        """
        client = self.pool(url).probes
        probe_timeout = self.timeout.probe
        started = self.now()
        node = self.fleet.node(url)
        found: _Found | None = None
        node.probing = True
        try:
            with anyio.move_on_after(probe_timeout):
                if node.kind == "openai":
                    found = await self._probe_openai(client)
                else:
                    found = await self._probe_ollama(client)
                    if node.kind is None and found.not_ollama:
                        other = await self._probe_openai(client)
                        if other.models is not None or other.listed:
                            found = other
                if (found.models is not None or found.listed) and node.kind is None:
                    node.kind = found.kind
        finally:
            node.probing = False
        now = self.now()
        health: Health
        if found is None:
            health = Health.down(url, f"probe timed out after {probe_timeout:g}s", checked_at=now)
        elif found.models is None:
            health = Health.down(url, found.failure or "probe failed", checked_at=now)
        else:
            health = Health.ok(
                url,
                checked_at=now,
                latency=now - started,
                version=found.version,
                models=found.models + _public_names(node, found.models),
            )
        self._probed[url] = health
        if health.up and found is not None:
            self._listings[url] = (list(found.entries), list(found.loaded_entries))
        if health.up:
            loaded = found.loaded if found is not None else None
            if loaded is not None:
                loaded += _public_names(node, loaded)
            ejected = self.fleet.probed(
                url,
                now,
                latency=health.latency or 0.0,
                version=health.version,
                models=health.models,
                keys=health.keys,
                loaded=None if loaded is None else frozenset(model_key(n) for n in loaded),
            )
            for name in ejected:
                logger.warning("Ejecting model %r on %s: it failed 3 times in a row", name, url)
        else:
            self.fleet.failed(url, "unreachable", health.error or "probe failed", now)
            logger.warning("Server %s is down: %s", url, health.error)
        return health

    async def _probe_ollama(self, client: httpx.AsyncClient) -> _Found:
        tags: dict[str, Any] = {}
        version: list[str] = []
        loaded: list[list[str]] = []
        loaded_entries: list[dict[str, Any]] = []
        failure: list[str] = []
        not_ollama: list[bool] = []

        async def get_tags() -> None:
            try:
                response = await client.get(TAGS_PATH)
            except Exception as exc:  # a probe reports; it never raises
                failure.append(describe_error(exc, self.timeout))
                return
            data = _json_object(response) if response.status_code == 200 else None
            if data is None:
                not_ollama.append(True)
                failure.append(
                    f"probe GET {TAGS_PATH} answered HTTP {response.status_code}"
                    if response.status_code != 200
                    else f"probe GET {TAGS_PATH} did not answer with Ollama's JSON"
                )
                return
            tags.update(data)

        async def get_optional(path: str) -> None:
            try:
                response = await client.get(path)
            except Exception:  # the version and the loaded models are extras
                return
            data = _json_object(response) if response.status_code == 200 else None
            if data is None:
                return
            if path == PS_PATH:
                loaded.append(_model_names(data.get("models")))
                loaded_entries.extend(_entries(data.get("models")))
            elif isinstance(value := data.get("version"), str):
                version.append(value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(get_tags)
            tg.start_soon(get_optional, VERSION_PATH)
            tg.start_soon(get_optional, PS_PATH)
        if not tags:
            return _Found(
                "ollama", None, failure=failure[0] if failure else None, not_ollama=bool(not_ollama)
            )
        return _Found(
            "ollama",
            tuple(_model_names(tags.get("models"))),
            version=version[0] if version else None,
            loaded=tuple(loaded[0]) if loaded else None,
            entries=tuple(_entries(tags.get("models"))),
            loaded_entries=tuple(loaded_entries),
        )

    async def _probe_openai(self, client: httpx.AsyncClient) -> _Found:
        found: list[_Found] = []
        not_ready: list[str] = []

        async def get_models() -> None:
            found.append(await self._openai_models(client))

        async def get_health() -> None:
            # llama.cpp, vLLM and SGLang answer /health; 503 while the model loads.
            try:
                response = await client.get(HEALTH_PATH)
            except Exception:  # not every server has it
                return
            if response.status_code == 503:
                message = error_text(response.content) or "not ready"
                not_ready.append(f"probe GET {HEALTH_PATH} answered HTTP 503: {message}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(get_models)
            tg.start_soon(get_health)
        if not_ready and found[0].models is not None:
            return _Found("openai", None, failure=not_ready[0], listed=True)
        return found[0]

    async def _openai_models(self, client: httpx.AsyncClient) -> _Found:
        try:
            response = await client.get(OPENAI_MODELS_PATH)
        except Exception as exc:  # a probe reports; it never raises
            return _Found("openai", None, failure=describe_error(exc, self.timeout))
        if response.status_code in (401, 403):
            return _Found(
                "openai",
                None,
                failure=f"probe GET {OPENAI_MODELS_PATH} answered HTTP {response.status_code}: "
                "its API key is missing or wrong (api_key= or api_key_env= on the Server)",
            )
        data = _json_object(response) if response.status_code == 200 else None
        if data is None or not isinstance(data.get("data"), list):
            return _Found(
                "openai",
                None,
                failure=f"probe GET {OPENAI_MODELS_PATH} answered HTTP {response.status_code}, "
                "not an OpenAI model list",
            )
        ids = tuple(model_ids(data))
        return _Found("openai", ids, loaded=ids)  # what it serves is what it has loaded

    async def probe_once(self, url: str) -> Health | None:
        """Probe ``url``, or wait for a probe of it that is already running; None when
        that one was cancelled."""
        running = self._inflight.get(url)
        if running is not None:
            await running.wait()
            return self._probed.get(url)
        done = anyio.Event()
        self._inflight[url] = done
        self._probed.pop(url, None)
        try:
            return await self.probe(url)
        finally:
            del self._inflight[url]
            done.set()

    def probe_soon(self, url: str) -> None:
        """Probe ``url`` in the background, unless a probe of it is already running.

        Used when an ejection ends and to attribute a broken answer: no request
        waits for it. Closing the router cancels it.
        """
        if self._closed or url in self._inflight:
            return
        self.pool(url)
        scope = anyio.CancelScope()
        done = anyio.Event()
        self._background[scope] = done

        async def run() -> None:
            try:
                with scope:
                    await self.probe_once(url)
            finally:
                del self._background[scope]
                done.set()

        run_soon(current_loop(), run)

    async def refresh(
        self,
        candidates: Sequence[str],
        model: str,
        strategy: Strategy,
        *,
        spread: bool,
        force: bool = False,
    ) -> dict[str, Health]:
        """Probe the candidates that need it before routing, concurrently; with
        ``force``, every candidate. Returns what the probes run here found.

        Unless ``force`` is set, probing stops as soon as the pick is settled
        (:meth:`Fleet.settled`), and candidates whose ejection is over are probed in
        the background: the request goes elsewhere, and never waits for a server that
        may still be dead.
        """
        fleet = self.fleet
        if force:
            stale = list(candidates)
        else:
            now = self.now()
            stale, alongside = fleet.to_probe(candidates, now)
            for url in alongside:
                self.probe_soon(url)
            if not stale or fleet.settled(candidates, model, now, strategy, spread=spread):
                return {}
        for url in stale:
            # Pools are made here, not in the probe tasks, so that a transport that
            # cannot run on this loop raises its own ValidationError, not a group.
            self.pool(url)
        found: dict[str, Health] = {}

        async with anyio.create_task_group() as tg:

            async def run(url: str) -> None:
                health = await self.probe_once(url)
                if health is not None:
                    found[url] = health
                if not force and fleet.settled(
                    candidates, model, self.now(), strategy, spread=spread
                ):
                    tg.cancel_scope.cancel()

            for url in stale:
                tg.start_soon(run, url)
        return found

    def listing(self, url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The model entries of ``url``'s last good probe, as an Ollama server sent them:
        ``/api/tags``' and ``/api/ps``' (None for a server never probed, or not Ollama)."""
        return self._listings.get(url)

    def lease(self, url: str, model: str, slots: anyio.Semaphore | None) -> Lease:
        """Count a request to ``url`` in flight until its :class:`Lease` is released."""
        node = self.fleet.node(url)
        node.inflight += 1
        return Lease(self, node, model, slots)

    async def aclose(self) -> None:
        """Stop the background probes and close every pooled connection."""
        self._closed = True
        background = list(self._background.items())
        for scope, _ in background:
            scope.cancel()
        pools = list(self._pools.values())
        self._pools.clear()
        with anyio.CancelScope(shield=True):
            # A probe cut short closes its own connection; let it, then close the pools.
            with anyio.move_on_after(1.0):
                for _, done in background:
                    await done.wait()
            for pool in pools:
                await pool.aclose()


class Lease:
    """One request in flight to a server: it reports how the request went and gives
    back its connection slot, once."""

    __slots__ = ("_done", "_model", "_node", "_router", "_slots")

    def __init__(
        self, router: Router, node: Node, model: str, slots: anyio.Semaphore | None
    ) -> None:
        self._router = router
        self._node = node
        self._model = model
        self._slots = slots
        self._done = False

    def answered(self) -> None:
        """The first token arrived: the server works."""
        self._router.fleet.answered(self._node.url)

    def failed(self, reason: str) -> None:
        """The answer broke: count it against (server, model) and check the server."""
        self._router.failed(self._node.url, "model", reason, model_key(self._model), self._model)

    def release(self, completed: bool = False) -> None:
        """The request is over (``completed``: its answer ended cleanly)."""
        if self._done:
            return
        self._done = True
        node = self._node
        node.inflight -= 1
        if completed:
            self._router.fleet.served(node.url, model_key(self._model))
        if self._slots is not None:
            self._slots.release()


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


class _Found(NamedTuple):
    """What one probe found: the models listed (None: the probe failed, ``failure``)."""

    kind: Literal["ollama", "openai"]
    models: tuple[str, ...] | None
    version: str | None = None
    loaded: tuple[str, ...] | None = None
    failure: str | None = None
    not_ollama: bool = False  # it answered, but not as Ollama does
    listed: bool = False  # it listed its models, but is not ready to serve them
    entries: tuple[dict[str, Any], ...] = ()  # /api/tags' models, as sent
    loaded_entries: tuple[dict[str, Any], ...] = ()  # /api/ps' models, as sent


def _public_names(node: Node, names: tuple[str, ...]) -> tuple[str, ...]:
    """The names callers use (``Server.models``) for the models in ``names``, so that a
    server is listed under them too."""
    here = {model_key(n) for n in names}
    return tuple(
        public
        for public in node.public_names
        if model_key(node.names_here[model_key(public)]) in here and model_key(public) not in here
    )


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return cast("dict[str, Any]", data) if isinstance(data, dict) else None


def _entries(models: object) -> list[dict[str, Any]]:
    """The model entries (JSON objects with a name) of a model list."""
    if not isinstance(models, list):
        return []
    return [
        cast("dict[str, Any]", item)
        for item in cast("list[object]", models)
        if isinstance(item, dict) and isinstance(item.get("model") or item.get("name"), str)  # pyright: ignore[reportUnknownMemberType]
    ]


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
