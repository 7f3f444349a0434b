"""Unit tests with respx at the HTTP boundary: exact requests and answers, no sockets.

respx patches httpx's own transport, so these tests do what docs/testing.md tells users to
do in theirs: set ``AICORTEX_HTTP=httpx`` (on asyncio, "auto" would pick aiohttp).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx

from aicortex import AsyncCortex, ModelNotFoundError, ServerError, Timeout, ValidationError

A = "http://gpu-box:11434"
B = "http://cpu-box:11434"
MODEL = "llama3.2:3b"


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("AICORTEX_HTTP", "httpx")
    with respx.mock(assert_all_called=False) as router:
        yield router


def tags(*models: str) -> httpx.Response:
    return httpx.Response(200, json={"models": [{"name": m, "model": m} for m in models]})


def ndjson(path: Path) -> httpx.Response:
    return httpx.Response(
        200, content=path.read_bytes(), headers={"content-type": "application/x-ndjson"}
    )


def client() -> AsyncCortex:
    return AsyncCortex([A, B], fallback=False, timeout=Timeout(probe=0.5))


async def test_a_chat_streams_the_documented_answer(
    mock: respx.MockRouter, fixtures_dir: Path
) -> None:
    """The documented NDJSON answer becomes the text; the request body is exact."""
    mock.get(f"{A}/api/tags").mock(return_value=tags(MODEL))
    mock.get(f"{A}/api/version").mock(return_value=httpx.Response(200, json={"version": "0.5.1"}))
    chat = mock.post(f"{A}/api/chat").mock(
        return_value=ndjson(fixtures_dir / "ollama" / "chat-stream.ndjson")
    )
    async with client() as cortex:
        assert await cortex.chat("why is the sky blue?", model=MODEL) == "The"
        info = await cortex.server_info(MODEL)
    assert json.loads(chat.calls.last.request.content) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "why is the sky blue?"}],
        "stream": True,
    }
    assert info.version == "0.5.1"
    assert info.models == (MODEL,)


async def test_a_connect_error_fails_over(mock: respx.MockRouter, fixtures_dir: Path) -> None:
    """A ConnectError on the first server's chat moves on to the second."""
    for base in (A, B):
        mock.get(f"{base}/api/tags").mock(return_value=tags(MODEL))
        mock.get(f"{base}/api/version").mock(return_value=httpx.Response(404))
    mock.post(f"{A}/api/chat").mock(side_effect=httpx.ConnectError("connection refused"))
    mock.post(f"{B}/api/chat").mock(
        return_value=ndjson(fixtures_dir / "ollama" / "chat-stream.ndjson")
    )
    async with client() as cortex:
        stream = await cortex.chat("hi", model=MODEL, stream=True)
        assert stream.server == B
        assert await stream.text() == "The"


async def test_the_documented_404_becomes_model_not_found(
    mock: respx.MockRouter, fixtures_dir: Path
) -> None:
    """Ollama's `model '…' not found` 404 raises ModelNotFoundError with suggestions."""
    body = (fixtures_dir / "ollama" / "error-model-not-found.json").read_bytes()
    for base in (A, B):
        mock.get(f"{base}/api/tags").mock(return_value=tags("llama3.2:1b"))
        mock.get(f"{base}/api/version").mock(return_value=httpx.Response(404))
        mock.post(f"{base}/api/chat").mock(
            return_value=httpx.Response(
                404, content=body, headers={"content-type": "application/json"}
            )
        )
    async with client() as cortex:
        with pytest.raises(ModelNotFoundError) as info:
            await cortex.chat("hi", model="llama3.2:3")
    assert info.value.servers == [A, B]
    # What the servers have first, then the catalog's models they lack.
    assert info.value.suggestions[:2] == ["llama3.2:1b", "llama3.2:3b"]
    assert "llama3.2:3b" in info.value.not_pulled
    assert "llama3.2:1b" not in info.value.not_pulled


async def test_the_documented_400_is_a_validation_error(
    mock: respx.MockRouter, fixtures_dir: Path
) -> None:
    """Ollama's `model is required` 400 is raised as ValidationError with its text."""
    body = (fixtures_dir / "ollama" / "error-model-required.json").read_bytes()
    mock.get(f"{A}/api/tags").mock(return_value=tags(MODEL))
    mock.get(f"{A}/api/version").mock(return_value=httpx.Response(404))
    mock.post(f"{A}/api/chat").mock(
        return_value=httpx.Response(400, content=body, headers={"content-type": "application/json"})
    )
    async with client() as cortex:
        with pytest.raises(ValidationError, match="model is required"):
            await cortex.chat("hi", model=MODEL)


async def test_probe_answers_that_are_not_ollama_mark_the_server_down(
    mock: respx.MockRouter,
) -> None:
    """A 500 or a non-JSON /api/tags answer counts as down, with the reason kept."""
    mock.get(f"{A}/api/tags").mock(return_value=httpx.Response(500))
    mock.get(f"{B}/api/tags").mock(return_value=httpx.Response(200, text="<html>"))
    mock.get(url__regex=r".*/api/version").mock(return_value=httpx.Response(404))
    async with client() as cortex:
        with pytest.raises(ServerError) as info:
            await cortex.chat("hi", model=MODEL)
    reasons = {a.server: a.reason for a in info.value.attempts}
    assert reasons[A] == "probe GET /api/tags answered HTTP 500"
    assert reasons[B] == "probe GET /api/tags did not answer with Ollama's JSON"


async def test_an_api_key_is_sent_as_a_bearer_token(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path
) -> None:
    """OLLAMA_API_KEY becomes an Authorization header on every request."""
    monkeypatch.setenv("OLLAMA_API_KEY", "sekrit")
    route = mock.get(f"{A}/api/tags").mock(return_value=tags(MODEL))
    mock.get(f"{A}/api/version").mock(return_value=httpx.Response(404))
    chat = mock.post(f"{A}/api/chat").mock(
        return_value=ndjson(fixtures_dir / "ollama" / "chat-stream.ndjson")
    )
    async with AsyncCortex([A], fallback=False) as cortex:
        await cortex.chat("hi", model=MODEL)
    assert route.calls.last.request.headers["authorization"] == "Bearer sekrit"
    assert chat.calls.last.request.headers["authorization"] == "Bearer sekrit"


async def test_the_documented_recipe_mocks_a_default_cortex(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The recipe of docs/testing.md for users' tests: AICORTEX_HTTP=httpx plus
    respx.mock, and a cortex built with default settings never touches the network."""
    monkeypatch.setenv("AICORTEX_HTTP", "httpx")
    monkeypatch.setenv("OLLAMA_HOST", A)
    with respx.mock(assert_all_mocked=True) as router:
        router.get(f"{A}/api/tags").respond(json={"models": [{"name": MODEL, "model": MODEL}]})
        router.get(f"{A}/api/version").respond(json={"version": "0.12.0"})
        router.post(f"{A}/api/chat").respond(
            content=b'{"message":{"role":"assistant","content":"mocked"},"done":false}\n'
            b'{"message":{"role":"assistant","content":""},"done":true}\n'
        )
        async with AsyncCortex() as cortex:
            assert cortex.transport() == "httpx"
            assert await cortex.chat("hi", model=MODEL) == "mocked"
