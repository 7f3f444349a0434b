"""What a web page may do with the proxy: which origins are served (CORS), and which
``Host`` names a loopback listener answers to (DNS rebinding).

A page on another site can send requests to any address its browser reaches,
``http://127.0.0.1:8000`` included; the browser adds an ``Origin`` header to them.
The proxy serves such a request only when the origin is allowed, as Ollama does:
localhost pages and desktop-app webviews by default, plus any origin configured.
A page can also have its own name resolve to 127.0.0.1 (DNS rebinding): its requests
then carry no foreign ``Origin``, but a ``Host`` that names the attacker's site, so a
connection that arrived on a loopback address must name a loopback host.

Pure decisions, no I/O: :class:`~aicortex.server._gateway.Gateway` asks them and answers.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable

from ._errors import ProxyError

__all__ = [
    "ALLOW_METHODS",
    "DEFAULT_ORIGINS",
    "ENV_HOSTS",
    "ENV_ORIGINS",
    "EXPOSE_HEADERS",
    "MAX_AGE",
    "HostPolicy",
    "OriginPolicy",
    "cors_headers",
    "host_refused",
    "is_loopback_address",
    "is_loopback_host",
    "load_hosts",
    "load_origins",
    "origin_refused",
    "preflight_headers",
]

ENV_ORIGINS = "AICORTEX_ALLOWED_ORIGINS"
ENV_HOSTS = "AICORTEX_ALLOWED_HOSTS"

DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
"""The origins served without configuration: localhost pages on any port, and the
webviews of desktop apps and editors (Ollama's defaults, with ``[::1]``)."""

ALLOW_METHODS = b"GET, POST, DELETE, HEAD, OPTIONS"
_DEFAULT_ALLOW_HEADERS = b"Authorization, Content-Type, X-Request-Id, X-Aicortex-Affinity"
EXPOSE_HEADERS = b"X-Request-Id, X-Aicortex-Server"
MAX_AGE = b"600"  # seconds a browser may reuse a preflight's answer

# A serialised origin: scheme://host[:port], no path, no user; the host a name or [IPv6].
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://(?:[a-z0-9\-._~%]*|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
# What a configured origin may be: the same, with * anywhere in the host or the port.
_ORIGIN_ENTRY = re.compile(
    r"[a-z][a-z0-9+.\-]*://(?:[a-z0-9\-._~%*]*|\[[0-9a-f:.]+\])(?::(?:[0-9]{1,5}|\*))?"
)
# A Host header, or a configured host: a name or IPv4 address, or [IPv6]; a port or none.
_HOST = re.compile(r"(?P<name>[a-z0-9\-._~%*]+|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}|\*))?")
# The headers a page may ask to send (a comma-separated list of tokens), echoed back.
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~\-]+"
_HEADER_LIST = re.compile(rf"{_TOKEN}(?:[ \t]*,[ \t]*{_TOKEN})*")
_CACHE_SIZE = 256


def _wildcard(pattern: str) -> re.Pattern[str]:
    """``pattern`` as a regular expression in which ``*`` matches any run of characters."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _entries(values: Iterable[str] | str, what: str, argument: str) -> list[str]:
    if isinstance(values, str):
        raise ValueError(
            f"{argument} must be a list of {what}s, not one string; write [{values!r}]."
        )
    entries: list[str] = []
    for value in values:
        if not isinstance(value, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"{argument} must hold strings, not {value!r}.")
        entry = value.strip().lower()
        if not entry:
            raise ValueError(f"{argument} must not contain an empty {what}.")
        entries.append(entry)
    return entries


def load_origins(allowed_origins: Iterable[str] | None = None) -> list[str]:
    """The origins configured beyond :data:`DEFAULT_ORIGINS`: ``allowed_origins``, else
    ``AICORTEX_ALLOWED_ORIGINS`` (comma-separated); each checked, lower-cased.

    An entry is an exact origin (``https://app.example.com``), a pattern with ``*`` as a
    wildcard (``https://*.example.com``, ``http://localhost:*``), ``null`` (the origin of
    sandboxed and ``file:`` pages), or ``*`` for every origin.
    """
    if allowed_origins is None:
        raw = os.environ.get(ENV_ORIGINS, "")
        argument = ENV_ORIGINS
        values: Iterable[str] = [v for v in raw.split(",") if v.strip()]
    else:
        argument, values = "allowed_origins", allowed_origins
    entries = _entries(values, "origin", argument)
    for entry in entries:
        if entry in ("*", "null") or _ORIGIN_ENTRY.fullmatch(entry):
            continue
        if "/" in entry.partition("://")[2]:
            problem = "has a path; an origin is only scheme://host[:port]"
        else:
            problem = "is not an origin (scheme://host[:port], e.g. 'https://app.example.com')"
        raise ValueError(f"{argument}: {entry!r} {problem}.")
    return entries


def load_hosts(allowed_hosts: Iterable[str] | None = None) -> list[str]:
    """The ``Host`` names a loopback listener answers to beyond the loopback ones:
    ``allowed_hosts``, else ``AICORTEX_ALLOWED_HOSTS`` (comma-separated); each checked,
    lower-cased.

    An entry is a host name or address (``proxy.internal``, ``192.168.1.5``,
    ``[fd00::1]``) that matches on any port, or with ``:PORT`` on that port only; ``*``
    is a wildcard (``*.example.com``), and ``*`` alone turns the check off.
    """
    if allowed_hosts is None:
        raw = os.environ.get(ENV_HOSTS, "")
        argument = ENV_HOSTS
        values: Iterable[str] = [v for v in raw.split(",") if v.strip()]
    else:
        argument, values = "allowed_hosts", allowed_hosts
    entries = _entries(values, "host", argument)
    for entry in entries:
        if not _HOST.fullmatch(entry):
            raise ValueError(
                f"{argument}: {entry!r} is not a host name; give the name a client puts in "
                "its Host header, with or without a port (e.g. 'proxy.internal' or "
                "'proxy.internal:8000'), not a URL."
            )
    return entries


class OriginPolicy:
    """Which ``Origin`` values are served: :data:`DEFAULT_ORIGINS` plus ``extra``
    (entries as :func:`load_origins` returns them)."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        entries = [*DEFAULT_ORIGINS, *(e.lower() for e in extra)]
        self.allow_all = "*" in entries
        self._exact = frozenset(e for e in entries if "*" not in e)
        self._patterns = [_wildcard(e) for e in entries if "*" in e and e != "*"]

    def allows(self, origin: str) -> bool:
        """Whether a request with ``Origin: origin`` is served. Case does not matter;
        ``null`` is served only when configured."""
        if self.allow_all:
            return True
        origin = origin.strip().lower()
        if origin in self._exact:
            return True
        if not _ORIGIN.fullmatch(origin):  # patterns apply to well-formed origins only
            return False
        return any(p.fullmatch(origin) for p in self._patterns)


def cors_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    """The CORS headers of an answer to a request from the allowed ``origin``."""
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-expose-headers", EXPOSE_HEADERS),
        (b"vary", b"Origin"),
    ]


def preflight_headers(
    origin: bytes, requested_headers: bytes | None, private_network: bool = False
) -> list[tuple[bytes, bytes]]:
    """The headers of the 204 answer to a preflight (``OPTIONS`` with
    ``Access-Control-Request-Method``) from the allowed ``origin``.

    The headers the page asked for (``Access-Control-Request-Headers``) are allowed as
    asked; without a well-formed list, the ones the proxy reads. ``private_network``
    (``Access-Control-Request-Private-Network: true``, from a public page to a local
    address) is allowed too: the origin was allowed on purpose.
    """
    asked = requested_headers.strip() if requested_headers else b""
    allowed = (
        asked
        if asked and len(asked) <= 2048 and _HEADER_LIST.fullmatch(asked.decode("latin-1"))
        else _DEFAULT_ALLOW_HEADERS
    )
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", ALLOW_METHODS),
        (b"access-control-allow-headers", allowed),
        (b"access-control-max-age", MAX_AGE),
        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        (b"content-length", b"0"),
    ]
    if private_network:
        headers.append((b"access-control-allow-private-network", b"true"))
    return headers


def is_loopback_address(address: str) -> bool:
    """Whether a listening address (ASGI ``scope["server"][0]``) is a loopback one."""
    if address.startswith("127.") or address in ("::1", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _split_host(host: str) -> tuple[str, str | None] | None:
    """``(name, port)`` of a Host header or a configured host (lower-cased, a trailing
    dot dropped), or None when it is not one."""
    match = _HOST.fullmatch(host.strip().lower())
    if match is None:
        return None
    name = match["name"]
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    return name, match["port"]


def is_loopback_host(name: str) -> bool:
    """Whether a host name (without its port) names this machine's loopback interface:
    ``localhost``, ``*.localhost``, ``127.x.x.x``, ``[::1]``, and ``0.0.0.0`` (which
    reaches the local listeners)."""
    if name == "localhost" or name.endswith(".localhost") or name == "0.0.0.0":
        return True
    if name.startswith("["):
        try:
            return ipaddress.IPv6Address(name[1:-1]).is_loopback
        except ValueError:
            return False
    if name.startswith("127."):
        try:
            return ipaddress.IPv4Address(name).is_loopback
        except ValueError:
            return False
    return False


class HostPolicy:
    """Which ``Host`` headers a connection that arrived on a loopback address may carry:
    loopback names (see :func:`is_loopback_host`), on any port, plus ``extra`` (entries
    as :func:`load_hosts` returns them). ``*`` in ``extra`` turns the check off."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        entries = [e.lower() for e in extra]
        self.allow_all = "*" in entries
        self._entries: list[tuple[re.Pattern[str], str | None]] = []
        for entry in entries:
            parts = _split_host(entry)
            if parts is not None and entry != "*":
                name, port = parts
                self._entries.append((_wildcard(name), None if port == "*" else port))
        self._seen: dict[bytes, bool] = {}
        self._listeners: dict[str, bool] = {}

    def guards(self, server: tuple[str, int | None] | None) -> bool:
        """Whether requests arriving on ``server`` (ASGI ``scope["server"]``) have their
        ``Host`` checked: only on a loopback address, and unless the check is off."""
        if self.allow_all or server is None:
            return False
        address = server[0]
        known = self._listeners.get(address)
        if known is None:
            known = is_loopback_address(address)
            if len(self._listeners) < _CACHE_SIZE:
                self._listeners[address] = known
        return known

    def allows(self, host: bytes) -> bool:
        """Whether ``Host: host`` is answered on a loopback listener."""
        known = self._seen.get(host)
        if known is not None:
            return known
        allowed = self._decide(host.decode("latin-1"))
        if len(self._seen) < _CACHE_SIZE:
            self._seen[host] = allowed
        return allowed

    def _decide(self, host: str) -> bool:
        if self.allow_all:
            return True
        parts = _split_host(host)
        if parts is None:
            return False
        name, port = parts
        if is_loopback_host(name):
            return True
        return any(
            pattern.fullmatch(name) and (wanted is None or wanted == port)
            for pattern, wanted in self._entries
        )


_HOW_ORIGINS = (
    "create_app(allowed_origins=[...]), AICORTEX_ALLOWED_ORIGINS or "
    "aicortex serve --allowed-origin ORIGIN"
)
_HOW_HOSTS = (
    "create_app(allowed_hosts=[...]), AICORTEX_ALLOWED_HOSTS or aicortex serve --allowed-host HOST"
)


def _shown(value: str) -> str:
    """``value`` quoted for a message, cut short if it is long."""
    return repr(value if len(value) <= 200 else value[:200] + "...")


def origin_refused(origin: str) -> ProxyError:
    """The 403 for a request from an origin that is not allowed."""
    return ProxyError(
        403,
        f"Requests from the origin {_shown(origin)} are not allowed (a web page on that site "
        f"sent this request). To let that site use the proxy, allow its origin with "
        f"{_HOW_ORIGINS}.",
        code="origin_not_allowed",
    )


def host_refused(host: str) -> ProxyError:
    """The 403 for a request on a loopback listener whose Host is not a loopback name."""
    return ProxyError(
        403,
        f"The Host {_shown(host)} is not allowed on this loopback address (a web page may be "
        "trying to reach the proxy through its own domain name). Use localhost or "
        f"127.0.0.1, or, if that name is yours, allow it with {_HOW_HOSTS}.",
        code="host_not_allowed",
    )
