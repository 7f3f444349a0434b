"""Host strings become base URLs the way Ollama's own clients build them."""

from __future__ import annotations

import pytest

from aicortex import AsyncCortex, Server, ValidationError
from aicortex._urls import normalize_host, server_url


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        ("example.com", "http://example.com:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("example.com:56789", "http://example.com:56789"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("https://example.com:56789", "https://example.com:56789"),
        ("example.com:56789/path/", "http://example.com:56789/path"),
        ("http://example.com/api/", "http://example.com:80/api"),
        ("[0001:002:003:0004::1]:56789", "http://[0001:002:003:0004::1]:56789"),
        ("http://[::1]", "http://[::1]:80"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("http://[::]:11434", "http://[::1]:11434"),
        ("HTTPS://Example.COM:8443", "https://example.com:8443"),
        ("  localhost  ", "http://localhost:11434"),
        ("ollama.com", "https://ollama.com:443"),
    ],
)
def test_host_strings_normalise_like_ollamas_clients(host: str | None, expected: str) -> None:
    """Each host form maps to the base URL Ollama's Python client would use."""
    assert normalize_host(host) == expected


@pytest.mark.parametrize("host", ["ftp://example.com", "unix:///tmp/ollama.sock", "ws://x:1"])
def test_non_http_schemes_are_rejected_naming_the_url(host: str) -> None:
    """A URL that is not http or https raises ValidationError that names it."""
    with pytest.raises(ValidationError, match="only http:// and https://") as info:
        normalize_host(host)
    assert host in str(info.value)


@pytest.mark.parametrize("host", ["http://x:99999", "example.com:port", "x:-1"])
def test_bad_ports_are_rejected(host: str) -> None:
    """An invalid port raises ValidationError instead of silently picking another."""
    with pytest.raises(ValidationError, match="invalid port"):
        normalize_host(host)


def test_query_strings_are_rejected() -> None:
    """A base URL with a query cannot be joined with API paths, so it is refused."""
    with pytest.raises(ValidationError, match="query"):
        normalize_host("http://example.com:11434/?x=1")


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("http//127.0.0.1:11434", "Did you mean 'http://127.0.0.1:11434'?"),
        ("https//gpu-box", "Did you mean 'https://gpu-box'?"),
        ("http:/gpu-box:11434", "Did you mean 'http://gpu-box:11434'?"),
        ("", "is empty. Give one like http://127.0.0.1:11434"),
        ("   ", "is empty"),
        ("http://gpu box:11434", "contains spaces"),
        ("http://a:1 http://b:2", "separate several with commas"),
        ("http://", "has no host"),
        ("http://:11434", "has no host"),
        ("http://gpu!box", "has no valid host name ('gpu!box')"),
        ("http://[::1", "is not a valid URL"),
        ("http://127.0.0.1:11434/api", "(drop the /api suffix): 'http://127.0.0.1:11434'"),
        ("gpu-box:11434/api/", "(drop the /api suffix): 'http://gpu-box:11434'"),
        ("http://h:80/ollama/api/tags", "(drop the /api suffix): 'http://h:80/ollama'"),
    ],
)
def test_a_server_string_that_is_no_url_is_refused_with_the_fix(text: str, fix: str) -> None:
    """Explicit servers are never guessed at: the error names the string and the fix."""
    with pytest.raises(ValidationError) as info:
        server_url(text)
    assert repr(text) in str(info.value)
    assert fix in str(info.value)
    with pytest.raises(ValidationError):
        AsyncCortex([text])
    with pytest.raises(ValidationError):
        AsyncCortex([Server(text)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu-box", "http://gpu-box:11434"),
        (":8080", "http://127.0.0.1:8080"),
        ("http://[::1]:11434", "http://[::1]:11434"),
        ("https://models.example/ollama", "https://models.example:443/ollama"),
        ("http://a:1/apis", "http://a:1/apis"),
        ("http://a:1/v1", "http://a:1/v1"),
        ("host_name:1", "http://host_name:1"),
    ],
)
def test_valid_server_strings_normalise_as_hosts_do(text: str, expected: str) -> None:
    assert server_url(text) == expected


def test_an_empty_servers_string_is_refused_but_no_servers_is_the_default() -> None:
    with pytest.raises(ValidationError, match="servers='' names no server"):
        AsyncCortex("")
    assert AsyncCortex(None).candidates() == ["http://127.0.0.1:11434"]


def test_a_malformed_url_for_one_call_is_refused() -> None:
    with pytest.raises(ValidationError, match="scheme needs '://'"):
        AsyncCortex().candidates(server_url="http//gpu-box")
