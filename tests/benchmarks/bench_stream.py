"""Streaming throughput and import time, measured in one run.

Streams TOKENS NDJSON chat chunks from a fast local server (a separate process on
127.0.0.1, one HTTP chunk per line like Ollama) and prints tokens/s for:

* plain httpx + json (the baseline),
* ``AsyncCortex`` (goal: >= 0.85x the baseline),
* ``Cortex``, the blocking twin (goal: >= 0.6x),
* ollama-python's ``AsyncClient`` (when installed), for comparison.

Then the time of ``import aicortex`` next to ``import ollama`` (goal: <= 0.5x).
Run with ``nox -s bench`` or ``python tests/benchmarks/bench_stream.py [--tokens N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

import aicortex

MODEL = "bench:latest"


def _chunked_body(tokens: int) -> bytes:
    parts: list[bytes] = []
    for i in range(tokens):
        line = (
            json.dumps(
                {
                    "model": MODEL,
                    "created_at": "2025-01-01T00:00:00.000000Z",
                    "message": {"role": "assistant", "content": f" tok{i % 100}"},
                    "done": False,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        parts.append(b"%x\r\n%s\r\n" % (len(line), line))
    final = (
        json.dumps(
            {
                "model": MODEL,
                "created_at": "2025-01-01T00:00:00.000000Z",
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "eval_count": tokens,
                "eval_duration": 1_000_000_000,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )
    parts.append(b"%x\r\n%s\r\n" % (len(final), final))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def _serve(port_out: multiprocessing.SimpleQueue[int], tokens: int) -> None:
    stream_head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    stream_body = _chunked_body(tokens)
    tags = json.dumps({"models": [{"name": MODEL, "model": MODEL}]}).encode()
    version = b'{"version":"0.33.0"}'

    def plain(body: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                path = head.split(b" ", 2)[1]
                if path == b"/api/chat":
                    writer.write(stream_head)
                    writer.write(stream_body)
                elif path == b"/api/tags":
                    writer.write(plain(tags))
                else:
                    writer.write(plain(version))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _body() -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}


async def plain_httpx(url: str) -> int:
    count = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        client.stream("POST", "/api/chat", json=_body()) as response,
    ):
        async for line in response.aiter_lines():
            if line:
                chunk = json.loads(line)
                if chunk["message"]["content"]:
                    count += 1
    return count


def make_async_cortex(url: str) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        count = 0
        async with aicortex.AsyncCortex([url], fallback=False) as cortex:
            stream = await cortex.chat("go", model=MODEL, stream=True)
            async with stream:
                async for event in stream:
                    if event.type is aicortex.EventType.TOKEN:
                        count += 1
        return count

    return run


async def ollama_async(url: str) -> int:
    import ollama  # pyright: ignore[reportMissingImports]

    client = ollama.AsyncClient(host=url)
    count = 0
    async for part in await client.chat(  # pyright: ignore
        model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True
    ):
        if part["message"]["content"]:  # pyright: ignore
            count += 1
    return count


def cortex_sync(url: str) -> int:
    count = 0
    with aicortex.Cortex([url], fallback=False) as cortex:
        for event in cortex.chat("go", model=MODEL, stream=True):
            if event.type is aicortex.EventType.TOKEN:
                count += 1
    return count


def best_rate(run: Callable[[], int], tokens: int, repeats: int) -> float:
    rates: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        got = run()
        elapsed = time.perf_counter() - start
        if got != tokens:
            raise SystemExit(f"expected {tokens} tokens, got {got}")
        rates.append(tokens / elapsed)
    return max(rates)


def import_time(module: str, repeats: int) -> float | None:
    code = (
        "import time; t = time.perf_counter(); import "
        + module
        + "; print(time.perf_counter() - t)"
    )
    times: list[float] = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return None
        times.append(float(result.stdout))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokens: int = args.tokens

    ports: multiprocessing.SimpleQueue[int] = multiprocessing.SimpleQueue()
    server = multiprocessing.Process(target=_serve, args=(ports, tokens), daemon=True)
    server.start()
    try:
        port = ports.get()
        # Wait until it accepts connections.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        url = f"http://127.0.0.1:{port}"
        print(f"streaming {tokens:,} tokens from {url}, best of {args.repeats}")

        baseline = best_rate(lambda: anyio.run(plain_httpx, url), tokens, args.repeats)
        rates = {"plain httpx + json": baseline}
        rates["AsyncCortex"] = best_rate(
            lambda: anyio.run(make_async_cortex(url)), tokens, args.repeats
        )
        rates["Cortex (blocking)"] = best_rate(lambda: cortex_sync(url), tokens, args.repeats)
        try:
            import ollama  # noqa: F401  # pyright: ignore[reportUnusedImport, reportMissingImports]
        except ImportError:
            print("(ollama-python not installed; skipping it)")
        else:
            rates["ollama-python AsyncClient"] = best_rate(
                lambda: anyio.run(ollama_async, url), tokens, args.repeats
            )
        goals = {"AsyncCortex": 0.85, "Cortex (blocking)": 0.6}
        for name, rate in rates.items():
            ratio = rate / baseline
            goal = goals.get(name)
            verdict = (
                "" if goal is None else f"  goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'}"
            )
            print(f"  {name:<28} {rate:>12,.0f} tokens/s  {ratio:5.2f}x{verdict}")
    finally:
        server.kill()
        server.join()

    ours = import_time("aicortex", args.repeats * 2)
    theirs = import_time("ollama", args.repeats * 2)
    print(
        f"import aicortex: {ours * 1000:.1f} ms" if ours is not None else "import aicortex failed"
    )
    if theirs is not None and ours is not None:
        ratio = ours / theirs
        print(
            f"import ollama:   {theirs * 1000:.1f} ms  ratio {ratio:.2f}x  goal <= 0.5x: "
            f"{'met' if ratio <= 0.5 else 'MISSED'}"
        )
    else:
        print("(ollama-python not installed; no import comparison)")


if __name__ == "__main__":
    main()
