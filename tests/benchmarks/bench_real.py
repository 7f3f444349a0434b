"""aicortex against a real model server: llama.cpp's (xllamacpp) serving Gemma 3 270M.

One run, the same requests three ways, alternating in rounds: the official ``openai``
client straight to the server, ``AsyncCortex``, and the proxy (``create_app`` under
uvicorn, in its own process) with the ``openai`` client in front. For one stream and for
4 parallel streams (the server has 4 slots) it reports tokens/s per stream and time to
the first token, medians over rounds. Goal: aicortex costs at most 2% of tokens/s and at
most 5 ms of time to first token next to direct.

Run with ``nox -s bench`` or ``python tests/benchmarks/bench_real.py``;
``AICORTEX_BENCH_PIN=0`` leaves every process free to run on any CPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai

sys.path.insert(0, str(Path(__file__).parent.parent))
from aicortex import AsyncCortex, Timeout
from llamacpp import MODEL_ALIAS, LlamaServer, free_port

TOKENS = 64
ROUNDS = 9
GOAL_TPS_LOSS = 0.02
GOAL_TTFT_MS = 5.0
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def _serve_proxy(port: int, upstream: str) -> None:
    import uvicorn

    from aicortex.server import create_app

    app = create_app(servers=[upstream], timeout=Timeout(first_token=60, idle=30))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


async def openai_stream(client: openai.AsyncOpenAI) -> tuple[float, float]:
    """(seconds to the first token, tokens/s after it) of one streamed chat."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    stream = await client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            count += 1
            if not first:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - started, (count - 1) / (end - first)


async def cortex_stream(cortex: AsyncCortex) -> tuple[float, float]:
    started = time.perf_counter()
    stream = await cortex.chat(
        MESSAGES, model=MODEL_ALIAS, stream=True, options={"num_predict": TOKENS, "temperature": 0}
    )
    first = 0.0
    count = 0
    async with stream:
        async for event in stream:
            if event.content:
                count += 1
                if not first:
                    first = time.perf_counter()
    end = time.perf_counter()
    return first - started, (count - 1) / (end - first)


async def parallel(run: Any, n: int) -> list[tuple[float, float]]:
    results: list[tuple[float, float]] = []

    async def one() -> None:
        results.append(await run())

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return results


async def measure(server: str, proxy: str) -> dict[str, dict[int, list[tuple[float, float]]]]:
    direct = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused")
    through = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="unused")
    results: dict[str, dict[int, list[tuple[float, float]]]] = {
        "direct (openai client)": {1: [], 4: []},
        "AsyncCortex": {1: [], 4: []},
        "proxy (openai client)": {1: [], 4: []},
    }
    async with AsyncCortex([server], fallback=False, timeout=Timeout(first_token=60)) as cortex:
        runners = {
            "direct (openai client)": lambda: openai_stream(direct),
            "AsyncCortex": lambda: cortex_stream(cortex),
            "proxy (openai client)": lambda: openai_stream(through),
        }
        for runner in runners.values():  # warm-up: connections, the prompt cache
            await parallel(runner, 4)
        order = list(runners.items())
        for round_ in range(ROUNDS):
            for n in (1, 4):
                # Each way goes first in turn: none always meets a server fresh from rest.
                for label, runner in order[round_ % 3 :] + order[: round_ % 3]:
                    results[label][n].extend(await parallel(runner, n))
    await direct.close()
    await through.close()
    return results


def pin(server: LlamaServer) -> str:
    """On a machine with 2 CPUs or more, llama.cpp's threads on CPU 0 and this process
    (and the proxy it starts) on the others: the server's one thread then loses no time
    to the clients and the proxy, and what differs between the three ways is their own
    cost, not the CPU they took from the model."""
    cpus = sorted(os.sched_getaffinity(0))
    if os.environ.get("AICORTEX_BENCH_PIN") == "0":
        return "not pinned (AICORTEX_BENCH_PIN=0)"
    if len(cpus) < 2 or server.process is None:
        return "not pinned (1 CPU)"
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpus[0]})
    os.sched_setaffinity(0, set(cpus[1:]))
    return f"server pinned to CPU {cpus[0]}, clients and proxy to {cpus[1:]}"


def main() -> None:
    with LlamaServer(slots=4) as server:
        pinning = pin(server)
        port = free_port()
        proxy_process = multiprocessing.Process(
            target=_serve_proxy, args=(port, server.url), daemon=True
        )
        proxy_process.start()
        proxy = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(proxy + "/health")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        try:
            results = asyncio.run(measure(server.url, proxy))
        finally:
            proxy_process.kill()
            proxy_process.join()
    print(
        f"real server: llama.cpp (xllamacpp), {MODEL_ALIAS}, 4 slots, 1 thread; "
        f"{TOKENS}-token streams, {ROUNDS} rounds, medians; {pinning}"
    )
    ok = True
    for n in (1, 4):
        print(f"  {n} stream{'s' if n > 1 else ''} at once")
        base_ttft = statistics.median(r[0] for r in results["direct (openai client)"][n])
        base_tps = statistics.median(r[1] for r in results["direct (openai client)"][n])
        for label, by_n in results.items():
            ttft = statistics.median(r[0] for r in by_n[n])
            tps = statistics.median(r[1] for r in by_n[n])
            line = (
                f"    {label:24} first token {ttft * 1000:7.1f} ms  {tps:6.1f} tokens/s per stream"
            )
            if not label.startswith("direct"):
                loss = 1 - tps / base_tps
                added = (ttft - base_ttft) * 1000
                good = loss <= GOAL_TPS_LOSS and added <= GOAL_TTFT_MS
                ok &= good
                line += (
                    f"  ({loss:+.1%} tokens/s, {added:+.1f} ms first token; goal <= "
                    f"{GOAL_TPS_LOSS:.0%}, <= {GOAL_TTFT_MS:g} ms: {'met' if good else 'MISSED'})"
                )
            print(line)
    print("all goals met" if ok else "SOME GOALS MISSED")


if __name__ == "__main__":
    main()
