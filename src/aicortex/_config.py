"""Client configuration: timeouts and settings read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._exceptions import ValidationError

__all__ = [
    "DEFAULT_HEALTH_TTL",
    "Timeout",
    "env_api_key",
    "env_host",
    "env_model",
    "env_servers",
    "split_servers",
]

DEFAULT_HEALTH_TTL = 60.0


@dataclass(frozen=True)
class Timeout:
    """How long aicortex waits, in seconds; ``None`` means no limit.

    * ``connect``: opening a TCP (and TLS) connection to a server.
    * ``first_token``: from sending a request until the first chunk arrives.
      It includes loading the model into memory, hence the generous default.
    * ``idle``: the longest gap between two chunks once the answer has started.
    * ``total``: an optional deadline for the whole call, failover included.
    * ``probe``: a health probe of one server (``GET /api/tags``).

    An expiry before the first token moves on to the next server; after it, the
    stream ends with an error. Pass a ``Timeout`` to the client to change the
    defaults, or to a single call to override them for that call::

        AsyncCortex(timeout=Timeout(first_token=600))
        await cortex.chat("hi", timeout=Timeout(total=30))
    """

    connect: float | None = 5.0
    first_token: float | None = 120.0
    idle: float | None = 60.0
    total: float | None = None
    probe: float = 2.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_token", "idle", "total", "probe"):
            value: object = getattr(self, name)
            if value is None and name != "probe":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValidationError(
                    f"Timeout.{name} must be a positive number of seconds"
                    f"{'' if name == 'probe' else ' or None'}, not {value!r}."
                )


def split_servers(value: str) -> list[str]:
    """Servers from a comma- (or semicolon-) separated string."""
    return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]


def env_servers() -> list[str]:
    """Servers from ``AICORTEX_SERVERS`` (comma-separated), or ``[]``."""
    return split_servers(os.environ.get("AICORTEX_SERVERS", ""))


def env_model() -> str | None:
    """The default model from ``AICORTEX_MODEL``, or ``None``."""
    return os.environ.get("AICORTEX_MODEL", "").strip() or None


def env_host() -> str | None:
    """``OLLAMA_HOST``, or ``None`` when unset or empty."""
    return os.environ.get("OLLAMA_HOST", "").strip() or None


def env_api_key() -> str | None:
    """``OLLAMA_API_KEY``, sent as a bearer token when set."""
    return os.environ.get("OLLAMA_API_KEY", "").strip() or None
