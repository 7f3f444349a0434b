"""Ollama's own API, measured next to the official ``ollama`` client (ollama-python).

Two measurements, each next to its peer in the same run, in alternating rounds
(figures are medians over rounds):

* embedding throughput: 10,000 short texts embedded by one ``AsyncCortex.embed`` call
  (``routing="least_busy"``, the default batches of 64: 157 of them, 16 in flight:
  4 per server) over 4 fake Ollama servers, next to ollama-python's
  ``Client.embed`` called in a plain loop over the same 157 batches on one of them.
  The 4 fakes run in one process of their own, one port each; each takes 20 ms per
  batch, one batch at a time (a lock per server: one GPU each, so requests to the same
  server queue), and answers 768-dimension vectors (nomic-embed-text's) of 8 significant
  digits, pre-encoded per batch size. Both sides are warmed up first (the probes sent,
  the connections open). It reports texts/s of each, the CPU seconds this process spent
  on each call, and the batches each server served in aicortex's call.
  Goal: aicortex >= 3x the texts/s of ollama-python's loop (4 servers for 1: at most 4x).
* the native gateway's added latency: small non-streamed ``ollama.Client.chat`` calls
  straight to a fake Ollama (its own process, answering ``/api/chat`` at once) and
  through the gateway (``aicortex.server.create_app`` under uvicorn, another process,
  serving Ollama's API at ``/api/*``; it always streams from the upstream), in
  alternating rounds of ``--requests`` each: p50, p99, and what the gateway adds, the
  median over rounds of (gateway p50 - direct p50). Goal: <= 1.5 ms.

Run with ``nox -s bench`` or ``python tests/benchmarks/bench_native.py [--rounds N]
[--only embed|gateway]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import ollama
from _wire import read_request
from bench_proxy import (
    MODEL,
    _serve_proxy,
    _serve_upstream,
    free_port,
    percentiles,
    server_stack,
    timed,
    verdict,
    wait_for,
)

import aicortex
from aicortex import AsyncCortex

EMBED_MODEL = "nomic-embed-text"
EMBED_TAG = "nomic-embed-text:latest"
DIMENSIONS = 768  # nomic-embed-text's
SERVERS = 4
BATCH_SECONDS = 0.020  # each fake server's time per batch, one batch at a time
BATCH_SIZE = 64  # AsyncCortex.embed's default
GOAL_EMBED_RATIO = 3.0
GOAL_ADDED_P50_MS = 1.5
CHAT: list[dict[str, str]] = [{"role": "user", "content": "hi"}]


# --- the fake embedding servers ----------------------------------------------------------


def _serve_embedders(port_out: Any, count: int, seconds: float) -> None:
    """``count`` fake Ollama embedding servers in this process, on a port each (sent to
    ``port_out`` in order). Each serves one ``/api/embed`` batch at a time, ``seconds``
    each; ``GET /stats`` on any of them answers ``{"batches": [...]}``, the batches each
    one has served so far."""
    rng = random.Random(DIMENSIONS)
    # Ollama's vectors are float32s: 8 significant digits is about as long as they print.
    vector = json.dumps(
        [float(f"{rng.gauss(0.0, 0.036):.8g}") for _ in range(DIMENSIONS)],
        separators=(",", ":"),
    ).encode()
    tags = json.dumps({"models": [{"name": EMBED_TAG, "model": EMBED_TAG}]}).encode()
    served = [0] * count
    answers: dict[tuple[str, int], bytes] = {}

    def plain(body: bytes, status: bytes = b"200 OK") -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            status,
            len(body),
            body,
        )

    def embedded(model: str, inputs: int) -> bytes:
        """The whole answer to a batch of ``inputs`` texts, encoded once per size."""
        key = (model, inputs)
        if key not in answers:
            answers[key] = plain(
                b'{"model":%s,"embeddings":[%s],"total_duration":%d,'
                b'"load_duration":%d,"prompt_eval_count":%d}'
                % (
                    json.dumps(model).encode(),
                    b",".join([vector] * inputs),
                    int(seconds * 1e9),
                    1_000_000,
                    6 * inputs,
                )
            )
        return answers[key]

    def handler(index: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        gpu = asyncio.Lock()  # one batch at a time: later ones queue

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                path, body = await read_request(reader)
                if path == b"/api/embed":
                    request = json.loads(body)
                    inputs = request["input"]
                    size = 1 if isinstance(inputs, str) else len(inputs)
                    async with gpu:
                        await asyncio.sleep(seconds)
                        served[index] += 1
                    writer.write(embedded(request["model"], size))
                elif path == b"/api/tags":
                    writer.write(plain(tags))
                elif path == b"/api/ps":
                    writer.write(plain(b'{"models":[]}'))
                elif path in (b"/api/version", b"/"):
                    writer.write(plain(b'{"version":"0.33.0"}'))
                elif path == b"/stats":
                    writer.write(plain(json.dumps({"batches": served}).encode()))
                else:
                    writer.write(plain(b'{"error":"not found"}', b"404 Not Found"))
                await writer.drain()

        return handle

    async def main() -> None:
        servers: list[asyncio.Server] = []
        for index in range(count):
            handle = handler(index)

            async def connection(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] = handle,
            ) -> None:
                try:
                    await handle(reader, writer)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
                finally:
                    writer.close()

            server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=1024)
            servers.append(server)
            port_out.put(server.sockets[0].getsockname()[1])
        await asyncio.gather(*(server.serve_forever() for server in servers))

    asyncio.run(main())


# --- embedding throughput ----------------------------------------------------------------


async def served_batches(url: str) -> list[int]:
    async with httpx.AsyncClient() as client:
        batches: list[int] = (await client.get(url + "/stats")).json()["batches"]
        return batches


def embed_aicortex(urls: list[str], texts: list[str]) -> tuple[float, float, list[int]]:
    """(seconds, CPU seconds of this process, batches per server) of one ``embed`` call
    of every text, after a warm-up call of 64 small batches that probes the servers and
    opens connections to each (a burst of batches can all go to one server at first)."""

    async def main() -> tuple[float, float, list[int]]:
        async with AsyncCortex(urls, routing="least_busy", fallback=False) as cortex:
            warm = await cortex.embed(texts[:256], model=EMBED_MODEL, batch_size=4)
            assert len(warm.servers) == len(urls), warm.servers
            before = await served_batches(urls[0])
            cpu = time.process_time()
            started = time.perf_counter()
            result = await cortex.embed(texts, model=EMBED_MODEL)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
            after = await served_batches(urls[0])
        expected = -(-len(texts) // BATCH_SIZE)
        assert len(result) == len(texts), len(result)
        assert result.batches == expected, result.batches
        assert all(len(v) == DIMENSIONS for v in result.embeddings[:: BATCH_SIZE // 2])
        return elapsed, cpu, [a - b for a, b in zip(after, before, strict=True)]

    return anyio.run(main)


def embed_ollama(url: str, texts: list[str]) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) of ``ollama.Client.embed`` called in a
    loop over the same batches, on one server, after one warm-up call."""
    batches = [texts[i : i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE)]
    with ollama.Client(host=url) as client:
        client.embed(model=EMBED_MODEL, input=batches[0])
        count = 0
        cpu = time.process_time()
        started = time.perf_counter()
        for batch in batches:
            answer = client.embed(model=EMBED_MODEL, input=batch)
            count += len(answer.embeddings)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    assert count == len(texts), count
    assert len(answer.embeddings[0]) == DIMENSIONS
    return elapsed, cpu


def embed_throughput(args: argparse.Namespace) -> None:
    ports: Any = multiprocessing.SimpleQueue()
    process = multiprocessing.Process(
        target=_serve_embedders, args=(ports, SERVERS, BATCH_SECONDS), daemon=True
    )
    process.start()
    try:
        urls = [f"http://127.0.0.1:{ports.get()}" for _ in range(SERVERS)]
        texts = [f"short text number {i}" for i in range(args.texts)]
        batches = -(-len(texts) // BATCH_SIZE)
        rounds = args.rounds or 3
        print(
            f"embedding {len(texts):,} texts ({batches} batches of {BATCH_SIZE}, "
            f"{DIMENSIONS} dims), fake servers taking {BATCH_SECONDS * 1000:.0f} ms per batch, "
            f"one at a time; {rounds} rounds"
        )
        ours: list[tuple[float, float, list[int]]] = []
        theirs: list[tuple[float, float]] = []
        for round_ in range(rounds):
            runs: list[Callable[[], None]] = [
                lambda: ours.append(embed_aicortex(urls, texts)),
                lambda: theirs.append(embed_ollama(urls[0], texts)),
            ]
            for run in runs if round_ % 2 == 0 else runs[::-1]:
                run()
        ours_rate = statistics.median(len(texts) / elapsed for elapsed, _, _ in ours)
        theirs_rate = statistics.median(len(texts) / elapsed for elapsed, _ in theirs)
        ours_cpu = statistics.median(cpu for _, cpu, _ in ours)
        theirs_cpu = statistics.median(cpu for _, cpu in theirs)
        median_run = sorted(ours, key=lambda run: run[0])[len(ours) // 2]
        spread = " ".join(str(n) for n in median_run[2])
        per_server = BATCH_SIZE / BATCH_SECONDS
        ours_label = f"aicortex AsyncCortex.embed, {SERVERS} servers"
        theirs_label = "ollama-python Client.embed loop, 1 server"
        print(
            f"  {ours_label:42s}{ours_rate:8,.0f} texts/s  "
            f"(CPU here {ours_cpu:.2f} s; ceiling {SERVERS * per_server:,.0f})"
        )
        print(f"    batches per server (median run): {spread}")
        print(
            f"  {theirs_label:42s}{theirs_rate:8,.0f} texts/s  "
            f"(CPU here {theirs_cpu:.2f} s; ceiling {per_server:,.0f})"
        )
        ratio = ours_rate / theirs_rate
        print(
            f"  ratio {ratio:.2f}x  goal >= {GOAL_EMBED_RATIO:g}x: "
            f"{verdict(ratio >= GOAL_EMBED_RATIO)}"
        )
    finally:
        stop(process)


# --- the native gateway ------------------------------------------------------------------


def chat_latency(url: str, count: int) -> list[float]:
    """Seconds of each of ``count`` small non-streamed chats by ``ollama.Client``."""
    with ollama.Client(host=url) as client:

        def run() -> None:
            answer = client.chat(model=MODEL, messages=CHAT)
            assert answer.message.content == "Hi!", answer

        return timed(run, count, warmup=min(50, count))


def gateway_latency(args: argparse.Namespace) -> None:
    ports: Any = multiprocessing.SimpleQueue()
    upstream_process = multiprocessing.Process(target=_serve_upstream, args=(ports, 3), daemon=True)
    upstream_process.start()
    gateway_process: multiprocessing.Process | None = None
    try:
        upstream = f"http://127.0.0.1:{ports.get()}"
        port = free_port()
        gateway_process = multiprocessing.Process(
            target=_serve_proxy, args=(port, upstream), daemon=True
        )
        gateway_process.start()
        gateway = f"http://127.0.0.1:{port}"
        wait_for(gateway + "/health")
        rounds = args.rounds or 7
        print(
            f"native gateway (uvicorn, {server_stack()}): non-streamed ollama.Client.chat, "
            f"{rounds} rounds of {args.requests} sequential requests"
        )
        kinds = {"direct": upstream, "gateway": gateway}
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        added: list[float] = []
        for round_ in range(rounds):
            p50s: dict[str, float] = {}
            order = list(kinds.items())
            for kind, url in order if round_ % 2 == 0 else order[::-1]:
                taken = chat_latency(url, args.requests)
                samples[kind] += taken
                p50s[kind] = percentiles(taken)[0]
            added.append(p50s["gateway"] - p50s["direct"])
        plus = statistics.median(added)
        for kind, label in (
            ("direct", "straight to the fake Ollama"),
            ("gateway", "through the gateway"),
        ):
            p50, p99 = percentiles(samples[kind])
            line = f"  {label:27s}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
            if kind == "gateway":
                line += (
                    f"  (+{plus:.2f} ms over direct)  goal <= {GOAL_ADDED_P50_MS} ms: "
                    f"{verdict(plus <= GOAL_ADDED_P50_MS)}"
                )
            print(line)
    finally:
        if gateway_process is not None:
            stop(gateway_process)
        stop(upstream_process)


# --- main --------------------------------------------------------------------------------


def stop(process: multiprocessing.Process) -> None:
    process.terminate()
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, help="rounds of each measurement (default: 3 embed, 7 gateway)"
    )
    parser.add_argument("--requests", type=int, default=300, help="chats per gateway round")
    parser.add_argument("--texts", type=int, default=10_000, help="texts to embed")
    parser.add_argument("--only", choices=["embed", "gateway"], help="run only this measurement")
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"ollama-python {importlib.metadata.version('ollama')}, "
        f"aicortex {aicortex.__version__}"
    )
    if args.only in (None, "embed"):
        embed_throughput(args)
    if args.only in (None, "gateway"):
        gateway_latency(args)


if __name__ == "__main__":
    main()
