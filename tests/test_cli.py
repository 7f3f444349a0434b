"""The ``aicortex`` command, run as a user runs it: in a subprocess, against fake servers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import aicortex
from aicortex import Catalog
from aicortex._catalog import metadata_dir
from fakeollama import FakeOllamaFactory, error_after, refused_url, reply, stall_before_headers

SRC = str(Path(aicortex.__file__).resolve().parent.parent)
COMMANDS = ["chat", "models", "families", "info", "servers", "pull", "config", "refresh", "serve"]
NO_PROXY = (
    "aicortex: error: the proxy is not available in this installation "
    "(install aicortex-core[server])\n"
)


def environment(**extra: str) -> dict[str, str]:
    """The test's environment, aicortex importable, and no real Ollama within reach."""
    env = {**os.environ, "OLLAMA_HOST": refused_url(), **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    return env


def aicortex_cmd(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aicortex ARGS`` and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "aicortex", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment(**env),
        timeout=60,
    )


def start_aicortex(*args: str, text: bool = False) -> subprocess.Popen[Any]:
    """Start ``python -m aicortex ARGS`` with stdout and stderr piped, without waiting."""
    return subprocess.Popen(
        [sys.executable, "-m", "aicortex", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
        env=environment(),
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Exit ``code``, exactly one ``aicortex: error:`` line on stderr, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aicortex: error: ")
    return lines[0]


def proxy_available() -> bool:
    """Whether this installation has the proxy and the ``server`` extra."""
    names = ("starlette", "uvicorn", "aicortex.server._run")
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ImportError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- help and entry points


def test_the_top_level_help_lists_every_command() -> None:
    """``aicortex --help`` names each command and the exit statuses."""
    result = aicortex_cmd("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in result.stdout
    assert "\n  3    no server could be reached (each one tried is named)\n" in result.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])
def test_every_command_has_help(command: str) -> None:
    """``aicortex COMMAND --help`` prints its usage and exits 0."""
    result = aicortex_cmd(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: aicortex {command} ")


def test_serve_help_documents_the_proxy_or_how_to_install_it() -> None:
    """``aicortex serve --help`` documents the proxy, or says how to install it."""
    result = aicortex_cmd("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: aicortex serve")
    if not proxy_available():
        assert "python3 -m pip install 'aicortex-core[server]'" in result.stdout


@pytest.mark.skipif(not proxy_available(), reason="the proxy or its extra is not installed")
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_serve_runs_the_proxy_until_interrupted(fake_ollama: FakeOllamaFactory) -> None:
    """``aicortex serve`` answers OpenAI's model list for its server and stops on Ctrl-C."""
    import httpx

    server = fake_ollama(models=["qwen3:8b"])
    port = free_port()
    args = ["serve", "--port", str(port), "--server", server.url, "--log-level", "warning"]
    with start_aicortex(*args, text=True) as process:
        deadline = time.monotonic() + 30
        answer = None
        while answer is None and time.monotonic() < deadline and process.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert answer is not None, stderr
    assert answer.status_code == 200
    assert "qwen3:8b" in [m["id"] for m in answer.json()["data"]]
    assert process.returncode == 0, stderr


def test_usage_errors_are_one_line_with_status_2() -> None:
    """An unknown command or option is a one-line error, not argparse's usage dump."""
    line = assert_one_error_line(aicortex_cmd("frobnicate"), 2)
    assert "invalid choice: 'frobnicate'" in line
    line = assert_one_error_line(aicortex_cmd("models", "--colour"), 2)
    assert "unrecognized arguments: --colour" in line
    assert_one_error_line(aicortex_cmd(), 2)


def test_version_is_printed() -> None:
    """``aicortex --version`` prints the package version."""
    result = aicortex_cmd("--version")
    assert (result.returncode, result.stdout) == (0, f"aicortex {aicortex.__version__}\n")


def test_the_console_script_runs_the_same_command() -> None:
    """The installed ``aicortex`` script (when installed) is the same command."""
    script = shutil.which("aicortex", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the aicortex console script is not installed in this environment")
    result = subprocess.run(
        [script, "families"], capture_output=True, text=True, env=environment(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FAMILY")


# --------------------------------------------------------------------------- offline commands


def test_models_prints_a_table_of_the_catalog() -> None:
    """One row per catalog model, with the default model starred."""
    result = aicortex_cmd("models")
    assert result.returncode == 0, result.stderr
    header, *rows, footer = result.stdout.splitlines()
    assert header.split() == ["MODEL", "FAMILY", "PARAMS", "QUANT", "CONTEXT", "SIZE", "TAGS"]
    assert [r.split()[0] for r in rows] == Catalog().models()
    assert any(r.startswith("llama3.2:3b *  ") and " 128K " in r for r in rows)
    assert footer == "* the default model"


def test_models_of_one_family_as_json() -> None:
    """``--family`` filters and ``--json`` prints the catalog entries."""
    result = aicortex_cmd("models", "--family", "gemma", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [m["name"] for m in data] == Catalog().models("gemma")
    assert data[0] == Catalog().model_info(data[0]["name"]).to_dict()


def test_an_unknown_family_is_bad_input() -> None:
    """An unknown family is status 2 with the known families named."""
    line = assert_one_error_line(aicortex_cmd("models", "--family", "lama"), 2)
    assert "Known families: deepseek, gemma, llama, mistral, qwen." in line


def test_families_lists_each_family_with_its_models() -> None:
    """A row per family, with its count; ``--json`` gives the same facts."""
    table = aicortex_cmd("families")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["FAMILY", "COUNT", "MODELS"]
    assert "llama     6      llama3.2:1b, llama3.2:3b," in table.stdout
    data = json.loads(aicortex_cmd("families", "--json").stdout)
    catalog = Catalog()
    assert data == [{"family": f, "models": catalog.models(f)} for f in catalog.families()]


def test_info_shows_a_model_entry() -> None:
    """Facts, description, servers and generation parameters of one model."""
    result = aicortex_cmd("info", "LLAMA3.2:3b")
    assert result.returncode == 0, result.stderr
    info = Catalog().model_info("llama3.2:3b")
    assert "model:          llama3.2:3b\n" in result.stdout
    assert "context length: 131072 tokens\n" in result.stdout
    assert f"description:    {info.description}\n" in result.stdout
    assert "  http://localhost:11434  unknown\n" in result.stdout
    assert "  num_ctx         4096     2048  131072\n" in result.stdout
    data = json.loads(aicortex_cmd("info", "llama3.2:3b", "--json").stdout)
    assert data == info.to_dict()


def test_info_on_an_unknown_model_suggests_close_names() -> None:
    """An unknown model is status 2 with suggestions."""
    line = assert_one_error_line(aicortex_cmd("info", "llama3.2:4b"), 2)
    assert "Did you mean: 'llama3.2:1b', 'llama3.2:3b'" in line


def test_offline_commands_read_another_catalog(tmp_path: Path) -> None:
    """``--metadata-dir`` (or ``AICORTEX_METADATA_DIR``) picks the catalog to read."""
    source = metadata_dir()
    assert isinstance(source, Path)
    shutil.copy(source / "qwen.json", tmp_path / "qwen.json")
    result = aicortex_cmd("families", "--metadata-dir", str(tmp_path))
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["FAMILY", "qwen"]
    result = aicortex_cmd("families", AICORTEX_METADATA_DIR=str(tmp_path))
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["FAMILY", "qwen"]
    line = assert_one_error_line(aicortex_cmd("models", "--metadata-dir", "/no/such/dir"), 2)
    assert "'/no/such/dir' does not exist" in line


@pytest.mark.parametrize(
    "args", [["models"], ["families"], ["info", "qwen3:8b"], ["--help"], ["pull", "--help"]]
)
def test_offline_commands_import_no_http_stack(args: list[str]) -> None:
    """``models``, ``families``, ``info`` and the help never import httpx, anyio, rich or
    starlette."""
    code = (
        "import sys, aicortex._cli as cli\n"
        f"status = cli.main({args!r})\n"
        "heavy = sorted(m for m in ('httpx', 'httpcore', 'anyio', 'starlette', 'uvicorn', 'rich')"
        " if m in sys.modules)\n"
        "sys.stderr.write(f'status={status} heavy={heavy}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment()
    )
    assert result.stderr == "status=0 heavy=[]"


# --------------------------------------------------------------------------- chat


def test_chat_streams_tokens_as_they_arrive(fake_ollama: FakeOllamaFactory) -> None:
    """The first token is on stdout while the answer is still being generated."""
    server = fake_ollama(chat=reply(["first ", "second"], delay=0.8))
    with start_aicortex("chat", "hi", "--server", server.url) as process:
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 100)
        still_running = process.poll() is None
        rest = process.stdout.read()
        assert process.wait(timeout=30) == 0
    assert first == b"first "
    assert still_running
    assert rest == b"second\n"


def test_chat_json_prints_one_object_at_the_end(fake_ollama: FakeOllamaFactory) -> None:
    """``--json``: text, model, server, done_reason and stats, nothing streamed."""
    server = fake_ollama(models=["qwen3:8b"], chat=reply(["Hel", "lo"]))
    result = aicortex_cmd("chat", "hi", "-m", "qwen3:8b", "-s", server.url, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {k: data[k] for k in ("text", "model", "server", "done_reason")} == {
        "text": "Hello",
        "model": "qwen3:8b",
        "server": server.url,
        "done_reason": "stop",
    }
    assert data["stats"]["completion_tokens"] == 2
    assert data["stats"]["tokens_per_second"] == pytest.approx(100.0)


def test_chat_verbose_reports_server_and_token_stats(fake_ollama: FakeOllamaFactory) -> None:
    """``--verbose`` says which server answered and how fast, on stderr."""
    server = fake_ollama(chat=reply(["a", "b", "c"]))
    result = aicortex_cmd("chat", "hi", "--server", server.url, "--verbose", "--system", "terse")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "abc\n"
    assert f"llama3.2:3b is answering from {server.url}" in result.stderr
    assert "8 prompt tokens, 3 completion tokens, 100.0 tokens/s" in result.stderr
    body = next(r.json for r in server.requests if r.path == "/api/chat")
    assert body["messages"][0] == {"role": "system", "content": "terse"}


def test_chat_reads_the_prompt_from_stdin(fake_ollama: FakeOllamaFactory) -> None:
    """``-`` as the prompt reads it from stdin."""
    server = fake_ollama()
    result = aicortex_cmd("chat", "-", "-s", server.url, stdin="from a pipe\n")
    assert result.returncode == 0, result.stderr
    body = next(r.json for r in server.requests if r.path == "/api/chat")
    assert body["messages"][-1]["content"] == "from a pipe\n"


def test_chat_with_an_empty_prompt_is_bad_input() -> None:
    """An empty prompt is refused before any server is asked."""
    assert "the prompt is empty" in assert_one_error_line(aicortex_cmd("chat", "  "), 2)


def test_chat_with_an_unknown_model_suggests_names(fake_ollama: FakeOllamaFactory) -> None:
    """A model no server has is status 2, naming the server and close matches."""
    server = fake_ollama()  # it has llama3.2:3b, not llama3.2:1b
    line = assert_one_error_line(
        aicortex_cmd("chat", "hi", "-m", "llama3.2:4b", "-s", server.url), 2
    )
    assert f"Model 'llama3.2:4b' was not found on {server.url}" in line
    assert "Did you mean: 'llama3.2:3b', 'llama3.2:1b' (not pulled)" in line
    assert line.endswith(
        f"To use it, pull it: `aicortex pull llama3.2:4b --server {server.url}`, "
        "or `ollama pull llama3.2:4b` on that machine."
    )


def test_chat_with_no_reachable_server_names_each_one() -> None:
    """Every server down is status 3; the message names each one tried and why, and
    says how to point the command at a server (not the Python arguments)."""
    first, second = refused_url(), refused_url()
    line = assert_one_error_line(aicortex_cmd("chat", "hi", "-s", first, "-s", second), 3)
    assert f"{first}: connection refused; {second}: connection refused" in line
    assert "--server URL or OLLAMA_HOST" in line
    assert "servers=" not in line


def test_chat_with_a_malformed_server_url_is_bad_input() -> None:
    """A URL with an unsupported scheme is status 2."""
    line = assert_one_error_line(aicortex_cmd("chat", "hi", "-s", "ftp://box"), 2)
    assert "scheme 'ftp'" in line


def test_a_stream_that_breaks_mid_answer_is_status_4(fake_ollama: FakeOllamaFactory) -> None:
    """The partial answer stays on stdout; stderr says the stream broke."""
    server = fake_ollama(chat=error_after(["Hel", "lo", " world"], 2))
    result = aicortex_cmd("chat", "hi", "-s", server.url)
    line = assert_one_error_line(result, 4)
    assert result.stdout == "Hello\n"
    assert line == (
        f"aicortex: error: The stream from {server.url} broke after 2 tokens: the server "
        "reported an error: an error was encountered while running the model. The answer is "
        "incomplete; run the command again for a full one."
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_ctrl_c_during_chat_exits_130(fake_ollama: FakeOllamaFactory) -> None:
    """Ctrl-C while waiting for the answer ends with status 130 and closes the request."""
    server = fake_ollama(chat=stall_before_headers())
    with start_aicortex("chat", "hi", "-s", server.url, text=True) as process:
        assert server.wait_for_request("/api/chat", timeout=30)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr == "aicortex: interrupted\n"
    assert server.wait_for_disconnect(timeout=10)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX")
def test_ctrl_c_during_pull_exits_130(fake_ollama: FakeOllamaFactory) -> None:
    """Ctrl-C while pulling ends with status 130 and cancels the request to every server."""
    first, second = fake_ollama(), fake_ollama()
    for server in (first, second):
        server.on("/api/pull", stall_before_headers())
    with start_aicortex(
        "pull", "qwen3:8b", "-s", first.url, "-s", second.url, text=True
    ) as process:
        assert first.wait_for_request("/api/pull", timeout=30)
        assert second.wait_for_request("/api/pull", timeout=30)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr == "aicortex: interrupted\n"
    assert first.wait_for_disconnect(timeout=10)
    assert second.wait_for_disconnect(timeout=10)


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """Output into a closed pipe (``aicortex models | head``) is status 141, no noise."""
    with start_aicortex("models") as process:
        assert process.stdout is not None
        process.stdout.close()  # before the interpreter has even started
        _, stderr = process.communicate(timeout=30)
    assert (process.returncode, stderr) == (141, b"")


def test_an_internal_error_is_one_line_unless_debugging() -> None:
    """A bug is status 1 and one line; ``AICORTEX_DEBUG=1`` adds the traceback."""
    code = (
        "import aicortex._cli as cli\n"
        "def broken(args): raise RuntimeError('wires crossed')\n"
        "cli.cmd_families = broken\n"
        "raise SystemExit(cli.main(['families']))\n"
    )

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=environment(**env)
        )

    line = assert_one_error_line(run(), 1)
    assert "wires crossed" in line
    debug = run(AICORTEX_DEBUG="1")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


# --------------------------------------------------------------------------- servers


def test_servers_prints_a_live_table(fake_ollama: FakeOllamaFactory) -> None:
    """Each server: up/down, latency, version and whether it has the model."""
    good = fake_ollama(models=["qwen3:8b"], version="0.9.0")
    other = fake_ollama(models=["gemma3:4b"])
    refused = refused_url()
    result = aicortex_cmd("servers", "qwen3:8b", "-s", good.url, "-s", other.url, "-s", refused)
    assert result.returncode == 0, result.stderr
    header, *rows = [re.split(r"\s{2,}", line) for line in result.stdout.splitlines()]
    assert header == ["SERVER", "STATUS", "LATENCY", "VERSION", "HAS qwen3:8b", "NOTE"]
    assert [row[:2] for row in rows] == [[good.url, "up"], [other.url, "up"], [refused, "down"]]
    assert re.fullmatch(r"\d+ ms", rows[0][2])
    assert rows[0][3:] == ["0.9.0", "yes"]
    assert rows[1][4:] == ["no"]
    assert rows[2][2:] == ["-", "-", "-", "connection refused"]


@pytest.mark.parametrize(
    ("http", "expected"), [(None, "httpx (http=httpx)"), ("auto", "aiohttp (http=auto)")]
)
def test_servers_verbose_names_the_http_transport(
    fake_ollama: FakeOllamaFactory, http: str | None, expected: str
) -> None:
    """`servers -v` says which transport it used: httpx's, as one-shot commands do,
    unless AICORTEX_HTTP chooses."""
    server = fake_ollama()
    env = {} if http is None else {"AICORTEX_HTTP": http}
    result = aicortex_cmd("servers", "-v", "-s", server.url, **env)
    assert result.returncode == 0, result.stderr
    assert f"HTTP transport: {expected}" in result.stderr


def test_servers_json_and_probe_timeout(fake_ollama: FakeOllamaFactory) -> None:
    """``--json`` lists the probe results; ``--timeout`` bounds a slow server."""
    good = fake_ollama()
    slow = fake_ollama(probe_delay=3.0)
    started = time.monotonic()
    result = aicortex_cmd("servers", "-s", f"{good.url},{slow.url}", "--timeout", "0.5", "--json")
    assert time.monotonic() - started < 3.0
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(s["url"], s["up"]) for s in data] == [(good.url, True), (slow.url, False)]
    assert data[0]["models"] == ["llama3.2:3b"]
    assert data[1]["error"] == "probe timed out after 0.5s"


def test_servers_with_none_reachable_is_status_3() -> None:
    """The table is printed, then one error line naming each server tried."""
    first, second = refused_url(), refused_url()
    result = aicortex_cmd("servers", "-s", first, "-s", second)
    line = assert_one_error_line(result, 3)
    assert line == (
        f"aicortex: error: no reachable server; tried: {first} (connection refused); "
        f"{second} (connection refused)"
    )
    assert result.stdout.count("down") == 2


def test_servers_without_the_model_is_status_2(fake_ollama: FakeOllamaFactory) -> None:
    """Reachable servers that lack the model: status 2 with suggestions."""
    server = fake_ollama(models=["llama3.2:3b"])
    line = assert_one_error_line(aicortex_cmd("servers", "llama3.2:1b", "-s", server.url), 2)
    assert "Did you mean: 'llama3.2:3b'" in line


def test_servers_defaults_to_ollama_host(fake_ollama: FakeOllamaFactory) -> None:
    """Without ``--server`` the usual candidates are probed, ending with OLLAMA_HOST."""
    server = fake_ollama()
    result = aicortex_cmd("servers", OLLAMA_HOST=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(f"{server.url}  up ")


# --------------------------------------------------------------------------- refresh


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    source = metadata_dir()
    assert isinstance(source, Path)
    shutil.copytree(source, tmp_path / "metadata")
    return tmp_path / "metadata"


def test_refresh_dry_run_prints_a_diff_and_writes_nothing(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path
) -> None:
    """``--dry-run``: the diff on stdout, progress on stderr, no file touched."""
    server = fake_ollama(models=["tinyllama:1.1b"])
    before = {p.name: p.read_bytes() for p in catalog_dir.iterdir()}
    result = aicortex_cmd(
        "refresh", "--metadata-dir", str(catalog_dir), "-s", server.url, "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "--- /dev/null\n+++ b/tinyllama.json\n" in result.stdout
    assert f"  up    {server.url}  " in result.stderr
    assert "6 of 6 files would change; nothing was written" in result.stderr
    assert {p.name: p.read_bytes() for p in catalog_dir.iterdir()} == before


def test_refresh_without_the_catalog_probes_only_given_servers(
    fake_ollama: FakeOllamaFactory, catalog_dir: Path
) -> None:
    """``--no-catalog`` skips the catalog's servers (their statuses stay)."""
    server = fake_ollama(models=["phi3:3.8b"])
    result = aicortex_cmd("refresh", "--metadata-dir", str(catalog_dir), "--no-catalog",
                          "-s", server.url)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 of 1 servers up" in result.stderr
    assert result.stdout.splitlines() == [
        f"phi3:3.8b: added to phi.json (family 'phi', on {server.url})",
        "wrote phi.json (created)",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metadata-dir", "/no/such/dir"], "The catalog directory '/no/such/dir' does not"),
        (["--server", "ftp://box"], "scheme 'ftp'"),
        (["--no-catalog"], "--no-catalog needs at least one --server"),
        (["--timeout", "0"], "must be more than 0 seconds"),
    ],
)
def test_refresh_rejects_bad_input(args: list[str], message: str, catalog_dir: Path) -> None:
    """A missing catalog, a malformed URL or a bad option is status 2, one line."""
    if "--metadata-dir" not in args:
        args = [*args, "--metadata-dir", str(catalog_dir)]
    line = assert_one_error_line(aicortex_cmd("refresh", *args), 2)
    assert message in line


def test_refresh_refuses_an_invalid_catalog_and_writes_nothing(catalog_dir: Path) -> None:
    """A family file that breaks the schema stops the refresh before any write."""
    broken = catalog_dir / "llama.json"
    broken.write_text(broken.read_text().replace('"context_length": 131072', '"context_length": 0'))
    before = {p.name: p.read_bytes() for p in catalog_dir.iterdir()}
    line = assert_one_error_line(aicortex_cmd("refresh", "--metadata-dir", str(catalog_dir)), 2)
    assert "is not valid; fix it before refreshing: llama.json: models[0].context_length:" in line
    assert {p.name: p.read_bytes() for p in catalog_dir.iterdir()} == before


def test_online_commands_read_the_configuration_file(
    fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    """chat and servers use the file's servers and model; a bad file is bad input."""
    server = fake_ollama(models=["qwen2.5:7b"], chat=reply(["from ", "the file"]))
    config = tmp_path / "aicortex.toml"
    config.write_text(f'model = "qwen2.5:7b"\n[[servers]]\nurl = "{server.url}"\n')
    chat = aicortex_cmd("chat", "hi", "--config", str(config))
    assert (chat.returncode, chat.stdout) == (0, "from the file\n"), chat.stderr
    assert server.requests[-1].json["model"] == "qwen2.5:7b"
    listed = aicortex_cmd("servers", "--json", AICORTEX_CONFIG=str(config))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["url"] == server.url
    config.write_text("[timeouts]\nconect = 1\n")
    bad = aicortex_cmd("chat", "hi", "--config", str(config))
    line = assert_one_error_line(bad, 2)
    assert "timeouts.conect: unknown key; did you mean 'connect'?" in line


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http//127.0.0.1:11434", "Did you mean 'http://127.0.0.1:11434'?"),
        ("", "--server '' names no server"),
        ("http://a b:1", "contains spaces"),
        ("http://127.0.0.1:11434/api", "drop the /api suffix"),
    ],
)
@pytest.mark.parametrize("command", [["chat", "hi"], ["servers"], ["pull", "llama3.2:3b"]])
def test_a_malformed_server_url_is_bad_input(command: list[str], url: str, says: str) -> None:
    """Exit 2 with the fix, before anything goes online (no server runs here)."""
    line = assert_one_error_line(aicortex_cmd(*command, "--server", url), 2)
    assert says in line
