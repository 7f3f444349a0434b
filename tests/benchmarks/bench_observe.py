"""What metrics and the access log cost the proxy: both on against both off, in one run.

Two ``aicortex serve`` processes in front of the same fake Ollama: one as served by
default with its access log written (``--log-level info``: metrics at ``/metrics``, and
one text line per request to its stderr, a file), one with ``--no-metrics
--no-access-log``. Measured in alternating rounds, so a slow spell of a shared machine
hits both alike (figures are medians over rounds):

* the added p50 latency of small non-streamed chats: ``POST /v1/chat/completions`` with
  plain httpx through each proxy, next to the same chat sent natively (``/api/chat``) to
  the upstream (bench_proxy.py's fast fake), in turns of 20 requests back to back to each
  side (the order turning turn by turn), ``--requests`` to each per round; what a proxy
  adds is its p50 minus the native p50 of the same round;
* each proxy process's CPU seconds (utime + stime from /proc) per 1,000 streamed
  tokens: ``--streams`` concurrent streamed chats of 80-120 tokens each to each proxy,
  both at once (so both see the same moments), paced by the upstream at ``--rate``
  tokens/s each (bench_proxy.py's paced scenario), each round after a round of 3-token
  streams that opens every connection; the figure is the median over rounds of the
  ratio of the two.

Goal: with both on, each figure rises by at most 10% against both off. At the end the
proxy with both on is checked to have counted every chat at ``/metrics`` and logged a
line for each.

Run with ``nox -s bench`` or ``python tests/benchmarks/bench_observe.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from bench_proxy import (
    MESSAGES,
    MODEL,
    PACED_TOKENS,
    PacedRound,
    ServeProcess,
    _serve_paced,
    _serve_upstream,
    paced_client,
    paced_round,
    paced_tokens,
    percentiles,
    server_stack,
    verdict,
)
from prometheus_client.parser import text_string_to_metric_families

GOAL_RATIO = 1.10
BLOCK = 20  # requests sent back to back to one side before the next side's turn
ON = ("--log-level", "info")  # the defaults: metrics on, the access log on stderr
OFF = ("--no-metrics", "--no-access-log")


def start_pair(upstream: str) -> dict[str, ServeProcess]:
    """The proxy with metrics and the access log on, and the one with both off."""
    proxies = {
        "on": ServeProcess("metrics + access log on", upstream, None, ON),
        "off": ServeProcess("metrics + access log off", upstream, None, OFF),
    }
    for proxy in proxies.values():
        proxy.start()
    return proxies


def chats_counted(proxy: ServeProcess) -> tuple[float, int]:
    """The chats the proxy counted at /metrics, and the access-log lines it wrote."""
    text = httpx.get(proxy.url + "/metrics", timeout=30).text
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aicortex_requests_total"
        and sample.labels.get("route") == "/v1/chat/completions"
    )
    lines = proxy._log(1).count("route=/v1/chat/completions")  # pyright: ignore[reportPrivateUsage]
    return counted, lines


def interleaved(upstream: str, proxies: dict[str, ServeProcess], count: int) -> dict[str, float]:
    """p50 (ms) of ``count`` small chats to each side, sent in turns of ``BLOCK`` back to
    back (native, off, on, the order turning turn by turn): the sides share the same
    moments, and what a proxy does after an answer can still delay its next request."""
    native_body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    body = {"model": MODEL, "messages": MESSAGES}
    with contextlib.ExitStack() as stack:
        clients = {
            name: stack.enter_context(httpx.Client(base_url=url, timeout=30))
            for name, url in [("native", upstream)] + [(n, p.url) for n, p in proxies.items()]
        }

        def native() -> None:
            response = clients["native"].post("/api/chat", json=native_body)
            assert json.loads(response.text.splitlines()[-1])["done"] is True

        def through(name: str) -> Callable[[], None]:
            client = clients[name]

            def run() -> None:
                answer = client.post("/v1/chat/completions", json=body).json()
                assert answer["choices"][0]["message"]["content"] == "Hi!", answer

            return run

        calls: dict[str, Callable[[], None]] = {"native": native}
        calls |= {name: through(name) for name in proxies}
        order = list(calls)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for index in range(0, count, BLOCK):
            turn = index // BLOCK % len(order)
            for name in order[turn:] + order[:turn]:
                call, taken = calls[name], samples[name]
                for _ in range(min(BLOCK, count - index)):
                    started = time.perf_counter()
                    call()
                    taken.append(time.perf_counter() - started)
    return {name: percentiles(taken)[0] for name, taken in samples.items()}


def latency(args: argparse.Namespace) -> float:
    """Median over rounds of each proxy's added p50 (ms); returns on / off."""
    ports: Any = multiprocessing.SimpleQueue()
    upstream_process = multiprocessing.Process(
        target=_serve_upstream, args=(ports, 100), daemon=True
    )
    upstream_process.start()
    upstream = f"http://127.0.0.1:{ports.get()}"
    proxies: dict[str, ServeProcess] = {}
    try:
        proxies = start_pair(upstream)
        interleaved(upstream, proxies, 100)  # warm-up: probes, connections, code paths
        added: dict[str, list[float]] = {"on": [], "off": []}
        p50s: dict[str, list[float]] = {"on": [], "off": [], "native": []}
        for _ in range(args.rounds):
            this_round = interleaved(upstream, proxies, args.requests)
            for kind, p50 in this_round.items():
                p50s[kind].append(p50)
            for kind in ("on", "off"):
                added[kind].append(this_round[kind] - this_round["native"])
        sent = 100 + args.rounds * args.requests
        on, off = statistics.median(added["on"]), statistics.median(added["off"])
        print(
            f"  small non-streamed chats (plain httpx), {args.rounds} rounds of "
            f"{args.requests} requests to each side, in turns of {BLOCK}; added over "
            "native /api/chat:"
        )
        native = statistics.median(p50s["native"])
        print(f"    native                    p50 {native:6.3f} ms")
        for kind, value in (("off", off), ("on", on)):
            p50 = statistics.median(p50s[kind])
            per_round = ", ".join(f"{a:+.3f}" for a in added[kind])
            print(
                f"    {proxies[kind].label:<25} p50 {p50:6.3f} ms, added {value:+.3f} ms "
                f"(per round: {per_round})"
            )
        ratio = on / off
        print(
            f"    added p50, on / off: {ratio:.3f}x  goal <= {GOAL_RATIO:.2f}x: "
            f"{verdict(ratio <= GOAL_RATIO)}"
        )
        counted, lines = chats_counted(proxies["on"])
        check = "ok" if counted == sent and lines == sent else "WRONG"
        print(
            f"    the proxy with both on counted {counted:,.0f} chats at /metrics and "
            f"logged {lines:,} lines for {sent:,} sent: {check}"
        )
        return ratio
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream_process.kill()
        upstream_process.join()


def streaming(args: argparse.Namespace) -> float:
    """The proxies' CPU seconds per 1,000 streamed tokens, both loaded at once in each
    round; returns the median over rounds of on / off."""
    ports: Any = multiprocessing.SimpleQueue()
    upstream_process = multiprocessing.Process(
        target=_serve_paced, args=(ports, args.rate), daemon=True
    )
    upstream_process.start()
    upstream = f"http://127.0.0.1:{ports.get()}"
    proxies: dict[str, ServeProcess] = {}
    try:
        proxies = start_pair(upstream)
        streams: int = args.streams

        async def both(
            clients: dict[str, httpx.AsyncClient], tokens: Callable[[int], int]
        ) -> dict[str, tuple[float, int]]:
            """One round of ``streams`` streams to each proxy at once: CPU s and tokens."""
            before = {name: proxy.cpu_seconds() for name, proxy in proxies.items()}
            taken: dict[str, PacedRound] = {}

            async def one(name: str) -> None:
                taken[name] = await paced_round(clients[name], False, streams, tokens)

            async with anyio.create_task_group() as tg:
                for name in proxies:
                    tg.start_soon(one, name)
            return {
                name: (proxy.cpu_seconds() - before[name], taken[name].tokens)
                for name, proxy in proxies.items()
            }

        async def run_all() -> list[dict[str, tuple[float, int]]]:
            clients = {name: paced_client(p.url) for name, p in proxies.items()}
            rounds: list[dict[str, tuple[float, int]]] = []
            try:
                for _ in range(args.rounds):
                    await both(clients, lambda i: 3)  # every connection open and fresh
                    await anyio.sleep(0.5)
                    rounds.append(await both(clients, paced_tokens))
            finally:
                for client in clients.values():
                    await client.aclose()
            return rounds

        rounds = anyio.run(run_all)
        low, high = PACED_TOKENS
        print(
            f"  {streams} concurrent streams of {low}-{high} tokens at {args.rate:g} tokens/s "
            f"to each proxy at once, {args.rounds} rounds; proxy CPU per 1,000 tokens:"
        )
        per_1k: dict[str, list[float]] = {"off": [], "on": []}
        for taken in rounds:
            for name, (cpu, tokens) in taken.items():
                per_1k[name].append(cpu / tokens * 1000)
        for name in ("off", "on"):
            listed = ", ".join(f"{v:.4f}" for v in per_1k[name])
            print(
                f"    {proxies[name].label:<25} {statistics.median(per_1k[name]):.4f} s "
                f"(per round: {listed})"
            )
        ratios = [on / off for on, off in zip(per_1k["on"], per_1k["off"], strict=True)]
        ratio = statistics.median(ratios)
        listed = ", ".join(f"{r:.3f}" for r in ratios)
        print(
            f"    CPU per 1,000 tokens, on / off: {ratio:.3f}x (per round: {listed})  "
            f"goal <= {GOAL_RATIO:.2f}x: {verdict(ratio <= GOAL_RATIO)}"
        )
        sent = 2 * args.rounds * streams  # with the rounds of 3-token streams
        counted, lines = chats_counted(proxies["on"])
        check = "ok" if counted == sent and lines == sent else "WRONG"
        print(
            f"    the proxy with both on counted {counted:,.0f} streams at /metrics and "
            f"logged {lines:,} lines for {sent:,} sent: {check}"
        )
        return ratio
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream_process.kill()
        upstream_process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per latency round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each measurement")
    parser.add_argument(
        "--streams", type=int, default=100, help="concurrent paced streams to each proxy"
    )
    parser.add_argument("--rate", type=float, default=40.0, help="tokens/s of each stream")
    parser.add_argument(
        "--only", choices=["latency", "streaming"], help="run one measurement (default: both)"
    )
    args = parser.parse_args()
    print(
        f"observe: the proxy with metrics and the access log on, next to both off; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, uvicorn with {server_stack()}"
    )
    if args.only in (None, "latency"):
        latency(args)
    if args.only in (None, "streaming"):
        streaming(args)


if __name__ == "__main__":
    main()
