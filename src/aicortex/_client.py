"""``AsyncCortex``: one client for many Ollama servers."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict, TypeVar, cast, overload

import anyio
import httpx
from pydantic_core import from_json

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
from ._embed import Batch, EmbedResult, assemble, split_batches
from ._events import Stats
from ._exceptions import (
    Attempt,
    AttemptKind,
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    StreamError,
    ValidationError,
)
from ._health import Health, ServerInfo, unique
from ._metrics import Kind, Meter, Observer, Observers, RequestRecord, outcome_of
from ._openai import CHAT_PATH as OPENAI_CHAT
from ._openai import EMBEDDINGS_PATH as OPENAI_EMBEDDINGS
from ._openai import SSETranslator
from ._openai import chat_body as openai_chat_body
from ._openai import classify_status as openai_status
from ._openai import embeddings_body as openai_embeddings_body
from ._openai import embeddings_of as openai_embeddings_of
from ._openai import generate_body as openai_generate_body
from ._pools import HttpChoice, TransportName, connection_limits, http_choice
from ._protocol import (
    CHAT_PATH,
    EMBED_PATH,
    GENERATE_PATH,
    Message,
    build_chat_body,
    build_embed_body,
    build_generate_body,
    build_messages,
    classify_status,
    embed_inputs,
    embeddings_of,
    encode_body,
    error_text,
    model_key,
)
from ._pull import PullStream
from ._router import Lease, Router, describe_error, read_capped, request_timeouts
from ._routing import (
    DOWN,
    FULL,
    MODEL,
    UNLISTED,
    Ejection,
    FailureKind,
    Fleet,
    Server,
    ServerState,
    Strategy,
    routing_choice,
)
from ._stream import DEFAULT_MAX_LINE, AsyncStream, StartFailed
from ._urls import is_local_default, normalize_host
from ._urls import server_url as _server_url

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ApiRequest",
    "AsyncCortex",
    "ChatArgs",
    "GenerateArgs",
    "RequestArgs",
    "collect_call",
    "native_call",
    "open_call",
    "router_of",
    "whole_answer",
]

logger = logging.getLogger("aicortex")

Prompt = str | Sequence[Mapping[str, Any] | Message]


class RequestArgs(TypedDict, total=False):
    """The keyword arguments of a chat request, besides ``model`` and ``stream``; each
    may be left out (or None).

    ``server_url`` sends it to that server only. The others are Ollama's own:
    ``system`` (a system message put first), ``options`` (model options such as
    ``temperature`` or ``num_ctx``), ``format`` (``"json"`` or a JSON schema),
    ``tools``, ``images`` (paths, bytes or base64, added to the last user message),
    ``think`` and ``keep_alive``.
    """

    server_url: str | Server | None
    system: str | None
    options: Mapping[str, Any] | None
    format: str | Mapping[str, Any] | None
    tools: Sequence[Mapping[str, Any]] | None
    images: Sequence[str | bytes | PathLike[str]] | None
    think: bool | Literal["low", "medium", "high", "max"] | None
    keep_alive: float | str | None


class ChatArgs(RequestArgs, total=False):
    """:class:`RequestArgs` plus ``timeout`` (a :class:`Timeout` for this call
    only) and ``affinity`` (a key, such as a conversation id, that sends every
    chat with it to the same healthy server, so that it can reuse its prompt cache).
    """

    timeout: Timeout | None
    affinity: str | None


class GenerateArgs(TypedDict, total=False):
    """The keyword arguments of :meth:`AsyncCortex.generate`, besides ``model`` and
    ``stream``; each may be left out (or None).

    ``server_url``, ``timeout`` and ``affinity`` are as for :class:`ChatArgs`. The others
    are Ollama's ``/api/generate`` fields: ``suffix`` (the text after the gap, to fill
    in the middle), ``raw`` (send the prompt without the model's template), ``images``,
    ``system``, ``template`` (instead of the model's), ``context`` (an earlier answer's
    ``context``, from its END event's ``raw``), ``options``, ``format``, ``think`` and
    ``keep_alive``.
    """

    server_url: str | Server | None
    suffix: str | None
    raw: bool | None
    images: Sequence[str | bytes | PathLike[str]] | None
    system: str | None
    template: str | None
    context: Sequence[int] | None
    options: Mapping[str, Any] | None
    format: str | Mapping[str, Any] | None
    think: bool | Literal["low", "medium", "high", "max"] | None
    keep_alive: float | str | None
    timeout: Timeout | None
    affinity: str | None


CHAT_ARGS = ChatArgs.__optional_keys__
GENERATE_ARGS = GenerateArgs.__optional_keys__
REQUEST_ARGS = RequestArgs.__optional_keys__
DEFAULT_BATCH_SIZE = 64
_PER_SERVER = 4  # embedding batches in flight per candidate server, by default
_KINDS: dict[str, Kind] = {CHAT_PATH: "chat", GENERATE_PATH: "generate", EMBED_PATH: "embed"}
_T = TypeVar("_T")


def check_args(func: str, args: Mapping[str, object], allowed: frozenset[str]) -> None:
    """What Python says of an unknown keyword argument, for ``**args`` signatures."""
    for name in args:
        if name not in allowed:
            raise TypeError(f"{func}() got an unexpected keyword argument {name!r}")


def _body(model: str, prompt: Prompt, stream: bool, args: RequestArgs) -> dict[str, Any]:
    """The ``/api/chat`` body for ``prompt`` and ``args``."""
    messages = build_messages(prompt, system=args.get("system"), images=args.get("images"))
    return build_chat_body(
        model,
        messages,
        stream=stream,
        options=args.get("options"),
        format=args.get("format"),
        tools=args.get("tools"),
        think=args.get("think"),
        keep_alive=args.get("keep_alive"),
    )


_EMBED_BODY_LIMIT = 512 * 1024 * 1024  # a batch of long vectors as JSON; past it, an error
# How a Python caller names its servers; the command line says it its own way.
NO_SERVER_ADVICE = "servers=[...] or AICORTEX_SERVERS"


class ApiRequest(TypedDict):
    """The HTTP request aicortex would send for a chat."""

    method: str
    url: str
    path: str
    json: dict[str, Any]


class _Call(NamedTuple):
    """A planned request: what to send, to which servers, within which limits."""

    body: bytes  # the JSON sent to an Ollama server's `path`
    request: dict[str, Any]  # the same, as a dict (OpenAI-style servers get it translated)
    model: str
    candidates: list[str]
    timeout: Timeout
    deadline: float | None
    affinity: str | None
    explicit: bool  # the caller named the server (server_url=)
    path: str = CHAT_PATH  # /api/chat, /api/generate or /api/embed


ServerSpec = str | Server


def _as_servers(servers: Sequence[ServerSpec] | str | None) -> list[Server]:
    """``servers=`` (else ``AICORTEX_SERVERS``) as :class:`Server` entries with
    normalised URLs, without repeats."""
    if isinstance(servers, str) and not servers.strip():
        raise ValidationError(
            "servers='' names no server. Give URLs like 'http://127.0.0.1:11434', or leave "
            "servers out to use AICORTEX_SERVERS, OLLAMA_HOST or the local default."
        )
    items = split_servers(servers) if isinstance(servers, str) else list(servers or ())
    found: dict[str, Server] = {}
    for item in items or env_servers():
        if isinstance(item, str):
            api, _, rest = item.strip().partition("+")
            shorthand = rest and api in ("ollama", "openai")  # openai+http://host:8000
            item = Server(rest, api=api) if shorthand else Server(item)  # type: ignore[arg-type]
        if isinstance(item, Server):  # pyright: ignore[reportUnnecessaryIsInstance]
            url = _server_url(item.url)
            if item.api != "ollama" and url.endswith("/v1"):
                url = url[: -len("/v1")]  # OpenAI clients' base URL: the server's root
            server = item if url == item.url else dataclasses.replace(item, url=url)
        else:
            raise ValidationError(
                f"servers must hold URL strings or aicortex.Server, not {item!r}."
            )
        found.setdefault(server.url, server)
    return list(found.values())


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
    ``observers`` are told how each request went, once it ended (see :class:`Observer`).
    ``ejection`` (an :class:`Ejection`) says when a failing server or model is taken
    out of the rotation and for how long (default: after 3 failures in a row, for 1 s
    doubling up to 30 s).
    """

    def __init__(
        self,
        servers: Sequence[ServerSpec] | str | None = None,
        *,
        model: str | None = None,
        routing: Strategy | None = None,
        timeout: Timeout | None = None,
        health_ttl: float = DEFAULT_HEALTH_TTL,
        fallback: bool = True,
        headers: Mapping[str, str] | None = None,
        catalog: Catalog | None = None,
        http: HttpChoice | None = None,
        limits: httpx.Limits | None = None,
        max_connections: int | None = None,
        max_line_size: int = DEFAULT_MAX_LINE,
        observers: Iterable[Observer] = (),
        ejection: Ejection | None = None,
    ) -> None:
        configured = _as_servers(servers)
        if ejection is not None and not isinstance(ejection, Ejection):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("ejection must be an aicortex.Ejection.")
        self._servers = [s.url for s in configured]
        self._routing: Strategy = routing_choice(routing)
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
            servers=configured,
            ejection=ejection,
        )
        self._observers: tuple[Observer, ...] = ()
        self._observer: Observers | None = None  # None: nobody to tell, nothing recorded
        for observer in observers:
            self.add_observer(observer)

    @classmethod
    def from_config(cls, path: str | PathLike[str] | None = None, **arguments: Any) -> AsyncCortex:
        """A client configured by the TOML file at ``path`` (else ``AICORTEX_CONFIG``, else
        ``./aicortex.toml``, else the user's config folder; none is fine) and by the
        ``AICORTEX_*`` variables, which win over the file. ``arguments`` are this class's
        own and win over both::

            cortex = AsyncCortex.from_config()  # [[servers]], [routing], [timeouts], ...
            cortex = AsyncCortex.from_config("fleet.toml", routing="round_robin")

        An invalid file raises :class:`ValidationError` naming the file, the key and
        what is wrong.
        """
        from ._settings import load_settings

        options = load_settings(path).settings.cortex_arguments()
        options.update(arguments)
        return cls(**options)

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
    def routing(self) -> Strategy:
        """How servers are chosen: ``"priority"``, ``"least_busy"`` or ``"round_robin"``."""
        return self._routing

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

    # -- observers -----------------------------------------------------------

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The observers told about each finished request, in the order they were added."""
        return self._observers

    def add_observer(self, observer: Observer) -> None:
        """Tell ``observer`` about every request that starts from now on, once it ends
        (:meth:`Observer.request_finished`). Adding one twice changes nothing."""
        if not callable(getattr(observer, "request_finished", None)):
            raise ValidationError(
                f"An observer needs a request_finished(record) method, which {observer!r} lacks."
            )
        if observer not in self._observers:
            self._set_observers((*self._observers, observer))

    def remove_observer(self, observer: Observer) -> None:
        """Stop telling ``observer`` (requests already under way still do)."""
        self._set_observers(tuple(o for o in self._observers if o is not observer))

    def _set_observers(self, observers: tuple[Observer, ...]) -> None:
        self._observers = observers
        self._observer = Observers(observers) if observers else None

    # -- selection -----------------------------------------------------------

    def default_model(self) -> str:
        """``model=`` of the constructor, else ``AICORTEX_MODEL``, else the catalog's default."""
        return self._model or env_model() or self.catalog.default_model()

    def candidates(
        self, model: str | None = None, server_url: str | Server | None = None
    ) -> list[str]:
        """The servers that would be considered for ``model``, in preference order."""
        if isinstance(server_url, Server):
            [server] = _as_servers([server_url])
            self._router.fleet.configure(server)
            return [server.url]
        if server_url is not None:
            return [_server_url(server_url)]
        urls = list(self._servers)
        if self._fallback or not urls:
            default = normalize_host(env_host())
            if model is not None:
                info = self.catalog.find(model)
                if info is not None:
                    for entry in info.servers:
                        try:
                            url = _server_url(entry.url)
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
        **args: Unpack[ChatArgs],
    ) -> str: ...

    @overload
    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[True],
        **args: Unpack[ChatArgs],
    ) -> AsyncStream: ...

    @overload
    async def chat(
        self, prompt: Prompt, *, model: str | None = None, stream: bool, **args: Unpack[ChatArgs]
    ) -> str | AsyncStream: ...

    async def chat(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool = False,
        **args: Unpack[ChatArgs],
    ) -> str | AsyncStream:
        """Send a chat to the best available server.

        Returns the answer's text, or with ``stream=True`` an :class:`AsyncStream`
        that is already connected (its first token has arrived). Failures before
        the first token move on to the next server; see the documentation's
        "Routing and failover" page for the rules.
        The other keyword arguments are :class:`ChatArgs`.
        """
        check_args("chat", args, CHAT_ARGS)
        call = self._prepare(prompt, model, args)
        if stream:
            return await self._stream(call)
        return (await self._collect(call)).partial_text

    # -- generate ------------------------------------------------------------

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        **args: Unpack[GenerateArgs],
    ) -> str: ...

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: Literal[True],
        **args: Unpack[GenerateArgs],
    ) -> AsyncStream: ...

    @overload
    async def generate(
        self, prompt: str, *, model: str | None = None, stream: bool, **args: Unpack[GenerateArgs]
    ) -> str | AsyncStream: ...

    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        stream: bool = False,
        **args: Unpack[GenerateArgs],
    ) -> str | AsyncStream:
        """Complete ``prompt`` with Ollama's ``/api/generate``: no chat messages, and
        ``suffix``, ``raw``, ``template`` and ``context`` available (see
        :class:`GenerateArgs`).

        Returns the text, or with ``stream=True`` an :class:`AsyncStream`, with the
        same routing, failover and events as :meth:`chat`. On an OpenAI-style server a
        plain prompt is sent as a one-message chat, and a ``raw`` one (or one with a
        ``suffix``) to ``/v1/completions``.
        """
        check_args("generate", args, GENERATE_ARGS)
        self._router.check_open()
        model = model or self.default_model()
        body = build_generate_body(
            model,
            prompt,
            suffix=args.get("suffix"),
            raw=args.get("raw"),
            images=args.get("images"),
            system=args.get("system"),
            template=args.get("template"),
            context=args.get("context"),
            options=args.get("options"),
            format=args.get("format"),
            think=args.get("think"),
            keep_alive=args.get("keep_alive"),
        )
        call = self._plan(body, model, args, GENERATE_PATH)
        if stream:
            return await self._stream(call)
        return (await self._collect(call)).partial_text

    # -- embed ---------------------------------------------------------------

    async def embed(
        self,
        input: str | Sequence[str],
        *,
        model: str | None = None,
        truncate: bool | None = None,
        dimensions: int | None = None,
        keep_alive: float | str | None = None,
        server_url: str | Server | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: Timeout | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int | None = None,
    ) -> EmbedResult:
        """Embed one text or a list of texts; the vectors come back in input order.

        A list longer than ``batch_size`` (64) is sent in batches, at most
        ``concurrency`` at once (default: 4 per candidate server), each routed like a
        chat: the routing strategy spreads the batches over the healthy servers that
        have the model (``least_busy`` or ``round_robin`` use them all; ``priority``
        keeps to the first), and a batch that fails is sent again to another server.
        When a batch cannot be served anywhere the whole call fails with that error.

        ``truncate`` (Ollama's default: true) cuts each text to the model's context;
        ``dimensions`` shortens the vectors; ``keep_alive`` and ``options`` are as for
        chats. OpenAI-style servers are asked at ``/v1/embeddings`` (``truncate``,
        ``keep_alive`` and ``options`` have no field there).
        """
        self._router.check_open()
        texts = embed_inputs(input)
        model = model or self.default_model()
        # Checked once for the whole call; each batch gets its own inputs.
        body = build_embed_body(
            model,
            [],
            truncate=truncate,
            dimensions=dimensions,
            keep_alive=keep_alive,
            options=options,
        )
        batches = split_batches(texts, batch_size)
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise ValidationError(f"concurrency must be a whole number >= 1, not {concurrency!r}.")
        call = self._plan(body, model, {"server_url": server_url, "timeout": timeout}, EMBED_PATH)
        if not batches:
            return EmbedResult([], model, (), 0)
        limit = concurrency or _PER_SERVER * len(call.candidates)
        done: list[Batch] = []
        failure: list[BaseException] = []
        slots = anyio.Semaphore(limit)
        attempts: list[Attempt] = []  # of every batch
        started = time.perf_counter()

        async def run(start: int, part: list[str]) -> None:
            async with slots:
                tried: list[Attempt] = []
                try:
                    sent = _Batch(start, part)
                    done.append(await self._route(call, tried, sent.attempt(self)))
                except Exception as exc:  # the first failure ends the call, raised below
                    if not failure:
                        failure.append(exc)
                    tg.cancel_scope.cancel()
                finally:
                    attempts.extend(tried)

        try:
            with _total_deadline(call.deadline, call.timeout):
                async with anyio.create_task_group() as tg:
                    for start, part in batches:
                        tg.start_soon(run, start, part)
            if failure:
                raise failure[0]
            result = assemble(model, done, len(texts))
        except BaseException as exc:
            self._finished(call, started, exc, attempts=attempts)
            raise
        if self._observer is not None:
            stats = Stats(prompt_tokens=result.prompt_tokens, load_duration=result.load_duration)
            server = ", ".join(result.servers)
            self._finished(call, started, None, server=server, stats=stats, attempts=attempts)
        return result

    async def _embed_attempt(self, url: str, call: _Call, start: int, texts: list[str]) -> Batch:
        """Embed one batch on ``url``; raises :class:`_Failed` as a chat attempt does."""
        model, t = call.model, call.timeout
        router = self._router
        pool = router.pool(url)
        node = router.fleet.node(url)
        openai = node.kind == "openai"
        request = call.request
        if openai:
            here = node.names_here.get(model_key(model), model)
            body = openai_embeddings_body(here, texts, dimensions=request.get("dimensions"))
            path = OPENAI_EMBEDDINGS
        else:
            body = {**request, "input": texts}
            path = EMBED_PATH
        timeouts = request_timeouts(t, "httpx")  # one JSON answer: the first-token limit reads it
        content = encode_body(body)
        limit = t.first_token
        if call.deadline is not None:
            remaining = max(call.deadline - anyio.current_time(), 0.0)
            limit = remaining if limit is None else min(limit, remaining)
        slots = pool.slots
        lease: Lease | None = None
        holding = False
        with anyio.move_on_after(math.inf if limit is None else limit):
            try:
                if slots is not None:
                    try:
                        # Without a pause when a slot is free, so that the lease below
                        # counts this batch before the next one is routed.
                        slots.acquire_nowait()
                    except anyio.WouldBlock:
                        await slots.acquire()
                    holding = True
                lease = router.lease(url, model, slots)
                holding = False
                response = await pool.client.send(
                    router.chat_request(url, content, timeouts, path), stream=True
                )
                try:
                    data = await read_capped(response, _EMBED_BODY_LIMIT)
                finally:
                    await _close(response)
                if response.status_code != 200:
                    if response.status_code == 501:  # llama.cpp started without --embeddings
                        raise _Failed("failed", f"cannot embed here: {error_text(data)}", None)
                    raise self._status_error(response, data, url, model, openai)
                try:
                    parsed: object = from_json(data)
                    if openai:
                        vectors, tokens = openai_embeddings_of(parsed, len(texts))
                        stats = Stats(prompt_tokens=tokens)
                    else:
                        vectors, stats = embeddings_of(parsed, len(texts))
                except ValueError as exc:
                    raise _Failed("failed", f"answered {path} wrongly: {exc}") from None
                lease.answered()
                lease.release(completed=True)
                return Batch(start, vectors, url, stats)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _Failed("unreachable", describe_error(exc, t), "unreachable") from None
            except httpx.HTTPError as exc:
                reason = describe_error(exc, t)
                if _hung_up(exc):
                    raise _Failed("unreachable", reason, "model") from None
                raise _Failed("failed", reason, "model") from None
            finally:
                if lease is not None:
                    lease.release()
                if holding and slots is not None:
                    slots.release()
        raise _Failed("failed", f"no answer within {limit:g}s", "model")

    def _prepare(self, prompt: Prompt, model: str | None, args: ChatArgs) -> _Call:
        """Check a chat's arguments and plan it: body, servers to try, limits."""
        self._router.check_open()
        model = model or self.default_model()
        return self._plan(_body(model, prompt, True, args), model, args, CHAT_PATH)

    def _plan(self, body: dict[str, Any], model: str, args: Mapping[str, Any], path: str) -> _Call:
        """Plan a request whose ``body`` is built: servers to try, limits."""
        timeout = args.get("timeout")
        t = timeout if timeout is not None else self._timeout
        if not isinstance(t, Timeout):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError("timeout must be an aicortex.Timeout.")
        deadline = None if t.total is None else anyio.current_time() + t.total
        affinity = args.get("affinity")
        if affinity is not None and not isinstance(affinity, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"affinity must be a string, not {affinity!r}.")
        candidates = self.candidates(model, args.get("server_url"))
        explicit = args.get("server_url") is not None
        return _Call(
            encode_body(body) if path != EMBED_PATH else b"",
            body,
            model,
            candidates,
            t,
            deadline,
            affinity or None,
            explicit,
            path,
        )

    async def _collect(self, call: _Call) -> AsyncStream:
        """A stream read to its end. Nothing has reached the caller yet, so a stream
        that breaks midway is retried on the next server; when none is left,
        :class:`ServerError` lists every server and why it failed."""
        attempts: list[Attempt] = []
        started = time.perf_counter()
        first: float | None = None
        try:
            while True:
                stream = await self._open(call, attempts)
                first = time.perf_counter() - started
                try:
                    await stream.text()
                    break
                except StreamError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, CortexTimeoutError) and cause.phase == "total":
                        raise cause from None
                    # Nothing reached the caller: the reason, not the advice about partial text.
                    attempts.append(
                        Attempt(stream.server, f"broke mid-answer ({exc.reason or exc})", "failed")
                    )
                finally:
                    await stream.aclose()
        except BaseException as exc:
            self._finished(call, started, exc, attempts=attempts)
            raise
        self._finished(
            call,
            started,
            None,
            server=stream.server,
            first_token=first,
            stats=stream.stats,
            attempts=attempts,
        )
        return stream

    async def _open(self, call: _Call, attempts: list[Attempt]) -> AsyncStream:
        """Route the chat and start it on the first server that answers."""
        return await self._route(call, attempts, self._attempt)

    async def _stream(self, call: _Call) -> AsyncStream:
        """Start a streamed request for the caller; its record (if anyone is told) is
        made when the stream is released."""
        observer = self._observer
        if observer is None:
            return await self._open(call, [])
        attempts: list[Attempt] = []
        started = time.perf_counter()
        try:
            stream = await self._open(call, attempts)
        except BaseException as exc:
            self._finished(call, started, exc, attempts=attempts)
            raise
        first = time.perf_counter() - started
        meter = Meter(observer, _KINDS[call.path], call.model, started, first, attempts)
        stream._meter = meter  # pyright: ignore[reportPrivateUsage]
        return stream

    def _finished(
        self,
        call: _Call,
        started: float,
        exc: BaseException | None,
        *,
        server: str = "",
        first_token: float | None = None,
        stats: Stats | None = None,
        attempts: Sequence[Attempt] = (),
    ) -> None:
        """Tell the observers that ``call`` ended: well, or with ``exc``."""
        observer = self._observer
        if observer is None:
            return
        outcome = "ok" if exc is None else outcome_of(exc, anyio.get_cancelled_exc_class())
        record = RequestRecord(
            _KINDS[call.path],
            call.model,
            server,
            outcome,
            time.perf_counter() - started,
            first_token,
            stats,
            tuple(attempts),
        )
        observer.request_finished(record)

    async def _route(
        self,
        call: _Call,
        attempts: list[Attempt],
        attempt: Callable[[str, _Call], Awaitable[_T]],
    ) -> _T:
        """Route ``call``: ``attempt`` it on the best server, then on the next while
        attempts fail; raises :class:`ModelNotFoundError` or :class:`ServerError` when
        no server is left."""
        _, _, model, candidates, t, deadline, affinity, explicit, _ = call
        router = self._router
        fleet = router.fleet
        key = model_key(model)
        strategy = self._routing
        spread = strategy != "priority" or affinity is not None
        # Servers out of the running for this request: tried, or found down by a probe.
        out = {a.server for a in attempts if a.kind != "busy"}
        forced: set[str] = set()  # servers probed despite their state (nothing else left)
        missing_on: list[str] = []
        busy_until = _busy_limit(t, deadline)
        while True:
            untried = [c for c in candidates if c not in out]
            if not untried:
                break
            with _total_deadline(deadline, t):
                found = await router.refresh(untried, key, strategy, spread=spread)
            _note_down(found, attempts, out)
            untried = [c for c in untried if c not in out]
            now = router.now()
            url = fleet.pick(untried, key, now, strategy, affinity, explicit=explicit)
            if url is None and untried:
                # Every candidate left is held back: see what can still be done.
                with _total_deadline(deadline, t):
                    step = await self._when_held(
                        untried, call, strategy, attempts, out, forced, busy_until
                    )
                if step is True:
                    continue
                url = step
            if url is None:
                break
            try:
                return await attempt(url, call)
            except _Failed as exc:
                if exc.kind != "busy":
                    out.add(url)
                kind = exc.kind
                if kind == "local":  # nothing against the server
                    kind = "busy"
                elif kind == "model_missing":
                    missing_on.append(url)
                elif exc.record is not None:
                    router.failed(url, exc.record, exc.reason, key, model)
                attempts.append(Attempt(url, exc.reason, kind))
        missing_on += [a.server for a in attempts if a.kind == "model_missing"]
        missing_on = unique(missing_on)
        if missing_on:
            live: list[str] = []
            for url in missing_on:
                live.extend(fleet.node(url).models)
            hint = None
            if all(fleet.node(url).kind == "openai" for url in missing_on):
                hint = (
                    "Load it on the server, or map this name to a model the server lists "
                    "with Server(models={...})."
                )
            near, not_pulled = self.catalog.suggestions_for_servers(model, live)
            raise ModelNotFoundError(
                model, near, servers=missing_on, hint=hint, not_pulled=not_pulled
            )
        ollama_only = all(fleet.node(url).kind != "openai" for url in candidates)
        raise _server_error(model, _last_per_server(attempts, candidates), ollama_only)

    async def _when_held(
        self,
        untried: list[str],
        call: _Call,
        strategy: Strategy,
        attempts: list[Attempt],
        out: set[str],
        forced: set[str],
        busy_until: float,
    ) -> str | Literal[True] | None:
        """Every candidate left is held back. Never refuse from memory alone: probe the
        ejected servers now (soonest to recover first) and try one that answers; wait
        for busy or full ones within ``busy_until``. A model ejected on a server that
        works fails fast, with the reason. Returns a server to try, True to route
        again, or None when nothing is left."""
        router = self._router
        fleet = router.fleet
        now = router.now()
        key = model_key(call.model)
        holds = sorted(
            ((u, *fleet.hold(u, key, now, explicit=call.explicit)) for u in untried),
            key=lambda h: h[2],
        )
        down = [u for u, why, _ in holds if why == DOWN and u not in forced]
        if down:
            forced.update(down)
            found = await router.refresh(down, key, strategy, spread=True, force=True)
            _note_down(found, attempts, out)
            return True
        for u, why, until in holds:
            if why == UNLISTED:
                out.add(u)
                attempts.append(Attempt(u, f"does not list model {call.model!r}", "model_missing"))
            elif why == MODEL:
                out.add(u)
                attempts.append(Attempt(u, _pair_reason(fleet, u, key, until, now), "ejected"))
            elif why == DOWN and u not in out:
                return u  # it answered the probe just now
        waiting = [(u, why, until) for u, why, until in holds if u not in out]
        if not waiting:
            return None
        soonest = min(until for _, _, until in waiting)
        wait = max(soonest - now, 0.005) * random.uniform(1.0, 1.25)
        if now + wait > busy_until:
            _note_held(waiting, fleet, attempts, out)
            return None
        await anyio.sleep(wait)
        return True

    async def _attempt(self, url: str, call: _Call) -> AsyncStream:
        model, t, deadline = call.model, call.timeout, call.deadline
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
        node = router.fleet.node(url)
        sse: SSETranslator | None = None
        if node.kind == "openai":
            # This server's own name for the model, and OpenAI's request and stream shapes.
            here = node.names_here.get(model_key(model), model)
            if call.path == GENERATE_PATH:
                path, body = openai_generate_body(here, call.request)
                content = encode_body(body)
            else:
                path, content = OPENAI_CHAT, _openai_body(call.request, here)
            request = router.chat_request(url, content, timeouts, path)
            sse = SSETranslator(model)
        else:
            request = router.chat_request(url, call.body, timeouts, call.path)
        slots = pool.slots
        holding = waiting = False
        response: httpx.Response | None = None
        stream: AsyncStream | None = None
        lease: Lease | None = None
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
                lease = router.lease(url, model, slots)
                holding = False  # from now on the lease gives the slot back
                try:
                    response = await pool.client.send(request, stream=True)
                except httpx.TransportError as exc:
                    if not _hung_up(exc):
                        raise
                    # A kept-alive connection that the server closed just as it was
                    # reused (aiohttp does not retry): once more, on another connection.
                    response = await pool.client.send(request, stream=True)
                if response.status_code != 200:
                    error_body = await read_capped(response)
                    raise self._status_error(response, error_body, url, model, sse is not None)
                # Once the server answers, the idle limit applies between chunks.
                timeouts["read"] = t.idle
                stream = AsyncStream(
                    response,
                    model=model,
                    server=url,
                    deadline=deadline,
                    total=t.total,
                    idle=watch_idle,
                    lease=lease,
                    max_line=self._max_line,
                    sse=sse,
                )
                await stream._prime()  # pyright: ignore[reportPrivateUsage]
                lease.answered()
                opened, stream, response, lease = stream, None, None, None
                return opened
            except StartFailed as exc:
                if not exc.deadline:
                    raise _Failed("failed", exc.reason, exc.record) from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise _Failed("unreachable", describe_error(exc, t), "unreachable") from None
            except httpx.HTTPError as exc:
                reason = describe_error(exc, t)
                if response is None and _hung_up(exc):
                    # Closed before any answer: the probe that follows tells whether
                    # the server is gone.
                    raise _Failed("unreachable", reason, "model") from None
                if isinstance(exc, httpx.RemoteProtocolError):  # not HTTP: the server's fault
                    raise _Failed("failed", reason) from None
                raise _Failed("failed", reason, "model") from None
            finally:
                if stream is not None:
                    await stream.aclose()
                else:
                    await _close(response)
                    if lease is not None:
                        lease.release()
                if holding and slots is not None:
                    slots.release()
        # The first token did not come in time.
        if total_binds:
            raise CortexTimeoutError("total", t.total or 0.0, server=url)
        if waiting:
            raise _Failed(
                "local",
                f"no free connection within {limit:g}s: {pool.limit} requests to it were "
                "already in flight (raise max_connections to allow more)",
            )
        raise _Failed("failed", f"no first token within {limit:g}s", "model")

    def _status_error(
        self, response: httpx.Response, body: bytes, url: str, model: str, openai: bool
    ) -> Exception:
        status = response.status_code
        if openai:
            failure = openai_status(status, body, url)
        else:
            failure = classify_status(status, body, response.headers.get("content-type", ""))
        if failure.kind == "invalid":
            who = "The server" if openai else "Ollama"
            return ValidationError(f"{who} rejected the request: {failure.message}")
        if failure.kind == "model_missing":
            return _Failed("model_missing", f"does not have model {model!r}")
        if status in (429, 503):
            return _Failed("busy", failure.message, "busy")
        # HTTP 500 is how Ollama reports a model that failed to load or crashed.
        return _Failed("failed", failure.message, "model" if status == 500 else "failed")

    # -- live information ----------------------------------------------------

    async def probe_servers(
        self, model: str | None = None, *, server_url: str | None = None
    ) -> list[ServerInfo]:
        """Probe every candidate server for ``model`` now, concurrently."""
        self._router.check_open()
        candidates = self.candidates(model, server_url)
        key = model_key(model) if model else ""
        health = await self._router.refresh(candidates, key, self._routing, spread=True, force=True)
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

    def server_states(self) -> list[ServerState]:
        """What this client knows about each server now, without probing: the
        configured servers first, then any other it has talked to."""
        router = self._router
        urls = unique([*self.candidates(), *router.fleet.nodes])
        now = router.now()
        return [router.fleet.snapshot(url, now) for url in urls]

    def pull(self, model: str, servers: Sequence[ServerSpec] | str | None = None) -> PullStream:
        """Pull ``model`` onto every server at once (Ollama's ``POST /api/pull``).

        ``servers`` defaults to the configured servers, else the candidates. Returns a
        :class:`PullStream` of :class:`PullProgress` events in arrival order, one with
        ``done`` set last for each server; a server that fails (unreachable, an error
        from Ollama, an OpenAI-style server, which cannot pull) says why in ``error``.
        Nothing is sent before it is iterated; use it in ``async with`` so that leaving
        early cancels every request. The whole pull has no time limit; a server silent
        for longer than ``Timeout.idle`` (when None, 300 s) fails.
        """
        self._router.check_open()
        if servers is None:
            urls = self.servers or self.candidates()
        else:
            targets = _as_servers(servers)
            for server in targets:
                if server.api != "auto":
                    self._router.fleet.configure(server)
            urls = [server.url for server in targets]
        router = self._router
        return PullStream(
            model,
            urls,
            timeout=self._timeout,
            client=router.client,
            kind=lambda url: router.fleet.node(url).kind,
        )

    # -- offline helpers -----------------------------------------------------

    def build_api_request(
        self, model: str, prompt: Prompt, *, stream: bool = True, **args: Unpack[RequestArgs]
    ) -> ApiRequest:
        """The request a chat would send to its first candidate server, without sending it.

        aicortex itself always streams from Ollama (``"stream": true``) and joins
        the chunks for non-streamed calls; pass ``stream=False`` to get a body for
        a one-shot JSON answer instead. The other keyword arguments are
        :class:`RequestArgs`.
        """
        check_args("build_api_request", args, REQUEST_ARGS)
        body = _body(model, prompt, stream, args)
        url = self.candidates(model, args.get("server_url"))[0]
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
    cortex: AsyncCortex, prompt: Prompt, *, model: str | None = None, **args: Unpack[ChatArgs]
) -> AsyncStream:
    """A chat's whole answer as a finished :class:`AsyncStream`: its text, thinking,
    tool calls and stats, with the same retries as ``chat()`` without streaming."""
    call = cortex._prepare(prompt, model, args)  # pyright: ignore[reportPrivateUsage]
    return await cortex._collect(call)  # pyright: ignore[reportPrivateUsage]


def native_call(
    cortex: AsyncCortex, path: str, body: Mapping[str, Any], *, affinity: str | None = None
) -> _Call:
    """Plan a request whose Ollama body (for ``path``: ``/api/chat`` or ``/api/generate``)
    is given whole, every field as the caller sent it: the native gateway's pass-through.
    Ollama servers get it as it is (streamed); OpenAI-style ones, translated."""
    cortex._router.check_open()  # pyright: ignore[reportPrivateUsage]
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValidationError("model is required")
    request = {**body, "stream": True}
    return cortex._plan(request, model, {"affinity": affinity}, path)  # pyright: ignore[reportPrivateUsage]


def router_of(cortex: AsyncCortex) -> Router:
    """The :class:`Router` (pools, probes, server states) of ``cortex``."""
    return cortex._router  # pyright: ignore[reportPrivateUsage]


async def open_call(cortex: AsyncCortex, call: _Call) -> AsyncStream:
    """Start a planned request; returns once its first token has arrived."""
    return await cortex._stream(call)  # pyright: ignore[reportPrivateUsage]


async def collect_call(cortex: AsyncCortex, call: _Call) -> AsyncStream:
    """A planned request's whole answer, as a finished stream (retried on the next
    server when it breaks midway, as nothing has reached the caller)."""
    return await cortex._collect(call)  # pyright: ignore[reportPrivateUsage]


class _Failed(Exception):
    """One attempt failed: ``kind`` for the :class:`Attempt` (``local``: no free local
    connection, which says nothing about the server), ``record`` for its state machine
    (None: nothing to record, the server cannot do this kind of request)."""

    def __init__(
        self,
        kind: AttemptKind | Literal["local"],
        reason: str,
        record: FailureKind | None = "failed",
    ) -> None:
        self.kind: AttemptKind | Literal["local"] = kind
        self.reason = reason
        self.record: FailureKind | None = record
        super().__init__(reason)


_MAX_BUSY_WAIT = 60.0  # when there is no first-token or total limit


def _note_down(found: Mapping[str, Health], attempts: list[Attempt], out: set[str]) -> None:
    """Servers a probe just found down are out of this request, with the probe's reason."""
    for url, health in found.items():
        if not health.up and url not in out:
            out.add(url)
            attempts.append(Attempt(url, health.error or "probe failed", "unreachable"))


def _openai_body(request: dict[str, Any], model: str) -> bytes:
    """``request`` (an ``/api/chat`` body) as the body of ``/v1/chat/completions``."""
    body, _ = openai_chat_body(
        model,
        request.get("messages") or [],
        options=request.get("options"),
        format=request.get("format"),
        tools=request.get("tools"),
        think=request.get("think"),
        keep_alive=request.get("keep_alive"),
    )
    return encode_body(body)


def _hung_up(exc: httpx.HTTPError) -> bool:
    """Whether the connection was closed or reset under the request (as opposed to an
    answer that is not HTTP, or a timeout)."""
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return True
    # httpx: "Server disconnected without sending a response."; aiohttp: "Server disconnected"
    return isinstance(exc, httpx.RemoteProtocolError) and "disconnected" in str(exc).lower()


def _pair_reason(fleet: Fleet, url: str, key: str, until: float, now: float) -> str:
    pair = fleet.node(url).pairs[key]
    return (
        f"model ejected here for {until - now:.1f}s more after failing "
        f"{fleet.ejection.failures} times in a row (last: {pair.reason})"
    )


def _note_held(
    holds: Sequence[tuple[str, str, float]], fleet: Fleet, attempts: list[Attempt], out: set[str]
) -> None:
    """The servers still held back when a request gives up waiting, as attempts."""
    for url, why, _ in holds:
        if why == DOWN:
            out.add(url)
        elif not any(a.server == url and a.kind == "busy" for a in attempts):
            node = fleet.node(url)
            if why == FULL:
                reason = f"at its max_concurrency ({node.inflight} requests in flight)"
            else:
                reason = node.error or "busy"
            attempts.append(Attempt(url, reason, "busy"))


def _busy_limit(t: Timeout, deadline: float | None) -> float:
    """Until when (on the routing clock) a request may wait for busy servers."""
    limit = t.first_token if t.first_token is not None else _MAX_BUSY_WAIT
    if deadline is not None:
        limit = min(limit, deadline - anyio.current_time())
    return time.monotonic() + limit


def _last_per_server(attempts: Sequence[Attempt], candidates: Sequence[str]) -> list[Attempt]:
    """One attempt per server, its last, in preference order."""
    last: dict[str, Attempt] = {}
    for attempt in attempts:
        last[attempt.server] = attempt
    rank = {url: i for i, url in enumerate(candidates)}
    return sorted(last.values(), key=lambda a: rank.get(a.server, len(rank)))


def _server_error(model: str, attempts: list[Attempt], ollama_only: bool) -> ServerError:
    """The error for a chat no server served; ``ollama_only``: no OpenAI-style server
    was among the candidates, so the advice can name Ollama."""
    kinds = {a.kind for a in attempts}
    servers = "Ollama server" if ollama_only else "server"
    if kinds and kinds <= {"unreachable", "ejected"}:
        start = "Start Ollama" if ollama_only else "Start the servers"
        return ServerError(
            f"No {servers} answered for model {model!r}. {start}, or check the "
            f"server URLs ({NO_SERVER_ADVICE}).",
            attempts,
        )
    if kinds == {"busy"}:
        more = ", or raise OLLAMA_MAX_QUEUE on them" if ollama_only else ""
        return ServerError(
            f"Every {servers} for model {model!r} was busy, until the first-token limit. "
            f"Try again later, add servers{more}.",
            attempts,
        )
    return ServerError(f"The {servers}s could not serve model {model!r}.", attempts)


class _Batch:
    """One batch of an embed call, as the routing loop attempts it."""

    __slots__ = ("start", "texts")

    def __init__(self, start: int, texts: list[str]) -> None:
        self.start = start
        self.texts = texts

    def attempt(self, cortex: AsyncCortex) -> Callable[[str, _Call], Awaitable[Batch]]:
        async def run(url: str, call: _Call) -> Batch:
            return await cortex._embed_attempt(url, call, self.start, self.texts)  # pyright: ignore[reportPrivateUsage]

        return run


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


async def _close(response: httpx.Response | None) -> None:
    if response is not None:
        with anyio.CancelScope(shield=True):
            await response.aclose()
