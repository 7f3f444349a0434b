"""Realistic use of aicortex's public API, type-checked by pyright (strict), never run.

Annotated assignments pin the types the public surface promises: if an overload or a
return type regresses, pyright reports it here. Everything sits in functions, so
importing this module does no I/O.
"""

from __future__ import annotations

from typing import Literal

import aicortex
from aicortex import (
    AICortexError,
    ApiRequest,
    AsyncCortex,
    AsyncStream,
    Attempt,
    Cortex,
    CortexTimeoutError,
    EventType,
    ModelInfo,
    ModelNotFoundError,
    PullProgress,
    ServerEntry,
    ServerError,
    ServerInfo,
    Stats,
    Stream,
    StreamError,
    StreamEvent,
    Timeout,
    ToolCall,
)


async def use_async_cortex() -> None:
    async with AsyncCortex(
        servers=["http://gpu-box:11434"], model="llama3.2:3b", timeout=Timeout(first_token=300)
    ) as cortex:
        text: str = await cortex.chat("hi")
        print(text)
        text = await cortex.chat(
            [{"role": "user", "content": "hi"}], model="llama3.2:3b", stream=False
        )
        stream: AsyncStream = await cortex.chat("hi", stream=True)
        async with stream:
            async for event in stream:
                kind: EventType = event.type
                if kind is EventType.TOKEN:
                    content: str | None = event.content
                    index: int | None = event.index
                    print(content, index)
                elif event.type is EventType.END:
                    stats: Stats | None = event.stats
                    if stats is not None:
                        tokens: int | None = stats.completion_tokens
                        speed: float | None = stats.tokens_per_second
                        print(tokens, speed)
                    reason: str | None = event.done_reason
                    print(reason)
                calls: tuple[ToolCall, ...] = event.tool_calls
                for call in calls:
                    name: str = call.name
                    print(name, call.arguments)
            whole: str = await stream.text()
            print(whole, stream.model, stream.server, stream.partial_text, stream.thinking)
        either: str | AsyncStream = await cortex.chat("hi", stream=bool(text))
        print(either)
        infos: list[ServerInfo] = await cortex.probe_servers("llama3.2:3b")
        info: ServerInfo = await cortex.server_info("llama3.2:3b")
        latency: float | None = info.latency
        print(infos, latency, info.up, info.version, info.models)
        candidates: list[str] = cortex.candidates("llama3.2:3b")
        print(candidates)
    await cortex.aclose()


async def use_the_pools() -> None:
    async with AsyncCortex(["http://gpu-box:11434"], http="aiohttp", max_connections=64) as cortex:
        which: Literal["httpx", "aiohttp"] = cortex.transport()
        limit: int | None = cortex.limits.max_connections
        print(which, limit, cortex.http)
    with Cortex(http="httpx", max_line_size=1 << 20) as blocking:
        print(blocking.transport(), blocking.limits)


def use_sync_cortex() -> None:
    with Cortex(servers="http://a:11434,http://b:11434", backend="trio") as cortex:
        s: str = cortex.chat("hi")
        print(s)
        st: Stream = cortex.chat("hi", stream=True, options={"temperature": 0.2})
        with st:
            for event in st:
                e: StreamEvent = event
                if e.type is EventType.TOKEN and e.content:
                    print(e.content, end="")
            full: str = st.text()
            print(full, st.stats, st.done_reason, st.tool_calls)
        closed: bool = cortex.closed
        servers: list[str] = cortex.servers
        timeout: Timeout = cortex.timeout
        print(closed, servers, timeout.first_token)
        info: ServerInfo = cortex.server_info(server_url="http://a:11434")
        has: bool | None = info.has_model
        print(has)
        request: ApiRequest = cortex.build_api_request("llama3.2:3b", "hi")
        print(request["url"])
    cortex.close()


async def use_pull() -> None:
    async with AsyncCortex(["http://a:11434", "http://b:11434"]) as cortex:
        async with cortex.pull("llama3.2:3b") as progress:
            async for step in progress:
                p: PullProgress = step
                share: float | None = p.fraction
                failed: str | None = p.error if p.done else None
                print(p.server, p.status, p.digest, p.total, p.completed, share, failed)
        async for step in cortex.pull("llama3.2:3b", servers=["http://c:11434"]):
            print(step.unreachable, step.bytes_completed, step.bytes_total)
    with Cortex() as blocking:
        for step in blocking.pull("llama3.2:3b"):
            done: bool = step.done
            print(done)


def use_module_functions() -> None:
    text: str = aicortex.chat("hi", model="llama3.2:3b")
    stream: aicortex.Stream = aicortex.chat("hi", stream=True)
    for event in stream:
        print(event.content)
    families: list[str] = aicortex.families()
    names: list[str] = aicortex.models("llama")
    info: ModelInfo = aicortex.model_info("llama3.2:3b")
    context: int = aicortex.model_info("llama3.2:3b").context_length
    entries: list[ServerEntry] = aicortex.model_servers("llama3.2:3b")
    url: str = entries[0].url
    params: dict[str, int | float] = aicortex.llm_params("llama3.2:3b")
    drawn: dict[str, int | float] = aicortex.random_llm_params("llama3.2:3b", seed=7)
    request: ApiRequest = aicortex.build_api_request("llama3.2:3b", "hi")
    method: str = request["method"]
    body: dict[str, object] = aicortex.build_api_request("llama3.2:3b", "hi")["json"]
    server: ServerInfo = aicortex.server_info(server_url="http://gpu-box:11434")
    up: bool = server.up
    error: str | None = server.error
    default: Cortex = aicortex.get_default_cortex()
    version: str = aicortex.__version__
    print(text, families, names, info, context, url, params, drawn, method, body, up, error)
    print(default, version)


def use_exceptions() -> None:
    try:
        aicortex.chat("hi")
    except ModelNotFoundError as exc:
        suggestions: list[str] = exc.suggestions
        model: str = exc.model
        print(suggestions, model, exc.servers)
    except ServerError as exc:
        attempts: list[Attempt] = exc.attempts
        first: str = exc.attempts[0].server
        why: str = exc.attempts[0].reason
        print(attempts, first, why, exc.servers)
    except StreamError as exc:
        partial: str = exc.partial_text
        where: str | None = exc.server
        print(partial, where)
    except CortexTimeoutError as exc:
        phase: Literal["connect", "first_token", "idle", "total", "probe"] = exc.phase
        limit: float = exc.timeout
        as_builtin: TimeoutError = exc
        print(phase, limit, as_builtin)
    except AICortexError as exc:
        print(exc)


def use_timeout() -> Timeout:
    generous = Timeout(first_token=300)
    first_token: float | None = generous.first_token
    probe: float = generous.probe
    print(first_token, probe)
    return Timeout(connect=1, first_token=2, idle=2, total=30, probe=1)


async def use_generate_and_embed() -> None:
    async with AsyncCortex(["http://gpu-box:11434"]) as cortex:
        text: str = await cortex.generate("def f(", model="qwen2.5-coder:1.5b", suffix=")")
        stream: AsyncStream = await cortex.generate("x", stream=True, raw=True)
        flag: bool = bool(text) and not stream.closed
        result: aicortex.EmbedResult = await cortex.embed(["a", "b"], model="nomic-embed-text")
        vectors: list[list[float]] = result.embeddings
        servers: tuple[str, ...] = result.servers
        tokens: int | None = result.prompt_tokens
        del flag, vectors, servers, tokens
    with Cortex() as blocking:
        done: str = blocking.generate("x", context=[1, 2])
        streamed: Stream = blocking.generate("x", stream=True)
        one: aicortex.EmbedResult = blocking.embed("a", dimensions=256)
        del done, streamed, one
    module_text: str = aicortex.generate("x")
    module_vectors: aicortex.EmbedResult = aicortex.embed("x", batch_size=32)
    args: aicortex.GenerateArgs = {"suffix": "x", "raw": False}
    del module_text, module_vectors, args


class Slow(aicortex.Observer):
    def request_finished(self, record: aicortex.RequestRecord) -> None:
        first: float | None = record.first_token
        seconds: float = record.duration
        outcome: Literal["ok", "error", "timeout", "model_missing", "invalid", "client_gone"]
        outcome = record.outcome
        kind: Literal["chat", "generate", "embed"] = record.kind
        stats: Stats | None = record.stats
        attempts: tuple[Attempt, ...] = record.attempts
        print(first, seconds, outcome, kind, stats, attempts, record.model, record.server)


async def use_observers_and_the_collector() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    async with AsyncCortex(observers=[Slow()]) as cortex:
        collector = aicortex.CortexCollector(cortex)
        registry.register(collector)
        cortex.add_observer(Slow())
        watching: tuple[aicortex.Observer, ...] = cortex.observers
        collector.close()
        del watching
    with Cortex(observers=(Slow(),)) as blocking:
        registry.register(aicortex.CortexCollector(blocking))
        blocking.remove_observer(blocking.observers[0])
