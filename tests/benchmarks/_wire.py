"""What the benchmarks' fake servers send: Ollama's NDJSON chat lines and HTTP/1.1
chunked bodies, and the loop that serves them from a process of their own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def chat_lines(model: str, tokens: list[str]) -> list[bytes]:
    """A streamed ``/api/chat`` answer: a line per token, then the final ``done`` line."""
    created = "2025-01-01T00:00:00.000000Z"
    lines = [
        line(
            {
                "model": model,
                "created_at": created,
                "message": {"role": "assistant", "content": token},
                "done": False,
            }
        )
        for token in tokens
    ]
    lines.append(
        line(
            {
                "model": model,
                "created_at": created,
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": 8,
                "eval_count": len(tokens),
                "eval_duration": 1_000_000_000,
            }
        )
    )
    return lines


def chunked(pieces: list[bytes]) -> bytes:
    """``pieces`` as the chunks of a chunked body, with its terminating chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def in_64k_chunks(data: bytes) -> bytes:
    """``data`` as a chunked body of 64 KiB chunks."""
    return chunked([data[i : i + 65536] for i in range(0, len(data), 65536)])


def stream_tokens(count: int) -> list[str]:
    return [f" tok{i % 100}" for i in range(count)]


def serve(handle: Handler, port_out: Any, backlog: int, port: int = 0) -> None:
    """Serve ``handle`` on ``port`` (default: a free one) of 127.0.0.1 until the process
    ends; the port goes to ``port_out`` (a multiprocessing queue). ``handle`` answers one
    connection; a client that leaves ends it quietly, and the connection is closed after
    it."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(
            connection, "127.0.0.1", port, backlog=backlog, reuse_address=True
        )
        port_out.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next request on a connection: its path (without the query) and its body.
    Raises ``asyncio.IncompleteReadError`` when the client closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for field in head.split(b"\r\n")[1:]:
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head.split(b" ", 2)[1].split(b"?", 1)[0], body
