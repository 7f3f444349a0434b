"""Fake Ollama servers for tests: real HTTP/1.1 on 127.0.0.1, scripted down to the byte.

Each `FakeOllama` runs its own asyncio event loop in a daemon thread, so tests on asyncio
*and* trio can talk to it with any HTTP client, and start or stop it synchronously::

    with FakeOllama(models=["llama3.2:3b"]) as server:
        server.chat = [busy(), reply(["Hel", "lo"], delay=0.05)]
        ...  # point the client at server.url
        assert server.count("/api/chat") == 2

What `POST /api/chat` (or any path, see `FakeOllama.on`) does is a `Script`, built with
`reply`, `status`, `busy`, `model_not_found`, `page_not_found`, `cut_after`, `error_after`,
`stall_before_headers`, `stall_after`, `ndjson_lines`, `garbage_response`, `drop_connection`
and `delayed`; subclass `Script` for anything else. Without a script the server behaves like
a healthy Ollama that has `models` installed. Its `POST /api/pull` streams Ollama's progress
lines and then adds the model to `models` (a name containing "missing" fails mid-stream
instead); `DELETE /api/delete` removes a model.

`BlackHole` accepts TCP connections and never answers; `refused_url()` names a port that
refuses connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import selectors
import socket
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, cast

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_TOKENS",
    "STREAM_ERROR_MESSAGE",
    "BlackHole",
    "Exchange",
    "FakeOllama",
    "FakeOllamaFactory",
    "BlackHoleFactory",
    "Recorded",
    "Script",
    "busy",
    "cut_after",
    "delayed",
    "drop_connection",
    "embedding_of",
    "error_after",
    "garbage_response",
    "model_not_found",
    "ndjson_lines",
    "page_not_found",
    "refused_url",
    "reply",
    "stall_after",
    "stall_before_headers",
    "status",
]

DEFAULT_TOKENS = ("Hello", "!")
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
STREAM_ERROR_MESSAGE = "an error was encountered while running the model"

JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"
_PROBE_PATHS = frozenset({"/", "/api/version", "/api/tags", "/api/ps"})
_MAX_HEAD = 64 * 1024
_JOIN_TIMEOUT = 5.0

_T = TypeVar("_T", bound="_Background")


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    json: Any  # the parsed body, or None when it is empty or not JSON


class _ClientGone(Exception):
    """The client closed or reset the connection before the response was complete."""


class _BadRequest(Exception):
    """The bytes received are not an HTTP/1.1 request this server understands."""


class _Connection:
    """A client connection: buffered reads, EOF detection, writes that notice a dead peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.buffer = bytearray()
        self.eof = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader = reader
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        # Reading all the time is what lets a sleeping script see the client leave.
        try:
            while data := await self._reader.read(65536):
                self.buffer += data
                self._changed.set()
        except OSError:
            pass
        finally:
            self.eof.set()
            self._changed.set()

    @property
    def gone(self) -> bool:
        return self.eof.is_set() or self.writer.transport.is_closing()

    async def _more(self) -> bool:
        if self.eof.is_set():
            return False
        self._changed.clear()
        await self._changed.wait()
        return True

    async def read_until(self, separator: bytes, limit: int) -> bytes | None:
        while (end := self.buffer.find(separator)) < 0:
            if len(self.buffer) > limit:
                raise _BadRequest
            if not await self._more():
                return None
        end += len(separator)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._more():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def write(self, data: bytes) -> None:
        if self.gone:
            raise _ClientGone
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:
            raise _ClientGone from exc


class Exchange:
    """One request being answered. Scripts write the response through its methods.

    Every method raises an internal exception when the client has gone away; let it
    propagate, the server counts it in `FakeOllama.disconnects`.
    """

    def __init__(self, server: FakeOllama, connection: _Connection, request: Recorded) -> None:
        self.server = server
        self.request = request
        self.reusable = True  # False once the script closed the connection
        self.started = False  # True once the status line was sent
        self._connection = connection

    @property
    def body(self) -> dict[str, Any]:
        """The request body as a JSON object ({} when it is not one)."""
        parsed: object = self.request.json
        return cast("dict[str, Any]", parsed) if isinstance(parsed, dict) else {}

    @property
    def model(self) -> str:
        """The `model` field of the request body ("" when absent)."""
        model = self.body.get("model")
        return model if isinstance(model, str) else ""

    @property
    def wants_stream(self) -> bool:
        """Ollama streams unless the body says `"stream": false`."""
        return self.body.get("stream") is not False

    async def pause(self, seconds: float) -> None:
        """Sleep, but stop at once if the client leaves meanwhile."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._connection.eof.wait(), seconds)
        if self._connection.gone:
            raise _ClientGone

    async def hang(self) -> None:
        """Say nothing until the client leaves (or the server stops)."""
        await self._connection.eof.wait()
        raise _ClientGone

    async def respond(
        self,
        code: int,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a complete response with a `Content-Length` body."""
        fields = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        payload = b"" if self.request.method == "HEAD" else body
        await self.send_raw(self._head(code, fields) + payload)

    async def start_stream(self, content_type: str = NDJSON_TYPE, code: int = 200) -> None:
        """Send the head of a `Transfer-Encoding: chunked` response."""
        fields = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        await self.send_raw(self._head(code, fields))

    async def send_chunk(self, data: bytes) -> None:
        """Send `data` as one HTTP chunk and wait until it is handed to the kernel."""
        if data:
            await self.send_raw(b"%X\r\n%s\r\n" % (len(data), data))

    async def end_stream(self) -> None:
        """Send the terminating zero-length chunk."""
        await self.send_raw(b"0\r\n\r\n")

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are."""
        await self._connection.write(data)

    async def drop(self, *, reset: bool = False) -> None:
        """Close the connection now: FIN after what was sent, or RST with `reset=True`."""
        self.reusable = False
        transport = self._connection.writer.transport
        if not reset:
            transport.close()
            return
        await self.pause(0.05)  # let the bytes already written reach the client first
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _head(self, code: int, fields: Mapping[str, str]) -> bytes:
        self.started = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [f"HTTP/1.1 {code} {phrase}", f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{name}: {value}" for name, value in fields.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Script(ABC):
    """What the server does with one request; subclass it for behaviour not provided here."""

    @abstractmethod
    async def run(self, exchange: Exchange) -> None:
        """Answer `exchange.request` through `exchange`."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _stats(eval_count: int) -> dict[str, int]:
    prompt_eval_duration = 2_000_000
    eval_duration = eval_count * 10_000_000
    load_duration = 1_000_000
    stats = {
        "total_duration": load_duration + prompt_eval_duration + eval_duration,
        "load_duration": load_duration,
        "prompt_eval_count": 8,
        "prompt_eval_duration": prompt_eval_duration,
        "eval_count": eval_count,
        "eval_duration": eval_duration,
    }
    return {name: value for name, value in stats.items() if value}  # Go's omitempty


_Ending = Literal["done", "cut", "reset", "error", "stall"]


@dataclass(frozen=True)
class _Generation(Script):
    """A model answer in Ollama's shape, ending normally or in one of the failure modes."""

    tokens: tuple[str, ...]
    delay: float = 0.0
    model: str | None = None
    thinking: tuple[str, ...] = ()
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    done_reason: str | None = "stop"
    limit: int | None = None  # how many non-final chunks to send before `ending`
    ending: _Ending = "done"
    message: str = STREAM_ERROR_MESSAGE

    def _chunk(
        self,
        exchange: Exchange,
        content: str,
        thinking: str = "",
        tool_calls: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.model or exchange.model, "created_at": _now()}
        if exchange.request.path == "/api/generate":
            chunk["response"] = content
            if thinking:
                chunk["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = list(tool_calls)
            chunk["message"] = message
        return chunk

    def _final(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if self.done_reason is not None:
            chunk["done_reason"] = self.done_reason
        chunk["done"] = True
        return chunk | _stats(len(self.tokens))

    async def run(self, exchange: Exchange) -> None:
        if exchange.wants_stream:
            await self._stream(exchange)
        else:
            await self._single(exchange)

    async def _stream(self, exchange: Exchange) -> None:
        chunks = [self._chunk(exchange, "", thinking=text) for text in self.thinking]
        chunks += [self._chunk(exchange, text) for text in self.tokens]
        if self.tool_calls:
            chunks.append(self._chunk(exchange, "", tool_calls=self.tool_calls))
        for chunk in chunks:
            chunk["done"] = False
        if self.ending == "done":
            chunks.append(self._final(self._chunk(exchange, "")))
        else:
            chunks = chunks[: self.limit]
        await exchange.start_stream()
        for chunk in chunks:
            await exchange.pause(self.delay)
            await exchange.send_chunk(_encode(chunk) + b"\n")
        if self.ending == "done":
            await exchange.end_stream()
        elif self.ending == "error":
            await exchange.send_chunk(_encode({"error": self.message}) + b"\n")
            await exchange.end_stream()
        elif self.ending == "stall":
            await exchange.hang()
        else:
            await exchange.drop(reset=self.ending == "reset")

    async def _single(self, exchange: Exchange) -> None:
        # Without streaming Ollama collects the chunks itself: a failure is a plain error.
        count = len(self.thinking) + len(self.tokens) + (1 if self.tool_calls else 0)
        if self.ending != "done" and self.limit is not None:
            count = min(count, self.limit)
        await exchange.pause(self.delay * (count + 1))
        if self.ending == "stall":
            await exchange.hang()
        elif self.ending in ("cut", "reset"):
            await exchange.drop(reset=self.ending == "reset")
        elif self.ending == "error":
            await exchange.respond(500, _encode({"error": self.message}), JSON_TYPE)
        else:
            body = self._chunk(
                exchange, "".join(self.tokens), "".join(self.thinking), self.tool_calls
            )
            await exchange.respond(200, _encode(self._final(body)), JSON_TYPE)


def _tokens(tokens: str | Sequence[str]) -> tuple[str, ...]:
    return (tokens,) if isinstance(tokens, str) else tuple(tokens)


def reply(
    tokens: str | Sequence[str] = DEFAULT_TOKENS,
    *,
    delay: float = 0.0,
    model: str | None = None,
    thinking: str | Sequence[str] = (),
    tool_calls: Sequence[Mapping[str, Any]] = (),
    done_reason: str | None = "stop",
) -> Script:
    """Answer like Ollama: NDJSON chunks (thinking, tokens, tool calls, then `done:true` with
    stats), or one JSON object when the request says `"stream": false`.

    `delay` is slept before every chunk (in total before a non-streamed answer); `model`
    defaults to the requested model; a bare string is one token; `done_reason=None` omits it.
    On `/api/generate` the text goes in `response` instead of `message.content`.
    """
    return _Generation(
        _tokens(tokens),
        delay,
        model,
        _tokens(thinking),
        tuple(tool_calls),
        done_reason,
    )


def cut_after(
    tokens: str | Sequence[str], n: int, *, delay: float = 0.0, reset: bool = False
) -> Script:
    """Stream `n` chunks, then close the TCP connection without ending the chunked body
    (FIN; `reset=True` sends an RST instead). Not streaming: close without a response."""
    return _Generation(_tokens(tokens), delay, limit=n, ending="reset" if reset else "cut")


def error_after(
    tokens: str | Sequence[str],
    n: int,
    message: str = STREAM_ERROR_MESSAGE,
    *,
    delay: float = 0.0,
) -> Script:
    """Stream `n` chunks, then an in-band `{"error": message}` line and a proper end of the
    chunked body; the status stays 200 (Ollama's mid-stream failure). Not streaming: 500."""
    return _Generation(_tokens(tokens), delay, limit=n, ending="error", message=message)


def stall_after(tokens: str | Sequence[str], n: int, *, delay: float = 0.0) -> Script:
    """Send the headers and `n` chunks, then go silent with the connection open."""
    return _Generation(_tokens(tokens), delay, limit=n, ending="stall")


@dataclass(frozen=True)
class _Status(Script):
    code: int
    body: bytes
    content_type: str

    async def run(self, exchange: Exchange) -> None:
        await exchange.respond(self.code, self.body, self.content_type)


def status(
    code: int,
    body: Mapping[str, Any] | Sequence[Any] | str | bytes = b"",
    *,
    content_type: str | None = None,
) -> Script:
    """Answer with a fixed status and body: a dict/list is sent as JSON, a str as
    `text/plain; charset=utf-8`, bytes as they are (`application/octet-stream`)."""
    if isinstance(body, bytes):
        data, default_type = body, "application/octet-stream"
    elif isinstance(body, str):
        data, default_type = body.encode(), "text/plain; charset=utf-8"
    else:
        data, default_type = _encode(body), JSON_TYPE
    return _Status(code, data, content_type or default_type)


def busy() -> Script:
    """503 with Ollama's exact queue-full message."""
    return status(503, {"error": BUSY_MESSAGE})


def page_not_found() -> Script:
    """gin's plain-text 404 for a path the server does not route (an old server)."""
    return status(404, "404 page not found", content_type="text/plain")


@dataclass(frozen=True)
class _ModelNotFound(Script):
    async def run(self, exchange: Exchange) -> None:
        body = {"error": f"model '{exchange.model}' not found"}
        await exchange.respond(404, _encode(body), JSON_TYPE)


def model_not_found() -> Script:
    """404 `{"error": "model '<requested name>' not found"}`, as `/api/chat` sends it."""
    return _ModelNotFound()


@dataclass(frozen=True)
class _Stall(Script):
    async def run(self, exchange: Exchange) -> None:
        await exchange.hang()


def stall_before_headers() -> Script:
    """Read the request and never answer; the connection stays open."""
    return _Stall()


@dataclass(frozen=True)
class _Lines(Script):
    lines: tuple[bytes, ...]
    delay: float
    content_type: str

    async def run(self, exchange: Exchange) -> None:
        await exchange.start_stream(self.content_type)
        for line in self.lines:
            await exchange.pause(self.delay)
            await exchange.send_chunk(line)
        await exchange.end_stream()


def ndjson_lines(
    lines: Sequence[bytes], *, delay: float = 0.0, content_type: str = NDJSON_TYPE
) -> Script:
    """Stream each item as one HTTP chunk exactly as given (add the `\\n` yourself), then end
    the body properly. Serves fixture files too: `ndjson_lines(data.splitlines(True))`."""
    return _Lines(tuple(lines), delay, content_type)


@dataclass(frozen=True)
class _Garbage(Script):
    async def run(self, exchange: Exchange) -> None:
        await exchange.send_raw(b"\x00\x01NOT-HTTP garbage \xff\xfe\r\n\r\n")
        await exchange.drop()


def garbage_response() -> Script:
    """Answer with bytes that are not HTTP at all, then close."""
    return _Garbage()


@dataclass(frozen=True)
class _Drop(Script):
    reset: bool

    async def run(self, exchange: Exchange) -> None:
        await exchange.drop(reset=self.reset)


def drop_connection(*, reset: bool = False) -> Script:
    """Read the request, then close the connection without answering (a crashed server)."""
    return _Drop(reset)


@dataclass(frozen=True)
class _Delayed(Script):
    seconds: float
    then: Script

    async def run(self, exchange: Exchange) -> None:
        await exchange.pause(self.seconds)
        await self.then.run(exchange)


def delayed(seconds: float, then: Script) -> Script:
    """Wait `seconds` (noticing a client that leaves), then run `then`."""
    return _Delayed(seconds, then)


def embedding_of(text: str, dimensions: int = 8) -> list[float]:
    """The fake's (deterministic, L2-normalised) embedding of `text`."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dimensions)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


def _canonical(name: str) -> str:
    name = name.lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _details(name: str) -> dict[str, Any]:
    family_match = re.match(r"[a-z]+", name.rsplit("/", 1)[-1].lower())
    family = family_match.group() if family_match else "llama"
    tag = name.rsplit(":", 1)[-1].lower() if ":" in name else ""
    size = tag.upper() if re.fullmatch(r"\d+(\.\d+)?[bm]", tag) else "7.6B"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": "Q4_K_M",
    }


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        "size": 2019393189,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(name),
    }


PULL_LAYERS = (("model", 2_019_393_189), ("params", 96))
"""The layers the builtin `POST /api/pull` reports for any model: (name, bytes)."""


def _pull_lines(name: str) -> list[dict[str, Any]]:
    """What Ollama streams for a pull of `name`: the manifest, two layers downloading in
    turns, then the checks and "success"; for a name with "missing" in it, an error."""
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    if "missing" in name:
        return [*lines, {"error": "pull model manifest: file does not exist"}]
    layers = [
        (f"sha256:{hashlib.sha256(f'{name}/{part}'.encode()).hexdigest()}", size)
        for part, size in PULL_LAYERS
    ]
    for step in range(3):  # the layers interleave, as Ollama's concurrent downloads do
        for digest, size in layers:
            line: dict[str, Any] = {"status": f"pulling {digest[7:19]}", "digest": digest}
            line["total"] = size
            if step:  # Go's omitempty: no "completed" while it is 0
                line["completed"] = size * step // 2
            lines.append(line)
    lines += [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "removing unused layers"},
        {"status": "success"},
    ]
    return lines


_ROUTES: Mapping[str, frozenset[str]] = {
    "/": frozenset({"GET", "HEAD"}),
    "/api/version": frozenset({"GET", "HEAD"}),
    "/api/tags": frozenset({"GET", "HEAD"}),
    "/api/ps": frozenset({"GET"}),
    "/api/show": frozenset({"POST"}),
    "/api/chat": frozenset({"POST"}),
    "/api/generate": frozenset({"POST"}),
    "/api/embed": frozenset({"POST"}),
    "/api/embeddings": frozenset({"POST"}),
    "/api/pull": frozenset({"POST"}),
    "/api/delete": frozenset({"DELETE"}),
}


class _Builtin(Script):
    """A healthy Ollama with `server.models` installed."""

    async def run(self, exchange: Exchange) -> None:
        server, request = exchange.server, exchange.request
        methods = _ROUTES.get(request.path)
        if methods is None:
            await page_not_found().run(exchange)
        elif request.method not in methods:
            await status(405, "405 method not allowed", content_type="text/plain").run(exchange)
        elif request.path == "/":
            await status(200, "Ollama is running").run(exchange)
        elif request.path == "/api/version":
            await status(200, {"version": server.version}).run(exchange)
        elif request.path == "/api/tags":
            await status(200, {"models": [_model_entry(n) for n in server.models]}).run(exchange)
        elif request.path == "/api/ps":
            models = [_model_entry(n) for n in server.loaded if server.has_model(n)]
            await status(200, {"models": models}).run(exchange)
        elif request.path == "/api/show":
            await self._show(exchange)
        elif request.path in ("/api/embed", "/api/embeddings"):
            await self._embed(exchange)
        elif request.path == "/api/pull":
            await self._pull(exchange)
        elif request.path == "/api/delete":
            await self._delete(exchange)
        else:
            await self._generate(exchange)

    async def _show(self, exchange: Exchange) -> None:
        name = exchange.model
        if not exchange.server.has_model(name):
            error = {"error": f"model '{_canonical(name)}' not found"}
            await status(404, error).run(exchange)
            return
        details = _details(name)
        architecture = details["family"]
        body = {
            "parameters": "temperature 0.7\nnum_ctx 2048",
            "template": "{{ .Prompt }}",
            "details": details,
            "model_info": {
                "general.architecture": architecture,
                f"{architecture}.context_length": 4096,
            },
            "capabilities": ["completion"],
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        }
        await status(200, body).run(exchange)

    async def _embed(self, exchange: Exchange) -> None:
        server, body, name = exchange.server, exchange.body, exchange.model
        legacy = exchange.request.path == "/api/embeddings"
        if not server.has_model(name):
            message = (
                f"model '{name}' not found"
                if not name
                else f'model "{name}" not found, try pulling it first'
            )
            await status(404, {"error": message}).run(exchange)
            return
        texts: object = body.get("prompt", "") if legacy else body.get("input", [])
        if isinstance(texts, str):
            texts = [texts] if texts or legacy else []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            await status(400, {"error": "invalid input type"}).run(exchange)
            return
        inputs = cast("list[str]", texts)
        # A server computes one batch at a time, as one GPU would.
        async with server._embedding:  # pyright: ignore[reportPrivateUsage]
            await exchange.pause(server.embed_delay)
        dimensions = body.get("dimensions") or server.dimensions
        vectors = [embedding_of(text, dimensions) for text in inputs]
        if legacy:
            await status(200, {"embedding": vectors[0] if inputs[0] else []}).run(exchange)
            return
        answer = {
            "model": name,
            "embeddings": vectors,
            "total_duration": 1_000_000 + 10_000 * len(inputs),
            "load_duration": 1_000_000,
            "prompt_eval_count": sum(len(t.split()) + 1 for t in inputs),
        }
        await status(200, answer).run(exchange)

    async def _pull(self, exchange: Exchange) -> None:
        # Ollama's progress lines; a name with "missing" in it has no manifest upstream.
        name, server = exchange.model, exchange.server
        if not name:
            await status(400, {"error": "invalid model name"}).run(exchange)
            return
        lines = _pull_lines(name)
        if not exchange.wants_stream:  # one answer at the end: the last line
            self._pulled(server, name, lines[-1])
            await status(200 if "status" in lines[-1] else 500, lines[-1]).run(exchange)
            return
        await exchange.start_stream()
        for line in lines:
            self._pulled(server, name, line)
            await exchange.send_chunk(_encode(line) + b"\n")
        await exchange.end_stream()

    @staticmethod
    def _pulled(server: FakeOllama, name: str, line: Mapping[str, Any]) -> None:
        if line.get("status") == "success" and not server.has_model(name):
            server.models.append(name)

    async def _delete(self, exchange: Exchange) -> None:
        name, server = exchange.model, exchange.server
        if not server.has_model(name):
            await status(404, {"error": f"model '{name}' not found"}).run(exchange)
            return
        server.models[:] = [m for m in server.models if _canonical(m) != _canonical(name)]
        await exchange.respond(200, b"", "text/plain; charset=utf-8")

    async def _generate(self, exchange: Exchange) -> None:
        body, path = exchange.body, exchange.request.path
        if path == "/api/chat" and not exchange.model:
            await status(400, {"error": "model is required"}).run(exchange)
        elif not exchange.server.has_model(exchange.model):
            await model_not_found().run(exchange)
        elif not body.get("prompt" if path == "/api/generate" else "messages"):
            await self._load(exchange, unload=body.get("keep_alive") in (0, "0"))
        else:
            await reply().run(exchange)

    async def _load(self, exchange: Exchange, *, unload: bool) -> None:
        # No messages/prompt: load (or unload) the model, answer one JSON object.
        chunk: dict[str, Any] = {"model": exchange.model, "created_at": _now()}
        if exchange.request.path == "/api/generate":
            chunk["response"] = ""
        else:
            chunk["message"] = {"role": "assistant", "content": ""}
        chunk |= {"done_reason": "unload" if unload else "load", "done": True}
        await exchange.respond(200, _encode(chunk), JSON_TYPE)


_BUILTIN = _Builtin()


class _Background(ABC):
    """A listener on 127.0.0.1 served from a daemon thread; a context manager."""

    _port: int = 0

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} is not started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`, no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @abstractmethod
    def start(self) -> _Background:
        """Start listening; returns self."""

    @abstractmethod
    def stop(self) -> None:
        """Stop listening and close every connection."""

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class FakeOllama(_Background):
    """An HTTP/1.1 server that speaks Ollama's API and fails on demand.

    Attributes may be changed between (and during) requests from the test thread:
    `models` (served by `/api/tags`), `loaded` (by `/api/ps`), `version`, `probe_delay`
    (slept before answering `/`, `/api/version`, `/api/tags` and `/api/ps`), `chat`,
    `embed_delay` (how long each `/api/embed` batch takes; batches are computed one at a time)
    and `dimensions` (of its embeddings, see `embedding_of`).
    """

    def __init__(
        self,
        *,
        models: Sequence[str] = ("llama3.2:3b",),
        version: str = "0.33.0",
        probe_delay: float = 0.0,
        chat: Script | Sequence[Script] | None = None,
    ) -> None:
        self.models: list[str] = list(models)
        self.loaded: list[str] = []
        self.version = version
        self.probe_delay = probe_delay
        self.embed_delay = 0.0  # seconds each /api/embed batch takes, one batch at a time
        self.dimensions = 8  # the length of the fake's embeddings
        self._embedding = asyncio.Lock()  # made again for each event loop, in _main
        self.requests: list[Recorded] = []
        self.connections = 0  # TCP connections accepted
        self.disconnects = 0  # responses the client abandoned before they were complete
        self.script_errors: list[Exception] = []  # bugs in custom scripts (connection dropped)
        self._scripts: dict[str, list[Script]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._startup_error: BaseException | None = None
        if chat is not None:
            self.chat = chat

    # -- scripting -------------------------------------------------------------------------

    def on(self, path: str, script: Script | Sequence[Script] | None) -> None:
        """Answer requests to `path` (any method) with `script` instead of the default.

        A sequence is consumed one script per request and its last script then repeats;
        None restores the default behaviour.
        """
        if script is None:
            self._scripts.pop(path, None)
        else:
            scripts = [script] if isinstance(script, Script) else list(script)
            if not scripts:
                raise ValueError("give at least one script, or None for the default")
            self._scripts[path] = scripts

    @property
    def chat(self) -> tuple[Script, ...]:
        """The scripts still queued for `POST /api/chat` (empty: the default behaviour)."""
        return tuple(self._scripts.get("/api/chat", ()))

    @chat.setter
    def chat(self, script: Script | Sequence[Script] | None) -> None:
        self.on("/api/chat", script)

    def _next_script(self, path: str) -> Script:
        scripts = self._scripts.get(path)
        if not scripts:
            return _BUILTIN
        return scripts.pop(0) if len(scripts) > 1 else scripts[0]

    def has_model(self, name: str) -> bool:
        """Whether `name` is installed (case-insensitive, `:latest` implied)."""
        return bool(name) and _canonical(name) in {_canonical(m) for m in self.models}

    # -- observing -------------------------------------------------------------------------

    def count(self, path: str, method: str | None = None) -> int:
        """How many requests reached `path` (optionally only with `method`)."""
        return sum(
            1
            for r in list(self.requests)
            if r.path == path and (method is None or r.method == method)
        )

    def wait_for_disconnect(self, timeout: float, count: int = 1) -> bool:
        """Block until `disconnects >= count`; False if `timeout` seconds pass first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.disconnects >= count, timeout)

    def wait_for_request(self, path: str, timeout: float, count: int = 1) -> bool:
        """Block until `count` requests reached `path`; False if `timeout` passes first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count(path) >= count, timeout)

    def _note(self, *, request: Recorded | None = None, disconnect: bool = False) -> None:
        with self._changed:
            if request is not None:
                self.requests.append(request)
            if disconnect:
                self.disconnects += 1
            self._changed.notify_all()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeOllama:
        """Start listening (on an ephemeral port; after a `stop()`, on the same port again, as
        a restarted server would); returns self once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("FakeOllama is already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="FakeOllama", daemon=True
        )
        self._thread.start()
        if not ready.wait(_JOIN_TIMEOUT):
            raise RuntimeError("FakeOllama did not start listening in time")
        if self._startup_error is not None:
            raise RuntimeError("FakeOllama failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        """Close every connection and the event loop; never blocks for more than a few seconds."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_JOIN_TIMEOUT)
        self._thread = self._loop = self._stopping = None

    def drop_idle_connections(self) -> None:
        """Close every open connection now (FIN), as a server ending its keep-alives does."""
        loop = self._loop
        if loop is not None:
            for writer in list(self._writers):
                loop.call_soon_threadsafe(writer.close)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._embedding = asyncio.Lock()
        server = await asyncio.start_server(
            self._serve, "127.0.0.1", self._port, reuse_address=True
        )
        self._port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await asyncio.sleep(0)  # let connections accepted just now register
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Connections that registered while the others were cancelled, and the close
            # callbacks of all of them: run now, before the loop ends, so that no socket
            # is left for the garbage collector to warn about.
            for writer in list(self._writers):
                writer.transport.abort()
            for _ in range(3):
                await asyncio.sleep(0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _JOIN_TIMEOUT / 2)
            # Last, any socket transport the loop still holds (one accepted as the server
            # closed, whose handler never ran): the selector loop keeps them by fd.
            leftover: Any = getattr(self._loop, "_transports", {})
            for transport in list(leftover.values()):
                if transport is not None and not transport.is_closing():
                    transport.abort()
            for _ in range(2):
                await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with self._changed:
            self.connections += 1
        connection = _Connection(reader, writer)
        try:
            while (request := await _read_request(connection)) is not None:
                if not await self._answer(connection, request):
                    break
        except _BadRequest:
            with contextlib.suppress(_ClientGone):
                body = b"400 Bad Request"
                await connection.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
        except asyncio.CancelledError:
            pass  # stop() cancelled us; ending quietly keeps 3.11/3.12 asyncio from logging it
        finally:
            connection.pump.cancel()
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _answer(self, connection: _Connection, request: Recorded) -> bool:
        """Run the script for one request; True if the connection can serve another."""
        self._note(request=request)
        exchange = Exchange(self, connection, request)
        try:
            if request.path in _PROBE_PATHS:
                await exchange.pause(self.probe_delay)
            await self._next_script(request.path).run(exchange)
            if not exchange.started and exchange.reusable:
                message = f"the script for {request.path} sent no response"
                await exchange.respond(500, _encode({"error": message}), JSON_TYPE)
        except _ClientGone:
            self._note(disconnect=True)
            return False
        except Exception as exc:  # a broken custom script: keep it for the test to see
            self.script_errors.append(exc)
            return False
        return exchange.reusable and request.headers.get("connection", "").lower() != "close"


async def _read_request(connection: _Connection) -> Recorded | None:
    """Parse one request off the connection; None when the client closed it."""
    head = await connection.read_until(b"\r\n\r\n", _MAX_HEAD)
    if head is None:
        return None
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")[:-2]
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(connection)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest from None
        body = await connection.read_exactly(length)
    if body is None:
        return None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    path, _, query = target.partition("?")
    return Recorded(method, path, query, headers, body, parsed)


async def _read_chunked(connection: _Connection) -> bytes | None:
    body = bytearray()
    while (line := await connection.read_until(b"\r\n", 1024)) is not None:
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            raise _BadRequest from None
        if size == 0:
            while (trailer := await connection.read_until(b"\r\n", _MAX_HEAD)) != b"\r\n":
                if trailer is None:
                    return None
            return bytes(body)
        chunk = await connection.read_exactly(size + 2)
        if chunk is None:
            return None
        body += chunk[:-2]
    return None


class BlackHole(_Background):
    """A TCP listener that accepts connections and never reads or writes a byte."""

    def __init__(self) -> None:
        self.accepted = 0
        self._changed = threading.Condition()
        self._clients: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BlackHole:
        """Start listening on an ephemeral port (at once: the kernel queues connections)."""
        if self._thread is not None:
            raise RuntimeError("BlackHole is already started")
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._port = self._listener.getsockname()[1]
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="BlackHole", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._listener is not None
        assert self._wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake[0], selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake[0]:
                        return
                    client, _ = self._listener.accept()
                    self._clients.append(client)
                    with self._changed:
                        self.accepted += 1
                        self._changed.notify_all()

    def wait_for_connection(self, timeout: float, count: int = 1) -> bool:
        """Block until `count` connections were accepted; False if `timeout` passes first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.accepted >= count, timeout)

    def stop(self) -> None:
        """Stop the thread and close the listener and every accepted connection."""
        if self._thread is None or self._wake is None or self._listener is None:
            return
        self._wake[1].send(b"x")
        self._thread.join(_JOIN_TIMEOUT)
        for sock in [*self._clients, self._listener, *self._wake]:
            sock.close()
        self._clients.clear()
        self._thread = self._wake = self._listener = None


def refused_url() -> str:
    """A `http://127.0.0.1:<port>` URL where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeOllamaFactory(Protocol):
    """The `fake_ollama` fixture: starts a server, stopped at teardown."""

    def __call__(
        self,
        *,
        models: Sequence[str] = ...,
        version: str = ...,
        probe_delay: float = ...,
        chat: Script | Sequence[Script] | None = ...,
    ) -> FakeOllama: ...


class BlackHoleFactory(Protocol):
    """The `black_hole` fixture: starts a listener, stopped at teardown."""

    def __call__(self) -> BlackHole: ...
