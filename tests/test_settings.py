"""The configuration: the TOML file, the environment and arguments, their precedence, every
validation error, `from_config`, and `aicortex config`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aicortex import AsyncCortex, Cortex, Ejection, Server, Timeout, ValidationError
from aicortex._cli import main
from aicortex._client import router_of
from aicortex._settings import config_path, load_settings, user_config_file

EXAMPLE = """
[[servers]]
url = "http://gpu-1:11434"
weight = 2
[[servers]]
url = "openai+http://vllm-1:8000"
api_key_env = "VLLM_KEY"
models = { "llama3.2:3b" = "meta-llama/Llama-3.2-3B-Instruct" }

[routing]
strategy = "least_busy"
health_ttl = 30

[timeouts]
connect = 2
first_token = 120

[proxy]
host = "127.0.0.1"
port = 8000
api_keys_file = "/etc/aicortex/keys"
"""


def write(tmp_path: Path, text: str, name: str = "aicortex.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    resolved = load_settings(write(tmp_path, EXAMPLE), env={})
    settings = resolved.settings
    assert [s.url for s in settings.servers] == ["http://gpu-1:11434", "openai+http://vllm-1:8000"]
    assert settings.routing.strategy == "least_busy"
    assert settings.routing.health_ttl == 30
    assert settings.timeouts.timeout() == Timeout(connect=2, first_token=120)
    assert settings.proxy.api_keys_file == "/etc/aicortex/keys"
    vllm = settings.servers[1].server()
    assert vllm.api == "openai"
    assert vllm.url == "http://vllm-1:8000"
    assert vllm.api_key_env == "VLLM_KEY"
    assert vllm.models == {"llama3.2:3b": "meta-llama/Llama-3.2-3B-Instruct"}
    assert resolved.source("routing.strategy") == "file"
    assert resolved.source("proxy.body_timeout") == "default"


def test_environment_wins_over_the_file_and_arguments_over_both(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    env = {
        "AICORTEX_ROUTING": "round_robin",
        "AICORTEX_HEALTH_TTL": "5",
        "AICORTEX_SERVERS": "http://a:11434,http://b:11434",
        "AICORTEX_TOTAL_TIMEOUT": "90",
        "AICORTEX_IDLE_TIMEOUT": "none",
    }
    resolved = load_settings(path, env=env, overrides={"routing.strategy": "priority"})
    settings = resolved.settings
    assert settings.routing.strategy == "priority"
    assert resolved.source("routing.strategy") == "argument"
    assert settings.routing.health_ttl == 5
    assert resolved.source("routing.health_ttl") == "AICORTEX_HEALTH_TTL"
    assert [s.url for s in settings.servers] == ["http://a:11434", "http://b:11434"]
    assert resolved.source("servers") == "AICORTEX_SERVERS"
    assert settings.timeouts.timeout() == Timeout(connect=2, first_token=120, idle=None, total=90)
    assert resolved.source("timeouts.connect") == "file"


def test_where_the_file_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path(env={}) == (None, "no file")
    user = write(tmp_path / "xdg" / "aicortex", "", "config.toml")
    assert user_config_file() == user
    assert config_path(env={}) == (user, "the user's config folder")
    local = write(tmp_path, "")
    assert config_path(env={}) == (Path("aicortex.toml"), "the current folder")
    named = write(tmp_path, "", "named.toml")
    assert config_path(env={"AICORTEX_CONFIG": str(named)}) == (named, "AICORTEX_CONFIG")
    assert config_path(named, env={"AICORTEX_CONFIG": str(local)}) == (named, "--config")


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            '[routing]\nstrateg = "least_busy"\n',
            {},
            "aicortex.toml: routing.strateg: unknown key; did you mean 'strategy'? "
            "(known here: eject_first, eject_max, failures_to_eject, health_ttl, strategy)",
        ),
        ('[routing]\nstrategy = "fastest"\n', {}, "routing.strategy: Input should be"),
        ('[timeouts]\nconnect = "soon"\n', {}, "timeouts.connect: Input should be a valid number"),
        (
            "[timeouts]\nidle = -1\n",
            {},
            "timeouts.idle: Input should be greater than or equal to 0",
        ),
        ("[proxy]\nport = 70000\n", {}, "proxy.port: Input should be less than or equal to 65535"),
        ("[[servers]]\nweight = 2\n", {}, "servers[0].url: Field required"),
        ('[[servers]]\nurl = "http://a"\nwieght = 2\n', {}, "did you mean 'weight'?"),
        ('[[servers]]\nurl = "http://a"\napi = "grpc"\n', {}, "servers[0].api: Input should be"),
        ('modle = "x"\n', {}, "modle: unknown key; did you mean 'model'?"),
        ("", {"AICORTEX_PORT": "abc"}, "the environment variable AICORTEX_PORT: proxy.port:"),
        ("", {"AICORTEX_MAX_BODY_SIZE": "0"}, "AICORTEX_MAX_BODY_SIZE: proxy.max_body_size:"),
        ("[proxy]\nallow_management = 3\n", {}, "allow_management: Input should be a valid"),
        ("", {"AICORTEX_BODY_TIMEOUT": "0"}, "AICORTEX_BODY_TIMEOUT: proxy.body_timeout:"),
        ("[proxy]\nallowed_origins = 'x'\n", {}, "proxy.allowed_origins: Input should be a valid"),
        ("[proxy]\nworkers = 0\n", {}, "proxy.workers: Input should be greater than"),
        ("[routing]\n[routing.extra]\nx = 1\n", {}, "aicortex.toml: routing.extra: unknown key"),
    ],
)
def test_every_invalid_value_names_where_it_came_from(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValidationError) as caught:
        load_settings(path, env=env)
    assert message in str(caught.value)
    assert str(caught.value).startswith("Invalid configuration: ")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, '[routing]\nhealth_ttl = "x"\n[proxy]\nport = -1\n')
    with pytest.raises(ValidationError) as caught:
        load_settings(path, env={})
    text = str(caught.value)
    assert "routing.health_ttl" in text
    assert "proxy.port" in text


def test_a_file_that_is_not_toml_or_not_there(tmp_path: Path) -> None:
    broken = write(tmp_path, "servers = [\n")
    with pytest.raises(ValidationError, match="is not valid TOML: "):
        load_settings(broken, env={})
    with pytest.raises(ValidationError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(ValidationError, match=r"\(AICORTEX_CONFIG\) does not exist"):
        load_settings(env={"AICORTEX_CONFIG": str(tmp_path / "gone.toml")})


def test_servers_may_be_written_as_urls(tmp_path: Path) -> None:
    path = write(tmp_path, 'servers = ["http://a:11434", {url = "http://b:11434", weight = 3}]\n')
    settings = load_settings(path, env={}).settings
    assert [(s.url, s.weight) for s in settings.servers] == [
        ("http://a:11434", 1.0),
        ("http://b:11434", 3.0),
    ]


async def test_async_cortex_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, EXAMPLE)
    monkeypatch.setenv("AICORTEX_MODEL", "qwen2.5:7b")
    async with AsyncCortex.from_config(path) as cortex:
        assert cortex.servers == ["http://gpu-1:11434", "http://vllm-1:8000"]
        assert cortex.routing == "least_busy"
        assert cortex.timeout == Timeout(connect=2, first_token=120)
        assert cortex.default_model() == "qwen2.5:7b"
        states = {s.url: s for s in cortex.server_states()}
        assert states["http://gpu-1:11434"].weight == 2
        assert states["http://vllm-1:8000"].api == "openai"
    async with AsyncCortex.from_config(path, routing="round_robin", servers=["c"]) as cortex:
        assert cortex.routing == "round_robin"
        assert cortex.servers == ["http://c:11434"]


def test_cortex_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path, '[[servers]]\nurl = "http://gpu-2:11434"\n[routing]\nstrategy = "round_robin"\n'
    )
    with Cortex.from_config() as cortex:  # ./aicortex.toml
        assert cortex.servers == ["http://gpu-2:11434"]
        assert cortex.routing == "round_robin"
    write(tmp_path, "[routing]\nhealth_ttl = -3\n")
    with pytest.raises(ValidationError, match=r"routing\.health_ttl"):
        Cortex.from_config()


def run_config(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["config", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_aicortex_config_shows_sources_and_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-do-not-show-1234"
    path = write(
        tmp_path,
        EXAMPLE + f'\n[[servers]]\nurl = "openai+http://other:8000"\napi_key = "{secret}"\n',
    )
    monkeypatch.setenv("VLLM_KEY", "from-the-environment-5678")
    monkeypatch.setenv("AICORTEX_MAX_BODY_SIZE", "1200")
    code, out, _ = run_config(capsys, "--config", str(path))
    assert code == 0
    assert secret not in out
    assert "from-the-environment-5678" not in out
    assert f"configuration file: {path} (from --config)" in out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert '"****"' in lines["servers[2].api_key"]
    assert '"VLLM_KEY (set)"' in lines["servers[1].api_key_env"]
    assert lines["proxy.max_body_size"].split()[1:] == ["1200", "AICORTEX_MAX_BODY_SIZE"]
    assert lines["routing.strategy"].split()[1:] == ['"least_busy"', "file"]
    assert lines["proxy.allow_management"].split()[1:] == ["false", "default"]
    code, out, _ = run_config(capsys, "--config", str(path), "--json")
    data: dict[str, Any] = json.loads(out)
    assert data["file"] == str(path)
    assert data["settings"]["servers[2].api_key"] == {"value": "****", "source": "file"}
    assert secret not in out


def test_aicortex_config_reports_an_invalid_file_as_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[proxy]\nprot = 1\n")
    code, out, err = run_config(capsys, "--config", str(path))
    assert code == 2
    assert out == ""
    assert "proxy.prot: unknown key; did you mean 'port'?" in err
    assert err.count("\n") == 1


def test_a_server_entry_becomes_a_server() -> None:
    settings = load_settings(
        overrides={"servers": [{"url": "http://x:8000", "kind": "openai", "max_concurrency": 4}]},
        env={},
    ).settings
    assert settings.servers[0].server() == Server("http://x:8000", api="openai", max_concurrency=4)


def test_ejection_settings_reach_the_client(tmp_path: Path) -> None:
    path = write(tmp_path, "[routing]\nfailures_to_eject = 1\neject_first = 2\neject_max = 8\n")
    resolved = load_settings(path, env={"AICORTEX_EJECT_MAX": "16"})
    assert resolved.settings.routing.ejection() == Ejection(failures=1, first=2, max=16)
    with Cortex.from_config(path) as cortex:
        assert router_of(cortex._async).fleet.ejection == Ejection(1, 2.0, 8.0)  # pyright: ignore[reportPrivateUsage]
    bad = write(tmp_path, "[routing]\neject_first = 10\neject_max = 5\n", "bad.toml")
    with pytest.raises(ValidationError, match=r"routing: Value error, eject_max \(5\) must not"):
        load_settings(bad, env={})
