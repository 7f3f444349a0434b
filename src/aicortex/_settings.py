"""One configuration for the library, the command line and the proxy: a TOML file, the
environment and explicit arguments, merged and validated.

Precedence, highest first: explicit arguments, environment variables (``AICORTEX_*``),
the file, the defaults. The file is ``--config PATH`` (or ``path=``), else
``AICORTEX_CONFIG``, else ``./aicortex.toml``, else the user's config folder
(``~/.config/aicortex/config.toml`` on Linux); none at all is fine. Every value
remembers where it came from, so that an error names the file and the key (or the
variable), and ``aicortex config`` can show it.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticError

from ._config import Timeout, split_servers
from ._exceptions import ValidationError
from ._routing import Ejection, Server

__all__ = [
    "CONFIG_ENV",
    "ENVIRONMENT",
    "Resolved",
    "Settings",
    "config_path",
    "load_settings",
    "user_config_file",
]

CONFIG_ENV = "AICORTEX_CONFIG"
_LOCAL_FILE = "aicortex.toml"
_SECRET = "****"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerSettings(_Section):
    """``[[servers]]``: one server, as :class:`aicortex.Server` takes it."""

    url: str
    api: Literal["auto", "ollama", "openai"] = Field(
        default="auto", validation_alias=AliasChoices("api", "kind")
    )
    weight: float = Field(default=1.0, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    api_key_env: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    models: dict[str, str] = Field(default_factory=dict[str, str])

    def server(self) -> Server:
        """This entry as a :class:`Server` (the URL shorthands ``openai+http://`` work)."""
        url, api = self.url.strip(), self.api
        kind, plus, rest = url.partition("+")
        if plus and kind in ("ollama", "openai") and api == "auto":
            url, api = rest, kind
        return Server(
            url,
            weight=self.weight,
            max_concurrency=self.max_concurrency,
            api=api,
            api_key=self.api_key,
            api_key_env=self.api_key_env,
            models=dict(self.models) or None,
        )


class RoutingSettings(_Section):
    """``[routing]``."""

    strategy: Literal["priority", "least_busy", "round_robin"] = "priority"
    health_ttl: float = Field(default=60.0, ge=0)
    failures_to_eject: int = Field(default=3, ge=1)
    eject_first: float = Field(default=1.0, gt=0)
    eject_max: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _longest_after_first(self) -> RoutingSettings:
        if self.eject_max < self.eject_first:
            raise ValueError(
                f"eject_max ({self.eject_max:g}) must not be shorter than eject_first "
                f"({self.eject_first:g})"
            )
        return self

    def ejection(self) -> Ejection:
        """The ejection rules of these settings (an ``eject_max`` below ``eject_first``
        raises :class:`aicortex.ValidationError`)."""
        return Ejection(self.failures_to_eject, self.eject_first, self.eject_max)


class TimeoutSettings(_Section):
    """``[timeouts]``, in seconds (as :class:`aicortex.Timeout`; ``0`` is no limit)."""

    connect: float | None = Field(default=5.0, ge=0)
    first_token: float | None = Field(default=120.0, ge=0)
    idle: float | None = Field(default=60.0, ge=0)
    total: float | None = Field(default=None, ge=0)
    probe: float = Field(default=2.0, gt=0)

    def timeout(self) -> Timeout:
        def limit(value: float | None) -> float | None:
            return value or None

        return Timeout(
            connect=limit(self.connect),
            first_token=limit(self.first_token),
            idle=limit(self.idle),
            total=limit(self.total),
            probe=self.probe,
        )


class ProxySettings(_Section):
    """``[proxy]``: what ``aicortex serve`` and ``create_app()`` use."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys_file: str | None = None
    max_body_size: int = Field(default=10 * 1024 * 1024, ge=1)
    allow_management: bool = False
    workers: int = Field(default=1, ge=1)
    grace: float = Field(default=30.0, ge=0)
    allowed_origins: list[str] | None = None
    allowed_hosts: list[str] | None = None
    body_timeout: float | None = Field(default=None, gt=0)
    access_log: bool = True
    log_format: Literal["text", "json"] = "text"


class MetricsSettings(_Section):
    """``[metrics]``: Prometheus metrics at ``GET /metrics``."""

    enabled: bool = True
    open: bool = False  # served without an API key


class Settings(_Section):
    """The whole configuration, validated. Build it with :func:`load_settings`."""

    servers: list[ServerSettings] = Field(default_factory=list[ServerSettings])
    model: str | None = None
    http: Literal["auto", "httpx", "aiohttp"] = "auto"
    max_connections: int | None = Field(default=None, ge=1)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("servers", mode="before")
    @classmethod
    def _urls_alone(cls, value: object) -> object:
        """A server may be written as its URL alone."""
        if isinstance(value, list):
            return [{"url": v} if isinstance(v, str) else v for v in cast("list[object]", value)]
        return value

    def cortex_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :class:`AsyncCortex` these settings give."""
        return {
            "servers": [s.server() for s in self.servers] or None,
            "model": self.model,
            "routing": self.routing.strategy,
            "timeout": self.timeouts.timeout(),
            "health_ttl": self.routing.health_ttl,
            "ejection": self.routing.ejection(),
            "http": self.http,
            "max_connections": self.max_connections,
        }


def _words(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _optional_seconds(value: str) -> str | None:
    return None if value.strip().lower() in ("", "none", "off") else value.strip()


# Each setting that the environment can give: its key, its variable, and how the
# variable's text becomes the value (pydantic then checks it like the file's).
ENVIRONMENT: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("servers", "AICORTEX_SERVERS", split_servers),
    ("model", "AICORTEX_MODEL", str.strip),
    ("http", "AICORTEX_HTTP", lambda v: v.strip().lower()),
    ("max_connections", "AICORTEX_MAX_CONNECTIONS", str.strip),
    ("routing.strategy", "AICORTEX_ROUTING", str.strip),
    ("routing.health_ttl", "AICORTEX_HEALTH_TTL", str.strip),
    ("routing.failures_to_eject", "AICORTEX_FAILURES_TO_EJECT", str.strip),
    ("routing.eject_first", "AICORTEX_EJECT_FIRST", str.strip),
    ("routing.eject_max", "AICORTEX_EJECT_MAX", str.strip),
    ("timeouts.connect", "AICORTEX_CONNECT_TIMEOUT", _optional_seconds),
    ("timeouts.first_token", "AICORTEX_FIRST_TOKEN_TIMEOUT", _optional_seconds),
    ("timeouts.idle", "AICORTEX_IDLE_TIMEOUT", _optional_seconds),
    ("timeouts.total", "AICORTEX_TOTAL_TIMEOUT", _optional_seconds),
    ("timeouts.probe", "AICORTEX_PROBE_TIMEOUT", str.strip),
    ("proxy.host", "AICORTEX_HOST", str.strip),
    ("proxy.port", "AICORTEX_PORT", str.strip),
    ("proxy.api_keys_file", "AICORTEX_API_KEYS_FILE", str.strip),
    ("proxy.max_body_size", "AICORTEX_MAX_BODY_SIZE", str.strip),
    ("proxy.workers", "AICORTEX_WORKERS", str.strip),
    ("proxy.grace", "AICORTEX_GRACE", str.strip),
    ("proxy.allowed_origins", "AICORTEX_ALLOWED_ORIGINS", _words),
    ("proxy.allowed_hosts", "AICORTEX_ALLOWED_HOSTS", _words),
    ("proxy.body_timeout", "AICORTEX_BODY_TIMEOUT", str.strip),
    ("proxy.access_log", "AICORTEX_ACCESS_LOG", str.strip),
    ("proxy.log_format", "AICORTEX_LOG_FORMAT", lambda v: v.strip().lower()),
    ("metrics.enabled", "AICORTEX_METRICS", str.strip),
    ("metrics.open", "AICORTEX_METRICS_OPEN", str.strip),
)


def user_config_file() -> Path:
    """The user's configuration file: ``$XDG_CONFIG_HOME/aicortex/config.toml`` (else
    ``~/.config/...``) on Linux, ``~/Library/Application Support/aicortex/config.toml``
    on macOS, ``%APPDATA%\\aicortex\\config.toml`` on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "aicortex" / "config.toml"


def config_path(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[Path | None, str]:
    """The configuration file to read and why: ``path``, else ``AICORTEX_CONFIG``, else
    ``./aicortex.toml``, else the user's file; ``(None, ...)`` when there is none. A file
    named explicitly (argument or variable) must exist."""
    env = os.environ if env is None else env
    if path is not None:
        return _must_exist(Path(path), "the file given"), "--config"
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        return _must_exist(Path(named), CONFIG_ENV), CONFIG_ENV
    local = Path(_LOCAL_FILE)
    if local.is_file():
        return local, "the current folder"
    user = user_config_file()
    if user.is_file():
        return user, "the user's config folder"
    return None, "no file"


def _must_exist(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValidationError(
            f"The configuration file {os.fspath(path)!r} ({what}) does not exist; "
            "create it, or name another one."
        )
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the backport, on 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ValidationError(
            f"Cannot read the configuration file {os.fspath(path)!r}: {exc.strerror}."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(
            f"The configuration file {os.fspath(path)!r} is not valid TOML: {exc}."
        ) from None


@dataclass(frozen=True)
class Resolved:
    """Settings and where each came from: ``sources`` maps a key (``routing.strategy``,
    ``servers``) to ``"default"``, ``"file"``, the variable's name, or ``"argument"``."""

    settings: Settings
    file: Path | None
    sources: dict[str, str]

    def source(self, key: str) -> str:
        """Where the value at ``key`` (or the section that holds it) came from."""
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return "default"

    def rows(self) -> Iterator[tuple[str, object, str]]:
        """``(key, value, source)`` for every setting, secrets masked."""
        data = self.settings.model_dump(mode="json")
        for section, value in data.items():
            if section == "servers":
                for i, server in enumerate(cast("list[dict[str, Any]]", value)):
                    for name, item in server.items():
                        shown: object = item
                        if name == "api_key" and item is not None:
                            shown = _SECRET
                        elif name == "api_key_env" and item is not None:
                            state = "set" if os.environ.get(str(item)) else "not set"
                            shown = f"{item} ({state})"
                        yield f"servers[{i}].{name}", shown, self.source("servers")
            elif isinstance(value, dict):
                for name, item in cast("dict[str, object]", value).items():
                    key = f"{section}.{name}"
                    yield key, item, self.source(key)
            else:
                yield section, value, self.source(section)


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "models":
            yield from _leaves(cast("Mapping[str, Any]", value), path + ".")
        else:
            yield path


def _put(data: dict[str, Any], key: str, value: object) -> None:
    *sections, name = key.split(".")
    for section in sections:
        inner = data.get(section)
        if not isinstance(inner, dict):
            inner = data[section] = {}
        data = cast("dict[str, Any]", inner)
    data[name] = value


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Resolved:
    """Read the file, the environment and ``overrides`` (keys like ``"proxy.port"``,
    the highest precedence; ``labels`` names where each came from, such as a command's
    ``--port``), and validate the result.

    Raises :class:`aicortex.ValidationError` naming the file and key, or the variable,
    and what is wrong.
    """
    env = os.environ if env is None else env
    file, _ = config_path(path, env)
    data: dict[str, Any] = _read_toml(file) if file is not None else {}
    sources = dict.fromkeys(_leaves(data), "file")
    for key, name, parse in ENVIRONMENT:
        raw = env.get(name, "")
        if raw.strip():
            _put(data, key, parse(raw))
            sources[key] = name
    for key, value in (overrides or {}).items():
        if value is not None:
            _put(data, key, value)
            sources[key] = (labels or {}).get(key, "argument")
    try:
        settings = Settings.model_validate(data)
    except PydanticError as exc:
        raise ValidationError(_explain(exc, file, sources)) from None
    return Resolved(settings, file, sources)


def _explain(exc: PydanticError, file: Path | None, sources: Mapping[str, str]) -> str:
    """One line per problem: where the value came from, its key, and what is wrong."""
    lines: list[str] = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ""
        for part in loc:
            key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            section = _section_of(loc[:-1])
            close = difflib.get_close_matches(loc[-1], section, n=1)
            message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
            if section:
                message += f" (known here: {', '.join(section)})"
        origin = _origin_of(key, sources)
        if origin == "file" and file is not None:
            where = os.fspath(file)
        elif origin in ("default", "file"):
            where = "the configuration"
        elif origin == "argument":
            where = "an argument"
        elif origin.startswith("-"):
            where = f"the option {origin}"
        else:
            where = f"the environment variable {origin}"
        lines.append(f"{where}: {key}: {message}")
    return "Invalid configuration: " + "; ".join(lines) + "."


def _origin_of(key: str, sources: Mapping[str, str]) -> str:
    plain = key.split("[", 1)[0]
    inside = [source for name, source in sources.items() if name.startswith(plain + ".")]
    while plain:
        if plain in sources:
            return sources[plain]
        plain = plain.rpartition(".")[0]
    return inside[0] if inside else "default"  # a whole section, from where its keys are


def _section_of(loc: list[str]) -> list[str]:
    """The keys known at ``loc`` (a section path of the file)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = _model_in(annotation)
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


def _model_in(annotation: object) -> type[BaseModel] | None:
    args = cast("tuple[object, ...]", getattr(annotation, "__args__", ()))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in args:
        found = _model_in(arg)
        if found is not None:
            return found
    return None
