"""`python -m aicortex serve` end to end: a real process serving the proxy on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakeollama import FakeOllamaFactory, reply

MODEL = "llama3.2:3b"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Proxy:
    """`python -m aicortex serve ...` in a subprocess, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aicortex", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_until_up(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise AssertionError(f"aicortex serve exited {self.process.returncode}: {err}")
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, err = self.process.communicate()
        return self.process.returncode, err


@pytest.fixture
def run_proxy() -> Iterator[type[Proxy]]:
    """Start `aicortex serve` processes; any still running are killed at teardown."""
    started: list[Proxy] = []

    class Tracked(Proxy):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for proxy in started:
        proxy.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_serve_answers_health_and_chats_then_stops_cleanly(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """The command serves /health and a chat through the given server, and Ctrl-C stops it."""
    server = fake_ollama(chat=reply(["from", " the", " cli"]))
    proxy = run_proxy("--server", server.url)
    proxy.wait_until_up()
    assert httpx.get(proxy.url + "/health").json() == {"status": "ok"}
    response = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "from the cli"
    assert response.headers["x-aicortex-server"] == server.url
    ready = httpx.get(proxy.url + "/ready").json()
    assert [u["url"] for u in ready["upstreams"]] == [server.url]  # exactly the --server list
    code, err = proxy.stop()
    assert code == 0, err


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_serve_requires_a_key_from_the_key_file(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    """--api-key-file: requests without one of its keys get 401; /health stays open."""
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# proxy keys\nsk-cli-key\n")
    proxy = run_proxy("--server", fake_ollama().url, "--api-key-file", str(key_file))
    proxy.wait_until_up()
    assert httpx.post(proxy.url + "/v1/chat/completions", json=HI).status_code == 401
    authorized = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=HI,
        headers={"authorization": "Bearer sk-cli-key"},
        timeout=10,
    )
    assert authorized.status_code == 200
    _, err = proxy.stop()
    assert "sk-cli-key" not in err


def serve_command(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``aicortex serve ARGS`` on a free port, expecting it to stop by itself."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "aicortex", "serve", "--port", str(free_port()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serve_with_a_missing_key_file_exits_with_a_message(tmp_path: Path) -> None:
    """A key file that cannot be read stops the command before it listens, saying why."""
    result = serve_command("--api-key-file", str(tmp_path / "nope.txt"))
    assert result.returncode == 2
    assert "nope.txt" in result.stderr


def test_serve_takes_the_transport_and_the_connection_limit(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """--http and --max-connections reach the pools; the proxy serves through them."""
    server = fake_ollama(chat=reply(["over", " httpx"]))
    proxy = run_proxy("--server", server.url, "--http", "httpx", "--max-connections", "2")
    proxy.wait_until_up()
    response = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
    assert response.json()["choices"][0]["message"]["content"] == "over httpx"
    code, err = proxy.stop()
    assert code == 0, err


def test_serve_spreads_requests_by_the_routing_given(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """--routing round_robin takes the servers in turn."""
    first, second = fake_ollama(), fake_ollama()
    proxy = run_proxy("--server", first.url, "--server", second.url, "--routing", "round_robin")
    proxy.wait_until_up()
    for _ in range(4):
        response = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
        assert response.status_code == 200
    assert (first.count("/api/chat"), second.count("/api/chat")) == (2, 2)
    code, err = proxy.stop()
    assert code == 0, err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--max-connections", "0"],
            "the option --max-connections: max_connections: Input should be greater than or "
            "equal to 1",
        ),
        (["--http", "curl"], "invalid choice: 'curl'"),
        (["--routing", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_serve_refuses_a_bad_transport_setting_before_listening(
    option: list[str], message: str
) -> None:
    """A bad --http or --max-connections stops the command with status 2, saying why."""
    result = serve_command(*option)
    assert result.returncode == 2
    assert message in result.stderr


def test_serve_reads_its_settings_from_the_configuration_file(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    """--config gives the servers and the routing; a flag wins over the file."""
    first, second, unused = fake_ollama(), fake_ollama(), fake_ollama()
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'servers = ["{first.url}", "{second.url}"]\n'
        '[routing]\nstrategy = "priority"\n[proxy]\nport = 1\n'
    )
    proxy = run_proxy("--config", str(config), "--routing", "round_robin")
    proxy.wait_until_up()
    for _ in range(4):
        response = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
        assert response.status_code == 200
    assert (first.count("/api/chat"), second.count("/api/chat")) == (2, 2)
    assert unused.count("/api/chat") == 0
    code, err = proxy.stop()
    assert code == 0, err


def test_serve_takes_the_allowed_origins_and_hosts_and_the_body_timeout(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """--allowed-origin and --allowed-host (repeatable, or comma-separated) are served;
    others are refused; --body-timeout cuts off a body that stalls."""
    proxy = run_proxy(
        "--server",
        fake_ollama().url,
        "--allowed-origin",
        "https://app.example.com",
        "--allowed-origin",
        "https://b.example,https://*.c.example",
        "--allowed-host",
        "proxy.test",
        "--body-timeout",
        "0.5",
    )
    proxy.wait_until_up()
    url = proxy.url + "/v1/chat/completions"
    for origin in ("https://app.example.com", "https://b.example", "https://x.c.example"):
        response = httpx.post(url, json=HI, headers={"origin": origin}, timeout=10)
        assert response.status_code == 200, origin
        assert response.headers["access-control-allow-origin"] == origin
    assert httpx.post(url, json=HI, headers={"origin": "https://evil.example"}).status_code == 403
    assert httpx.get(proxy.url + "/health", headers={"host": "proxy.test:1"}).status_code == 200
    assert httpx.get(proxy.url + "/health", headers={"host": "evil.test"}).status_code == 403
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9\r\n\r\n{")
        started = time.monotonic()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3
    code, err = proxy.stop()
    assert code == 0, err


def test_serve_refuses_an_invalid_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[routing]\nstrategy = 'fastest'\n")
    result = subprocess.run(
        [sys.executable, "-m", "aicortex", "serve", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}: routing.strategy: Input should be" in result.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX's")
def test_sighup_reloads_servers_and_keys_without_cutting_a_stream(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    """A stream running on the old server completes; the next request uses the new
    server and the new keys."""
    old = fake_ollama(chat=reply([f"t{i} " for i in range(8)], delay=0.15))
    new = fake_ollama(chat=reply(["from", " new"]))
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    config = tmp_path / "fleet.toml"
    config.write_text(f'servers = ["{old.url}"]\n[proxy]\napi_keys_file = "{keys}"\n')
    proxy = run_proxy("--config", str(config))
    proxy.wait_until_up()
    body = {**HI, "stream": True}
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer old-key"},
        timeout=10,
    ) as streamed:
        lines = streamed.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        config.write_text(f'servers = ["{new.url}"]\n[proxy]\napi_keys_file = "{keys}"\n')
        keys.write_text("new-key\n")
        proxy.process.send_signal(signal.SIGHUP)
        rest = [first, *lines]
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in rest
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == "".join(f"t{i} " for i in range(8))
    assert [line for line in rest if line][-1] == "data: [DONE]"
    refused = httpx.post(
        proxy.url + "/v1/chat/completions", json=HI, headers={"Authorization": "Bearer old-key"}
    )
    assert refused.status_code == 401
    answer = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=HI,
        headers={"Authorization": "Bearer new-key"},
        timeout=10,
    )
    assert answer.json()["choices"][0]["message"]["content"] == "from new"
    assert old.count("/api/chat") == 1
    code, err = proxy.stop()
    assert code == 0, err
    assert "reloaded the configuration: 1 server, 1 API key" in err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX's")
def test_a_reload_of_an_invalid_file_keeps_the_running_configuration(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    server = fake_ollama(chat=reply(["still", " here"]))
    config = tmp_path / "fleet.toml"
    config.write_text(f'servers = ["{server.url}"]\n')
    proxy = run_proxy("--config", str(config))
    proxy.wait_until_up()
    config.write_text("[routing]\nstrategy = 'fastest'\n")
    proxy.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    answer = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
    assert answer.json()["choices"][0]["message"]["content"] == "still here"
    code, err = proxy.stop()
    assert code == 0, err
    assert "the configuration was not reloaded (the running one is kept)" in err
    assert "routing.strategy" in err


def _stream_lines(proxy: Proxy, path: str, body: dict[str, object]) -> list[str]:
    """The body lines of a streamed request; SIGTERM is sent once the first line is in."""
    with httpx.stream("POST", proxy.url + path, json=body, timeout=20) as streamed:
        lines = streamed.iter_lines()
        first = next(line for line in lines if line)
        proxy.process.send_signal(signal.SIGTERM)
        return [first, *(line for line in lines if line)]


def test_sigterm_lets_a_running_stream_finish_then_exits_0(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    server = fake_ollama(chat=reply([f"w{i} " for i in range(6)], delay=0.2))
    proxy = run_proxy("--server", server.url, "--grace", "10")
    proxy.wait_until_up()
    started = time.monotonic()
    lines = _stream_lines(proxy, "/api/chat", {"model": "llama3.2:3b", "messages": HI["messages"]})
    chunks = [json.loads(line) for line in lines]
    assert "".join(c["message"]["content"] for c in chunks) == "".join(f"w{i} " for i in range(6))
    assert chunks[-1]["done"] is True
    code, err = proxy.stop()
    assert code == 0, err
    assert time.monotonic() - started < 8


def test_past_the_grace_period_a_stream_ends_with_an_error_frame(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    server = fake_ollama(chat=reply([f"w{i} " for i in range(40)], delay=0.2))
    proxy = run_proxy("--server", server.url, "--grace", "1")
    proxy.wait_until_up()
    started = time.monotonic()
    lines = _stream_lines(proxy, "/v1/chat/completions", {**HI, "stream": True})
    assert lines[-1].startswith("data: {")
    error = json.loads(lines[-1][len("data: ") :])["error"]
    assert error["code"] == "shutting_down"
    assert "[DONE]" not in "".join(lines)
    code, err = proxy.stop()
    assert code == 0, err
    assert time.monotonic() - started < 6
    assert server.wait_for_disconnect(5)  # the upstream request was closed too


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts processes in /proc")
def test_workers_serve_side_by_side_and_stop_cleanly(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory, tmp_path: Path
) -> None:
    server = fake_ollama(chat=reply(["from", " a worker"]))
    config = tmp_path / "fleet.toml"
    config.write_text(f'servers = ["{server.url}"]\n[proxy]\nworkers = 2\n')
    proxy = run_proxy("--config", str(config))
    proxy.wait_until_up()
    deadline = time.monotonic() + 20
    while len(_children(proxy.process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _children(proxy.process.pid)
    assert len(workers) >= 2
    for _ in range(6):
        answer = httpx.post(proxy.url + "/api/chat", json={**HI, "stream": False}, timeout=10)
        assert answer.json()["message"]["content"] == "from a worker"
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(20) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--allowed-origin", "https://a.example/app"], "'https://a.example/app' has a path"),
        (["--allowed-origin", "evil"], "allowed_origins: 'evil' is not an origin"),
        (["--allowed-host", "http://x"], "allowed_hosts: 'http://x' is not a host name"),
        (["--body-timeout", "0"], "the option --body-timeout: proxy.body_timeout: Input should be"),
        (["--body-timeout", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_serve_refuses_a_bad_browser_setting_before_listening(
    option: list[str], message: str
) -> None:
    """A bad --allowed-origin, --allowed-host or --body-timeout stops the command with
    status 2, saying why."""
    result = serve_command(*option)
    assert result.returncode == 2
    assert message in result.stderr


def test_workers_add_up_their_metrics(
    run_proxy: type[Proxy], fake_ollama: FakeOllamaFactory
) -> None:
    """With --workers 2 (and no PROMETHEUS_MULTIPROC_DIR of one's own), a scrape of
    either worker counts the requests both served."""
    from prometheus_client.parser import text_string_to_metric_families

    server = fake_ollama(chat=reply(["counted"]))
    env_dir = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        proxy = run_proxy("--server", server.url, "--workers", "2")
    finally:
        if env_dir is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = env_dir
    proxy.wait_until_up()
    sent = 12
    for _ in range(sent):
        # A new connection each time, so that both workers get some.
        answer = httpx.post(proxy.url + "/v1/chat/completions", json=HI, timeout=10)
        assert answer.status_code == 200
    for _ in range(3):  # whichever worker answers the scrape
        text = httpx.get(proxy.url + "/metrics", timeout=10).text
        total = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "aicortex_requests"
            for sample in family.samples
            if sample.name == "aicortex_requests_total"
            and sample.labels.get("route") == "/v1/chat/completions"
            and sample.labels.get("outcome") == "ok"
        )
        assert total == sent
    code, err = proxy.stop()
    assert code == 0, err
