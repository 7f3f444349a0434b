"""The proxy against web pages, served by uvicorn on 127.0.0.1: foreign origins refused,
allowed ones served with CORS, DNS rebinding refused by the Host check, any content type
accepted for a JSON body, and slow bodies cut off with 408."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from aicortex.server import create_app
from fakeollama import FakeOllamaFactory, reply
from test_server_app import HI, MODEL, ServeFactory, error_of
from test_server_app import serve as serve  # the fixture

EVIL = "https://evil.example"
NATIVE_HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


# --- origins -------------------------------------------------------------------------------


def test_a_page_on_another_site_is_refused_in_each_apis_shape(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A cross-origin POST gets 403 naming the origin, and never reaches an upstream."""
    server = fake_ollama()
    url = serve(servers=[server.url])
    headers = {"origin": EVIL}
    openai = httpx.post(url + "/v1/chat/completions", json=HI, headers=headers)
    assert openai.status_code == 403
    error = error_of(openai)
    assert error["code"] == "origin_not_allowed"
    assert EVIL in error["message"]
    assert "--allowed-origin" in error["message"]
    assert "access-control-allow-origin" not in openai.headers
    assert openai.headers["x-request-id"]

    native = httpx.post(url + "/api/chat", json=NATIVE_HI, headers=headers)
    assert native.status_code == 403
    body = native.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert EVIL in body["error"]
    assert "access-control-allow-origin" not in native.headers

    for path in ("/", "/api/tags", "/v1/models"):  # reads are refused too
        assert httpx.get(url + path, headers=headers).status_code == 403, path
    assert httpx.get(url + "/", headers=headers).json().keys() == {"error"}
    assert server.count("/api/chat") == 0
    assert server.count("/api/tags") == 0


def test_every_origin_header_is_checked(serve: ServeFactory) -> None:
    """An allowed Origin beside a foreign one does not get the request through, and the
    refusal carries no CORS headers."""
    url = serve(servers=["http://127.0.0.1:9"])
    headers = [("origin", "http://localhost:3000"), ("origin", EVIL)]
    response = httpx.get(url + "/v1/models", headers=headers)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_is_served_with_cors_headers(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A localhost page (allowed by default) and a configured site get their answers, with
    the headers a browser needs to hand them to the page."""
    server = fake_ollama(chat=reply(["hi", " there"]))
    url = serve(servers=[server.url], allowed_origins=["https://app.example.com"])
    for origin in ("http://localhost:5173", "https://app.example.com"):
        response = httpx.post(url + "/v1/chat/completions", json=HI, headers={"origin": origin})
        assert response.status_code == 200, origin
        assert response.json()["choices"][0]["message"]["content"] == "hi there"
        assert response.headers["access-control-allow-origin"] == origin
        assert "Origin" in response.headers.get_list("vary")
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed
        assert "x-aicortex-server" in exposed
    origin = {"origin": "https://app.example.com"}
    streamed = httpx.post(url + "/v1/chat/completions", json={**HI, "stream": True}, headers=origin)
    assert streamed.headers["access-control-allow-origin"] == "https://app.example.com"
    native = httpx.post(url + "/api/chat", json=NATIVE_HI, headers=origin)
    assert native.status_code == 200
    assert native.json()["message"]["content"] == "hi there"
    assert native.headers["access-control-allow-origin"] == "https://app.example.com"
    missing = httpx.get(url + "/v1/nowhere", headers=origin)  # errors carry them too
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == "https://app.example.com"
    plain = httpx.post(url + "/v1/chat/completions", json=HI)  # no Origin: no CORS headers
    assert plain.status_code == 200
    assert "access-control-allow-origin" not in plain.headers


def test_origins_can_come_from_the_environment(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICORTEX_ALLOWED_ORIGINS", "https://*.example.com")
    url = serve(servers=[fake_ollama().url])
    ok = httpx.get(url + "/api/tags", headers={"origin": "https://a.example.com"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://a.example.com"
    assert httpx.get(url + "/api/tags", headers={"origin": EVIL}).status_code == 403


def preflight(url: str, origin: str, method: str = "POST", **headers: str) -> httpx.Response:
    return httpx.options(
        url,
        headers={"origin": origin, "access-control-request-method": method, **headers},
    )


def test_a_preflight_needs_no_key_and_the_request_then_does(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The browser's OPTIONS (which never carries credentials) is answered 204; the real
    request still needs the key, and its 401 is readable by the page."""
    url = serve(servers=[fake_ollama().url], api_keys=["sk-page"]) + "/v1/chat/completions"
    origin = "http://localhost:3000"
    answer = preflight(
        url, origin, **{"access-control-request-headers": "authorization,content-type"}
    )
    assert answer.status_code == 204
    assert answer.content == b""
    assert answer.headers["access-control-allow-origin"] == origin
    methods = {m.strip() for m in answer.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "DELETE", "HEAD", "OPTIONS"} <= methods
    assert answer.headers["access-control-allow-headers"] == "authorization,content-type"
    assert int(answer.headers["access-control-max-age"]) > 0
    assert "Origin" in answer.headers["vary"]
    assert answer.headers["x-request-id"]
    private = preflight(url, origin, **{"access-control-request-private-network": "true"})
    assert private.headers["access-control-allow-private-network"] == "true"
    assert "access-control-allow-private-network" not in answer.headers

    without = httpx.post(url, json=HI, headers={"origin": origin})
    assert without.status_code == 401
    assert error_of(without)["code"] == "invalid_api_key"
    assert without.headers["access-control-allow-origin"] == origin
    authorized = {"origin": origin, "authorization": "Bearer sk-page"}
    assert httpx.post(url, json=HI, headers=authorized).status_code == 200


def test_a_preflight_from_a_refused_origin_is_403(serve: ServeFactory) -> None:
    url = serve(servers=["http://127.0.0.1:9"])
    answer = preflight(url + "/api/chat", EVIL)
    assert answer.status_code == 403
    assert EVIL in answer.json()["error"]
    assert "access-control-allow-origin" not in answer.headers


def test_an_options_request_that_is_no_preflight_goes_to_the_routes(serve: ServeFactory) -> None:
    """Without Access-Control-Request-Method an OPTIONS is an ordinary request: 405 here."""
    url = serve(servers=["http://127.0.0.1:9"]) + "/v1/chat/completions"
    answer = httpx.options(url, headers={"origin": "http://localhost"})
    assert answer.status_code == 405
    assert answer.headers["access-control-allow-origin"] == "http://localhost"


# --- Host names: DNS rebinding -------------------------------------------------------------


def test_a_foreign_host_name_on_the_loopback_listener_is_refused(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A page whose domain resolves to 127.0.0.1 sends its own name as Host: 403, in each
    API's shape, and nothing reaches an upstream."""
    server = fake_ollama()
    url = serve(servers=[server.url])
    port = port_of(url)
    rebound = {"host": f"attacker.example:{port}"}
    openai = httpx.post(url + "/v1/chat/completions", json=HI, headers=rebound)
    assert openai.status_code == 403
    error = error_of(openai)
    assert error["code"] == "host_not_allowed"
    assert f"attacker.example:{port}" in error["message"]
    assert "--allowed-host" in error["message"]
    native = httpx.post(url + "/api/chat", json=NATIVE_HI, headers=rebound)
    assert native.status_code == 403
    assert "attacker.example" in native.json()["error"]
    assert httpx.get(url + "/health", headers=rebound).status_code == 403
    assert server.count("/api/chat") == 0


def test_loopback_and_configured_host_names_are_served(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_ollama()
    url = serve(servers=[server.url], allowed_hosts=["proxy.test"])
    port = port_of(url)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"proxy.test:{port}"):
        response = httpx.post(url + "/v1/chat/completions", json=HI, headers={"host": host})
        assert response.status_code == 200, host
    refused = httpx.get(url + "/v1/models", headers={"host": "other.test"})
    assert refused.status_code == 403

    monkeypatch.setenv("AICORTEX_ALLOWED_HOSTS", "*")  # the check off
    open_url = serve(servers=[server.url])
    assert httpx.get(open_url + "/v1/models", headers={"host": "other.test"}).status_code == 200


def raw_exchange(url: str, request: bytes, *, then: bytes = b"", wait: float = 0.0) -> bytes:
    """Send ``request`` on a new connection (and ``then`` after ``wait`` seconds); read
    until the server closes it."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
        sock.sendall(request)
        if then:
            time.sleep(wait)
            sock.sendall(then)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_request_without_a_host_header_is_served(serve: ServeFactory) -> None:
    """HTTP/1.0 has no Host header, so there is no name to check."""
    answer = raw_exchange(serve(servers=["http://127.0.0.1:9"]), b"GET /health HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"status":"ok"}')


# --- content types -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_curl_style_form_content_type_with_a_json_body_is_served(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, path: str
) -> None:
    """``curl -d '{...}'`` says application/x-www-form-urlencoded; the body is JSON."""
    server = fake_ollama(chat=reply(["from", " curl"]))
    url = serve(servers=[server.url])
    body = NATIVE_HI if path == "/api/chat" else HI
    response = httpx.post(
        url + path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/x-www-form-urlencoded", "user-agent": "curl/8.5"},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    text = (
        answer["message"]["content"]
        if path == "/api/chat"
        else answer["choices"][0]["message"]["content"]
    )
    assert text == "from curl"


# --- slow bodies ---------------------------------------------------------------------------


def head_and_body(answer: bytes) -> tuple[bytes, dict[bytes, bytes], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
    return status, headers, json.loads(body)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_body_that_stalls_gets_408_and_the_connection_is_closed(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, path: str
) -> None:
    """Half a body, then nothing: 408 soon after body_timeout, in the route's shape."""
    server = fake_ollama()
    url = serve(servers=[server.url], body_timeout=0.5)
    request = (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        ).encode()
        + b'{"model": "'
        + b"x" * 39
    )  # 50 of the 100 bytes
    started = time.monotonic()
    answer = raw_exchange(url, request)  # returns once the proxy closes the connection
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0
    status, headers, body = head_and_body(answer)
    assert status.startswith(b"HTTP/1.1 408 ")
    assert headers[b"connection"] == b"close"
    if path == "/api/chat":
        assert set(body) == {"error"}
        message = body["error"]
    else:
        assert body["error"]["code"] == "request_timeout"
        message = body["error"]["message"]
    assert "did not arrive within 0.5 seconds" in message
    assert server.count("/api/chat") == 0


def test_a_body_that_trickles_in_is_cut_off_at_the_limit(serve: ServeFactory) -> None:
    """The limit is for the whole body: bytes that keep coming slowly do not extend it."""
    url = serve(servers=["http://127.0.0.1:9"], body_timeout=0.5)
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        answer = b""
        while time.monotonic() - started < 5:  # a byte every 0.1 s: 100 would take 10 s
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                answer = sock.recv(65536)
                break
            sock.sendall(b" ")
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed < 2.0


def test_a_body_in_time_is_served_with_a_short_limit(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    url = serve(servers=[fake_ollama().url], body_timeout=0.5)
    body = json.dumps(HI).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = raw_exchange(url, request + body[:10], then=body[10:], wait=0.2)
    assert answer.startswith(b"HTTP/1.1 200 ")


# --- the new arguments, checked when the app is made ---------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allowed_origins": "https://a.example"}, "allowed_origins must be a list of origins"),
        ({"allowed_origins": ["https://a.example/"]}, "has a path"),
        ({"allowed_hosts": "proxy.test"}, "allowed_hosts must be a list of hosts"),
        ({"allowed_hosts": ["http://proxy.test"]}, "is not a host name"),
        ({"body_timeout": 0}, "body_timeout must be a positive number of seconds"),
        ({"body_timeout": -1.0}, "body_timeout must be a positive number"),
        ({"body_timeout": True}, "body_timeout must be a positive number"),
        ({"body_timeout": "30"}, "body_timeout must be a positive number"),
        ({"body_timeout": float("nan")}, "body_timeout must be a positive number"),
        ({"body_timeout": float("inf")}, "body_timeout must be a positive number"),
    ],
)
def test_bad_browser_and_body_settings_fail_when_the_app_is_made(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(servers=["http://127.0.0.1:9"], **kwargs)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("AICORTEX_BODY_TIMEOUT", "soon", "AICORTEX_BODY_TIMEOUT must be a positive number"),
        ("AICORTEX_BODY_TIMEOUT", "0", "AICORTEX_BODY_TIMEOUT must be a positive number"),
        ("AICORTEX_ALLOWED_ORIGINS", "evil", "AICORTEX_ALLOWED_ORIGINS: 'evil' is not an origin"),
        ("AICORTEX_ALLOWED_HOSTS", "http://x", "AICORTEX_ALLOWED_HOSTS: 'http://x' is not a host"),
    ],
)
def test_bad_settings_in_the_environment_fail_when_the_app_is_made(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(servers=["http://127.0.0.1:9"])


def test_the_body_timeout_can_come_from_the_environment(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICORTEX_BODY_TIMEOUT", "0.3")
    url = serve(servers=["http://127.0.0.1:9"])
    request = b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n{"
    answer = raw_exchange(url, request)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"within 0.3 seconds" in answer
