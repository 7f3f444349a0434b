"""Turning host strings into base URLs, the way Ollama's own clients do."""

from __future__ import annotations

import urllib.parse

from ._exceptions import ValidationError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_local_default", "normalize_host"]

DEFAULT_PORT = 11434
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"

# Addresses a server binds to but a client cannot connect to everywhere.
_BIND_ALL = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def normalize_host(host: str | None) -> str:
    """Return the base URL for an Ollama host string.

    * empty or ``None`` → ``http://127.0.0.1:11434``
    * no scheme → ``http`` and port 11434 (``example.com`` → ``http://example.com:11434``,
      ``:8080`` → ``http://127.0.0.1:8080``)
    * ``http://`` without a port → port 80; ``https://`` without a port → 443
    * a path is kept, without its trailing ``/``
    * the bind-all addresses ``0.0.0.0`` and ``::`` become loopback
    * bare ``ollama.com`` → ``https://ollama.com:443``

    Raises :class:`ValidationError` for a scheme other than http/https or a bad port.
    """
    text = (host or "").strip()
    if not text:
        return DEFAULT_HOST
    if text == "ollama.com":
        return "https://ollama.com:443"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest, port = "http", text, DEFAULT_PORT
    else:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValidationError(
                f"Server URL {host!r} uses the scheme {scheme!r}; "
                "only http:// and https:// servers are supported."
            )
        port = 80 if scheme == "http" else 443
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    try:
        explicit_port = parts.port
    except ValueError:
        raise ValidationError(
            f"Server URL {host!r} has an invalid port; use a number from 1 to 65535."
        ) from None
    hostname = parts.hostname or "127.0.0.1"
    hostname = _BIND_ALL.get(hostname, hostname)
    if ":" in hostname:
        hostname = f"[{hostname}]"
    path = parts.path.rstrip("/")
    if parts.query or parts.fragment:
        raise ValidationError(
            f"Server URL {host!r} has a query or fragment; give only scheme, host, port and path."
        )
    return f"{scheme}://{hostname}:{explicit_port or port}{path}"


_LOOPBACK_DEFAULTS = frozenset(
    f"http://{host}:{DEFAULT_PORT}" for host in ("localhost", "127.0.0.1", "[::1]")
)


def is_local_default(url: str) -> bool:
    """Whether a normalised URL is the stock local Ollama (loopback, port 11434)."""
    return url in _LOOPBACK_DEFAULTS
