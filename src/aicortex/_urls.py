"""Turning host strings into base URLs, the way Ollama's own clients do."""

from __future__ import annotations

import re
import urllib.parse

from ._exceptions import ValidationError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_local_default", "normalize_host", "server_url"]

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


# "http//host", "http:/host", "http:host": a scheme whose "://" is damaged.
_BROKEN_SCHEME = re.compile(r"(?i)^(https?)(?::/?(?!/)|//)(?P<rest>.*)$")
# A host name or an IPv4 address: letters, digits, dots, hyphens and underscores.
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
# An Ollama API path at the end of the URL: /api, /api/, /api/tags, ...
_API_SUFFIX = re.compile(r"/api(/.*)?$")


def server_url(text: str) -> str:
    """The base URL of a server named explicitly (``servers=``, ``--server``).

    Like :func:`normalize_host`, but an empty string is not "the default", and a
    string that cannot be a server's URL is refused instead of guessed at: a damaged
    ``://`` (``http//host``), spaces, no host or a host name with other characters,
    and a path ending in ``/api`` (a base URL is the server's root). Each
    :class:`ValidationError` names the string and the likely fix.
    """
    stripped = text.strip()
    if not stripped:
        raise ValidationError(
            f"Server URL {text!r} is empty. Give one like http://127.0.0.1:11434, or leave "
            "the server out to use OLLAMA_HOST or the local default."
        )
    if any(char.isspace() for char in stripped):
        raise ValidationError(
            f"Server URL {text!r} contains spaces. Give one URL per server, like "
            "http://127.0.0.1:11434; separate several with commas."
        )
    broken = _BROKEN_SCHEME.match(stripped)
    if broken and "://" not in stripped:
        fixed = f"{broken.group(1).lower()}://{broken.group('rest').lstrip('/')}"
        raise ValidationError(
            f"Server URL {text!r} is not a valid URL: the scheme needs '://'. "
            f"Did you mean {fixed!r}?"
        )
    try:
        given = urllib.parse.urlsplit(stripped if "://" in stripped else f"http://{stripped}")
        url = normalize_host(stripped)
    except ValueError as exc:  # urllib: "Invalid IPv6 URL" and the like
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(
            f"Server URL {text!r} is not a valid URL ({exc}). Give one like http://127.0.0.1:11434."
        ) from None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if "://" in stripped and not given.hostname:
        raise ValidationError(
            f"Server URL {text!r} has no host. Give one like http://127.0.0.1:11434."
        )
    if not (_HOSTNAME.match(host) or ":" in host):  # ":": an IPv6 address
        raise ValidationError(
            f"Server URL {text!r} has no valid host name ({host!r}). Give one like "
            "http://127.0.0.1:11434 or http://gpu-box:11434."
        )
    if _API_SUFFIX.search(parts.path):
        root = url[: len(url) - len(parts.path)] + _API_SUFFIX.sub("", parts.path)
        raise ValidationError(
            f"Server URL {text!r} ends in an API path; give the server's base URL "
            f"(drop the /api suffix): {root!r}."
        )
    return url


_LOOPBACK_DEFAULTS = frozenset(
    f"http://{host}:{DEFAULT_PORT}" for host in ("localhost", "127.0.0.1", "[::1]")
)


def is_local_default(url: str) -> bool:
    """Whether a normalised URL is the stock local Ollama (loopback, port 11434)."""
    return url in _LOOPBACK_DEFAULTS
