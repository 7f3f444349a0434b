"""Module-level functions: `aicortex.chat()` and friends on a lazily created default Cortex."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import aicortex
from aicortex import _api
from fakeollama import FakeOllama, FakeOllamaFactory, refused_url

# Not in the catalog, so the default Cortex has no catalog servers to fall back to.
MODEL = "test-only-model:1b"


# Each test starts without a default Cortex and closes the one it made.
pytestmark = pytest.mark.usefixtures("fresh_default_cortex")


@pytest.fixture
def configured(fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch) -> FakeOllama:
    """A fake server named by AICORTEX_SERVERS, with AICORTEX_MODEL set.

    OLLAMA_HOST points at a refused port so that the default Cortex, which falls back to
    it, never reaches a real Ollama on 127.0.0.1:11434.
    """
    server = fake_ollama(models=[MODEL])
    monkeypatch.setenv("AICORTEX_SERVERS", server.url)
    monkeypatch.setenv("AICORTEX_MODEL", MODEL)
    monkeypatch.setenv("OLLAMA_HOST", refused_url())
    return server


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aicortex-portal"]


def test_chat_uses_the_default_cortex_configured_from_the_environment(
    configured: FakeOllama,
) -> None:
    """aicortex.chat("hi") sends AICORTEX_MODEL to AICORTEX_SERVERS through the default Cortex."""
    assert _api._default is None
    assert aicortex.chat("hi") == "Hello!"
    (request,) = [r for r in configured.requests if r.path == "/api/chat"]
    assert request.json["model"] == MODEL
    assert request.json["messages"] == [{"role": "user", "content": "hi"}]
    cortex = aicortex.get_default_cortex()
    assert _api._default is cortex
    assert cortex.servers == [configured.url]


def test_the_default_cortex_is_shared_until_closed(configured: FakeOllama) -> None:
    """get_default_cortex() returns one object; after close() the next call makes a new one."""
    first = aicortex.get_default_cortex()
    assert aicortex.get_default_cortex() is first
    assert len(portal_threads()) >= 1
    first.close()
    second = aicortex.get_default_cortex()
    assert second is not first
    assert not second.closed
    assert aicortex.chat("hi") == "Hello!"
    assert aicortex.get_default_cortex() is second


def test_chat_stream_iterates_events(configured: FakeOllama) -> None:
    """aicortex.chat("hi", stream=True) yields START, TOKENs and END."""
    stream = aicortex.chat("hi", stream=True)
    events = list(stream)
    assert [e.type for e in events] == [
        aicortex.EventType.START,
        aicortex.EventType.TOKEN,
        aicortex.EventType.TOKEN,
        aicortex.EventType.END,
    ]
    assert "".join(e.content or "" for e in events) == "Hello!"
    assert {(e.model, e.server) for e in events} == {(MODEL, configured.url)}


def test_offline_functions_start_no_cortex_and_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catalog lookups and build_api_request do no I/O: no default Cortex, no loop thread."""
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama-box:11434")
    threads = set(threading.enumerate())

    assert "llama" in aicortex.families()
    llamas = aicortex.models("llama")
    assert "llama3.2:3b" in llamas
    assert all(name in aicortex.models() for name in llamas)
    info = aicortex.model_info("llama3.2:3b")
    assert info.name == "llama3.2:3b"
    assert info.family == "llama"
    assert info.context_length > 0
    assert all(entry.url for entry in aicortex.model_servers("llama3.2:3b"))
    defaults = aicortex.llm_params("llama3.2:3b")
    assert defaults["temperature"] == info.generation["temperature"].default
    drawn = aicortex.random_llm_params("llama3.2:3b", seed=7)
    assert drawn == aicortex.random_llm_params("llama3.2:3b", seed=7)
    assert drawn.keys() == defaults.keys()
    for name, value in drawn.items():
        bounds = info.generation[name]
        assert bounds.min <= value <= bounds.max
    request = aicortex.build_api_request("llama3.2:3b", "hi")
    assert request["method"] == "POST"
    assert request["path"] == "/api/chat"
    assert request["json"]["stream"] is True
    assert request["json"]["model"] == "llama3.2:3b"
    assert request["json"]["messages"] == [{"role": "user", "content": "hi"}]

    assert _api._default is None
    assert set(threading.enumerate()) == threads
    assert threading.active_count() == len(threads)


def test_build_api_request_targets_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without configured servers the request goes to OLLAMA_HOST, catalog model or not."""
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama-box:11434")
    assert aicortex.build_api_request("llama3.2:3b", "hi")["url"] == (
        "http://ollama-box:11434/api/chat"
    )
    assert aicortex.build_api_request(MODEL, "hi")["url"] == "http://ollama-box:11434/api/chat"
    assert _api._default is None


def test_build_api_request_prefers_configured_then_explicit_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AICORTEX_SERVERS beats OLLAMA_HOST, and server_url= beats both."""
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama-box:11434")
    monkeypatch.setenv("AICORTEX_SERVERS", "http://gpu-box:11434")
    assert aicortex.build_api_request("llama3.2:3b", "hi")["url"] == (
        "http://gpu-box:11434/api/chat"
    )
    explicit = aicortex.build_api_request("llama3.2:3b", "hi", server_url="http://other:11434")
    assert explicit["url"] == "http://other:11434/api/chat"
    assert aicortex.build_api_request("llama3.2:3b", "hi", stream=False)["json"]["stream"] is False
    assert _api._default is None


def test_server_info_reports_a_live_server(fake_ollama: FakeOllamaFactory) -> None:
    """server_info(server_url=...) probes now: up, version, latency and models."""
    server = fake_ollama(models=["llama3.2:3b", "qwen2.5:7b"], version="0.9.1")
    info = aicortex.server_info(server_url=server.url)
    assert info.url == server.url
    assert info.up is True
    assert info.version == "0.9.1"
    assert info.latency is not None
    assert info.latency > 0
    assert set(info.models) == {"llama3.2:3b", "qwen2.5:7b"}
    assert info.error is None


def test_server_info_reports_a_refused_server_as_down() -> None:
    """server_info of a refused URL says up=False and why, instead of raising."""
    url = refused_url()
    info = aicortex.server_info(server_url=url)
    assert info.url == url
    assert info.up is False
    assert info.error
    assert "refused" in info.error


def test_import_aicortex_loads_no_http_stack() -> None:
    """`import aicortex` imports no HTTP stack and starts no thread; nor does the catalog."""
    package_root = str(Path(aicortex.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in [package_root, os.environ.get("PYTHONPATH")] if p)
    code = (
        "import json, sys, threading\n"
        "import aicortex\n"
        "heavy = ('httpx', 'anyio', 'pydantic')\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "threads = threading.active_count()\n"
        "aicortex.Timeout(first_token=300); aicortex.EventType.TOKEN; aicortex.__version__\n"
        "light = [m for m in heavy if m in sys.modules]\n"
        "aicortex.models(); aicortex.model_info('llama3.2:3b'); aicortex.llm_params('gemma3:4b')\n"
        "offline = [m for m in heavy if m in sys.modules]\n"
        "aicortex.Cortex\n"
        "after = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps([before, light, offline, after, threads, aicortex.__file__]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, light, offline, after, threads, where = json.loads(result.stdout)
    assert Path(where).resolve() == Path(aicortex.__file__).resolve()
    assert before == []
    assert light == []  # the eagerly exported names are light too
    assert offline == []  # the catalog is validated by pydantic-core alone
    assert set(after) == {"httpx", "anyio", "pydantic"}  # so the check can see them
    assert threads == 1
