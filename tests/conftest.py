"""Shared fixtures: both async backends for every async test, fake servers, a clean env."""

from __future__ import annotations

import inspect
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakeollama import BlackHole, BlackHoleFactory, FakeOllama, FakeOllamaFactory

# tests/real/ runs against llama.cpp's real server: only in `nox -s real`, whose venv has it.
collect_ignore_glob = [] if os.environ.get("AICORTEX_REAL") == "1" else ["real/*"]

_ENVIRONMENT = (
    "AICORTEX_HTTP",
    "OLLAMA_HOST",
    "AICORTEX_SERVERS",
    "AICORTEX_MODEL",
    "AICORTEX_METADATA_DIR",
    "OLLAMA_API_KEY",
    "AICORTEX_CONFIG",
    "AICORTEX_ALLOWED_ORIGINS",
    "AICORTEX_ALLOWED_HOSTS",
    "AICORTEX_BODY_TIMEOUT",
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


# (event loop, AICORTEX_HTTP): each async test runs on asyncio and on trio with the
# default transport; a module that sets EVERY_TRANSPORT = True also runs on asyncio
# with httpx's transport, so what it tests holds for both transports asyncio can use.
_BACKENDS = [("asyncio", None), ("trio", None)]
_TRANSPORTS = [("asyncio", "aiohttp"), ("asyncio", "httpx"), ("trio", "httpx")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" not in metafunc.fixturenames:
        return
    every = getattr(metafunc.module, "EVERY_TRANSPORT", False)
    combos = _TRANSPORTS if every else _BACKENDS
    metafunc.parametrize(
        "anyio_backend",
        combos,
        ids=[backend if http is None else f"{backend}-{http}" for backend, http in combos],
        indirect=True,
        scope="module",
    )


@pytest.fixture(scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once on asyncio and once on trio (and see EVERY_TRANSPORT)."""
    backend: str = request.param[0]
    return backend


@pytest.fixture(autouse=True)
def _http_transport(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _isolated_environment: None
) -> None:
    """Pin AICORTEX_HTTP for the tests of an EVERY_TRANSPORT module."""
    callspec = getattr(request.node, "callspec", None)
    combo = callspec.params.get("anyio_backend") if callspec is not None else None
    if isinstance(combo, tuple) and combo[1] is not None:
        monkeypatch.setenv("AICORTEX_HTTP", str(combo[1]))


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's Ollama/aicortex settings out of every test."""
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    from aicortex._settings import ENVIRONMENT

    for _, name, _ in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    # No user configuration file either: the tests' own folder, empty.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(Path(__file__).parent / "fixtures" / "no-config"))


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


@pytest.fixture
def fresh_default_cortex(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start without the module-level functions' default Cortex, and close the one made."""
    from aicortex import _api

    monkeypatch.setattr(_api, "_default", None)
    yield
    made = _api._default
    if made is not None:
        made.close()
