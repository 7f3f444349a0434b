"""Host strings become base URLs the way Ollama's own clients build them."""

from __future__ import annotations

import pytest

from aicortex import ValidationError
from aicortex._urls import normalize_host


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
