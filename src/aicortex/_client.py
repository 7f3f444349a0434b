"""``AsyncCortex``: one client for many Ollama servers."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypedDict, cast, overload

import anyio
import httpx

from ._catalog import Catalog, ModelInfo, ServerEntry, default_catalog
from ._config import (
    DEFAULT_HEALTH_TTL,
    Timeout,
    env_api_key,
    env_host,
    env_model,
    env_servers,
    split_servers,
)
from ._exceptions import (
    Attempt,
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    StreamError,
    ValidationError,
)
from ._health import NOT_PROBED, ServerInfo, plan_attempts, unique
from ._pools import HttpChoice, TransportName, connection_limits, http_choice
from ._protocol import (
    CHAT_PATH,
    Message,
    build_chat_body,
    build_messages,
    classify_status,
    encode_body,
)
from ._router import Router, describe_error, request_timeouts
from ._stream import DEFAULT_MAX_LINE, AsyncStream, StartFailed
from ._urls import is_local_default, normalize_host

__all__ = ["ApiRequest", "AsyncCortex", "whole_answer"]

logger = logging.getLogger("aicortex")

Prompt = str | Sequence[Mapping[str, Any] | Message]

_ERROR_BODY_LIMIT = 64 * 1024


class ApiRequest(TypedDict):
    """The HTTP request aicortex would send for a chat."""

    method: str
    url: str
    path: str
    json: dict[str, Any]


class _Call(NamedTuple):
    """A planned chat: what to send, to which servers, within which limits."""

    body: bytes  # the JSON sent to /api/chat
    model: str
    candidates: list[str]
    timeout: Timeout
    deadline: float | None


class _ModelMissing(Exception):
    pass


def _as_list(servers: Sequence[str] | str | None) -> list[str]:
    if servers is None:
        return []
    if isinstance(servers, str):
        return split_servers(servers)
    return list(servers)


class AsyncCortex:
    """An async client that treats one or many Ollama servers as one.

    ``servers`` are tried in order; when none are given, ``AICORTEX_SERVERS`` is
    read. Unless ``fallback=False``, the catalog's servers for the model and
    then ``OLLAMA_HOST`` (else ``http://127.0.0.1:11434``) follow as further
    candidates. Use it as an async context manager, or call :meth:`aclose`::

        async with AsyncCortex(servers=["http://gpu-box:11434"]) as cortex:
            print(await cortex.chat("Why is the sky blue?", model="llama3.2:3b"))

    Each server gets a pooled ``httpx.AsyncClient``. ``http`` picks its transport
    (else ``AICORTEX_HTTP``): ``"auto"``, the default, uses httpx-aiohttp's on asyncio
    when it is installed and httpx's own otherwise (always on trio); ``"httpx"`` or
    ``"aiohttp"`` force one. ``max_connections`` (default 1,000), or a whole
    ``httpx.Limits`` as ``limits``, bounds the requests in flight to each server;
    a chat past it waits for a free connection within its first-token limit.
    ``max_line_size`` (default 8 MiB) is the longest NDJSON line accepted: a longer
    one fails the answer (before the first token, the next server is tried).
    """

    def __init__(
        self,
        servers: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        timeout: Timeout | None = None,
        health_ttl: float = DEFAULT_HEALTH_TTL,
        fallback: bool = True,
        headers: Mapping[str, str] | None = None,
        catalog: Catalog | None = None,
        http: HttpChoice | None = None,
        limits: httpx.Limits | None = None,
        max_connections: int | None = None,
        max_line_size: int = DEFAULT_MAX_LINE,
    ) -> None:
        configured = _as_list(servers) or env_servers()
        self._servers = unique(normalize_host(s) for s in configured)
        self._model = model
        self._timeout = timeout if timeout is not None else Timeout()
        if not isinstance(self._timeout, Timeout):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("timeout must be an aicortex.Timeout.")
        ttl = cast(object, health_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
            raise ValidationError(
                f"health_ttl must be a number of seconds >= 0, not {health_ttl!r}."
            )
        size = cast(object, max_line_size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValidationError(
                f"max_line_size must be a whole number of bytes >= 1, not {max_line_size!r}."
            )
        self._max_line = max_line_size
        self._fallback = fallback
        self._catalog = catalog
        all_headers = dict(headers or {})
        api_key = env_api_key()
        if api_key and not any(k.lower() == "authorization" for k in all_headers):
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._router = Router(
            timeout=self._timeout,
            health_ttl=float(health_ttl),
            headers=all_headers,
            http=http_choice(http),
            limits=connection_limits(limits, max_connections),
        )

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> AsyncCortex:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection. The client cannot be used afterwards."""
        await self._router.aclose()

    @property
    def servers(self) -> list[str]:
        """The configured servers, normalised, in preference order."""
        return list(self._servers)

    @property
    def timeout(self) -> Timeout:
        """The default timeouts of this client."""
        return self._timeout

    @property
    def http(self) -> HttpChoice:
        """The transport choice: ``"auto"``, ``"httpx"`` or ``"aiohttp"``."""
        return self._router.http

    @property
    def limits(self) -> httpx.Limits:
        """The connection limits of each server's pool."""
        return self._router.limits

    def transport(self) -> TransportName:
        """The transport (``"aiohttp"`` or ``"httpx"``) that a server's pool uses when
        made on the running event loop. A server that the environment routes through a
        proxy always uses httpx's."""
        return self._router.transport()

    @property
    def catalog(self) -> Catalog:
        """The model catalog this client uses."""
        if self._catalog is None:
            self._catalog = default_catalog()
        return self._catalog

    def __repr__(self) -> str:
        return f"<AsyncCortex servers={self._servers!r}>"

    # -- selection -----------------------------------------------------------

    def default_model(self) -> str:
        """``model=`` of the constructor, else ``AICORTEX_MODEL``, else the catalog's default."""
        return self._model or env_model() or self.catalog.default_model()

    def candidates(self, model: str | None = None, server_url: str | None = None) -> list[str]:
        """The servers that would be considered for ``model``, in preference order."""
        if server_url is not None:
            return [normalize_host(server_url)]
        urls = list(self._servers)
        if self._fallback or not urls:
            default = normalize_host(env_host())
            if model is not None:
                info = self.catalog.find(model)
                if info is not None:
                    for entry in info.servers:
                        try:
                            url = normalize_host(entry.url)
                        except ValidationError as exc:
                            logger.warning("Skipping catalog server of %s: %s", model, exc)
                            continue
                        # The catalog's "local Ollama" means this machine's default server.
                        urls.append(default if is_local_default(url) else url)
            urls.append(default)
        return unique(urls)

    # -- chat ----------------------------------------------------------------

    @overload
    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
        timeout: Timeout | None = None,
    ) -> str: ...

    @overload
    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[True],
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
        timeout: Timeout | None = None,
    ) -> AsyncStream: ...

    @overload
    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool,
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
        timeout: Timeout | None = None,
    ) -> str | AsyncStream: ...

    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool = False,
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
        timeout: Timeout | None = None,
    ) -> str | AsyncStream:
        """Send a chat to the best available server.

        Returns the answer's text, or with ``stream=True`` an :class:`AsyncStream`
        that is already connected (its first token has arrived). Failures before
        the first token move on to the next server; see the README for the rules.
        """
        call = self._prepare(
            prompt,
            model=model,
            server_url=server_url,
            system=system,
            options=options,
            format=format,
            tools=tools,
            images=images,
            think=think,
            keep_alive=keep_alive,
            timeout=timeout,
        )
        if stream:
            return await self._open(call, [])
        return (await self._collect(call)).partial_text

    def _prepare(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
        timeout: Timeout | None = None,
    ) -> _Call:
        """Check a chat's arguments and plan it: body, servers to try, limits."""
        self._router.check_open()
        model = model or self.default_model()
        body = build_chat_body(
            model,
            build_messages(prompt, system=system, images=images),
            stream=True,
            options=options,
            format=format,
            tools=tools,
            think=think,
            keep_alive=keep_alive,
        )
        t = timeout if timeout is not None else self._timeout
        if not isinstance(t, Timeout):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("timeout must be an aicortex.Timeout.")
        deadline = None if t.total is None else anyio.current_time() + t.total
        return _Call(encode_body(body), model, self.candidates(model, server_url), t, deadline)

    async def _collect(self, call: _Call) -> AsyncStream:
        """A stream read to its end. Nothing has reached the caller yet, so a stream
        that breaks midway is retried on the next server; when none is left,
        :class:`ServerError` lists every server and why it failed."""
        attempts: list[Attempt] = []
        while True:
            stream = await self._open(call, attempts)
            try:
                await stream.text()
                return stream
            except StreamError as exc:
                cause = exc.__cause__
                if isinstance(cause, CortexTimeoutError) and cause.phase == "total":
                    raise cause from None
                # Nothing reached the caller: the reason, not the advice about partial text.
                attempts.append(Attempt(stream.server, f"broke mid-answer ({exc.reason or exc})"))
            finally:
                await stream.aclose()

    async def _open(self, call: _Call, attempts: list[Attempt]) -> AsyncStream:
        body, model, candidates, t, deadline = call
        tried = {a.server for a in attempts}
        missing_on: list[str] = []
        skipped: list[Attempt] = []
        while True:
            # Only the servers not tried yet decide what to probe: one that failed (or
            # lacked the model) must not stop a slower server's probe from mattering.
            untried = [c for c in candidates if c not in tried]
            with _total_deadline(deadline, t):
                health = await self._router.health(untried, model)
            plan = plan_attempts(untried, health, model)
            skipped = plan.skipped
            if not plan.order:
                break
            url = plan.order[0]
            tried.add(url)
            for skip in skipped:
                if skip.server not in tried and skip.reason != NOT_PROBED:
                    logger.warning("Skipping Ollama server %s: %s", skip.server, skip.reason)
            try:
                return await self._attempt(url, body, model, t, deadline)
            except _ModelMissing:
                missing_on.append(url)
                attempts.append(Attempt(url, f"does not have model {model!r}"))
            except _AttemptError as exc:
                self._router.mark_down(url, exc.reason)
                attempts.append(Attempt(url, exc.reason))
            except _LocalWait as exc:
                attempts.append(Attempt(url, exc.reason))
        if missing_on:
            live: list[str] = []
            for url in missing_on:
                entry = self._router.cache.get(url, self._router.now())
                if entry is not None:
                    live.extend(entry.models)
            raise ModelNotFoundError(
                model, self.catalog.suggestions(model, extra=unique(live)), servers=missing_on
            )
        attempts.extend(s for s in skipped if s.server not in {a.server for a in attempts})
        raise ServerError(
            f"No Ollama server could serve model {model!r}. Start Ollama on one of them, "
            "or pass servers=[...] / set AICORTEX_SERVERS.",
            attempts,
        )

    async def _attempt(
        self,
        url: str,
        body: bytes,
        model: str,
        t: Timeout,
        deadline: float | None,
    ) -> AsyncStream:
        now = anyio.current_time()
        limit = t.first_token
        total_binds = False  # whether the caller's total limit comes before first_token's
        if deadline is not None:
            remaining = max(deadline - now, 0.0)
            total_binds = limit is None or remaining <= limit
            limit = remaining if total_binds else limit
        router = self._router
        pool = router.pool(url)
        kind = pool.transport
        timeouts = request_timeouts(t, kind)
        # The idle limit the stream must watch itself: none where the transport's read
        # timeout is it (httpx's is switched to it below; aiohttp's stays as it starts).
        watch_idle = None if kind == "httpx" or timeouts["read"] == t.idle else t.idle
        request = router.chat_request(url, body, timeouts)
        slots = pool.slots
        holding = waiting = False
        response: httpx.Response | None = None
        stream: AsyncStream | None = None
        # One limit for the first token, from here: a free slot, connecting, the
        # response head and the first chunk all count.
        with anyio.CancelScope(deadline=math.inf if limit is None else now + limit):
            try:
                if slots is not None:
                    try:
                        slots.acquire_nowait()
                    except anyio.WouldBlock:
                        waiting = True
                        await slots.acquire()
                        waiting = False
                    holding = True
                response = await pool.client.send(request, stream=True)
                if response.status_code != 200:
                    raise self._status_error(response, await _read_capped(response))
                # Once the server answers, the idle limit applies between chunks.
                timeouts["read"] = t.idle
                stream = AsyncStream(
                    response,
                    model=model,
                    server=url,
                    deadline=deadline,
                    total=t.total,
                    idle=watch_idle,
                    on_failure=router.mark_down,
                    on_release=None if slots is None else slots.release,
                    max_line=self._max_line,
                )
                holding = False  # from now on the stream gives the slot back
                await stream._prime()  # pyright: ignore[reportPrivateUsage]
                opened, stream, response = stream, None, None
                return opened
            except StartFailed as exc:
                if not exc.deadline:
                    raise _AttemptError(exc.reason) from None
            except httpx.HTTPError as exc:
                raise _AttemptError(describe_error(exc, t)) from None
            finally:
                if stream is not None:
                    await stream.aclose()
                else:
                    await _close(response)
                if holding and slots is not None:
                    slots.release()
        # The first token did not come in time.
        if total_binds:
            raise CortexTimeoutError("total", t.total or 0.0, server=url)
        if waiting:
            raise _LocalWait(
                f"no free connection within {limit:g}s: {pool.limit} requests to it were "
                "already in flight (raise max_connections to allow more)"
            )
        raise _AttemptError(f"no first token within {limit:g}s")

    def _status_error(self, response: httpx.Response, body: bytes) -> Exception:
        failure = classify_status(
            response.status_code, body, response.headers.get("content-type", "")
        )
        if failure.kind == "invalid":
            return ValidationError(f"Ollama rejected the request: {failure.message}")
        if failure.kind == "model_missing":
            return _ModelMissing(failure.message)
        return _AttemptError(failure.message)

    # -- live information ----------------------------------------------------

    async def probe_servers(
        self, model: str | None = None, *, server_url: str | None = None
    ) -> list[ServerInfo]:
        """Probe every candidate server for ``model`` now, concurrently."""
        self._router.check_open()
        candidates = self.candidates(model, server_url)
        health = await self._router.health(candidates, model, fresh=True)
        return [ServerInfo.from_health(health[url], model) for url in candidates if url in health]

    async def server_info(
        self, model: str | None = None, server_url: str | None = None
    ) -> ServerInfo:
        """Live facts about the server that would serve ``model`` (or about ``server_url``).

        Probes now: reachable, latency, version, and whether the model is present.
        When no server is up, describes the first candidate (``up=False``, ``error``).
        """
        infos = await self.probe_servers(model, server_url=server_url)
        for info in infos:
            if info.up and (model is None or info.has_model):
                return info
        for info in infos:
            if info.up:
                return info
        return infos[0]

    # -- offline helpers -----------------------------------------------------

    def build_api_request(
        self,
        model: str,
        prompt: Prompt,
        *,
        stream: bool = True,
        server_url: str | None = None,
        system: str | None = None,
        options: Mapping[str, Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        images: Sequence[str | bytes | PathLike[str]] | None = None,
        think: bool | Literal["low", "medium", "high", "max"] | None = None,
        keep_alive: float | str | None = None,
    ) -> ApiRequest:
        """The request a chat would send to its first candidate server, without sending it.

        aicortex itself always streams from Ollama (``"stream": true``) and joins
        the chunks for non-streamed calls; pass ``stream=False`` to get a body for
        a one-shot JSON answer instead.
        """
        body = build_chat_body(
            model,
            build_messages(prompt, system=system, images=images),
            stream=stream,
            options=options,
            format=format,
            tools=tools,
            think=think,
            keep_alive=keep_alive,
        )
        url = self.candidates(model, server_url)[0]
        return ApiRequest(method="POST", url=url + CHAT_PATH, path=CHAT_PATH, json=body)

    def families(self) -> list[str]:
        """Model families in the catalog."""
        return self.catalog.families()

    def models(self, family: str | None = None) -> list[str]:
        """Model names in the catalog, optionally of one family."""
        return self.catalog.models(family)

    def model_info(self, model: str) -> ModelInfo:
        """Catalog facts about ``model``; raises :class:`ModelNotFoundError` with suggestions."""
        return self.catalog.model_info(model)

    def model_servers(self, model: str) -> list[ServerEntry]:
        """The servers the catalog lists for ``model``."""
        return self.catalog.model_servers(model)

    def llm_params(self, model: str) -> dict[str, int | float]:
        """The catalog's default generation parameters for ``model``."""
        return self.catalog.llm_params(model)

    def random_llm_params(self, model: str, seed: int | None = None) -> dict[str, int | float]:
        """Generation parameters drawn within the catalog's ranges; same seed, same result."""
        return self.catalog.random_llm_params(model, seed=seed)


async def whole_answer(
    cortex: AsyncCortex,
    prompt: Prompt,
    *,
    model: str | None = None,
    options: Mapping[str, Any] | None = None,
    format: str | Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    think: bool | Literal["low", "medium", "high", "max"] | None = None,
    keep_alive: float | str | None = None,
) -> AsyncStream:
    """A chat's whole answer as a finished :class:`AsyncStream`: its text, thinking,
    tool calls and stats, with the same retries as ``chat()`` without streaming."""
    call = cortex._prepare(  # pyright: ignore[reportPrivateUsage]
        prompt,
        model=model,
        options=options,
        format=format,
        tools=tools,
        think=think,
        keep_alive=keep_alive,
    )
    return await cortex._collect(call)  # pyright: ignore[reportPrivateUsage]


class _LocalWait(Exception):
    """Every local connection slot of a server stayed busy: nothing against the server."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _AttemptError(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _total_deadline:
    """Turn an expired total deadline into :class:`CortexTimeoutError`."""

    def __init__(self, deadline: float | None, t: Timeout) -> None:
        self._deadline = deadline
        self._t = t
        self._scope: anyio.CancelScope | None = None

    def __enter__(self) -> None:
        if self._deadline is not None:
            self._scope = anyio.CancelScope(deadline=self._deadline)
            self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._scope is None:
            return
        self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught:
            raise CortexTimeoutError("total", self._t.total or 0.0)


async def _read_capped(response: httpx.Response) -> bytes:
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= _ERROR_BODY_LIMIT:
            break
    return data


async def _close(response: httpx.Response | None) -> None:
    if response is not None:
        with anyio.CancelScope(shield=True):
            await response.aclose()
