"""What a probe of a server found."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ._mapping import RecordMapping
from ._protocol import model_key

__all__ = ["Health", "ServerInfo", "unique"]


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

    @property
    def keys(self) -> frozenset[str]:
        """The listed models, as :func:`model_key` compares them."""
        return self._keys

    def has_model(self, model: str) -> bool:
        """Whether the server listed ``model`` (names compared the way Ollama does)."""
        return model_key(model) in self._keys


@dataclass(frozen=True, slots=True)
class ServerInfo(RecordMapping):
    """A live view of one server, as :meth:`AsyncCortex.server_info` reports it.

    ``latency`` is the probe's round trip in seconds; ``has_model`` says whether
    the server lists ``model`` (``None`` when no model was asked about or the
    server is down). Also a read-only mapping: ``info["up"]``, ``dict(info)``.
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


def unique(urls: Iterable[str]) -> list[str]:
    """``urls`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(urls))
