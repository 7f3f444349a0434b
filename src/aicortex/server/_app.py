"""The Starlette app: routes, the lazily created AsyncCortex, keys and request ids."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._client import AsyncCortex
from .._config import Timeout
from .._embed import EmbedResult
from .._exceptions import ValidationError
from .._pools import HttpChoice
from .._protocol import embed_inputs, model_key
from .._routing import Ejection, Server, ServerState, Strategy
from ._auth import KeyChecker, load_keys
from ._browser import HostPolicy, OriginPolicy, load_hosts, load_origins
from ._drain import Drain, Draining
from ._errors import ProxyError, invalid, missing
from ._gateway import (
    DEFAULT_BODY_TIMEOUT,
    ClientGone,
    Gateway,
    Receive,
    Send,
    dumps,
    is_native,
    read_body,
    request_id,
    send_json,
)
from ._handle import CortexHandle, Endpoint
from ._observe import LogFormat, Observe, RecordTaker
from ._ollama import native_routes
from ._schema import decode_json, parse_chat_request
from ._streaming import SSEResponse, collect, open_stream, unless_disconnected
from ._translate import ChunkWriter, completion, completion_id, embedding_list, to_chat_call

__all__ = ["CortexHandle", "create_app"]

logger = logging.getLogger("aicortex.server")

DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class _ChatCompletions(Endpoint):
    """``POST /v1/chat/completions``."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        rid = request_id(scope)
        try:
            body = await read_body(scope, receive, self.max_body_size)
        except ClientGone:
            return
        call = to_chat_call(parse_chat_request(decode_json(body)))
        affinity = _header(scope, b"x-aicortex-affinity")
        if affinity:  # the header wins over the body's "user"
            call = dataclasses.replace(call, affinity=affinity)
        cortex = self.handle.cortex
        created = int(time.time())
        cid = completion_id()
        extra = {"request_id": rid}
        if call.stream:
            opened = await unless_disconnected(receive, lambda: open_stream(cortex, call))
            if opened is None:
                logger.info("[%s] the client went away before the first token", rid, extra=extra)
                return
            stream = opened[0]
            logger.debug("[%s] streaming %s from %s", rid, call.model, stream.server, extra=extra)
            writer = ChunkWriter(cid, created, call.model, include_usage=call.include_usage)
            headers = [*_SSE_HEADERS, (b"x-aicortex-server", stream.server.encode())]
            response = SSEResponse(
                stream,
                writer,
                headers=headers,
                include_usage=call.include_usage,
                request_id=rid,
            )
            await response(scope, receive, send)
            return
        collected = await unless_disconnected(receive, lambda: collect(cortex, call))
        if collected is None:
            logger.info("[%s] the client went away; the request was cancelled", rid, extra=extra)
            return
        answer = collected[0]
        logger.debug("[%s] answered %s from %s", rid, call.model, answer.server, extra=extra)
        result = completion(
            id=cid,
            created=created,
            model=call.model,
            text=answer.partial_text,
            thinking=answer.thinking,
            tool_calls=answer.tool_calls,
            done_reason=answer.done_reason,
            stats=answer.stats,
        )
        await send_json(send, 200, dumps(result), [(b"x-aicortex-server", answer.server.encode())])


class _Embeddings(Endpoint):
    """``POST /v1/embeddings``: ``input`` a string or a list of strings, batched over the
    servers by :meth:`AsyncCortex.embed`."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.max_body_size)
        except ClientGone:
            return
        data = decode_json(body)
        if not isinstance(data, dict):
            raise ProxyError(400, "The request body must be a JSON object.")
        request = cast("dict[str, Any]", data)
        model = request.get("model")
        if not isinstance(model, str) or not model.strip():
            raise missing("model")
        raw: object = request.get("input")
        if raw is None:
            raise missing("input")
        if (
            isinstance(raw, list)
            and raw
            and all(isinstance(x, (int, list)) for x in cast("list[object]", raw))
        ):
            raise invalid("input", "token arrays are not supported; send the text itself")
        try:
            texts = embed_inputs(cast(object, raw))
        except ValidationError:
            raise invalid("input", "it must be a string or a list of strings") from None
        if not texts or any(not t for t in texts):
            raise invalid("input", "it must not be empty, nor hold an empty string")
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid("encoding_format", f"{encoding!r} is not 'float' or 'base64'")
        dimensions = request.get("dimensions")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
        ):
            raise invalid("dimensions", "it must be a whole number >= 1")
        cortex = self.handle.cortex

        async def embed() -> EmbedResult:
            return await cortex.embed(texts, model=model, dimensions=dimensions)

        done = await unless_disconnected(receive, embed)
        if done is None:
            return
        result = done[0]
        answer = embedding_list(
            result.embeddings, model, result.prompt_tokens, base64=encoding == "base64"
        )
        headers = [(b"x-aicortex-server", ", ".join(result.servers).encode())]
        await send_json(send, 200, dumps(answer), headers)


class _Models(Endpoint):
    """``GET /v1/models`` and ``GET /v1/models/{model}``: live models first, then the catalog."""

    async def _list(self) -> list[dict[str, Any]]:
        cortex = self.handle.cortex
        seen: dict[str, dict[str, Any]] = {}
        for info in await cortex.probe_servers():
            if info.up:
                for name in info.models:
                    seen.setdefault(model_key(name), self._entry(name, "aicortex"))
        catalog = cortex.catalog
        for name in catalog.models():
            found = catalog.find(name)
            seen.setdefault(
                model_key(name), self._entry(name, found.family if found else "aicortex")
            )
        return list(seen.values())

    def _entry(self, name: str, owner: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": owner}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        models = await self._list()
        wanted: str | None = scope.get("path_params", {}).get("model")
        if wanted is None:
            await send_json(send, 200, dumps({"object": "list", "data": models}))
            return
        for entry in models:
            if model_key(entry["id"]) == model_key(wanted):
                await send_json(send, 200, dumps(entry))
                return
        names = [m["id"] for m in models]
        suggestions = self.handle.cortex.catalog.suggestions(wanted, extra=names)
        message = f"The model {wanted!r} does not exist."
        if suggestions:
            message += " Did you mean: " + ", ".join(repr(s) for s in suggestions) + "?"
        raise ProxyError(404, message, param="model", code="model_not_found")


class _Ready(Endpoint):
    """``GET /ready``: 200 when at least one upstream answers its probe, else 503; each
    upstream with its routing state (see :meth:`AsyncCortex.server_states`)."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        cortex = self.handle.cortex
        infos = await cortex.probe_servers()
        states = {state.url: state for state in cortex.server_states()}
        upstreams: list[dict[str, Any]] = []
        for info in infos:
            upstream: dict[str, Any] = {
                "url": info.url,
                "status": "up" if info.up else "down",
                "latency_ms": None if info.latency is None else round(info.latency * 1000, 1),
                "version": info.version,
                "error": info.error,
            }
            state = states.get(info.url)
            if state is not None:
                upstream |= {
                    "state": state.state,
                    "retry_in": state.retry_in,
                    "in_flight": state.in_flight,
                    "failures": state.failures,
                    "loaded": None if state.loaded is None else list(state.loaded),
                    "ejected_models": state.ejected_models,
                }
                if state.error and not upstream["error"]:
                    upstream["error"] = state.error
            upstreams.append(upstream)
        ready = any(info.up for info in infos)
        body = {"status": "ready" if ready else "unavailable", "upstreams": upstreams}
        await send_json(send, 200 if ready else 503, dumps(body))


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """The value of header ``name`` (lower-case) in ``scope``, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip() or None
    return None


async def _health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown URL, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    where = f"{request.method} {request.url.path}"
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if is_native(path[len(root) :] if root and path.startswith(root) else path):
        # Ollama's shape; its own words for these are "404 page not found" and so on.
        text = {404: "404 page not found", 405: "405 method not allowed"}.get(status)
        message = f"{text}: {where}" if text else f"HTTP {status}"
        body = dumps({"error": message})
        return Response(body, status, headers=headers, media_type="application/json")
    if status == 405:
        message, code = f"Method not allowed: {where}.", "method_not_allowed"
    elif status == 404:
        message, code = f"Unknown request URL: {where}.", "unknown_url"
    else:
        message, code = f"The request failed with HTTP {status}.", None
    error = ProxyError(status, message, code=code)
    return Response(error.encode(), status, headers=headers, media_type="application/json")


ENV_BODY_TIMEOUT = "AICORTEX_BODY_TIMEOUT"


def _body_timeout(value: float | None) -> float:
    """``body_timeout`` checked: the value given, else ``AICORTEX_BODY_TIMEOUT``, else 30."""
    source = "body_timeout"
    number: object = value
    if value is None:
        raw = os.environ.get(ENV_BODY_TIMEOUT, "").strip()
        if not raw:
            return DEFAULT_BODY_TIMEOUT
        source = ENV_BODY_TIMEOUT
        try:
            number = float(raw)
        except ValueError:
            number = raw
    if (
        isinstance(number, bool)
        or not isinstance(number, (int, float))
        or not math.isfinite(number)
        or number <= 0
    ):
        raise ValueError(
            f"{source} must be a positive number of seconds (e.g. 30), not {number!r}."
        )
    return float(number)


def create_app(
    cortex: AsyncCortex | None = None,
    *,
    servers: Sequence[str | Server] | str | None = None,
    timeout: Timeout | None = None,
    api_keys: Iterable[str] | None = None,
    api_key_file: str | os.PathLike[str] | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    http: HttpChoice | None = None,
    max_connections: int | None = None,
    routing: Strategy | None = None,
    allow_management: bool = False,
    health_ttl: float | None = None,
    ejection: Ejection | None = None,
    shutdown_grace: float | None = None,
    allowed_origins: Iterable[str] | None = None,
    allowed_hosts: Iterable[str] | None = None,
    body_timeout: float | None = None,
    metrics: bool = True,
    metrics_open: bool = False,
    access_log: bool = True,
    log_format: LogFormat = "text",
) -> Starlette:
    """An ASGI app that serves OpenAI's API and Ollama's in front of one or many servers.

    OpenAI's routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
    ``GET /v1/models`` and ``GET /v1/models/{id}``. Ollama's (the whole fleet as one
    Ollama): ``GET /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
    ``POST /api/show``, ``POST /api/chat``, ``POST /api/generate``, ``POST /api/embed``
    and ``POST /api/embeddings``; its model-management routes are refused with a message
    that names ``aicortex pull``, unless ``allow_management`` is set: then
    ``POST /api/pull`` pulls onto every server at once (the progress of each streamed)
    and ``DELETE /api/delete`` deletes from every server. And ``GET /health``
    (liveness), ``GET /ready`` (200 when an upstream is up) and ``GET /metrics``.

    ``metrics`` (default on; False: no route, no cost): ``GET /metrics`` serves
    Prometheus metrics of every request and server (see the proxy's documentation),
    behind the API keys unless ``metrics_open``. With ``PROMETHEUS_MULTIPROC_DIR`` set
    before the process starts, ``prometheus_client``'s multiprocess mode adds up every
    worker process's.
    ``access_log`` (default on): one line per request on the logger ``aicortex.access``
    at INFO, as ``key=value`` pairs or with ``log_format="json"`` a JSON object; it
    never holds a key, a prompt or an answer. A cortex passed in gets an observer added
    for both (see :meth:`AsyncCortex.add_observer`).

    ``cortex``: the :class:`~aicortex.AsyncCortex` to use; the app never closes it.
    Without one, the app creates ``AsyncCortex(servers, timeout=timeout)`` on its
    first request (``servers`` given: exactly those servers; else ``AICORTEX_SERVERS``,
    then ``OLLAMA_HOST``) and closes it at shutdown.

    ``api_keys`` (else the lines of ``api_key_file``, else ``AICORTEX_API_KEYS``,
    comma-separated): when any key is set, every route but ``/health`` needs
    ``Authorization: Bearer <key>``. ``max_body_size``: larger bodies get 413.
    ``routing``, ``http``, ``max_connections``, ``health_ttl`` and ``ejection`` go to the
    ``AsyncCortex`` the app creates. ``allow_management``: serve Ollama's ``pull`` and
    ``delete`` (see above). ``shutdown_grace``: on SIGTERM or SIGINT (once the app has
    started, under uvicorn), answers running may take this many more seconds; the ones
    still running then end with an error frame (a 503 if nothing was sent yet). Leave it
    None when the host application handles shutdown itself.

    Web pages: a request with an ``Origin`` header is served only from an allowed
    origin, else refused with 403. Allowed are localhost pages (``http(s)://localhost``,
    ``127.0.0.1``, ``0.0.0.0`` and ``[::1]``, on any port), the webviews of desktop
    apps (``app://``, ``file://``, ``tauri://``, ``vscode-webview://``,
    ``vscode-file://``), and ``allowed_origins`` (else ``AICORTEX_ALLOWED_ORIGINS``,
    comma-separated): exact origins, patterns with ``*`` (``https://*.example.com``),
    ``null``, or ``*`` for every origin. Allowed origins get CORS headers and their
    preflights are answered (no key needed). On a connection that arrived on a loopback
    address the ``Host`` header must name a loopback host, or one of ``allowed_hosts``
    (else ``AICORTEX_ALLOWED_HOSTS``; ``*`` turns the check off): a page that has its
    own domain name resolve to 127.0.0.1 (DNS rebinding) is refused with 403.
    ``body_timeout`` (else ``AICORTEX_BODY_TIMEOUT``, else 30): seconds for a whole
    request body to arrive; a slower one gets 408 and the connection is closed.

    Served on its own (``uvicorn.run(create_app())``), the app closes the cortex it
    created when the server shuts down (ASGI lifespan). Mounted in another app, it
    gets no lifespan events of its own: run its lifespan from the host's, or close
    the cortex through ``app.state.aicortex``::

        proxy = create_app()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with proxy.router.lifespan_context(proxy):
                yield
            # or: yield; await proxy.state.aicortex.aclose()

        host = Starlette(routes=[Mount("/llm", app=proxy)], lifespan=lifespan)
    """
    if isinstance(max_body_size, bool) or not isinstance(max_body_size, int) or max_body_size < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(
            f"max_body_size must be a positive number of bytes, not {max_body_size!r}."
        )
    keys = KeyChecker(load_keys(api_keys, api_key_file))
    origins = OriginPolicy(load_origins(allowed_origins))
    hosts = HostPolicy(load_hosts(allowed_hosts))
    body_limit = _body_timeout(body_timeout)
    own = (servers, timeout, http, max_connections, routing, health_ttl, ejection)
    if cortex is not None and any(option is not None for option in own):
        raise ValueError(
            "Pass servers=, timeout=, http=, max_connections=, routing=, health_ttl= and ejection= "
            "to the AsyncCortex, not to create_app()."
        )
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}.")
    # The cortex's records reach the request that made them, for the metrics and the log.
    taker = RecordTaker() if metrics or access_log else None
    handle = CortexHandle(
        cortex,
        servers,
        timeout,
        http,
        max_connections,
        routing,
        health_ttl,
        ejection,
        observers=() if taker is None else (taker,),
    )
    grace = cast(object, shutdown_grace)
    if grace is not None and (
        isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0
    ):
        raise ValueError(
            f"shutdown_grace must be a number of seconds >= 0, not {shutdown_grace!r}."
        )
    drain = Drain(shutdown_grace)
    started = int(time.time())
    models = _Models(handle, max_body_size, started)
    routes = [
        Route(
            "/v1/chat/completions",
            _ChatCompletions(handle, max_body_size, started),
            methods=["POST"],
        ),
        Route("/v1/embeddings", _Embeddings(handle, max_body_size, started), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/ready", _Ready(handle, max_body_size, started), methods=["GET"]),
        *native_routes(handle, max_body_size, started, allow_management=allow_management),
    ]
    prometheus = None
    if metrics:
        from ._prom import MetricsRoute, proxy_metrics

        def states() -> list[ServerState]:
            return handle.cortex.server_states()

        prometheus = proxy_metrics(states)
        routes.append(Route("/metrics", MetricsRoute(prometheus, states), methods=["GET"]))
    open_paths = ("/health", "/metrics") if metrics and metrics_open else ("/health",)
    middleware = [
        Middleware(
            Gateway,
            keys=keys,
            origins=origins,
            hosts=hosts,
            body_timeout=body_limit,
            open_paths=open_paths,
        ),
    ]
    if shutdown_grace is not None:
        middleware.append(Middleware(Draining, drain=drain))
    if taker is not None:
        log = log_format if access_log else None
        observe = Middleware(Observe, metrics=prometheus, log_format=log, routes=routes)
        middleware.insert(0, observe)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None]:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_sweep, handle)
                if prometheus is not None and prometheus.multiprocess:
                    # Each worker writes its view of the fleet for the others' scrapes.
                    tg.start_soon(prometheus.keep_fleet_written, states)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
                    if prometheus is not None and prometheus.multiprocess:
                        prometheus.worker_done()
        finally:
            await handle.aclose()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.aicortex = handle
    app.state.aicortex_keys = keys
    return app


_SWEEP_EVERY = 1.0  # seconds between checks for replaced cortexes to close


async def _sweep(handle: CortexHandle) -> None:
    """Close the cortexes that a reconfiguration replaced, once their requests end."""
    while True:
        await anyio.sleep(_SWEEP_EVERY)
        if handle.retiring:
            await handle.sweep()
