"""The proxy's rules for web pages (origins, CORS, Host names) and for slow bodies, as pure
decisions: no network."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from aicortex.server._browser import (
    DEFAULT_ORIGINS,
    HostPolicy,
    OriginPolicy,
    cors_headers,
    host_refused,
    is_loopback_address,
    is_loopback_host,
    load_hosts,
    load_origins,
    origin_refused,
    preflight_headers,
)
from aicortex.server._errors import ProxyError
from aicortex.server._gateway import BODY_TIMEOUT, read_body

# --- origins -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "https://localhost",
        "http://localhost:3000",
        "https://localhost:8443",
        "http://127.0.0.1",
        "http://127.0.0.1:8080",
        "https://127.0.0.1:1",
        "http://0.0.0.0:5173",
        "http://[::1]",
        "http://[::1]:5173",
        "https://[::1]:443",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://1a2b3c4d",
        "vscode-file://vscode-app",
        "HTTP://LOCALHOST:3000",  # case does not matter
    ],
)
def test_localhost_pages_and_app_webviews_are_allowed_by_default(origin: str) -> None:
    assert OriginPolicy().allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost.evil.example",
        "http://localhost.evil.example:3000",
        "http://127.0.0.1.evil.example",
        "http://localhost:3000.evil.example",  # not an origin: a port is digits
        "http://evil.example#http://localhost",
        "http://localhost/path",
        "http://user@localhost",
        "http://127.0.0.2",  # Ollama's defaults name 127.0.0.1 only
        "http://app.localhost",
        "ftp://localhost",
        "null",  # sandboxed iframes and data: pages
        "",
        "localhost",
    ],
)
def test_other_origins_are_refused_by_default(origin: str) -> None:
    assert not OriginPolicy().allows(origin)


def test_the_defaults_are_ollamas_with_ipv6_localhost() -> None:
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]"):
        for scheme in ("http", "https"):
            assert f"{scheme}://{host}" in DEFAULT_ORIGINS
            assert f"{scheme}://{host}:*" in DEFAULT_ORIGINS
    for scheme in ("app", "file", "tauri", "vscode-webview", "vscode-file"):
        assert f"{scheme}://*" in DEFAULT_ORIGINS


def test_configured_origins_are_added_to_the_defaults() -> None:
    policy = OriginPolicy(load_origins(["https://App.Example.com", "http://10.0.0.5:3000"]))
    assert policy.allows("https://app.example.com")
    assert policy.allows("HTTPS://APP.EXAMPLE.COM")
    assert policy.allows("http://10.0.0.5:3000")
    assert policy.allows("http://localhost:3000")  # the defaults stay
    assert not policy.allows("https://app.example.com:8443")  # an exact origin: its port only
    assert not policy.allows("http://app.example.com")  # and its scheme only
    assert not policy.allows("http://10.0.0.5:3001")


def test_a_subdomain_pattern_matches_subdomains_only() -> None:
    policy = OriginPolicy(load_origins(["https://*.example.com"]))
    assert policy.allows("https://a.example.com")
    assert policy.allows("https://a.b.example.com")
    assert not policy.allows("https://example.com")
    assert not policy.allows("https://evilexample.com")
    assert not policy.allows("https://a.example.com.evil.net")
    assert not policy.allows("https://a.example.com:8443")
    assert not policy.allows("http://a.example.com")
    assert not policy.allows("https://evil.net:1.example.com")  # not an origin


def test_a_port_pattern_matches_any_port_of_that_host() -> None:
    policy = OriginPolicy(load_origins(["http://devbox:*"]))
    assert policy.allows("http://devbox:1")
    assert policy.allows("http://devbox:65535")
    assert not policy.allows("http://devbox")
    assert not policy.allows("http://devbox.evil.example:80")


def test_a_star_allows_every_origin_and_null_only_when_configured() -> None:
    everything = OriginPolicy(load_origins(["*"]))
    for origin in ("https://evil.example", "null", "whatever"):
        assert everything.allows(origin)
    assert not OriginPolicy(load_origins(["https://app.example.com"])).allows("null")
    assert OriginPolicy(load_origins(["null"])).allows("null")
    assert OriginPolicy(load_origins(["null"])).allows("NULL")


def test_origins_come_from_the_argument_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AICORTEX_ALLOWED_ORIGINS", raising=False)
    assert load_origins() == []
    monkeypatch.setenv("AICORTEX_ALLOWED_ORIGINS", " https://a.example , https://*.b.example,")
    assert load_origins() == ["https://a.example", "https://*.b.example"]
    assert load_origins(["https://c.example"]) == ["https://c.example"]  # the argument wins
    assert load_origins([]) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://a.example", "must be a list of origins, not one string"),
        (["https://a.example/"], "has a path; an origin is only scheme://host[:port]"),
        (["https://a.example/app"], "has a path"),
        (["a.example"], "is not an origin (scheme://host[:port]"),
        (["https://a.example:port"], "is not an origin"),
        ([""], "must not contain an empty origin"),
        ([3], "must hold strings, not 3"),
    ],
)
def test_a_bad_origin_is_refused_with_what_is_wrong(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="allowed_origins") as caught:
        load_origins(value)
    assert message in str(caught.value)


def test_a_bad_origin_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AICORTEX_ALLOWED_ORIGINS", "https://ok.example,not-an-origin")
    with pytest.raises(ValueError, match="AICORTEX_ALLOWED_ORIGINS: 'not-an-origin' is not"):
        load_origins()


def test_the_refusal_names_the_origin_and_how_to_allow_it() -> None:
    error = origin_refused("https://evil.example")
    assert error.status == 403
    assert error.code == "origin_not_allowed"
    assert "'https://evil.example'" in error.message
    for way in ("allowed_origins=", "AICORTEX_ALLOWED_ORIGINS", "--allowed-origin"):
        assert way in error.message
    assert len(origin_refused("x" * 10_000).message) < 600  # a huge header is cut short


# --- CORS headers --------------------------------------------------------------------------


def test_an_answer_to_an_allowed_origin_names_it_and_exposes_the_proxys_headers() -> None:
    headers = dict(cors_headers(b"http://localhost:3000"))
    assert headers[b"access-control-allow-origin"] == b"http://localhost:3000"
    assert headers[b"vary"] == b"Origin"
    exposed = headers[b"access-control-expose-headers"].lower()
    assert b"x-request-id" in exposed
    assert b"x-aicortex-server" in exposed


def test_a_preflight_answer_allows_the_methods_and_the_headers_asked_for() -> None:
    headers = dict(preflight_headers(b"http://localhost:3000", b"authorization, content-type"))
    assert headers[b"access-control-allow-origin"] == b"http://localhost:3000"
    methods = {m.strip() for m in headers[b"access-control-allow-methods"].split(b",")}
    assert methods == {b"GET", b"POST", b"DELETE", b"HEAD", b"OPTIONS"}
    assert headers[b"access-control-allow-headers"] == b"authorization, content-type"
    assert int(headers[b"access-control-max-age"]) > 0
    assert b"Origin" in headers[b"vary"]
    assert headers[b"content-length"] == b"0"
    assert b"access-control-allow-private-network" not in headers


@pytest.mark.parametrize(
    "asked",
    [None, b"", b"x-evil\r\nset-cookie: a=b", b"a;b", b"x" * 3000],
    ids=["none", "empty", "crlf", "not-tokens", "too-long"],
)
def test_a_preflight_without_a_clean_header_list_gets_the_proxys_headers(
    asked: bytes | None,
) -> None:
    allowed = dict(preflight_headers(b"http://localhost", asked))[b"access-control-allow-headers"]
    names = {n.strip().lower() for n in allowed.split(b",")}
    assert names == {b"authorization", b"content-type", b"x-request-id", b"x-aicortex-affinity"}


def test_a_preflight_for_a_private_network_request_allows_it() -> None:
    headers = dict(preflight_headers(b"https://app.example.com", None, private_network=True))
    assert headers[b"access-control-allow-private-network"] == b"true"


# --- Host names (DNS rebinding) ----------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.5.6.7", "::1", "localhost", "::ffff:127.0.0.1"]
)
def test_loopback_listeners_are_recognised(address: str) -> None:
    assert is_loopback_address(address)
    assert HostPolicy().guards((address, 8000))


@pytest.mark.parametrize(
    "address", ["192.168.1.20", "10.0.0.1", "0.0.0.0", "::", "fe80::1", "/tmp/s.sock", "proxy"]
)
def test_other_listeners_are_not_guarded(address: str) -> None:
    assert not is_loopback_address(address)
    assert not HostPolicy().guards((address, 8000))


def test_no_listener_address_is_not_guarded() -> None:
    assert not HostPolicy().guards(None)


@pytest.mark.parametrize(
    "host",
    [
        b"localhost",
        b"localhost:8000",
        b"LOCALHOST:8000",
        b"localhost.",
        b"app.localhost:3000",
        b"127.0.0.1",
        b"127.0.0.1:8000",
        b"127.1.2.3:80",
        b"[::1]",
        b"[::1]:8000",
        b"[0:0:0:0:0:0:0:1]:8000",
        b"0.0.0.0:8000",
    ],
)
def test_loopback_hosts_are_answered_on_any_port(host: bytes) -> None:
    assert HostPolicy().allows(host)


@pytest.mark.parametrize(
    "host",
    [
        b"attacker.example",
        b"attacker.example:8000",
        b"localhost.attacker.example",
        b"127.0.0.1.attacker.example",
        b"localhostx",
        b"128.0.0.1",
        b"192.168.1.20:8000",
        b"[::2]:8000",
        b"[::ffff:7f00:1",
        b"::1",  # an IPv6 host without brackets is no Host
        b"127.0.0.1:port",
        b"localhost:8000/x",
        b"",
    ],
)
def test_other_hosts_are_refused(host: bytes) -> None:
    assert not HostPolicy().allows(host)


def test_is_loopback_host_checks_addresses_strictly() -> None:
    assert is_loopback_host("127.255.255.254")
    assert not is_loopback_host("127.0.0.256")
    assert not is_loopback_host("127.0.0")
    assert not is_loopback_host("[not-an-address]")


def test_configured_hosts_match_any_port_or_the_one_given() -> None:
    policy = HostPolicy(
        load_hosts(["proxy.internal", "Box.Lan:8000", "*.corp.example", "[fd00::1]"])
    )
    assert policy.allows(b"proxy.internal")
    assert policy.allows(b"proxy.internal:9999")
    assert policy.allows(b"PROXY.INTERNAL:80")
    assert policy.allows(b"box.lan:8000")
    assert not policy.allows(b"box.lan:8001")
    assert not policy.allows(b"box.lan")
    assert policy.allows(b"a.corp.example:8000")
    assert not policy.allows(b"corp.example")
    assert not policy.allows(b"a.corp.example.evil.net")
    assert not policy.allows(b"proxy.internal.evil.net")
    assert not policy.allows(b"evil-proxy.internal")
    assert policy.allows(b"[fd00::1]:8000")
    assert policy.allows(b"localhost:8000")  # the loopback names stay
    assert not policy.allows(b"attacker.example")


def test_a_star_turns_the_host_check_off() -> None:
    policy = HostPolicy(load_hosts(["*"]))
    assert not policy.guards(("127.0.0.1", 8000))
    assert policy.allows(b"attacker.example")


def test_host_decisions_are_remembered_without_growing_forever() -> None:
    policy = HostPolicy()
    for i in range(1000):
        assert not policy.allows(f"site{i}.example".encode())
    assert policy.allows(b"localhost:8000")
    assert len(policy._seen) <= 256  # pyright: ignore[reportPrivateUsage]


def test_hosts_come_from_the_argument_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AICORTEX_ALLOWED_HOSTS", raising=False)
    assert load_hosts() == []
    monkeypatch.setenv("AICORTEX_ALLOWED_HOSTS", "proxy.internal, box.lan:8000")
    assert load_hosts() == ["proxy.internal", "box.lan:8000"]
    assert load_hosts(["other"]) == ["other"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("proxy.internal", "must be a list of hosts, not one string"),
        (["http://proxy.internal"], "is not a host name"),
        (["proxy.internal/x"], "not a URL"),
        ([" "], "must not contain an empty host"),
    ],
)
def test_a_bad_host_is_refused_with_what_is_wrong(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="allowed_hosts") as caught:
        load_hosts(value)
    assert message in str(caught.value)


def test_the_host_refusal_names_the_host_and_how_to_allow_it() -> None:
    error = host_refused("attacker.example:8000")
    assert error.status == 403
    assert error.code == "host_not_allowed"
    assert "'attacker.example:8000'" in error.message
    for way in ("allowed_hosts=", "AICORTEX_ALLOWED_HOSTS", "--allowed-host", "localhost"):
        assert way in error.message


# --- the body's time limit -----------------------------------------------------------------


def body_parts(*parts: bytes, pause: float = 0.0, stall: bool = False) -> Any:
    """An ASGI receive that hands out ``parts`` with ``pause`` before each, then (with
    ``stall``) never finishes."""
    queue = list(parts)

    async def receive() -> dict[str, Any]:
        if not queue:
            await anyio.sleep(math.inf)
        await anyio.sleep(pause)
        part = queue.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(queue) or stall}

    return receive


async def test_a_body_that_stalls_is_a_408_that_closes_the_connection() -> None:
    scope: dict[str, Any] = {"headers": [(b"content-length", b"100")]}
    with anyio.fail_after(5):
        with pytest.raises(ProxyError) as caught:
            await read_body(scope, body_parts(b"{" * 50, stall=True), 1000, timeout=0.2)
    error = caught.value
    assert error.status == 408
    assert error.code == "request_timeout"
    assert error.headers == {"connection": "close"}
    assert "did not arrive within 0.2 seconds" in error.message


async def test_the_limit_is_for_the_whole_body_not_each_part() -> None:
    """Parts that each come in time still fail when the whole body takes too long."""
    receive = body_parts(b"{", b" ", b" ", b" ", b"}", pause=0.1)
    with anyio.fail_after(5), pytest.raises(ProxyError, match=r"within 0\.25 seconds"):
        await read_body({"headers": []}, receive, 1000, timeout=0.25)


async def test_a_body_in_time_is_read_and_the_apps_limit_comes_from_the_scope() -> None:
    scope: dict[str, Any] = {"headers": [], BODY_TIMEOUT: 0.2}
    body = await read_body(scope, body_parts(b'{"a":', b"1}", pause=0.01), 1000)
    assert body == b'{"a":1}'
    with anyio.fail_after(5), pytest.raises(ProxyError, match=r"within 0\.2 seconds"):
        await read_body(scope, body_parts(b"{", stall=True), 1000)


async def test_the_content_type_is_not_checked() -> None:
    """curl's -d sends application/x-www-form-urlencoded; the body is JSON all the same."""
    scope: dict[str, Any] = {"headers": [(b"content-type", b"application/x-www-form-urlencoded")]}
    assert await read_body(scope, body_parts(b"{}"), 1000) == b"{}"
