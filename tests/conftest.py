"""Shared fixtures: both async backends for every async test, fake servers, a clean env."""

from __future__ import annotations

import inspect
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakeollama import BlackHole, BlackHoleFactory, FakeOllama, FakeOllamaFactory

_ENVIRONMENT = (
    "OLLAMA_HOST",
    "AICORTEX_SERVERS",
    "AICORTEX_MODEL",
    "AICORTEX_METADATA_DIR",
    "OLLAMA_API_KEY",
)


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, object, object]:
    """Mark every `async def` test for anyio, so modules need no `pytest.mark.anyio`."""
    # A wrapper runs before anyio's own hook, which then sees the mark and parametrises.
    if inspect.iscoroutinefunction(obj) and collector.istestfunction(obj, name):
        pytest.mark.anyio(obj)
    return (yield)


@pytest.fixture(
    scope="module",
    params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once on asyncio and once on trio."""
    backend: str = request.param
    return backend


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's Ollama/aicortex settings out of every test."""
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fixtures_dir() -> Path:
    """The wire fixtures in tests/fixtures (ollama/, openai/)."""
    return Path(__file__).parent / "fixtures"


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllamaFactory]:
    """Start fake Ollama servers on demand: `fake_ollama(models=[...], probe_delay=0.3)`."""
    servers: list[FakeOllama] = []

    def make(**kwargs: Any) -> FakeOllama:
        server = FakeOllama(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
    assert not [e for server in servers for e in server.script_errors], "a fake script failed"


@pytest.fixture
def black_hole() -> Iterator[BlackHoleFactory]:
    """Start listeners that accept connections and never answer."""
    holes: list[BlackHole] = []

    def make() -> BlackHole:
        hole = BlackHole()
        holes.append(hole)
        return hole.start()

    yield make
    for hole in holes:
        hole.stop()
