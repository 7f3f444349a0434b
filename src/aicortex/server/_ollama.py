"""Ollama's native API (``/api/*``): the whole fleet, seen by any Ollama client as one
Ollama server.

Chats and completions are routed, balanced and failed over as ``AsyncCortex.chat`` does,
with the client's body passed through whole to Ollama upstreams (translated for
OpenAI-style ones). Model lists are the union of the healthy servers'. Errors are
Ollama's: ``{"error": "..."}`` with its statuses; a stream that breaks after its first
line ends with an ``{"error": ...}`` line, as Ollama's own do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import anyio
import httpx
from starlette.routing import Route

from .._client import AsyncCortex, collect_call, native_call, open_call, router_of
from .._embed import EmbedResult
from .._events import EventType
from .._exceptions import StreamError, ValidationError
from .._protocol import CHAT_PATH, GENERATE_PATH, embed_inputs, error_text, model_key
from .._router import describe_error
from .._stream import AsyncStream, final_chunk
from ._errors import ProxyError, stream_error_text
from ._gateway import ClientGone, Receive, Send, dumps, read_body, request_id, send_json
from ._handle import CortexHandle, Endpoint
from ._native import NativeWriter, model_entries
from ._schema import decode_json
from ._streaming import stream_response, unless_disconnected

__all__ = ["OLLAMA_VERSION", "native_routes"]

logger = logging.getLogger("aicortex.server")

OLLAMA_VERSION = "0.12.0"
"""The version ``/api/version`` reports when no upstream Ollama reports its own."""

_NDJSON_HEADERS = ((b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"))
_TOKEN = EventType.TOKEN
_END = EventType.END
_SHOW_TIMEOUT = 30.0
_MANAGEMENT = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip() or None
    return None


async def _json_body(scope: dict[str, Any], receive: Receive, limit: int) -> dict[str, Any]:
    """The request's JSON object; Ollama's 400 for a missing or malformed one."""
    body = await read_body(scope, receive, limit)
    if not body.strip():
        raise ProxyError(400, "missing request body")
    try:
        data = decode_json(body)
    except ProxyError as exc:
        raise ProxyError(400, exc.message) from None
    if not isinstance(data, dict):
        raise ProxyError(400, "the request body must be a JSON object")
    return cast("dict[str, Any]", data)


async def _model_request(
    scope: dict[str, Any], receive: Receive, limit: int
) -> tuple[dict[str, Any], str] | None:
    """The body of a request about one model (``model``, or the older ``name``) and
    that model; Ollama's 400 without one; None when the client left first."""
    try:
        request = await _json_body(scope, receive, limit)
    except ClientGone:
        return None
    model = request.get("model") or request.get("name")
    if not isinstance(model, str) or not model.strip():
        raise ProxyError(400, "model is required")
    return request, model


def _check_native(request: dict[str, Any], generate: bool) -> bool:
    """Check the fields the gateway itself reads; returns whether to stream. The rest is
    the upstream's to judge."""
    model = request.get("model")
    if not isinstance(model, str) or not model.strip():
        if generate:
            raise ProxyError(404, "model '' not found")
        raise ProxyError(400, "model is required")
    stream = request.get("stream", True)
    if stream is not None and not isinstance(stream, bool):
        raise ProxyError(400, f"stream must be true or false, not {stream!r}")
    if generate:
        prompt = request.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ProxyError(400, "prompt must be a string")
    else:
        messages = request.get("messages")
        if messages is not None:
            if not isinstance(messages, list):
                raise ProxyError(400, "messages must be a list of messages")
            for i, message in enumerate(cast("list[object]", messages)):
                if not isinstance(message, dict) or not isinstance(
                    cast("dict[str, Any]", message).get("role"), str
                ):
                    raise ProxyError(400, f"messages[{i}] must be an object with a role")
    for name in ("options",):
        if request.get(name) is not None and not isinstance(request[name], dict):
            raise ProxyError(400, f"{name} must be an object")
    return stream is not False


class _Generation(Endpoint):
    """``POST /api/chat`` and ``POST /api/generate``."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int, path: str) -> None:
        super().__init__(handle, max_body_size, started)
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        rid = request_id(scope)
        extra = {"request_id": rid}
        try:
            request = await _json_body(scope, receive, self.max_body_size)
        except ClientGone:
            return
        generate = self.path == GENERATE_PATH
        stream = _check_native(request, generate)
        cortex = self.handle.cortex
        call = native_call(
            cortex, self.path, request, affinity=_header(scope, b"x-aicortex-affinity")
        )
        model: str = request["model"]
        if stream:
            opened = await unless_disconnected(receive, lambda: open_call(cortex, call))
            if opened is None:
                logger.info("[%s] the client went away before the first token", rid, extra=extra)
                return
            answer = opened[0]
            writer = self._writer(answer, model, generate)
            logger.debug("[%s] streaming %s from %s", rid, model, answer.server, extra=extra)
            headers = [*_NDJSON_HEADERS, (b"x-aicortex-server", answer.server.encode())]
            await NDJSONResponse(answer, writer, headers, rid)(scope, receive, send)
            return
        collected = await unless_disconnected(receive, lambda: collect_call(cortex, call))
        if collected is None:
            logger.info("[%s] the client went away; the request was cancelled", rid, extra=extra)
            return
        answer = collected[0]
        writer = self._writer(answer, model, generate)
        whole = writer.whole(
            final_chunk(answer), answer.partial_text, answer.thinking, answer.tool_calls
        )
        await send_json(send, 200, dumps(whole), [(b"x-aicortex-server", answer.server.encode())])

    def _writer(self, answer: AsyncStream, model: str, generate: bool) -> NativeWriter:
        kind = router_of(self.handle.cortex).fleet.node(answer.server).kind
        return NativeWriter(model, generate=generate, passthrough=kind != "openai")


class NDJSONResponse:
    """An ASGI response that streams an answer's lines in Ollama's NDJSON.

    Each write carries every event that had already arrived. A failure after the first
    line ends the body with an ``{"error": ...}`` line. A client that leaves cancels the
    relay, and the upstream stream is closed however this ends.
    """

    def __init__(
        self,
        stream: AsyncStream,
        writer: NativeWriter,
        headers: Sequence[tuple[bytes, bytes]],
        request_id: str,
    ) -> None:
        self._stream = stream
        self._writer = writer
        self._headers = list(headers)
        self._request_id = request_id

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        relay = self._relay
        await stream_response(
            self._stream, self._headers, self._request_id, receive, send, lambda: relay(send)
        )

    async def _relay(self, send: Send) -> None:
        writer = self._writer
        stream = self._stream
        take = stream._take  # pyright: ignore[reportPrivateUsage]
        out: list[bytes] = []
        try:
            async for event in stream:
                events = [event]
                take(events)
                for item in events:
                    if item.type is _TOKEN:
                        out.append(writer.token(item))
                    elif item.type is _END:
                        out.append(writer.end(item))
                if out:
                    await send(
                        {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                    )
                    out = []
        except StreamError as exc:
            out.append(writer.error(stream_error_text(exc)))
        except Exception as exc:
            logger.exception(
                "[%s] the stream failed unexpectedly",
                self._request_id,
                extra={"request_id": self._request_id},
            )
            out.append(writer.error(f"the gateway failed while streaming ({type(exc).__name__})"))
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})


class _Root(Endpoint):
    """``GET /`` and ``HEAD /``: what Ollama answers there."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = b"Ollama is running"
        head = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        empty = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if empty else body})


class _Version(Endpoint):
    """``GET /api/version``: the lowest version among the healthy Ollama upstreams, so
    that a client gates its features on what every server can do."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        cortex = self.handle.cortex
        versions = self._known(cortex)
        if not versions:  # nothing probed yet (a client's first request): probe now
            await cortex.probe_servers()
            versions = self._known(cortex)
        version = min(versions, key=_version_key) if versions else OLLAMA_VERSION
        await send_json(send, 200, dumps({"version": version}))

    @staticmethod
    def _known(cortex: AsyncCortex) -> list[str]:
        fleet = router_of(cortex).fleet
        return [
            node.version
            for url in cortex.candidates()
            if (node := fleet.nodes.get(url)) is not None and node.kind == "ollama" and node.version
        ]


def _version_key(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split("-", 1)[0].split("."):
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


class _Listing(Endpoint):
    """``GET /api/tags`` (installed models) and ``GET /api/ps`` (loaded ones): the union
    over every healthy server, each model once (the first server's entry)."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int, loaded: bool):
        super().__init__(handle, max_body_size, started)
        self.loaded = loaded

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        cortex = self.handle.cortex
        router = router_of(cortex)
        seen: dict[str, dict[str, Any]] = {}
        for info in await cortex.probe_servers():
            if not info.up:
                continue
            node = router.fleet.node(info.url)
            listing = router.listing(info.url)
            if node.kind == "openai" or listing is None:
                names, entries = info.models, None  # what it serves is what it has loaded
            elif self.loaded:
                entries = listing[1]
                loaded = node.loaded or frozenset()
                names = tuple(str(e.get("model") or e.get("name")) for e in entries)
                names += tuple(n for n in node.public_names if model_key(n) in loaded)
            else:
                names, entries = info.models, listing[0]
            for entry in model_entries(names, entries, node.names_here, loaded=self.loaded):
                seen.setdefault(model_key(str(entry["model"])), entry)
        await send_json(send, 200, dumps({"models": list(seen.values())}))


class _Show(Endpoint):
    """``POST /api/show``: answered by the first healthy server that has the model."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        asked = await _model_request(scope, receive, self.max_body_size)
        if asked is None:
            return
        request, model = asked
        cortex = self.handle.cortex
        router = router_of(cortex)
        failures: list[str] = []
        for info in await cortex.probe_servers(model):
            if not info.up or not info.has_model:
                continue
            node = router.fleet.node(info.url)
            if node.kind == "openai":
                body = _openai_show(model)
                await send_json(send, 200, dumps(body), [(b"x-aicortex-server", info.url.encode())])
                return
            here = node.names_here.get(model_key(model), model)
            asked = {k: v for k, v in request.items() if k != "name"} | {"model": here}
            t = cortex.timeout
            try:
                response = await router.client(info.url).post(
                    "/api/show",
                    content=dumps(asked),
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(_SHOW_TIMEOUT, connect=t.connect),
                )
            except httpx.HTTPError as exc:
                failures.append(f"{info.url}: {type(exc).__name__}")
                continue
            if response.status_code == 200:
                head = [(b"x-aicortex-server", info.url.encode())]
                await send_json(send, 200, response.content, head)
                return
            if response.status_code != 404:
                failures.append(
                    f"{info.url}: HTTP {response.status_code} {error_text(response.content)}"
                )
        if failures:
            raise ProxyError(
                502, f"no server could describe model '{model}': " + "; ".join(failures)
            )
        raise ProxyError(404, f"model '{model}' not found")


def _openai_show(model: str) -> dict[str, Any]:
    """What can be said of a model an OpenAI-style server serves, in ``/api/show``'s shape."""
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": {
            "parent_model": "",
            "format": "",
            "family": "",
            "families": None,
            "parameter_size": "",
            "quantization_level": "",
        },
        "model_info": {},
        "capabilities": ["completion"],
        "modified_at": "1970-01-01T00:00:00Z",
    }


class _Embed(Endpoint):
    """``POST /api/embed`` and the older ``POST /api/embeddings`` (``legacy``)."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int, legacy: bool):
        super().__init__(handle, max_body_size, started)
        self.legacy = legacy

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            request = await _json_body(scope, receive, self.max_body_size)
        except ClientGone:
            return
        model = request.get("model")
        if not isinstance(model, str) or not model.strip():
            if self.legacy:
                raise ProxyError(400, "model is required")
            raise ProxyError(404, "model '' not found")
        if self.legacy:
            prompt = request.get("prompt", "")
            if not isinstance(prompt, str):
                raise ProxyError(400, "prompt must be a string")
            texts = [prompt] if prompt else []
        else:
            try:
                texts = embed_inputs(request.get("input", []))
            except ValidationError:
                raise ProxyError(400, "invalid input type") from None
        options = request.get("options")
        if options is not None and not isinstance(options, dict):
            raise ProxyError(400, "options must be an object")
        cortex = self.handle.cortex

        async def embed() -> EmbedResult:
            return await cortex.embed(
                texts,
                model=model,
                truncate=request.get("truncate"),
                dimensions=request.get("dimensions"),
                keep_alive=request.get("keep_alive"),
                options=cast("dict[str, Any] | None", options),
            )

        done = await unless_disconnected(receive, embed)
        if done is None:
            return
        result = done[0]
        headers = [(b"x-aicortex-server", ", ".join(result.servers).encode())]
        if self.legacy:
            vector: list[float] = result.embeddings[0] if result.embeddings else []
            await send_json(send, 200, dumps({"embedding": vector}), headers)
            return
        body: dict[str, Any] = {"model": model, "embeddings": result.embeddings}
        for name, value in (
            ("total_duration", result.total_duration),
            ("load_duration", result.load_duration),
            ("prompt_eval_count", result.prompt_tokens),
        ):
            if value is not None:
                body[name] = value
        await send_json(send, 200, dumps(body), headers)


class _Refused(Endpoint):
    """A model-management route the gateway does not serve."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int, path: str):
        super().__init__(handle, max_body_size, started)
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        route = self.path.removeprefix("/api/").split("/", 1)[0]
        if route in ("pull", "delete"):
            advice = (
                "run `aicortex pull MODEL` to pull a model onto every server, or serve the "
                "gateway with allow_management=True"
                if route == "pull"
                else "serve the gateway with allow_management=True to delete a model "
                "from every server, or delete it on a server itself"
            )
        else:
            advice = f"run `ollama {route}` against a server itself; `aicortex pull MODEL` pulls"
            advice += " a model onto every server"
        raise ProxyError(
            403,
            f"this is an aicortex gateway in front of several servers; it does not {route} "
            f"models through {self.path}: {advice}",
        )


class _Pull(Endpoint):
    """``POST /api/pull`` with management on: the model is pulled onto every server at
    once. Streamed, each server's progress lines (Ollama's own, with a ``server`` field),
    a line when each one ends, then ``{"status": "success"}`` when every server has the
    model, else ``{"error": ...}`` naming the servers that failed and why."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        asked = await _model_request(scope, receive, self.max_body_size)
        if asked is None:
            return
        request, model = asked
        stream = request.get("stream", True) is not False
        pull = self.handle.cortex.pull(model)
        if not stream:
            failures: list[str] = []

            async def whole() -> None:
                async with pull as progress:
                    async for step in progress:
                        if step.done and step.error is not None:
                            failures.append(f"{step.server}: {step.error}")

            if await unless_disconnected(receive, whole) is None:
                return
            if failures:
                raise ProxyError(500, _pull_failed(model, failures, len(pull.servers)))
            await send_json(send, 200, dumps({"status": "success"}))
            return
        await send({"type": "http.response.start", "status": 200, "headers": list(_NDJSON_HEADERS)})

        async def relay() -> None:
            failures: list[str] = []
            async with pull as progress:
                async for step in progress:
                    line: dict[str, Any] = {"server": step.server}
                    if step.done:
                        if step.error is None:
                            line["status"] = f"success on {step.server}"
                        else:
                            failures.append(f"{step.server}: {step.error}")
                            line["status"] = f"failed on {step.server}: {step.error}"
                    else:
                        line["status"] = step.status
                        for name in ("digest", "total", "completed"):
                            value = getattr(step, name)
                            if value is not None:
                                line[name] = value
                    await send(
                        {
                            "type": "http.response.body",
                            "body": dumps(line) + b"\n",
                            "more_body": True,
                        }
                    )
            end: dict[str, Any] = {"status": "success"}
            if failures:
                end = {"error": _pull_failed(model, failures, len(pull.servers))}
            await send(
                {"type": "http.response.body", "body": dumps(end) + b"\n", "more_body": False}
            )

        if await unless_disconnected(receive, relay) is None:
            logger.info("[%s] the client went away; the pull was cancelled", request_id(scope))


def _pull_failed(model: str, failures: Sequence[str], servers: int) -> str:
    done = servers - len(failures)
    return (
        f"pulling {model} failed on {len(failures)} of {servers} servers"
        f"{f' (it succeeded on {done})' if done else ''}: " + "; ".join(failures)
    )


class _Delete(Endpoint):
    """``DELETE /api/delete`` with management on: the model is deleted from every server
    that has it. 200 when no server failed, 404 when none had it."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        asked = await _model_request(scope, receive, self.max_body_size)
        if asked is None:
            return
        _, model = asked
        cortex = self.handle.cortex
        router = router_of(cortex)
        urls = cortex.servers or cortex.candidates()
        outcome: dict[str, str | None] = {}  # url -> None: deleted, "missing", or why not

        async def delete(url: str) -> None:
            node = router.fleet.node(url)
            if node.kind == "openai":
                outcome[url] = "an OpenAI-style server cannot delete models"
                return
            here = node.names_here.get(model_key(model), model)
            try:
                response = await router.client(url).request(
                    "DELETE",
                    "/api/delete",
                    content=dumps({"model": here}),
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(_SHOW_TIMEOUT, connect=cortex.timeout.connect),
                )
            except httpx.HTTPError as exc:
                outcome[url] = describe_error(exc, cortex.timeout)
                return
            if response.status_code == 200:
                outcome[url] = None
            elif response.status_code == 404:
                outcome[url] = "missing"
            else:
                text = error_text(response.content) or f"HTTP {response.status_code}"
                outcome[url] = f"{text} (HTTP {response.status_code})"

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                for url in urls:
                    tg.start_soon(delete, url)

        if await unless_disconnected(receive, run) is None:
            return
        failures = [f"{url}: {why}" for url, why in outcome.items() if why not in (None, "missing")]
        if failures:
            deleted = [url for url, why in outcome.items() if why is None]
            where = f" (deleted on {', '.join(deleted)})" if deleted else ""
            raise ProxyError(500, f"deleting {model} failed{where}: " + "; ".join(failures))
        if all(why == "missing" for why in outcome.values()):
            raise ProxyError(404, f"model '{model}' not found")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})


def native_routes(
    handle: CortexHandle, max_body_size: int, started: int, *, allow_management: bool = False
) -> list[Route]:
    """The routes of Ollama's API; with ``allow_management``, ``pull`` and ``delete`` go
    to every server (the other management routes are refused either way)."""
    args = (handle, max_body_size, started)
    routes = [
        Route("/", _Root(*args), methods=["GET", "HEAD"]),
        Route("/api/version", _Version(*args), methods=["GET", "HEAD"]),
        Route("/api/tags", _Listing(*args, loaded=False), methods=["GET", "HEAD"]),
        Route("/api/ps", _Listing(*args, loaded=True), methods=["GET"]),
        Route("/api/show", _Show(*args), methods=["POST"]),
        Route(CHAT_PATH, _Generation(*args, CHAT_PATH), methods=["POST"]),
        Route(GENERATE_PATH, _Generation(*args, GENERATE_PATH), methods=["POST"]),
        Route("/api/embed", _Embed(*args, legacy=False), methods=["POST"]),
        Route("/api/embeddings", _Embed(*args, legacy=True), methods=["POST"]),
    ]
    for path in _MANAGEMENT:
        method = "DELETE" if path == "/api/delete" else "POST"
        endpoint: Endpoint = _Refused(*args, path)
        if allow_management and path == "/api/pull":
            endpoint = _Pull(*args)
        elif allow_management and path == "/api/delete":
            endpoint = _Delete(*args)
        routes.append(Route(path, endpoint, methods=[method]))
    routes.append(
        Route("/api/blobs/{digest}", _Refused(*args, "/api/blobs"), methods=["POST", "HEAD"])
    )
    return routes
