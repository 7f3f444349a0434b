"""The catalog refresh pipeline: check → fetch → resolve → apply, alone, chained and end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import aicortex
from aicortex import Catalog, ValidationError
from aicortex._catalog import metadata_dir
from aicortex.tools import CatalogWriteError, ToolError, read_family_files, refresh
from aicortex.tools import apply_valid_models as apply_module
from aicortex.tools.apply_valid_models import apply, render, validate, write_atomic
from aicortex.tools.check_models import CheckReport, ServerCheck, check
from aicortex.tools.fetch_models import (
    FetchedModel,
    FetchReport,
    ServerModels,
    fetch,
    model_from_api,
)
from aicortex.tools.resolve_models import human_size, merge, resolve
from fakeollama import FakeOllamaFactory, refused_url, status

LOCAL = "http://localhost:11434"
NEW_MODELS = ["tinyllama:1.1b", "phi3:3.8b"]
TOOLS = ["check_models", "fetch_models", "resolve_models", "apply_valid_models"]
SRC = str(Path(aicortex.__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """A private copy of the catalog the library reads (repo's metadata/ or the wheel's)."""
    source = metadata_dir()
    assert isinstance(source, Path), source
    target = tmp_path / "metadata"
    shutil.copytree(source, target)
    return target


@pytest.fixture
def local_down(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the catalog's "local Ollama" at a port that refuses connections."""
    url = refused_url()
    monkeypatch.setenv("OLLAMA_HOST", url)
    return url


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``directory``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def load(directory: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / name).read_text(encoding="utf-8"))
    return data


def find(directory: Path, model: str) -> dict[str, Any]:
    for name, data in read_family_files(directory):
        for entry in data["models"]:
            if entry["name"] == model:
                entry = dict(entry)
                entry["_file"] = name
                return entry
    raise AssertionError(f"{model} is not in {directory}")


def add_servers(directory: Path, model: str, *urls: str) -> None:
    """List more servers for ``model`` (status unknown), keeping the file's format."""
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for entry in data["models"]:
            if entry["name"] == model:
                entry["servers"] += [{"url": u, "status": "unknown"} for u in urls]
                path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
                return
    raise AssertionError(model)


def fetched(*servers: ServerModels, metadata: Path | None = None) -> FetchReport:
    return FetchReport(metadata_dir=str(metadata) if metadata else None, servers=list(servers))


def live(url: str, *models: FetchedModel) -> ServerModels:
    return ServerModels(url=url, address=url, up=True, models=list(models))


def dead(url: str, error: str = "connection refused") -> ServerModels:
    return ServerModels(url=url, address=url, up=False, error=error)


def found(name: str, family: str | None = "llama", context: int | None = 4096) -> FetchedModel:
    return FetchedModel(
        name=name,
        family=family,
        parameter_size="1.1B",
        quantization="Q4_0",
        size=637_700_138,
        context_length=context,
        capabilities=["completion", "tools"],
    )


def family_file(family: str, *models: dict[str, Any]) -> dict[str, Any]:
    return {"family": family, "models": list(models)}


def entry(name: str, family: str, *servers: tuple[str, str], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "family": family,
        "size": "1.0GB",
        "parameters": "1.0B",
        "quantization": "Q4_K_M",
        "context_length": 8192,
        "description": f"Hand-written words about {name}.",
        "tags": ["chat", "hand-picked"],
        "servers": [{"url": u, "status": s} for u, s in servers],
    }
    data.update(extra)
    return data


def without_servers(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if k != "servers"}


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (4_683_075_271, "4.7GB"),
        (20_000_000_000, "20GB"),
        (815_000_000, "815MB"),
        (2_019_393_189, "2.0GB"),
        (999, "999B"),
        (None, ""),
    ],
)
def test_sizes_are_written_the_way_the_catalog_writes_them(size: int | None, text: str) -> None:
    """Bytes become the catalog's ``4.7GB`` / ``20GB`` / ``815MB`` spelling."""
    assert human_size(size) == text


def test_context_length_comes_from_model_info_of_the_architecture() -> None:
    """``model_info["<general.architecture>.context_length"]`` wins over anything else."""
    tag = {"model": "x:1b", "size": 10, "details": {"family": "llama", "context_length": 99}}
    show = {
        "details": {"family": "llama", "parameter_size": "1.2B", "quantization_level": "Q8_0"},
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        "capabilities": ["completion", "tools"],
    }
    model = model_from_api(tag, show)
    assert (model.context_length, model.parameter_size, model.quantization) == (
        131072,
        "1.2B",
        "Q8_0",
    )
    assert model.capabilities == ["completion", "tools"]


def test_a_failed_show_keeps_what_the_tags_said() -> None:
    """Without ``/api/show`` the model keeps the tag's details and records why."""
    tag = {"name": "x:1b", "details": {"family": "qwen2", "parameter_size": "7.6B"}}
    model = model_from_api(tag, None, "HTTP 500")
    assert (model.name, model.family, model.parameter_size) == ("x:1b", "qwen2", "7.6B")
    assert (model.context_length, model.error) == (None, "HTTP 500")


def test_statuses_follow_the_probes_and_unprobed_servers_keep_theirs() -> None:
    """Up-with-model is up, down or missing-the-model is down, unprobed stays as written."""
    files = [
        (
            "llama.json",
            family_file(
                "llama",
                entry(
                    "llama3.2:3b",
                    "llama",
                    ("http://a:11434", "unknown"),
                    ("http://b:11434", "up"),
                    ("http://c:11434", "up"),
                    ("http://elsewhere:11434", "up"),
                ),
            ),
        )
    ]
    report = fetched(
        live("http://a:11434", found("llama3.2:3b")),
        dead("http://b:11434"),
        live("http://c:11434", found("other:1b")),
    )
    out, changes, _ = merge(files, report)
    servers = out["llama.json"]["models"][0]["servers"]
    assert [s["status"] for s in servers] == ["up", "down", "down", "up"]
    details = {c.server: c.detail for c in changes if c.change == "status"}
    assert details["http://b:11434"] == "up -> down (connection refused)"
    assert "does not have it" in details["http://c:11434"]


def test_a_known_model_keeps_every_hand_written_field() -> None:
    """Only ``servers`` of a known model changes, even when a server reports other facts."""
    known = entry("llama3.2:3b", "llama", ("http://a:11434", "unknown"), default=True)
    report = fetched(live("http://a:11434", found("LLAMA3.2:3B", family="other", context=2048)))
    out, _, _ = merge([("llama.json", family_file("llama", known))], report)
    model = out["llama.json"]["models"][0]
    assert without_servers(model) == without_servers(known)
    assert model["servers"] == [{"url": "http://a:11434", "status": "up"}]


def test_a_model_on_two_servers_becomes_one_entry_with_both() -> None:
    """New models are deduplicated by name (as Ollama matches names) across servers."""
    report = fetched(
        live("http://a:11434", found("tinyllama:1.1b", family="tinyllama")),
        live("http://b:11434", found("TinyLlama:1.1B", family="tinyllama")),
    )
    out, changes, _ = merge([], report)
    assert list(out) == ["tinyllama.json"]
    [model] = out["tinyllama.json"]["models"]
    assert model["servers"] == [
        {"url": "http://a:11434", "status": "up"},
        {"url": "http://b:11434", "status": "up"},
    ]
    assert [c.change for c in changes] == ["added"]


def test_a_live_server_with_a_known_model_is_added_to_its_list() -> None:
    """A server that has a catalog model but is not listed for it is appended, up."""
    known = entry("mistral", "mistral", (LOCAL, "unknown"))
    report = fetched(dead(LOCAL), live("http://gpu:11434", found("mistral:latest")))
    out, changes, _ = merge([("mistral.json", family_file("mistral", known))], report)
    assert out["mistral.json"]["models"][0]["servers"] == [
        {"url": LOCAL, "status": "down"},
        {"url": "http://gpu:11434", "status": "up"},
    ]
    assert [c.change for c in changes] == ["status", "server_added"]


@pytest.mark.parametrize(
    ("name", "ollama_family", "expected"),
    [
        ("qwen2.5:3b", "qwen2", "qwen"),  # same base name as a catalog model
        ("qwq:32b", "qwen2", "qwen"),  # Ollama's family without its version digits
        ("gemma9:2b", "gemma3", "gemma"),
        ("phi3:3.8b", "phi3", "phi"),  # a family the catalog lacks: a new file
    ],
)
def test_new_models_join_their_family(name: str, ollama_family: str, expected: str) -> None:
    """A new model goes to the file of its family; an unknown family gets a new file."""
    files = [
        ("gemma.json", family_file("gemma", entry("gemma3:4b", "gemma"))),
        ("qwen.json", family_file("qwen", entry("qwen2.5:7b", "qwen"))),
    ]
    out, _, _ = merge(files, fetched(live("http://a:11434", found(name, ollama_family))))
    model = out[f"{expected}.json"]["models"][-1]
    assert (model["name"], model["family"]) == (name, expected)
    assert model["description"] == ""
    assert model["tags"] == ["chat", "tools"]
    assert (model["size"], model["parameters"], model["context_length"]) == ("638MB", "1.1B", 4096)


def test_a_model_without_a_context_length_is_not_added() -> None:
    """Without ``/api/show`` the entry cannot be valid, so it is left out with a warning."""
    report = fetched(live("http://a:11434", found("mystery:1b", context=None)))
    out, changes, warnings = merge([], report)
    assert (out, changes) == ({}, [])
    assert warnings == ["mystery:1b on http://a:11434: not added, its context length is unknown"]


def test_merge_leaves_its_input_untouched() -> None:
    """``merge`` is pure: the files it is given are not modified."""
    files = [("llama.json", family_file("llama", entry("llama3.2:3b", "llama", (LOCAL, "up"))))]
    before = json.dumps(files)
    merge(files, fetched(dead(LOCAL)))
    assert json.dumps(files) == before


def test_validation_names_every_problem_and_writes_nothing(catalog_dir: Path) -> None:
    """A schema error, a duplicate across files and a path-like name are all reported."""
    before = snapshot(catalog_dir)
    resolved = resolve(catalog_dir, fetched(metadata=catalog_dir))
    files = dict(resolved.files)
    files["llama.json"] = {**files["llama.json"], "models": [{"name": "broken"}]}
    files["extra.json"] = family_file("qwen", entry("qwen2.5:7b", "qwen"))
    files["../evil.json"] = family_file("evil", entry("evil:1b", "evil"))
    with pytest.raises(ToolError) as caught:
        apply(resolved.model_copy(update={"files": files}), catalog_dir)
    message = str(caught.value)
    assert "llama.json: models[0].family: Field required" in message
    assert "extra.json: model 'qwen2.5:7b' is already in qwen.json" in message
    assert "'../evil.json' is not a plain <family>.json file name" in message
    assert snapshot(catalog_dir) == before


def test_the_shipped_catalog_renders_to_its_own_bytes(catalog_dir: Path) -> None:
    """Validating and rendering an unchanged catalog reproduces every file byte for byte."""
    files = dict(read_family_files(catalog_dir))
    validate(files)
    for name, data in files.items():
        assert render(data) == (catalog_dir / name).read_bytes(), name


def test_a_dry_run_shows_a_diff_and_writes_nothing(catalog_dir: Path) -> None:
    """``dry_run`` returns the unified diff of every file that would change."""
    before = snapshot(catalog_dir)
    report = fetched(dead(LOCAL), live("http://a:11434", found("tinyllama:1.1b", "tinyllama")))
    result = apply(resolve(catalog_dir, report), catalog_dir, dry_run=True)
    assert snapshot(catalog_dir) == before
    assert "--- /dev/null\n+++ b/tinyllama.json\n" in result.diff
    assert '-          "status": "unknown"\n+          "status": "down"\n' in result.diff
    assert "tinyllama.json" in result.written
    assert {f.status for f in result.files} == {"created", "updated"}


def test_unchanged_files_are_not_rewritten_and_modes_are_kept(catalog_dir: Path) -> None:
    """Only files whose bytes differ are replaced; a replaced file keeps its permissions."""
    (catalog_dir / "gemma.json").chmod(0o640)
    add_servers(catalog_dir, "gemma3:4b", "http://a:11434")
    before = snapshot(catalog_dir)
    report = fetched(live("http://a:11434", found("gemma3:4b")), metadata=catalog_dir)
    result = apply(resolve(None, report))
    after = snapshot(catalog_dir)
    assert result.written == ["gemma.json"]
    assert [n for n in after if after[n] != before[n]] == ["gemma.json"]
    assert (catalog_dir / "gemma.json").stat().st_mode & 0o777 == 0o640


def test_a_crash_before_a_replace_leaves_each_file_old_or_new(
    catalog_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure between writing a temporary file and its rename: no half file, no debris."""
    old = {name: data for name, (data, _) in snapshot(catalog_dir).items()}
    report = fetched(dead(LOCAL), live("http://a:11434", found("tinyllama:1.1b", "tinyllama")))
    resolved = resolve(catalog_dir, report)
    new = {name: render(data) for name, data in resolved.files.items()}
    calls: list[str] = []

    def crash_on_third(src: str, dst: os.PathLike[str]) -> None:
        calls.append(os.fspath(dst))
        assert Path(src).read_bytes() == new[Path(dst).name]  # fully written and flushed
        if len(calls) == 3:
            raise OSError("injected crash")
        os.replace(src, dst)

    monkeypatch.setattr(apply_module, "_replace", crash_on_third)
    with pytest.raises(CatalogWriteError, match="injected crash"):
        apply(resolved, catalog_dir)
    assert len(calls) == 3
    after = {p.name: p.read_bytes() for p in catalog_dir.iterdir()}
    assert set(after) <= set(new)  # no temporary file left behind
    for name, data in after.items():
        assert data in (old.get(name), new[name]), name
    assert sum(after[n] == new[n] != old.get(n) for n in after) == 2  # two made it
    assert sum(after[n] == old[n] != new[n] for n in old) >= 1  # the rest did not


def test_a_failed_write_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_atomic`` cleans up and re-raises; the target keeps its old bytes."""
    target = tmp_path / "x.json"
    target.write_bytes(b"old\n")

    def fail(src: str, dst: str) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(apply_module, "_replace", fail)
    with pytest.raises(PermissionError):
        write_atomic(target, b"new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert target.read_bytes() == b"old\n"


# --------------------------------------------------------------------------- against servers


async def test_probes_run_concurrently_and_report_as_each_completes(
    fake_ollama: FakeOllamaFactory, local_down: str
) -> None:
    """Four slow servers take about one probe, and the fast one is reported first."""
    slow = [fake_ollama(probe_delay=0.6) for _ in range(4)]
    fast = fake_ollama(models=["tinyllama:1.1b"])
    seen: list[tuple[float, ServerCheck]] = []
    started = time.monotonic()
    report = await check(
        [s.url for s in slow] + [fast.url],
        include_catalog=False,
        timeout=5.0,
        on_result=lambda r: seen.append((time.monotonic() - started, r)),
    )
    elapsed = time.monotonic() - started
    assert elapsed < 2.0  # one after another would take 2.4 s
    assert seen[0][1].url == fast.url
    assert seen[0][0] < 0.5
    assert [s.url for s in report.servers] == [s.url for s in slow] + [fast.url]
    assert all(s.up for s in report.servers)
    assert report.servers[-1].models == ["tinyllama:1.1b"]


async def test_check_probes_the_catalog_and_reports_failures_without_stopping(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path, local_down: str
) -> None:
    """Catalog servers come first (local at OLLAMA_HOST), down ones carry their reason."""
    healthy = fake_ollama(models=["llama3.2:3b"], version="0.9.1")
    slow = fake_ollama(probe_delay=3.0)
    refused = refused_url()
    add_servers(catalog_dir, "mistral:7b", "bad://url", refused)
    report = await check([healthy.url, slow.url], metadata_dir=catalog_dir, timeout=0.5)
    by_url = {s.url: s for s in report.servers}
    assert list(by_url) == [LOCAL, "bad://url", refused, healthy.url, slow.url]
    assert (by_url[LOCAL].address, by_url[LOCAL].error) == (local_down, "connection refused")
    assert by_url["bad://url"].error is not None
    assert "invalid URL" in by_url["bad://url"].error
    assert by_url[slow.url].error == "probe timed out after 0.5s"
    good = by_url[healthy.url]
    assert (good.up, good.version, good.source) == (True, "0.9.1", "argument")
    assert good.latency is not None
    assert good.latency < 0.5
    assert report.live() == [good]
    assert report.metadata_dir == str(catalog_dir.resolve())  # noqa: ASYNC240


async def test_a_malformed_extra_server_is_bad_input() -> None:
    """A URL the user typed wrong is an error, not a server to skip."""
    with pytest.raises(ValidationError, match="scheme 'ftp'"):
        await check(["ftp://example.com"], include_catalog=False)


async def test_fetch_reads_tags_and_show_for_each_live_server(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Family, size, quantization, context length and capabilities come from the server."""
    server = fake_ollama(models=["tinyllama:1.1b", "phi3:3.8b"])
    checked = CheckReport(
        checked_at="2025-01-01T00:00:00Z",
        probe_timeout=1.0,
        servers=[
            ServerCheck(url=server.url, address=server.url, source="argument", up=True),
            ServerCheck(url=LOCAL, address=LOCAL, source="catalog", up=False, error="refused"),
        ],
    )
    report = await fetch(checked)
    assert [s.up for s in report.servers] == [True, False]
    assert report.servers[1].error == "refused"
    tiny, phi = report.servers[0].models
    assert (tiny.name, tiny.family, tiny.parameter_size) == ("tinyllama:1.1b", "tinyllama", "1.1B")
    assert (phi.family, phi.context_length, phi.quantization) == ("phi", 4096, "Q4_K_M")
    assert phi.capabilities == ["completion"]
    assert phi.size == 2019393189
    assert server.count("/api/show") == 2
    assert server.count("/api/tags") == 1


async def test_a_server_that_fails_while_fetching_is_skipped_not_fatal(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """A failing ``/api/tags`` marks that server down; a failing show keeps the model."""
    broken = fake_ollama()
    broken.on("/api/tags", status(500, {"error": "disk on fire"}))
    flaky = fake_ollama(models=["phi3:3.8b"])
    flaky.on("/api/show", status(500, {"error": "busy"}))
    servers = [
        ServerCheck(url=s.url, address=s.url, source="argument", up=True) for s in (broken, flaky)
    ]
    report = await fetch(CheckReport(checked_at="x", probe_timeout=1, servers=servers))
    first, second = report.servers
    assert (first.up, first.error) == (False, "GET /api/tags answered HTTP 500: disk on fire")
    [phi] = second.models
    assert (second.up, phi.family, phi.context_length) == (True, "phi", None)
    assert phi.error == "POST /api/show answered HTTP 500: busy"


async def test_refresh_in_python_adds_models_and_is_idempotent(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path, local_down: str
) -> None:
    """``aicortex.tools.refresh`` runs the four steps; a second run writes nothing."""
    healthy = fake_ollama(models=["qwen2.5:3b"])
    first = await refresh([healthy.url], metadata_dir=catalog_dir, probe_timeout=1.0)
    assert "qwen.json" in first.written
    model = find(catalog_dir, "qwen2.5:3b")
    assert (model["_file"], model["servers"]) == (
        "qwen.json",
        [{"url": healthy.url, "status": "up"}],
    )
    before = snapshot(catalog_dir)
    second = await refresh([healthy.url], metadata_dir=catalog_dir, probe_timeout=1.0)
    assert second.written == []
    assert snapshot(catalog_dir) == before


def test_refresh_refuses_an_invalid_catalog_before_going_online(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path
) -> None:
    """A catalog that fails the schema stops ``refresh`` before any server is asked."""
    server = fake_ollama()
    broken = family_file("odd", entry("odd:1b", "odd", context_length=0))
    (catalog_dir / "odd.json").write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ToolError, match=r"fix it before refreshing: odd\.json: models\[0\]"):
        anyio.run(lambda: refresh([server.url], metadata_dir=catalog_dir))
    assert server.requests == []


# --------------------------------------------------------------------------- commands


def run_command(
    args: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (SRC, environment.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_has_help(tool: str) -> None:
    """``python -m aicortex.tools.NAME --help`` describes the step and exits 0."""
    result = run_command(["-m", f"aicortex.tools.{tool}", "--help"])
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m aicortex.tools.{tool}" in result.stdout
    assert "Step" in result.stdout
    assert "--output" in result.stdout


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("", "stdin is empty"),
        ("{not json", "stdin is not valid JSON"),
        ('{"version": 2, "kind": "aicortex.check"}', "version 2 of the check_models format"),
        ('{"version": 1, "kind": "aicortex.fetch"}', "is not a check_models document"),
    ],
)
def test_a_tool_rejects_bad_input_in_one_line(stdin: str, message: str) -> None:
    """Bad input is exit status 2 and one ``error:`` line, never a traceback."""
    result = run_command(["-m", "aicortex.tools.fetch_models"], stdin=stdin)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("fetch_models: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_the_four_tools_chain_through_pipes(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path, local_down: str, tmp_path: Path
) -> None:
    """Each step reads the previous step's JSON on stdin; the last one writes the files."""
    healthy = fake_ollama(models=["tinyllama:1.1b"])
    env = {"OLLAMA_HOST": local_down}
    step1 = run_command(
        [
            "-m",
            "aicortex.tools.check_models",
            "--metadata-dir",
            str(catalog_dir),
            "--server",
            healthy.url,
            "--timeout",
            "1",
        ],
        env=env,
    )
    assert step1.returncode == 0, step1.stderr
    assert f"Server {local_down} is down" in step1.stderr  # logged, not fatal
    step2 = run_command(["-m", "aicortex.tools.fetch_models"], stdin=step1.stdout)
    step3 = run_command(["-m", "aicortex.tools.resolve_models"], stdin=step2.stdout)
    dry = run_command(["-m", "aicortex.tools.apply_valid_models", "--dry-run"], stdin=step3.stdout)
    assert "+++ b/tinyllama.json" in dry.stdout
    assert not (catalog_dir / "tinyllama.json").exists()
    out = tmp_path / "applied.json"
    step4 = run_command(
        ["-m", "aicortex.tools.apply_valid_models", "-o", str(out)], stdin=step3.stdout
    )
    assert step4.returncode == 0, step4.stderr
    assert [json.loads(s.stdout)["kind"] for s in (step1, step2, step3)] == [
        "aicortex.check",
        "aicortex.fetch",
        "aicortex.resolved",
    ]
    report = json.loads(out.read_text())
    assert (report["version"], report["kind"]) == (1, "aicortex.apply")
    assert {"file": "tinyllama.json", "status": "created"} in report["files"]
    assert find(catalog_dir, "tinyllama:1.1b")["servers"] == [{"url": healthy.url, "status": "up"}]


# --------------------------------------------------------------------------- acceptance


@pytest.fixture
def refresh_command(
    catalog_dir: Path, local_down: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``aicortex refresh --metadata-dir <copy>`` with a 0.5 s probe timeout."""

    def run(*servers: str) -> subprocess.CompletedProcess[str]:
        args = ["-m", "aicortex", "refresh", "--metadata-dir", str(catalog_dir), "--timeout", "0.5"]
        for url in servers:
            args += ["--server", url]
        return run_command(args, env={"OLLAMA_HOST": local_down})

    return run


def test_refresh_end_to_end_with_a_healthy_a_refused_and_a_slow_server(
    fake_ollama: FakeOllamaFactory,
    catalog_dir: Path,
    local_down: str,
    refresh_command: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """New models are added with their server, the others marked, hand-written text kept."""
    healthy = fake_ollama(models=[*NEW_MODELS, "llama3.2:3b"])
    refused = refused_url()
    slow = fake_ollama(models=["mistral:7b"], probe_delay=3.0)  # slower than the 0.5 s timeout
    add_servers(catalog_dir, "mistral:7b", refused, slow.url)
    before = dict(read_family_files(catalog_dir))

    result = refresh_command(healthy.url, refused, slow.url)

    assert result.returncode == 0, result.stderr
    for line in (
        f"  up    {healthy.url}",
        f"  down  {refused}  connection refused",
        f"  down  {slow.url}  probe timed out after 0.5s",
        f"  down  {LOCAL} (at {local_down})  connection refused",
    ):
        assert line in result.stderr
    assert "tinyllama:1.1b: added to tinyllama.json" in result.stdout
    # The new models, under their family, on the healthy server.
    for name, family in (("tinyllama:1.1b", "tinyllama"), ("phi3:3.8b", "phi")):
        model = find(catalog_dir, name)
        assert (model["_file"], model["family"]) == (f"{family}.json", family)
        assert model["servers"] == [{"url": healthy.url, "status": "up"}]
        assert (model["context_length"], model["quantization"]) == (4096, "Q4_K_M")
    # Known models: servers marked, the healthy one added where it has the model.
    assert find(catalog_dir, "llama3.2:3b")["servers"] == [
        {"url": LOCAL, "status": "down"},
        {"url": healthy.url, "status": "up"},
    ]
    assert find(catalog_dir, "mistral:7b")["servers"] == [
        {"url": LOCAL, "status": "down"},
        {"url": refused, "status": "down"},
        {"url": slow.url, "status": "down"},
    ]
    # Every known model kept everything but its servers, byte for byte.
    after = dict(read_family_files(catalog_dir))
    for name, data in before.items():
        assert [without_servers(m) for m in after[name]["models"]] == [
            without_servers(m) for m in data["models"]
        ]
        for model in data["models"]:
            assert json.dumps(model["description"]).encode() in (catalog_dir / name).read_bytes()
    # The library loads the result cleanly.
    catalog = Catalog(catalog_dir)
    assert catalog.errors == []
    assert catalog.model_info("phi3:3.8b").servers[0].status == "up"

    # A second run changes no byte (and touches no file).
    snap = snapshot(catalog_dir)
    again = refresh_command(healthy.url, refused, slow.url)
    assert again.returncode == 0, again.stderr
    assert "the catalog is up to date" in again.stdout
    assert snapshot(catalog_dir) == snap


def test_refresh_when_no_server_answers_still_marks_them_down(
    catalog_dir: Path, refresh_command: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Every server down is not an error: statuses become ``down``, no model is dropped."""
    names_before = Catalog(catalog_dir).models()
    result = refresh_command(refused_url())
    assert result.returncode == 0, result.stderr
    assert "0 of 2 servers up" in result.stderr
    catalog = Catalog(catalog_dir)
    assert catalog.models() == names_before
    assert {s.status for n in catalog.models() for s in catalog.model_servers(n)} == {"down"}
