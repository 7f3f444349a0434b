"""The OpenAI-compatible proxy under load, measured with the official ``openai`` client.

Starts a fast fake Ollama (a separate process on 127.0.0.1 that answers ``/api/chat``
at once) and the proxy (``aicortex.server.create_app`` under uvicorn, another process,
so the client does not share its GIL), then measures in one run:

* latency of small non-streamed chats: p50/p99 through the proxy next to the same
  chat sent natively to the upstream, with ``openai.OpenAI`` (natively: Ollama's own
  ``/v1`` layer, which the fake serves too) and with plain httpx (natively:
  ``/api/chat``), in alternating rounds; what the proxy adds is the median over
  rounds of the p50 difference with the same client on both sides (goal: <= 1.5 ms);
* requests/s with 32 requests in flight (``openai.AsyncOpenAI`` in an anyio task group);
* tokens/s of one 20,000-token SSE stream (goal: >= 50,000 tokens/s).

If LiteLLM's proxy is installed and starts offline, it is measured the same way.

Then the paced scenario (``--only paced`` runs it alone; ``--only classic`` the
above): ``aicortex serve`` started as a command in front of ONE fake Ollama that
paces every stream on its own (``--paced-rate`` tokens/s, one HTTP chunk per token),
and ``--paced-streams`` concurrent streamed ``/v1/chat/completions`` of 80-120 tokens
each, all sent at once by one ``httpx.AsyncClient`` (on httpx-aiohttp's transport:
httpx's own pool alone delays 200 streams by seconds), in ``--paced-rounds`` rounds,
each after a round of 3-token streams that opens every connection. It reports

* every stream's first-token latency from its request: p50, p99, max
  (goal: max <= 250 ms), next to the same load sent straight to the upstream;
* the proxy process's CPU seconds (utime + stime from /proc) per 1,000 tokens
  (goal: <= 1.15x the old code's). The old code is a ``src/`` tree given with
  ``--baseline-src DIR`` (``git archive 60dc620 src metadata | tar -x -C DIR``),
  served the same way with ``PYTHONPATH=DIR/src``, in rounds alternating with the
  installed code's. Each proxy prints the ``aicortex`` it imported, which is checked.
  The old code holds at most 100 connections to a server, so there the last 100
  streams wait for the first ones to end.

Run with ``nox -s bench`` or ``python tests/benchmarks/bench_proxy.py
[--only paced] [--baseline-src DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx
import openai
from _wire import chat_lines, chunked, in_64k_chunks, line, read_request, serve, stream_tokens

MODEL = "bench:latest"
STREAM_MODEL = "bench-stream:latest"  # one HTTP chunk per NDJSON line, as Ollama writes
BULK_MODEL = "bench-bulk:latest"  # the same lines packed into 64 KiB HTTP chunks
GOAL_ADDED_P50_MS = 1.5
GOAL_SSE_TOKENS = 50_000
PACED_MODEL = "bench-paced:latest"  # each stream paced on its own, one chunk per token
GOAL_PACED_MAX_FIRST_MS = 250.0
GOAL_PACED_CPU_RATIO = 1.15
PACED_TOKENS = (80, 120)  # tokens per paced stream, spread over this range
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say hi."}]


# --- the fake upstream -----------------------------------------------------------------


def _serve_upstream(port_out: Any, tokens: int) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    tags = json.dumps(
        {"models": [{"name": m, "model": m} for m in (MODEL, STREAM_MODEL, BULK_MODEL)]}
    ).encode()

    def plain(body: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def single(model: str, tokens: list[str]) -> bytes:
        """The answer to ``"stream": false``: one JSON object."""
        lines = [json.loads(line) for line in chat_lines(model, tokens)]
        final = lines[-1]
        final["message"]["content"] = "".join(tokens)
        return plain(json.dumps(final).encode())

    answers = {
        # model: (streamed, single)
        MODEL: (head + chunked(chat_lines(MODEL, ["Hi", "!"])), single(MODEL, ["Hi", "!"])),
        STREAM_MODEL: (
            head + chunked(chat_lines(STREAM_MODEL, stream_tokens(tokens))),
            single(STREAM_MODEL, stream_tokens(tokens)),
        ),
        BULK_MODEL: (
            head + in_64k_chunks(b"".join(chat_lines(BULK_MODEL, stream_tokens(tokens)))),
            single(BULK_MODEL, stream_tokens(tokens)),
        ),
    }

    openai_answer = plain(
        json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1735689600,
                "model": MODEL,
                "system_fingerprint": "fp_ollama",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hi!"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
            }
        ).encode()
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            path, body = await read_request(reader)
            if path == b"/api/chat":
                request = json.loads(body)
                streamed, whole = answers.get(request.get("model"), answers[MODEL])
                writer.write(whole if request.get("stream") is False else streamed)
            elif path == b"/v1/chat/completions":
                writer.write(openai_answer)  # Ollama's own OpenAI-compatible layer
            elif path == b"/api/tags":
                writer.write(plain(tags))
            elif path == b"/api/ps":
                writer.write(plain(b'{"models":[]}'))
            else:
                writer.write(plain(b'{"version":"0.33.0"}'))
            await writer.drain()

    serve(handle, port_out, backlog=1024)


# --- the proxy ---------------------------------------------------------------------------


def _serve_proxy(port: int, upstream: str) -> None:
    import logging

    import uvicorn

    from aicortex import AsyncCortex
    from aicortex.server import create_app

    logging.getLogger("aicortex").setLevel(logging.ERROR)
    app = create_app(AsyncCortex([upstream], fallback=False))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2, headers=headers)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --- measurements ------------------------------------------------------------------------


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return p50 * 1000, p99 * 1000


def timed(run: Callable[[], object], count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return samples


def native_latency(upstream: str, count: int) -> list[float]:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=upstream, timeout=30) as client:

        def run() -> None:
            response = client.post("/api/chat", json=body)
            lines = [json.loads(line) for line in response.text.splitlines() if line]
            assert lines[-1]["done"] is True

        return timed(run, count, warmup=min(50, count))


def openai_latency(base_url: str, api_key: str, model: str, count: int) -> list[float]:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

    def run() -> None:
        answer = client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hi!", answer

    try:
        return timed(run, count, warmup=min(50, count))
    finally:
        client.close()


def httpx_latency(base_url: str, api_key: str, model: str, count: int) -> list[float]:
    body = {"model": model, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:

        def run() -> None:
            answer = client.post("/chat/completions", json=body).json()
            assert answer["choices"][0]["message"]["content"] == "Hi!", answer

        return timed(run, count, warmup=min(50, count))


def requests_per_second(base_url: str, api_key: str, model: str, total: int) -> float:
    async def main() -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
        limiter = anyio.CapacityLimiter(32)

        async def one() -> None:
            async with limiter:
                answer = await client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
                assert answer.choices[0].message.content == "Hi!"

        async with anyio.create_task_group() as tg:  # warm the pools
            for _ in range(64):
                tg.start_soon(one)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(total):
                tg.start_soon(one)
        elapsed = time.perf_counter() - started
        await client.close()
        return total / elapsed

    return anyio.run(main)


def sse_tokens_per_second(
    base_url: str, api_key: str, model: str, tokens: int, repeats: int
) -> tuple[float, int]:
    """Best tokens/s of one streamed chat read with the openai client, and its chunk count."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    expected = "".join(stream_tokens(tokens))
    best = 0.0
    chunks = 0
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            parts: list[str] = []
            count = 0
            for chunk in client.chat.completions.create(
                model=model,
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
            ):
                count += 1
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            elapsed = time.perf_counter() - started
            text = "".join(parts)
            if text != expected:
                raise SystemExit(f"the stream lost text: {len(text)} of {len(expected)} chars")
            if tokens / elapsed > best:
                best, chunks = tokens / elapsed, count
    finally:
        client.close()
    return best, chunks


def native_stream_tokens_per_second(upstream: str, tokens: int, repeats: int) -> float:
    """Best tokens/s of plain httpx + json reading the upstream's NDJSON: the ceiling for
    any Python proxy that reads Ollama with httpx on this machine."""

    async def run() -> float:
        body = {"model": STREAM_MODEL, "messages": MESSAGES, "stream": True}
        async with httpx.AsyncClient(base_url=upstream, timeout=120) as client:
            started = time.perf_counter()
            count = 0
            async with client.stream("POST", "/api/chat", json=body) as response:
                async for line in response.aiter_lines():
                    if line and json.loads(line)["message"]["content"]:
                        count += 1
            assert count == tokens, count
            return tokens / (time.perf_counter() - started)

    return max(anyio.run(run) for _ in range(repeats))


def server_stack() -> str:
    """The event loop and HTTP parser uvicorn picks here (``auto`` prefers the fast ones)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {http}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def latency_rounds(
    upstream: str, base_url: str, api_key: str, args: argparse.Namespace
) -> dict[str, tuple[float, float, float]]:
    """p50, p99, and for the proxy the median over rounds of (p50 - native p50).

    Each client is timed straight to the upstream ("native": ``/api/chat`` for
    httpx, Ollama's own ``/v1`` for the openai client) and through the proxy, in
    alternating rounds of ``--requests`` each, so a slow spell of a shared machine
    hits both sides of a comparison alike.
    """
    kinds: dict[str, Callable[[], list[float]]] = {
        "native httpx": lambda: native_latency(upstream, args.requests),
        "proxy httpx": lambda: httpx_latency(base_url, api_key, MODEL, args.requests),
        "native openai": lambda: openai_latency(upstream + "/v1", "unused", MODEL, args.requests),
        "proxy openai": lambda: openai_latency(base_url, api_key, MODEL, args.requests),
    }
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    added: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        p50s: dict[str, float] = {}
        for kind, run in kinds.items():
            taken = run()
            samples[kind] += taken
            p50s[kind] = percentiles(taken)[0]
        for kind in kinds:
            client = kind.split()[1]
            added[kind].append(p50s[kind] - p50s[f"native {client}"])
    return {kind: (*percentiles(samples[kind]), statistics.median(added[kind])) for kind in kinds}


def measure(
    name: str, base_url: str, api_key: str, upstream: str, args: argparse.Namespace
) -> None:
    """Latency, requests/s and SSE tokens/s of one proxy; goals are checked for ours only."""
    ours = name.startswith("aicortex")
    latency = latency_rounds(upstream, base_url, api_key, args)
    print(name)
    for client in ("openai", "httpx"):
        p50, p99, _ = latency[f"native {client}"]
        where = "Ollama's /v1" if client == "openai" else "/api/chat"
        print(f"  native, {client:6s} client  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  (to {where})")
        p50, p99, plus = latency[f"proxy {client}"]
        goal = f"  goal <= {GOAL_ADDED_P50_MS} ms: {verdict(plus <= GOAL_ADDED_P50_MS)}"
        print(
            f"  proxy,  {client:6s} client  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"(+{plus:.2f} ms over native){goal if ours else ''}"
        )
    rps = requests_per_second(base_url, api_key, MODEL, args.concurrent_requests)
    print(f"  32 in flight            {rps:9,.0f} requests/s (openai.AsyncOpenAI)")
    for label, model in (("Ollama framing", STREAM_MODEL), ("64 KiB framing", BULK_MODEL)):
        rate, chunks = sse_tokens_per_second(base_url, api_key, model, args.tokens, args.repeats)
        goal = f"  goal >= {GOAL_SSE_TOKENS:,}: {verdict(rate >= GOAL_SSE_TOKENS)}"
        print(
            f"  SSE, {label}     {rate:9,.0f} tokens/s ({args.tokens:,} tokens, {chunks:,} chunks)"
            f"{goal if ours else ''}"
        )


# --- the paced scenario ---------------------------------------------------------------------


def paced_tokens(index: int) -> int:
    """Tokens of the paced stream number ``index``: spread over PACED_TOKENS."""
    low, high = PACED_TOKENS
    return low + (index * 37) % (high - low + 1)


def paced_text(count: int) -> str:
    return "".join(f" t{i}" for i in range(count))


def _serve_paced(port_out: Any, rate: float) -> None:
    """A fake Ollama that streams ``paced N`` as N tokens, ``1 / rate`` s apart, each
    in an HTTP chunk of its own and written at once; every stream keeps its own pace."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    gap = 1.0 / rate
    created = "2025-01-01T00:00:00.000000Z"

    def chunk(obj: dict[str, Any]) -> bytes:
        data = line(obj)
        return b"%x\r\n%s\r\n" % (len(data), data)

    tokens = [
        chunk(
            {
                "model": PACED_MODEL,
                "created_at": created,
                "message": {"role": "assistant", "content": f" t{i}"},
                "done": False,
            }
        )
        for i in range(PACED_TOKENS[1])
    ]

    def final(count: int) -> bytes:
        done = {
            "model": PACED_MODEL,
            "created_at": created,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 8,
            "eval_count": count,
            "eval_duration": int(count * gap * 1e9),
        }
        return chunk(done) + b"0\r\n\r\n"

    def plain(body: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    fixed = {
        b"/api/tags": plain(json.dumps({"models": [{"name": PACED_MODEL}]}).encode()),
        b"/api/ps": plain(b'{"models":[]}'),
        b"/api/version": plain(b'{"version":"0.33.0"}'),
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            path, body = await read_request(reader)
            if path != b"/api/chat":
                writer.write(fixed.get(path, fixed[b"/api/version"]))
                await writer.drain()
                continue
            prompt = json.loads(body)["messages"][-1]["content"]
            count = min(int(prompt.split()[-1]), len(tokens))
            writer.write(head)
            for i in range(count):
                if i:
                    await asyncio.sleep(gap)
                writer.write(tokens[i])  # goes out now: the buffer is empty
                await writer.drain()
            writer.write(final(count))
            await writer.drain()

    serve(handle, port_out, backlog=2048)


# What the ``aicortex`` console script does, after printing which aicortex it imported.
PROXY_MAIN = (
    "import runpy, sys, aicortex; "
    "print('aicortex', aicortex.__version__, aicortex.__file__, flush=True); "
    "sys.argv[0] = 'aicortex'; "
    "runpy.run_module('aicortex', run_name='__main__', alter_sys=True)"
)


class ServeProcess:
    """``aicortex serve`` in a process of its own, with the aicortex of ``src`` (a
    directory holding ``aicortex/``) or, when ``src`` is None, the installed one;
    ``options`` go after the command's own (a later ``--log-level`` wins)."""

    def __init__(
        self,
        label: str,
        upstream: str,
        src: pathlib.Path | None,
        options: Sequence[str] = (),
    ) -> None:
        self.label = label
        self.src = src
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AICORTEX_SERVERS")}
        if src is not None:
            env["PYTHONPATH"] = str(src)
        # Its stdout and stderr, closed by stop(); files, so a full pipe cannot block it.
        self.logs = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        self.cwd = tempfile.TemporaryDirectory()  # nothing to import from the current directory
        self.origin = ""
        self.imported = pathlib.Path()
        command = [sys.executable, "-c", PROXY_MAIN, "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--server", upstream, "--log-level", "warning"]
        command += options
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.logs[0],
            stderr=self.logs[1],
            cwd=self.cwd.name,
        )

    def _log(self, which: int) -> str:
        log = self.logs[which]
        log.seek(0)
        return log.read().decode(errors="replace")

    def start(self) -> None:
        """Wait until it answers, then check which aicortex it imported."""
        try:
            wait_for(self.url + "/health", timeout=60)
        except httpx.HTTPError:
            self.stop()
            raise SystemExit(f"{self.label} did not start: {self._log(1)[-2000:]}") from None
        first = self._log(0).splitlines()[0].split(maxsplit=2)
        self.origin = f"aicortex {first[1]} from {pathlib.Path(first[2]).parent}"
        imported = pathlib.Path(first[2]).resolve()
        if self.src is not None and self.src.resolve() not in imported.parents:
            raise SystemExit(f"{self.label} imported {imported}, not the code in {self.src}")
        self.imported = imported

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far (Linux /proc)."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for log in self.logs:
            log.close()
        self.cwd.cleanup()


class PacedFailure(Exception):
    """A paced stream that did not read its whole answer."""


class PacedRound:
    """One round: every stream's first-token latency (s) and the tokens read."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.cpu = 0.0


async def paced_round(
    client: httpx.AsyncClient, native: bool, streams: int, tokens: Callable[[int], int]
) -> PacedRound:
    """``streams`` streamed chats sent at once: SSE from the proxy, or NDJSON when ``native``."""
    result = PacedRound()
    failures: list[str] = []

    async def one(index: int, cancel: anyio.CancelScope) -> None:
        try:
            await read_one(index)
        except (httpx.HTTPError, PacedFailure) as exc:
            failures.append(f"paced stream {index}: {type(exc).__name__}: {exc}")
            cancel.cancel()

    async def read_one(index: int) -> None:
        count = tokens(index)
        body = {
            "model": PACED_MODEL,
            "messages": [{"role": "user", "content": f"paced {count}"}],
            "stream": True,
        }
        parts: list[str] = []
        started = time.perf_counter()
        first: float | None = None
        path = "/api/chat" if native else "/v1/chat/completions"
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise PacedFailure(f"HTTP {response.status_code}: {response.text[:300]}")
            async for line in response.aiter_lines():
                if native:
                    if not line:
                        continue
                    text = json.loads(line)["message"]["content"]
                else:
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise PacedFailure(str(event["error"]))
                    choices = event.get("choices") or [{}]
                    text = (choices[0].get("delta") or {}).get("content") or ""
                if text:
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(text)
        if "".join(parts) != paced_text(count) or first is None:
            raise PacedFailure(f"got {len(''.join(parts))} chars of text, not the answer")
        result.first.append(first)
        result.tokens += count

    started = time.perf_counter()
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            for index in range(streams):
                tg.start_soon(one, index, tg.cancel_scope)
    if failures:
        where = client.base_url
        raise SystemExit(f"{where}: {len(failures)} failed; the first: {failures[0]}")
    result.seconds = time.perf_counter() - started
    return result


def paced_client(base_url: str) -> httpx.AsyncClient:
    """The load generator: an httpx client on httpx-aiohttp's transport. httpx's own
    pool is no load generator for 200 streams: it scans every connection for every
    request, and here alone it delayed its own first tokens by seconds."""
    from httpx_aiohttp import AiohttpTransport  # pyright: ignore[reportMissingImports]

    # Idle connections expire here before uvicorn closes them (after 5 s), so none is
    # reused as the server drops it.
    limits = httpx.Limits(
        max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=AiohttpTransport(limits=limits),
        timeout=httpx.Timeout(120, connect=10),
    )


def paced_line(label: str, first: list[float]) -> str:
    ordered = sorted(first)
    p50, p99 = percentiles(ordered)
    return (
        f"  {label:<44} first token p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
        f"max {ordered[-1] * 1000:7.1f} ms"
    )


def paced(args: argparse.Namespace) -> None:
    """The paced scenario; see the module docstring."""
    try:
        import httpx_aiohttp  # noqa: F401  # pyright: ignore[reportUnusedImport, reportMissingImports]
    except ImportError:
        raise SystemExit(
            "the paced scenario's load generator needs httpx-aiohttp (pip install httpx-aiohttp)"
        ) from None
    baseline: pathlib.Path | None = args.baseline_src
    if baseline is not None:
        baseline = baseline.resolve()
        if not (baseline / "src" / "aicortex" / "__init__.py").exists():
            raise SystemExit(f"--baseline-src {baseline}: no src/aicortex/__init__.py in it")
    ports: Any = multiprocessing.SimpleQueue()
    upstream_process = multiprocessing.Process(
        target=_serve_paced, args=(ports, args.paced_rate), daemon=True
    )
    upstream_process.start()
    upstream = f"http://127.0.0.1:{ports.get()}"
    proxies: dict[str, ServeProcess] = {}
    streams: int = args.paced_streams
    try:
        proxies["new"] = ServeProcess("aicortex serve (installed)", upstream, None)
        if baseline is not None:
            proxies["old"] = ServeProcess("aicortex serve (baseline)", upstream, baseline / "src")
        for proxy in proxies.values():
            proxy.start()
        if baseline is not None and proxies["new"].imported.is_relative_to(baseline):
            raise SystemExit(f"the installed proxy imported {proxies['new'].imported}")
        low, high = PACED_TOKENS
        print(
            f"paced: {streams} concurrent streams of {low}-{high} tokens at "
            f"{args.paced_rate:g} tokens/s each, one upstream; {args.paced_rounds} rounds per "
            "proxy, alternating, each after a warm-up round of 3-token streams; "
            f"upstream at {upstream}",
        )
        for proxy in proxies.values():
            print(f"  {proxy.label} at {proxy.url}: {proxy.origin}", flush=True)

        warmups: dict[str, list[PacedRound]] = {name: [] for name in proxies}

        async def run_all() -> tuple[PacedRound, dict[str, list[PacedRound]]]:
            rounds: dict[str, list[PacedRound]] = {name: [] for name in proxies}
            async with paced_client(upstream) as client:
                await paced_round(client, True, streams, lambda i: 3)  # warm-up
                direct = await paced_round(client, True, streams, paced_tokens)
            clients = {name: paced_client(p.url) for name, p in proxies.items()}
            try:
                for _ in range(args.paced_rounds):
                    for name, client in clients.items():
                        # Short streams first, so every connection is open and fresh,
                        # then a pause (under the client's keep-alive expiry) to settle.
                        before = proxies[name].cpu_seconds()
                        warm = await paced_round(client, False, streams, lambda i: 3)
                        warm.cpu = proxies[name].cpu_seconds() - before
                        warmups[name].append(warm)
                        await anyio.sleep(0.5)
                        before = proxies[name].cpu_seconds()
                        taken = await paced_round(client, False, streams, paced_tokens)
                        taken.cpu = proxies[name].cpu_seconds() - before
                        rounds[name].append(taken)
            finally:
                for client in clients.values():
                    await client.aclose()
            return direct, rounds

        direct, rounds = anyio.run(run_all)
        print(paced_line("straight to the upstream (/api/chat)", direct.first))
        cpu_per_1k: dict[str, float] = {}
        for name, proxy in proxies.items():
            taken = rounds[name]
            first = [f for r in taken for f in r.first]
            tokens = sum(r.tokens for r in taken)
            cpu = sum(r.cpu for r in taken)
            cpu_per_1k[name] = cpu / tokens * 1000
            line = paced_line(f"through {proxy.label}", first)
            if name == "new":
                worst = max(first) * 1000
                ok = verdict(worst <= GOAL_PACED_MAX_FIRST_MS)
                line += f"  goal max <= {GOAL_PACED_MAX_FIRST_MS:g} ms: {ok}"
            print(line)
            walls = ", ".join(f"{r.seconds:.1f}" for r in taken)
            worsts = ", ".join(f"{max(r.first) * 1000:.0f}" for r in taken)
            print(
                f"    proxy CPU {cpu:6.2f} s for {tokens:,} tokens = "
                f"{cpu_per_1k[name]:.4f} s per 1,000 tokens; per round: {walls} s long, "
                f"first token max {worsts} ms"
            )
            warm = warmups[name]
            per_stream = sum(r.cpu for r in warm) / sum(len(r.first) for r in warm) * 1000
            print(
                f"    (its warm-up rounds, {streams} streams of 3 tokens: proxy CPU "
                f"{per_stream:.2f} ms per stream)"
            )
        if "old" in cpu_per_1k:
            ratio = cpu_per_1k["new"] / cpu_per_1k["old"]
            print(
                f"  proxy CPU per token, this code / baseline: {ratio:.2f}x  "
                f"goal <= {GOAL_PACED_CPU_RATIO}x: {verdict(ratio <= GOAL_PACED_CPU_RATIO)}"
            )
        else:
            print("  (no --baseline-src: no CPU comparison with the old code)")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream_process.kill()
        upstream_process.join()


# --- LiteLLM -------------------------------------------------------------------------------


class LiteLLM:
    """LiteLLM's proxy in front of the same upstream, if it is installed and starts offline."""

    key = "sk-bench-master-key"

    def __init__(self, upstream: str, executable: str | None = None) -> None:
        self.upstream = upstream
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str | None:
        """Start it; returns why not, or None once it answers."""
        executable = self.executable or os.path.join(os.path.dirname(sys.executable), "litellm")
        if not os.path.exists(executable):
            executable = shutil.which("litellm") or ""
        if not executable:
            return "not installed (pip install 'litellm[proxy]', or pass --litellm PATH)"
        port = free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
            config.write(
                "model_list:\n"
                + "".join(
                    f"  - model_name: {name}\n"
                    f"    litellm_params:\n"
                    f"      model: ollama_chat/{name}\n"
                    f"      api_base: {self.upstream}\n"
                    for name in (MODEL, STREAM_MODEL, BULK_MODEL)
                )
            )
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MASTER_KEY": self.key,
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
        }
        self.process = subprocess.Popen(
            [executable, "--config", config.name, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_for(self.url + "/health/liveliness", timeout=120)
        except httpx.HTTPError:
            self.process.kill()
            _, err = self.process.communicate()
            self.process = None
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            return "did not start: " + " | ".join(tail)
        return None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=200, help="sequential small requests per round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of latency samples")
    parser.add_argument("--concurrent-requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument("--litellm", metavar="PATH", help="the litellm command to compare with")
    parser.add_argument(
        "--only", choices=["classic", "paced"], help="run only these scenarios (default: all)"
    )
    parser.add_argument("--paced-streams", type=int, default=200, help="concurrent paced streams")
    parser.add_argument("--paced-rate", type=float, default=40.0, help="tokens/s of each stream")
    parser.add_argument("--paced-rounds", type=int, default=5, help="paced rounds per proxy")
    parser.add_argument(
        "--baseline-src",
        type=pathlib.Path,
        metavar="DIR",
        help="a directory holding the old code's src/ (and metadata/) to compare with",
    )
    args = parser.parse_args()
    if args.only in (None, "classic"):
        classic(args)
    if args.only in (None, "paced"):
        paced(args)


def classic(args: argparse.Namespace) -> None:
    """Latency, requests/s and SSE tokens/s of the proxy (and LiteLLM's)."""
    ports: Any = multiprocessing.SimpleQueue()
    upstream_process = multiprocessing.Process(
        target=_serve_upstream, args=(ports, args.tokens), daemon=True
    )
    upstream_process.start()
    upstream = f"http://127.0.0.1:{ports.get()}"
    proxy_port = free_port()
    proxy_process = multiprocessing.Process(
        target=_serve_proxy, args=(proxy_port, upstream), daemon=True
    )
    proxy_process.start()
    litellm = LiteLLM(upstream, args.litellm)
    try:
        proxy = f"http://127.0.0.1:{proxy_port}"
        wait_for(proxy + "/health")
        print(
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, openai {openai.__version__}, "
            f"{args.rounds} rounds of {args.requests} sequential requests per client"
        )
        ceiling = native_stream_tokens_per_second(upstream, args.tokens, args.repeats)
        print(f"native NDJSON, httpx + json: {ceiling:,.0f} tokens/s (Ollama framing)")
        ours = f"aicortex proxy (uvicorn, {server_stack()})"
        measure(ours, proxy + "/v1", "unused", upstream, args)
        if args.no_litellm:
            return
        reason = litellm.start()
        if reason is not None:
            print(f"LiteLLM proxy: skipped, {reason}")
            return
        measure("LiteLLM proxy (ollama_chat/)", litellm.url + "/v1", litellm.key, upstream, args)
    finally:
        litellm.stop()
        proxy_process.kill()
        upstream_process.kill()
        proxy_process.join()
        upstream_process.join()


if __name__ == "__main__":
    main()
