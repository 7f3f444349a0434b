"""The product guide's own examples, run as written, and the first-hour behaviour around them.

The bodies of the three guide tests below are the guide's, unchanged; only the fixtures
they name (``mock_ollama_client``, ``mock_server_responses``) are this file's: fake servers
on 127.0.0.1 instead of mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import aicortex
from aicortex import EventType, ModelNotFoundError, ServerInfo, StreamConsumedError, chat
from aicortex import model_info as get_model_info
from aicortex._catalog import metadata_dir
from aicortex.tools import apply_valid_models, check_models, fetch_models, resolve_models
from aicortex.tools import server as server_tool
from fakeollama import FakeOllama, FakeOllamaFactory, refused_url, reply, stall_after

NEW_MODEL = "tinyllama:1.1b"


# Each test starts without a default Cortex and closes the one it made.
pytestmark = pytest.mark.usefixtures("fresh_default_cortex")


@pytest.fixture
def mock_ollama_client(
    fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> FakeOllama:
    """One fake Ollama with the catalog's default model, as the only server."""
    server = fake_ollama(models=["llama3.2:3b"])
    monkeypatch.setenv("AICORTEX_SERVERS", server.url)
    monkeypatch.setenv("OLLAMA_HOST", refused_url())
    return server


@pytest.fixture
def mock_server_responses(
    fake_ollama: FakeOllamaFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeOllama:
    """The guide's layout in a temporary folder: the catalog at ``aicortex/models/``, the
    current directory there, and the catalog's local Ollama a fake one with a new model."""
    source = metadata_dir()
    assert isinstance(source, Path)
    models = tmp_path / "aicortex" / "models"
    shutil.copytree(source, models)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AICORTEX_METADATA_DIR", str(models))
    monkeypatch.setenv("AICORTEX_REFRESH_DIR", str(tmp_path / "work"))
    server = fake_ollama(models=["llama3.2:3b", NEW_MODEL])
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    return server


# --------------------------------------------------------------------------- the guide's tests


def test_get_model_info_returns_correct_family(mock_ollama_client: FakeOllama) -> None:
    info = get_model_info("llama3.2:3b")
    assert info["family"] == "llama"


def test_tool_pipeline_produces_valid_json(mock_server_responses: FakeOllama) -> None:
    check_models.run()
    fetch_models.run()
    resolve_models.run()
    apply_valid_models.run()
    data = json.loads(Path("aicortex/models/llama.json").read_text())
    assert "models" in data
    # Beyond the guide: the run did its work, through the fake server.
    assert mock_server_responses.count("/api/tags") >= 1
    assert NEW_MODEL in aicortex.Catalog(Path("aicortex/models")).models()


def test_the_guides_stream_example(
    mock_ollama_client: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    mock_ollama_client.chat = reply(["Once", " upon", " a time."])

    stream = chat("Tell me a story", stream=True)
    for event in stream:
        if event.type == EventType.TOKEN:
            print(event.content, end="", flush=True)

    # Option 2: collect full text after completion
    text = stream.text()

    assert capsys.readouterr().out == "Once upon a time."
    assert text == "Once upon a time."
    with pytest.raises(StreamConsumedError, match=r"Call stream\.text\(\)"):
        for _event in stream:
            pass


# --------------------------------------------------------------------------- records as mappings


def test_model_info_reads_like_the_catalog_files_dict() -> None:
    info = get_model_info("llama3.2:3b")
    assert info["family"] == info.family == "llama"
    assert info.get("family") == "llama"
    assert info.get("no such key", "fallback") == "fallback"
    assert "context_length" in info
    assert "nothing" not in info
    with pytest.raises(KeyError):
        info["nothing"]
    as_dict = dict(info)
    assert as_dict == info.to_dict()
    # Nested records are plain data there, so the whole thing is JSON.
    assert as_dict["servers"][0] == {"url": info.servers[0].url, "status": info.servers[0].status}
    assert json.loads(json.dumps(dict(info)))["name"] == "llama3.2:3b"
    assert isinstance(info.servers[0], aicortex.ServerEntry)  # attributes stay typed
    entry = info.servers[0]
    assert entry["url"] == entry.url
    assert dict(entry) == {"url": entry.url, "status": entry.status}
    assert sorted(info) == sorted(f for f in info.to_dict())


def test_server_info_reads_as_a_dict(mock_ollama_client: FakeOllama) -> None:
    info = aicortex.server_info("llama3.2:3b")
    assert isinstance(info, ServerInfo)
    assert info["up"] is True
    assert info["has_model"] is True
    assert info.get("url") == mock_ollama_client.url
    data = json.loads(json.dumps(dict(info)))
    assert data["models"] == ["llama3.2:3b"]
    assert set(data) == {
        "url", "up", "latency", "version", "models", "error", "model", "has_model"
    }  # fmt: skip


# --------------------------------------------------------------------------- tools.run() chaining


def test_run_chains_explicitly_and_a_missing_step_is_a_clear_error(
    mock_server_responses: FakeOllama, tmp_path: Path
) -> None:
    with pytest.raises(aicortex.tools.ToolError, match=r"call check_models\.run\(\) first"):
        fetch_models.run(workdir=tmp_path / "empty")
    checked = check_models.run(workdir=tmp_path / "other")
    assert any(server.up for server in checked.servers)
    report = apply_valid_models.run(
        resolve_models.run(fetch_models.run(checked, workdir=tmp_path / "other")),
        dry_run=True,
    )
    assert report.dry_run
    assert NEW_MODEL in report.diff
    assert NEW_MODEL not in aicortex.Catalog(Path("aicortex/models")).models()  # dry run


async def test_run_works_inside_a_running_event_loop(mock_server_responses: FakeOllama) -> None:
    """A notebook cell or an async test runs an event loop: run() must not need its own."""
    checked = check_models.run()
    assert any(server.up for server in checked.servers)


# --------------------------------------------------------------------------- the proxy as a tool


def test_python_m_aicortex_tools_server_is_aicortex_serve() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aicortex.tools.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: aicortex serve")
    assert "--port" in result.stdout


def test_tools_server_main_takes_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_tool.main(["--port", "not-a-port"]) == 2
    assert "--port" in capsys.readouterr().err


# --------------------------------------------------------------------------- tracebacks


def test_a_blocking_error_shows_the_callers_frames_not_the_portals(
    mock_ollama_client: FakeOllama,
) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        aicortex.chat("hi", model="no-such-model:1b")
    frames = traceback.extract_tb(info.value.__traceback__)
    files = [Path(frame.filename) for frame in frames]
    assert files[0] == Path(__file__)
    library = [f for f in files if "aicortex" in f.parts]
    assert len(frames) <= 4, traceback.format_tb(info.value.__traceback__)
    assert len(library) <= 3
    assert not [f for f in files if f.parent.name in ("anyio", "concurrent", "futures")]
    assert "aicortex.ModelNotFoundError: " in "".join(
        traceback.format_exception_only(type(info.value), info.value)
    )


def test_a_blocking_stream_error_keeps_its_cause_chain(
    mock_ollama_client: FakeOllama,
) -> None:
    """The portal's frames go; the cause (here the idle timeout) stays for debugging."""
    mock_ollama_client.chat = stall_after(["a", "b", "c"], 1)
    stream = chat("hi", stream=True, timeout=aicortex.Timeout(idle=0.3))
    with pytest.raises(aicortex.StreamError) as info:
        stream.text()
    assert len(traceback.extract_tb(info.value.__traceback__)) <= 3
    assert isinstance(info.value.__cause__, aicortex.CortexTimeoutError)
    assert info.value.__cause__.phase == "idle"


def test_an_error_in_a_script_prints_a_short_traceback(mock_ollama_client: FakeOllama) -> None:
    script = (
        "import aicortex\n"
        f"aicortex.chat('hi', model='no-such-model:1b', servers=None) if False else None\n"
        f"c = aicortex.Cortex(servers=[{mock_ollama_client.url!r}], fallback=False)\n"
        "c.chat('hi', model='no-such-model:1b')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1].startswith("aicortex.ModelNotFoundError: Model 'no-such-model:1b'")
    frames = [line for line in lines if line.lstrip().startswith('File "')]
    assert len(frames) <= 3, result.stderr
    assert "Unclosed" not in result.stderr  # the unclosed Cortex was closed at exit
