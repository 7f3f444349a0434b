"""Streaming throughput, import time and a cold command-line chat, measured in one run.

A fake Ollama (a separate process on 127.0.0.1) streams TOKENS NDJSON chat chunks in
two framings: one HTTP chunk per token, the way Ollama flushes, and the same lines
packed into 64 KiB HTTP chunks. For each framing it prints tokens/s, the best of
``--repeats`` streams (fewer if ``--budget`` runs out, never fewer than 3), each
client next to its peer, alternating between them every repeat:

* asyncio: httpx + ``httpx_aiohttp.AiohttpTransport`` + json (the peer) and
  ``AsyncCortex(http="auto")`` (goal: >= 0.85x the peer);
* trio: stock httpx + json (the peer) and ``AsyncCortex`` (goal: >= 0.85x);
* blocking: stock ``httpx.Client`` + json (the peer) and ``Cortex`` (goal: >= 0.6x);
* for reference, on asyncio: stock httpx + json and ollama-python's ``AsyncClient``.

Then, each in fresh processes, alternating:

* ``import aicortex`` next to ``import ollama`` (goal: median <= 0.25x);
* ``aicortex chat PROMPT --server URL -m MODEL`` (the installed command) next to an
  ollama-python one-liner that sends the same chat and prints the answer, both to
  the same fake server, which answers a tiny "Hi!" (goal: median wall time <= 1.15x).

Run with ``nox -s bench`` or ``python tests/benchmarks/bench_stream.py [--tokens N]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
from _wire import chat_lines, chunked, in_64k_chunks, read_request, serve, stream_tokens

import aicortex

MODEL = "bench:latest"  # one HTTP chunk per NDJSON line, as Ollama writes
BULK_MODEL = "bench-bulk:latest"  # the same lines in 64 KiB HTTP chunks
TINY_MODEL = "bench-tiny:latest"  # a two-token answer, for the cold command line
TINY_TOKENS = ["Hi", "!"]
PROMPT = "go"
GOALS = {"async": 0.85, "trio": 0.85, "blocking": 0.6, "import": 0.25, "cli": 1.15}
MIN_REPEATS = 3


# --- the fake Ollama ---------------------------------------------------------------------


def _serve(port_out: Any, tokens: int) -> None:
    import asyncio

    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )

    def plain(body: bytes, status: bytes = b"200 OK") -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            status,
            len(body),
            body,
        )

    def single(model: str, words: list[str]) -> bytes:
        """The answer to ``"stream": false``: one JSON object."""
        final = json.loads(chat_lines(model, words)[-1])
        final["message"]["content"] = "".join(words)
        return plain(json.dumps(final).encode())

    long = stream_tokens(tokens)
    per_token = head + chunked(chat_lines(MODEL, long))
    bulk = head + in_64k_chunks(b"".join(chat_lines(BULK_MODEL, long)))
    answers = {
        # model: (streamed, single)
        MODEL: (per_token, single(MODEL, long)),
        BULK_MODEL: (bulk, single(BULK_MODEL, long)),
        TINY_MODEL: (
            head + chunked(chat_lines(TINY_MODEL, TINY_TOKENS)),
            single(TINY_MODEL, TINY_TOKENS),
        ),
    }
    tags = plain(json.dumps({"models": [{"name": m, "model": m} for m in answers]}).encode())
    fixed = {
        b"/api/tags": tags,
        b"/api/version": plain(b'{"version":"0.33.0"}'),
        b"/api/ps": plain(b'{"models":[]}'),
    }
    missing = plain(b'{"error":"not found"}', b"404 Not Found")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            path, body = await read_request(reader)
            if path == b"/api/chat":
                chat = json.loads(body)
                streamed, whole = answers.get(chat.get("model"), answers[MODEL])
                writer.write(whole if chat.get("stream") is False else streamed)
            else:
                writer.write(fixed.get(path, missing))
            await writer.drain()

    serve(handle, port_out, backlog=128)


# --- the clients: each returns the number of tokens it read ------------------------------


def _body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True}


def _count(line: str) -> int:
    return 1 if line and json.loads(line)["message"]["content"] else 0


async def read_httpx(client: httpx.AsyncClient, model: str) -> int:
    count = 0
    async with client.stream("POST", "/api/chat", json=_body(model)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            count += _count(line)
    return count


def read_httpx_sync(client: httpx.Client, model: str) -> int:
    count = 0
    with client.stream("POST", "/api/chat", json=_body(model)) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            count += _count(line)
    return count


async def read_cortex(cortex: aicortex.AsyncCortex, model: str) -> int:
    count = 0
    stream = await cortex.chat(PROMPT, model=model, stream=True)
    async with stream:
        async for event in stream:
            if event.type is aicortex.EventType.TOKEN:
                count += 1
    return count


def read_cortex_sync(cortex: aicortex.Cortex, model: str) -> int:
    count = 0
    with cortex.chat(PROMPT, model=model, stream=True) as stream:
        for event in stream:
            if event.type is aicortex.EventType.TOKEN:
                count += 1
    return count


async def read_ollama(client: Any, model: str) -> int:
    count = 0
    messages = [{"role": "user", "content": PROMPT}]
    async for part in await client.chat(model=model, messages=messages, stream=True):
        if part["message"]["content"]:
            count += 1
    return count


def has_ollama() -> bool:
    try:
        import ollama  # noqa: F401  # pyright: ignore[reportUnusedImport, reportMissingImports]
    except ImportError:
        return False
    return True


def has_aiohttp_transport() -> bool:
    try:
        import httpx_aiohttp  # noqa: F401  # pyright: ignore[reportUnusedImport, reportMissingImports]
    except ImportError:
        return False
    return True


def cortex_options(http: str | None) -> dict[str, Any]:
    """``http=...`` when this aicortex takes it (an older one has its own transport)."""
    if http is None or "http" not in inspect.signature(aicortex.AsyncCortex).parameters:
        return {}
    return {"http": http}


# --- timing --------------------------------------------------------------------------------


class Plan:
    """How many streams to time: up to ``repeats`` rounds, fewer once ``budget`` s are spent."""

    def __init__(self, tokens: int, repeats: int, budget: float) -> None:
        self.tokens = tokens
        self.repeats = repeats
        self.budget = budget

    def rounds(self) -> range:
        return range(max(self.repeats, MIN_REPEATS))

    def over(self, started: float, done: int) -> bool:
        return done >= MIN_REPEATS and time.perf_counter() - started > self.budget


class Rates:
    """The tokens/s of every timed stream of every client in a group."""

    def __init__(self, names: list[str]) -> None:
        self.samples: dict[str, list[float]] = {name: [] for name in names}

    def add(self, name: str, got: int, elapsed: float, expected: int) -> None:
        if got != expected:
            raise SystemExit(f"{name}: expected {expected} tokens, got {got}")
        self.samples[name].append(got / elapsed)

    def best(self) -> dict[str, tuple[float, int]]:
        return {name: (max(s), len(s)) for name, s in self.samples.items()}


AsyncReader = Callable[[str], Awaitable[int]]


async def time_async_group(
    readers: dict[str, AsyncReader], model: str, plan: Plan
) -> dict[str, tuple[float, int]]:
    """Each reader once to warm up (connections, health probes), then rounds in turn."""
    rates = Rates(list(readers))
    for read in readers.values():
        await read(model)
    started = time.perf_counter()
    for done in plan.rounds():
        if plan.over(started, done):
            break
        for name, read in readers.items():
            t = time.perf_counter()
            got = await read(model)
            rates.add(name, got, time.perf_counter() - t, plan.tokens)
    return rates.best()


def time_sync_group(
    readers: dict[str, Callable[[str], int]], model: str, plan: Plan
) -> dict[str, tuple[float, int]]:
    rates = Rates(list(readers))
    for read in readers.values():
        read(model)
    started = time.perf_counter()
    for done in plan.rounds():
        if plan.over(started, done):
            break
        for name, read in readers.items():
            t = time.perf_counter()
            got = read(model)
            rates.add(name, got, time.perf_counter() - t, plan.tokens)
    return rates.best()


async def asyncio_group(url: str, model: str, plan: Plan) -> dict[str, tuple[float, int]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        readers: dict[str, AsyncReader] = {}
        if has_aiohttp_transport():
            from httpx_aiohttp import AiohttpTransport  # pyright: ignore[reportMissingImports]

            peer = await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, timeout=60, transport=AiohttpTransport())
            )
            readers["peer"] = lambda m: read_httpx(peer, m)
        cortex = await stack.enter_async_context(
            aicortex.AsyncCortex([url], fallback=False, **cortex_options("auto"))
        )
        readers["cortex"] = lambda m: read_cortex(cortex, m)
        stock = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
        readers["httpx"] = lambda m: read_httpx(stock, m)
        if has_ollama():
            import ollama  # pyright: ignore[reportMissingImports]

            client = ollama.AsyncClient(host=url)
            readers["ollama"] = lambda m: read_ollama(client, m)
        return await time_async_group(readers, model, plan)


async def trio_group(url: str, model: str, plan: Plan) -> dict[str, tuple[float, int]]:
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as stock,
        aicortex.AsyncCortex([url], fallback=False, **cortex_options("auto")) as cortex,
    ):
        readers: dict[str, AsyncReader] = {
            "peer": lambda m: read_httpx(stock, m),
            "cortex": lambda m: read_cortex(cortex, m),
        }
        return await time_async_group(readers, model, plan)


def blocking_group(url: str, model: str, plan: Plan) -> dict[str, tuple[float, int]]:
    with (
        httpx.Client(base_url=url, timeout=60) as stock,
        aicortex.Cortex([url], fallback=False, **cortex_options("auto")) as cortex,
    ):
        readers: dict[str, Callable[[str], int]] = {
            "peer": lambda m: read_httpx_sync(stock, m),
            "cortex": lambda m: read_cortex_sync(cortex, m),
        }
        return time_sync_group(readers, model, plan)


# --- report ----------------------------------------------------------------------------------


class Verdicts:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, what: str, ok: bool) -> str:
        self.results.append((what, ok))
        return "met" if ok else "MISSED"

    def summary(self) -> str:
        met = sum(ok for _, ok in self.results)
        missed = [what for what, ok in self.results if not ok]
        line = f"goals met: {met} of {len(self.results)}"
        return line + (f"; missed: {', '.join(missed)}" if missed else "")


def _row(label: str, rate: float, runs: int, note: str = "") -> str:
    return f"    {label:<40} {rate:>11,.0f} tokens/s  ({runs:2d} runs){note}"


def framing_report(title: str, url: str, model: str, plan: Plan, verdicts: Verdicts) -> None:
    print(f"{title}: {plan.tokens:,} tokens")
    asyncio_rates = anyio.run(asyncio_group, url, model, plan)
    trio_rates = anyio.run(trio_group, url, model, plan, backend="trio")
    blocking_rates = blocking_group(url, model, plan)
    has_peer = "peer" in asyncio_rates

    def compare(
        rates: dict[str, tuple[float, int]], label: str, peer_label: str, goal: str, where: str
    ) -> None:
        rate, runs = rates["cortex"]
        if "peer" not in rates:
            print(_row(label, rate, runs, f"  (no {peer_label}: no verdict)"))
            return
        ratio = rate / rates["peer"][0]
        target = GOALS[goal]
        ok = verdicts.check(f"{where}, {title}", ratio >= target)
        print(_row(label, rate, runs, f"  {ratio:4.2f}x  goal >= {target}x: {ok}"))

    print("  asyncio")
    if has_peer:
        print(_row("httpx + AiohttpTransport + json (peer)", *asyncio_rates["peer"]))
    else:
        print("    (httpx-aiohttp is not installed: no asyncio peer)")
    compare(asyncio_rates, 'AsyncCortex(http="auto")', "peer", "async", "AsyncCortex on asyncio")
    print("  trio")
    print(_row("httpx + json (peer)", *trio_rates["peer"]))
    compare(trio_rates, "AsyncCortex", "peer", "trio", "AsyncCortex on trio")
    print("  blocking")
    print(_row("httpx.Client + json (peer)", *blocking_rates["peer"]))
    compare(blocking_rates, "Cortex", "peer", "blocking", "Cortex")
    print("  reference, asyncio")
    for name, label in (
        ("httpx", "httpx + json (its own transport)"),
        ("ollama", "ollama-python AsyncClient"),
    ):
        if name not in asyncio_rates:
            print(f"    ({label}: not installed)")
            continue
        rate, runs = asyncio_rates[name]
        vs = f"  {rate / asyncio_rates['peer'][0]:4.2f}x the asyncio peer" if has_peer else ""
        print(_row(label, rate, runs, vs))


# --- fresh processes ---------------------------------------------------------------------------


def import_seconds(module: str) -> float | None:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    return float(result.stdout) if result.returncode == 0 else None


def run_timed(command: list[str], expected: str) -> tuple[float, float]:
    """Seconds from start to the first byte on stdout and to the exit of ``command``."""
    started = time.perf_counter()
    # Unbuffered: the first byte is read alone, the rest by communicate().
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert process.stdout is not None
    first = process.stdout.read(1)
    first_at = time.perf_counter() - started
    try:
        rest, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise SystemExit(f"{command[0]} did not finish within 60 s") from None
    total = time.perf_counter() - started
    out = (first + rest).decode(errors="replace").strip()
    if process.returncode != 0 or out != expected:
        raise SystemExit(
            f"{' '.join(command)} exited {process.returncode} with {out!r}, expected "
            f"{expected!r}; stderr: {err.decode(errors='replace').strip()[-500:]}"
        )
    return first_at, total


OLLAMA_ONE_LINER = (
    "import sys, ollama; "
    "print(ollama.Client(host=sys.argv[1]).chat(model=sys.argv[2], "
    "messages=[{'role': 'user', 'content': sys.argv[3]}]).message.content)"
)


def aicortex_command() -> str:
    """The installed ``aicortex`` command next to this interpreter."""
    bindir = os.path.dirname(sys.executable)
    for name in ("aicortex", "aicortex.exe"):
        path = os.path.join(bindir, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"no aicortex command in {bindir}; install the project first")


def stat_line(label: str, samples: list[float]) -> str:
    return (
        f"  {label:<34} best {min(samples) * 1000:7.1f} ms  "
        f"median {statistics.median(samples) * 1000:7.1f} ms  ({len(samples)} runs)"
    )


def import_report(repeats: int, verdicts: Verdicts) -> None:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):  # alternating, so a slow spell hits both
        for module, samples in (("aicortex", ours), ("ollama", theirs)):
            seconds = import_seconds(module)
            if seconds is not None:
                samples.append(seconds)
    print("import time, fresh interpreters")
    if not ours:
        print("  import aicortex failed")
        return
    print(stat_line("import aicortex", ours))
    if not theirs:
        print("  (ollama-python not installed: no import comparison)")
        return
    ratio = statistics.median(ours) / statistics.median(theirs)
    ok = verdicts.check("import time", ratio <= GOALS["import"])
    goal = GOALS["import"]
    print(
        stat_line("import ollama", theirs) + f"  median ratio {ratio:4.2f}x  goal <= {goal}x: {ok}"
    )


def cli_report(url: str, repeats: int, verdicts: Verdicts) -> None:
    expected = "".join(TINY_TOKENS)
    ours_cmd = [aicortex_command(), "chat", PROMPT, "--server", url, "-m", TINY_MODEL]
    theirs_cmd = [sys.executable, "-c", OLLAMA_ONE_LINER, url, TINY_MODEL, PROMPT]
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    commands = {"ours": ours_cmd}
    if has_ollama():
        commands["theirs"] = theirs_cmd
    for _ in range(repeats):
        for who, command in commands.items():
            runs[who].append(run_timed(command, expected))
    print(f"cold process, one chat answered {expected!r} by the fake server")
    firsts = [first for first, _ in runs["ours"]]
    totals = [total for _, total in runs["ours"]]
    print(stat_line("aicortex chat: first token", firsts))
    print(stat_line("aicortex chat: whole run", totals))
    if not runs["theirs"]:
        print("  (ollama-python not installed: no comparison)")
        return
    theirs = [total for _, total in runs["theirs"]]
    ratio = statistics.median(totals) / statistics.median(theirs)
    ok = verdicts.check("cold chat", ratio <= GOALS["cli"])
    print(
        stat_line("ollama-python one-liner: whole run", theirs)
        + f"  median ratio {ratio:4.2f}x  goal <= {GOALS['cli']}x: {ok}"
    )


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="tokens per stream")
    parser.add_argument("--repeats", type=int, default=9, help="timed streams per client")
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="stop a group's repeats after this long (at least 3 are run)",
    )
    parser.add_argument("--import-repeats", type=int, default=15)
    parser.add_argument("--cli-repeats", type=int, default=15)
    parser.add_argument(
        "--only", choices=["stream", "import", "cli"], help="run only one part of the benchmark"
    )
    args = parser.parse_args()
    plan = Plan(args.tokens, args.repeats, args.budget)
    verdicts = Verdicts()

    ports: Any = multiprocessing.SimpleQueue()
    server = multiprocessing.Process(target=_serve, args=(ports, args.tokens), daemon=True)
    server.start()
    try:
        port = ports.get()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it accepts connections
        url = f"http://127.0.0.1:{port}"
        transport = cortex_options("auto") or {"http": "(this aicortex takes no http= argument)"}
        print(
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, httpx {httpx.__version__}, "
            f"aicortex {aicortex.__version__} from {os.path.dirname(aicortex.__file__)}, "
            f"http={transport['http']}; fake Ollama at {url}"
        )
        print(
            f"tokens/s: best of up to {max(args.repeats, MIN_REPEATS)} streams per client "
            f"(at least {MIN_REPEATS}, up to ~{args.budget:g} s per group)"
        )
        if args.only in (None, "stream"):
            framing_report("Ollama framing (one HTTP chunk per token)", url, MODEL, plan, verdicts)
            framing_report("64 KiB framing", url, BULK_MODEL, plan, verdicts)
        if args.only in (None, "import"):
            import_report(args.import_repeats, verdicts)
        if args.only in (None, "cli"):
            cli_report(url, args.cli_repeats, verdicts)
    finally:
        server.kill()
        server.join()
    print(verdicts.summary())


if __name__ == "__main__":
    main()
