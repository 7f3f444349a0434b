"""Server health: what a probe found, how long it stays true, and which server to try first.

Everything here is pure (time is passed in), so the rules are tested without a network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ._exceptions import Attempt
from ._protocol import model_key

NOT_PROBED = "not probed"

__all__ = ["NOT_PROBED", "Health", "HealthCache", "Plan", "ServerInfo", "plan_attempts", "unique"]


@dataclass(frozen=True, slots=True)
class Health:
    """What aicortex knows about one server at ``checked_at`` (monotonic seconds)."""

    url: str
    up: bool
    checked_at: float
    latency: float | None = None
    version: str | None = None
    models: tuple[str, ...] = ()
    error: str | None = None
    _keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def ok(
        cls,
        url: str,
        *,
        checked_at: float,
        latency: float,
        version: str | None,
        models: Iterable[str],
    ) -> Health:
        names = tuple(models)
        return cls(
            url,
            True,
            checked_at,
            latency=latency,
            version=version,
            models=names,
            _keys=frozenset(model_key(n) for n in names),
        )

    @classmethod
    def down(cls, url: str, reason: str, *, checked_at: float) -> Health:
        return cls(url, False, checked_at, error=reason)

    def has_model(self, model: str) -> bool:
        """Whether the server listed ``model`` (names compared the way Ollama does)."""
        return model_key(model) in self._keys


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A live view of one server, as :meth:`AsyncCortex.server_info` reports it.

    ``latency`` is the probe's round trip in seconds; ``has_model`` says whether
    the server lists ``model`` (``None`` when no model was asked about or the
    server is down).
    """

    url: str
    up: bool
    latency: float | None
    version: str | None
    models: tuple[str, ...]
    error: str | None = None
    model: str | None = None
    has_model: bool | None = None

    @classmethod
    def from_health(cls, health: Health, model: str | None = None) -> ServerInfo:
        return cls(
            url=health.url,
            up=health.up,
            latency=health.latency,
            version=health.version,
            models=health.models,
            error=health.error,
            model=model,
            has_model=health.has_model(model) if (model and health.up) else None,
        )


class HealthCache:
    """Probe results per server, each trusted for ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, Health] = {}

    def get(self, url: str, now: float) -> Health | None:
        """The entry for ``url`` if it is younger than the TTL."""
        entry = self._entries.get(url)
        if entry is None or now - entry.checked_at >= self.ttl:
            return None
        return entry

    def latest(self, url: str) -> Health | None:
        """The newest entry for ``url``, however old."""
        return self._entries.get(url)

    def put(self, health: Health) -> None:
        self._entries[health.url] = health

    def mark_down(self, url: str, reason: str, now: float) -> None:
        """Record that a real request to ``url`` just failed."""
        self._entries[url] = Health.down(url, reason, checked_at=now)

    def stale(self, urls: Iterable[str], now: float) -> list[str]:
        """The servers among ``urls`` that need a probe."""
        return [u for u in urls if self.get(u, now) is None]

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, url: object) -> bool:
        return url in self._entries


def unique(urls: Iterable[str]) -> list[str]:
    """``urls`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(urls))


@dataclass(frozen=True)
class Plan:
    """Servers to try, best first, and the ones skipped with the reason."""

    order: list[str]
    skipped: list[Attempt]


def plan_attempts(
    candidates: Sequence[str], health: Mapping[str, Health], model: str | None
) -> Plan:
    """Order ``candidates`` for a request for ``model``.

    Healthy servers that list the model come first, then healthy servers that do
    not (their list may be stale, or they serve the model under another name);
    each group keeps the caller's preference order. Servers that are down, or
    whose probe never finished, are skipped with their reason.
    """
    with_model: list[str] = []
    without_model: list[str] = []
    skipped: list[Attempt] = []
    for url in candidates:
        entry = health.get(url)
        if entry is None:
            skipped.append(Attempt(url, NOT_PROBED))
        elif not entry.up:
            skipped.append(Attempt(url, entry.error or "down"))
        elif model is None or entry.has_model(model):
            with_model.append(url)
        else:
            without_model.append(url)
    return Plan(with_model + without_model, skipped)


def decided(candidates: Sequence[str], health: Mapping[str, Health], model: str | None) -> bool:
    """Whether probing more servers could no longer change the first choice.

    True once a server that is up and lists the model has every server before it
    (in preference order) already settled.
    """
    for url in candidates:
        entry = health.get(url)
        if entry is None:
            return False
        if entry.up and (model is None or entry.has_model(model)):
            return True
    return False
