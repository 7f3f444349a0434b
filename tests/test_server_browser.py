"""The proxy against web pages, served by uvicorn on 127.0.0.1: foreign origins refused,
allowed ones served with CORS, DNS rebinding refused by the Host check, any content type
accepted for a JSON body."""

from __future__ import annotations

import json
import re
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


# --- the new arguments, checked when the app is made ---------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allowed_origins": "https://a.example"}, "allowed_origins must be a list of origins"),
        ({"allowed_origins": ["https://a.example/"]}, "has a path"),
        ({"allowed_hosts": "proxy.test"}, "allowed_hosts must be a list of hosts"),
        ({"allowed_hosts": ["http://proxy.test"]}, "is not a host name"),
    ],
)
def test_bad_browser_settings_fail_when_the_app_is_made(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(servers=["http://127.0.0.1:9"], **kwargs)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
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
