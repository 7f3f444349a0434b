"""Embeddings: batching and its reassembly (pure), and `embed()` across fake servers,
including one that dies mid-batch and OpenAI-style servers."""

from __future__ import annotations

import json
from typing import Any

import pytest

import aicortex
from aicortex import (
    AsyncCortex,
    Cortex,
    EmbedResult,
    ModelNotFoundError,
    Server,
    ServerError,
    Timeout,
    ValidationError,
)
from aicortex._embed import Batch, assemble, split_batches
from aicortex._events import Stats
from aicortex._openai import embeddings_of as openai_embeddings_of
from aicortex._protocol import build_embed_body, embed_inputs, embeddings_of
from fakeollama import (
    Exchange,
    FakeOllamaFactory,
    Script,
    drop_connection,
    embedding_of,
    refused_url,
    status,
)

EMBED = "nomic-embed-text"
QUICK = Timeout(connect=1.0, first_token=3.0, idle=2.0, probe=0.5)
TEXTS = [f"text number {i}" for i in range(10)]


# -- pure ------------------------------------------------------------------------------


def test_split_batches_keeps_every_text_once_with_its_position() -> None:
    batches = split_batches(TEXTS, 4)
    assert [start for start, _ in batches] == [0, 4, 8]
    assert [len(part) for _, part in batches] == [4, 4, 2]
    assert [t for _, part in batches for t in part] == TEXTS
    assert split_batches([], 64) == []


@pytest.mark.parametrize("size", [0, -1, True, 2.5])
def test_split_batches_refuses_a_bad_size(size: Any) -> None:
    with pytest.raises(ValidationError, match="batch_size must be a whole number"):
        split_batches(TEXTS, size)


def test_assemble_puts_batches_back_in_input_order_and_adds_up_figures() -> None:
    done = [
        Batch(4, [[4.0], [5.0]], "http://b", Stats(prompt_tokens=3, total_duration=10)),
        Batch(0, [[0.0], [1.0], [2.0], [3.0]], "http://a", Stats(prompt_tokens=5)),
        Batch(6, [[6.0]], "http://b", Stats(total_duration=7, load_duration=1)),
    ]
    result = assemble("m", done, 7)
    assert result.embeddings == [[float(i)] for i in range(7)]
    assert result.servers == ("http://a", "http://b")
    assert (result.prompt_tokens, result.total_duration, result.load_duration) == (8, 17, 1)
    assert result.batches == 3
    assert len(result) == 7


def test_assemble_refuses_a_gap() -> None:
    with pytest.raises(ValueError, match="position 2"):
        assemble("m", [Batch(0, [[0.0], [1.0]], "a", Stats()), Batch(3, [[3.0]], "a", Stats())], 4)


def test_embed_inputs_and_body_checks() -> None:
    assert embed_inputs("one") == ["one"]
    assert embed_inputs(("a", "b")) == ["a", "b"]
    with pytest.raises(ValidationError, match=r"input\[1\] is a int"):
        embed_inputs(["a", 2])
    with pytest.raises(ValidationError, match="a string or a list of strings"):
        embed_inputs(b"bytes")
    body = build_embed_body(EMBED, ["x"], truncate=False, dimensions=256, keep_alive="5m")
    assert body == {
        "model": EMBED,
        "input": ["x"],
        "truncate": False,
        "dimensions": 256,
        "keep_alive": "5m",
    }
    with pytest.raises(ValidationError, match="dimensions must be a whole number"):
        build_embed_body(EMBED, ["x"], dimensions=0)
    with pytest.raises(ValidationError, match="truncate must be true or false"):
        build_embed_body(EMBED, ["x"], truncate="no")  # type: ignore[arg-type]


def test_embeddings_of_reads_ollama_answers(fixtures_dir: Any) -> None:
    answer = json.loads((fixtures_dir / "ollama" / "embed-multi.json").read_text())
    vectors, stats = embeddings_of(answer, len(answer["embeddings"]))
    assert vectors == answer["embeddings"]
    assert stats.prompt_tokens == answer.get("prompt_eval_count")
    with pytest.raises(ValueError, match="holds 2 embeddings for 3 inputs"):
        embeddings_of({"embeddings": [[1.0], [2.0]]}, 3)
    with pytest.raises(ValueError, match="not a list of numbers"):
        embeddings_of({"embeddings": [["x"]]}, 1)
    with pytest.raises(ValueError, match="no 'embeddings' list"):
        embeddings_of({"embedding": [1.0]}, 1)


def test_openai_embeddings_are_put_in_index_order() -> None:
    answer = {
        "data": [
            {"index": 1, "embedding": [1.0]},
            {"index": 0, "embedding": [0.0]},
        ],
        "usage": {"prompt_tokens": 4},
    }
    assert openai_embeddings_of(answer, 2) == ([[0.0], [1.0]], 4)
    with pytest.raises(ValueError, match="repeated embedding index 0"):
        openai_embeddings_of({"data": [{"index": 0, "embedding": [0.0]}] * 2}, 2)
    with pytest.raises(ValueError, match="encoding_format"):
        openai_embeddings_of({"data": [{"index": 0, "embedding": "AAAA"}]}, 1)


# -- against servers ---------------------------------------------------------------------


def expected(texts: list[str]) -> list[list[float]]:
    return [embedding_of(t) for t in texts]


async def test_embed_spreads_batches_and_keeps_input_order(
    fake_ollama: FakeOllamaFactory,
) -> None:
    servers = [fake_ollama(models=[EMBED]) for _ in range(3)]
    for server in servers:
        server.embed_delay = 0.02
    urls = [s.url for s in servers]
    async with AsyncCortex(urls, routing="round_robin", fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed(TEXTS, model=EMBED, batch_size=3)
    assert isinstance(result, EmbedResult)
    assert result.embeddings == expected(TEXTS)
    assert result.batches == 4
    assert result.model == EMBED
    assert sorted(result.servers) == sorted(urls)
    sent = [r.json["input"] for s in servers for r in s.requests if r.path == "/api/embed"]
    assert sorted(t for batch in sent for t in batch) == sorted(TEXTS)
    assert max(len(batch) for batch in sent) == 3
    assert result.prompt_tokens == sum(len(t.split()) + 1 for t in TEXTS)
    assert result.total_duration is not None
    assert result.load_duration == 4 * 1_000_000


async def test_embed_sends_the_options_of_the_call(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama(models=[EMBED])
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed(
            "one text", model=EMBED, truncate=False, dimensions=4, keep_alive=0
        )
    assert result.embeddings == [embedding_of("one text", 4)]
    [request] = [r for r in server.requests if r.path == "/api/embed"]
    assert request.json == {
        "model": EMBED,
        "input": ["one text"],
        "truncate": False,
        "dimensions": 4,
        "keep_alive": 0,
    }


class DiesAfter(Script):
    """Embed like Ollama for ``served`` batches, then reset every connection mid-batch
    (after reading the request), as a server that crashed would."""

    def __init__(self, served: int) -> None:
        self.left = served

    async def run(self, exchange: Exchange) -> None:
        if self.left <= 0:
            await exchange.pause(0.01)
            await drop_connection(reset=True).run(exchange)
            return
        self.left -= 1
        inputs = exchange.body["input"]
        body = {"model": exchange.model, "embeddings": [embedding_of(t) for t in inputs]}
        await exchange.respond(200, json.dumps(body).encode(), "application/json")


async def test_a_server_that_dies_mid_batch_has_its_batch_sent_elsewhere(
    fake_ollama: FakeOllamaFactory,
) -> None:
    healthy = fake_ollama(models=[EMBED])
    dying = fake_ollama(models=[EMBED])
    healthy.embed_delay = 0.01
    dying.on("/api/embed", DiesAfter(1))
    urls = [dying.url, healthy.url]
    async with AsyncCortex(urls, routing="round_robin", fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed(TEXTS, model=EMBED, batch_size=1, concurrency=2)
    assert result.embeddings == expected(TEXTS)
    assert result.servers[0] in urls
    assert set(result.servers) == {dying.url, healthy.url}
    assert dying.count("/api/embed") >= 2  # one served, then at least one cut
    answered = healthy.count("/api/embed")
    assert answered + 1 == result.batches == 10  # every batch it lost was served again


async def test_embed_when_no_server_can_answer(fake_ollama: FakeOllamaFactory) -> None:
    broken = fake_ollama(models=[EMBED])
    broken.on("/api/embed", status(500, {"error": "llama runner process has terminated"}))
    urls = [broken.url, refused_url()]
    async with AsyncCortex(urls, fallback=False, timeout=QUICK) as cortex:
        with pytest.raises(ServerError) as caught:
            await cortex.embed(TEXTS, model=EMBED, batch_size=5)
    reasons = " ".join(a.reason for a in caught.value.attempts)
    assert "llama runner process has terminated" in reasons
    assert "connection refused" in reasons


async def test_embed_of_a_model_no_server_has(fake_ollama: FakeOllamaFactory) -> None:
    servers = [fake_ollama(models=["llama3.2:3b"]) for _ in range(2)]
    async with AsyncCortex([s.url for s in servers], fallback=False, timeout=QUICK) as cortex:
        with pytest.raises(ModelNotFoundError) as caught:
            await cortex.embed(["a", "b"], model=EMBED)
    assert caught.value.model == EMBED
    assert sorted(caught.value.servers) == sorted(s.url for s in servers)


async def test_a_rejected_batch_fails_the_call_at_once(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama(models=[EMBED])
    other = fake_ollama(models=[EMBED])
    for s in (server, other):
        s.on("/api/embed", status(400, {"error": "the input length exceeds the context length"}))
    async with AsyncCortex([server.url, other.url], fallback=False, timeout=QUICK) as cortex:
        with pytest.raises(ValidationError, match="exceeds the context length"):
            await cortex.embed(TEXTS, model=EMBED, truncate=False, batch_size=2)
    assert server.count("/api/embed") + other.count("/api/embed") <= 5


async def test_embed_of_nothing_sends_nothing(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama(models=[EMBED])
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed([], model=EMBED)
        with pytest.raises(ValidationError, match="concurrency must be"):
            await cortex.embed(["a"], model=EMBED, concurrency=0)
    assert result.embeddings == []
    assert result.servers == ()
    assert server.count("/api/embed") == 0


class Counting(Script):
    """Embed like Ollama after ``delay`` s, counting the batches in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.now = self.peak = 0

    async def run(self, exchange: Exchange) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await exchange.pause(self.delay)
        finally:
            self.now -= 1
        inputs = exchange.body["input"]
        body = {"model": exchange.model, "embeddings": [embedding_of(t) for t in inputs]}
        await exchange.respond(200, json.dumps(body).encode(), "application/json")


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_bounds_the_batches_in_flight(
    fake_ollama: FakeOllamaFactory, concurrency: int
) -> None:
    server = fake_ollama(models=[EMBED])
    counting = Counting(0.03)
    server.on("/api/embed", counting)
    async with AsyncCortex([server.url], fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed(TEXTS, model=EMBED, batch_size=1, concurrency=concurrency)
    assert result.embeddings == expected(TEXTS)
    assert counting.peak == concurrency


class OpenAIEmbeddings(Script):
    """``/v1/models`` and ``/v1/embeddings`` of an OpenAI-style server, the items of each
    answer in reverse order (their ``index`` says where they belong)."""

    def __init__(self, model: str) -> None:
        self.model = model

    async def run(self, exchange: Exchange) -> None:
        if exchange.request.path == "/v1/models":
            body: dict[str, Any] = {"object": "list", "data": [{"id": self.model}]}
        else:
            inputs = exchange.body["input"]
            data = [
                {"object": "embedding", "index": i, "embedding": embedding_of(t)}
                for i, t in enumerate(inputs)
            ]
            body = {"data": data[::-1], "usage": {"prompt_tokens": len(inputs)}}
        await exchange.respond(200, json.dumps(body).encode(), "application/json")


async def test_openai_style_servers_embed_at_v1_embeddings(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(models=[])
    script = OpenAIEmbeddings("nomic-embed-text-v1.5")
    for path in ("/v1/models", "/v1/embeddings"):
        server.on(path, script)
    target = Server(server.url, api="openai", models={EMBED: "nomic-embed-text-v1.5"})
    async with AsyncCortex([target], fallback=False, timeout=QUICK) as cortex:
        result = await cortex.embed(TEXTS, model=EMBED, batch_size=4, dimensions=8)
    assert result.embeddings == expected(TEXTS)
    assert result.prompt_tokens == len(TEXTS)
    sent = [r.json for r in server.requests if r.path == "/v1/embeddings"]
    assert [len(b["input"]) for b in sent] == [4, 4, 2] or sorted(
        len(b["input"]) for b in sent
    ) == [2, 4, 4]
    assert {b["model"] for b in sent} == {"nomic-embed-text-v1.5"}
    assert all(b["encoding_format"] == "float" and b["dimensions"] == 8 for b in sent)


def test_blocking_embed(fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake_ollama(models=[EMBED])
    with Cortex([server.url], fallback=False, timeout=QUICK) as cortex:
        result = cortex.embed(TEXTS[:3], model=EMBED, batch_size=2)
    assert result.embeddings == expected(TEXTS[:3])
    monkeypatch.setenv("AICORTEX_SERVERS", server.url)
    default = aicortex.get_default_cortex()
    try:
        assert aicortex.embed("x", model=EMBED).embeddings == expected(["x"])
    finally:
        default.close()


async def test_least_busy_spreads_a_burst_of_batches_evenly(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Every batch is counted in flight as soon as it is routed, so the batches sent at
    once do not all see idle servers and pick the same one."""
    servers = [fake_ollama(models=[EMBED]) for _ in range(4)]
    for server in servers:
        server.embed_delay = 0.05
    urls = [s.url for s in servers]
    async with AsyncCortex(urls, routing="least_busy", fallback=False, timeout=QUICK) as cortex:
        await cortex.embed(["warm"], model=EMBED)  # probes done, as in a running service
        result = await cortex.embed(TEXTS[:8], model=EMBED, batch_size=1)
    assert result.embeddings == expected(TEXTS[:8])
    assert sorted(s.count("/api/embed") for s in servers) == [2, 2, 2, 3]
