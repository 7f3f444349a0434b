"""The offline model catalog: ``metadata/*.json``, one file per model family.

The files ship in the wheel as ``aicortex/metadata/`` and are read once, on
first use, never at import time. A file that is not valid JSON or does not
match the schema is logged on the ``aicortex`` logger and skipped, so one bad
file never breaks the library::

    catalog = Catalog()                     # nothing read yet
    catalog.families()                      # ['deepseek', 'gemma', 'llama', ...]
    catalog.model_info("llama3.2:3b").context_length
    catalog.random_llm_params("llama3.2:3b", seed=7)

Set ``AICORTEX_METADATA_DIR`` to read another directory instead.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import logging
import os
import random
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic_core import SchemaValidator
from pydantic_core import ValidationError as SchemaError

from ._exceptions import ModelNotFoundError, ValidationError
from ._mapping import RecordMapping

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:
    from importlib.abc import Traversable

__all__ = [
    "Catalog",
    "FamilyFile",
    "ModelInfo",
    "ParamRange",
    "ServerEntry",
    "default_catalog",
    "metadata_dir",
]

logger = logging.getLogger("aicortex")

METADATA_ENV = "AICORTEX_METADATA_DIR"

_LATEST = ":latest"
_CUTOFF = 0.6  # difflib.get_close_matches' default


# --------------------------------------------------------------------------- schema
#
# The records are plain frozen dataclasses; pydantic-core (pydantic's validation
# engine) checks the JSON against a schema compiled once. That keeps loading the
# catalog cheap: the offline command line never pays for building pydantic models.

ServerStatus = Literal["up", "down", "unknown"]


@dataclass(frozen=True)
class ServerEntry(RecordMapping):
    """A server known to host a model; ``status`` is the last known state, not live.

    Also a read-only mapping: ``entry["url"]``, ``dict(entry)``.
    """

    url: str
    status: ServerStatus = "unknown"


@dataclass(frozen=True)
class ParamRange:
    """A generation parameter's default and allowed range.

    An ``int`` default marks an integer parameter (``top_k``, ``num_ctx``); then
    ``min`` and ``max`` must be integers too.
    """

    default: int | float
    min: int | float
    max: int | float

    def __post_init__(self) -> None:
        low, default, high = self.min, self.default, self.max
        if not low <= default <= high:
            raise ValueError(
                f"min <= default <= max does not hold (min={low}, default={default}, max={high})"
            )
        if isinstance(default, int) and not (isinstance(low, int) and isinstance(high, int)):
            raise ValueError(
                f"default {default} is an integer, so min ({low}) and max ({high}) must be "
                "integers too"
            )

    @property
    def is_int(self) -> bool:
        """True for an integer parameter."""
        return isinstance(self.default, int)

    @classmethod
    def from_dict(cls, data: object) -> ParamRange:
        """Validate ``data`` (decoded JSON); raises ``pydantic_core.ValidationError``."""
        return _validator("range").validate_python(data)

    def to_dict(self) -> dict[str, Any]:
        """The range as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo(RecordMapping):
    """Everything the catalog knows about one model tag, e.g. ``llama3.2:3b``.

    Also a read-only mapping of the catalog file's layout: ``info["family"]``,
    ``info.get("tags", [])``, ``"servers" in info``, ``dict(info)`` (its
    ``"servers"`` are dicts there, so ``json.dumps(dict(info))`` works).
    """

    name: str
    family: str
    size: str
    parameters: str
    quantization: str
    context_length: int
    description: str
    tags: list[str]
    servers: list[ServerEntry]
    generation: dict[str, ParamRange] = field(default_factory=dict[str, ParamRange])
    default: bool = False

    def __post_init__(self) -> None:
        num_ctx = self.generation.get("num_ctx")
        if num_ctx is not None and num_ctx.max > self.context_length:
            raise ValueError(
                f"generation.num_ctx.max ({num_ctx.max}) exceeds "
                f"context_length ({self.context_length})"
            )

    @classmethod
    def from_dict(cls, data: object) -> ModelInfo:
        """Validate ``data`` (decoded JSON); raises ``pydantic_core.ValidationError``."""
        return _validator("model").validate_python(data)


@dataclass(frozen=True)
class FamilyFile:
    """One ``metadata/<family>.json`` file."""

    family: str
    models: list[ModelInfo]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for model in self.models:
            if model.family != self.family:
                raise ValueError(
                    f"model {model.name!r} has family {model.family!r}, "
                    f"but the file is for family {self.family!r}"
                )
            if model.name in seen:
                raise ValueError(f"model {model.name!r} is listed twice")
            seen.add(model.name)

    @classmethod
    def from_dict(cls, data: object) -> FamilyFile:
        """Validate ``data`` (decoded JSON); raises ``pydantic_core.ValidationError``."""
        return _validator("family").validate_python(data)

    def to_dict(self) -> dict[str, Any]:
        """The file's content as JSON-ready data."""
        return asdict(self)


def _record(cls: type[Any], fields: dict[str, dict[str, Any]], **defaults: Any) -> dict[str, Any]:
    """A schema for ``cls(**data)`` from an object with exactly ``fields`` (``defaults``: optional).

    A ``ValueError`` from the class's checks becomes a validation error at the object's place.
    """
    out: dict[str, Any] = {}
    for name, schema in fields.items():
        if name in defaults:
            default = defaults[name]
            key = "default_factory" if callable(default) else "default"
            schema = {"type": "default", "schema": schema, key: default}
        out[name] = {"type": "typed-dict-field", "schema": schema, "required": name not in defaults}

    def build(data: dict[str, Any]) -> object:
        return cls(**data)

    return {
        "type": "function-after",
        "function": {"type": "no-info", "function": build},
        "schema": {"type": "typed-dict", "fields": out, "extra_behavior": "forbid"},
    }


def _schemas() -> dict[str, dict[str, Any]]:
    text = {"type": "str"}
    name = {"type": "str", "min_length": 1}
    number = {
        "type": "union",
        "choices": [{"type": "int", "strict": True}, {"type": "float", "strict": True}],
    }
    server = _record(
        ServerEntry,
        {"url": text, "status": {"type": "literal", "expected": ["up", "down", "unknown"]}},
        status="unknown",
    )
    param_range = _record(ParamRange, {"default": number, "min": number, "max": number})
    model = _record(
        ModelInfo,
        {
            "name": name,
            "family": name,
            "size": text,
            "parameters": text,
            "quantization": text,
            "context_length": {"type": "int", "gt": 0},
            "description": text,
            "tags": {"type": "list", "items_schema": text},
            "servers": {"type": "list", "items_schema": server},
            "generation": {"type": "dict", "keys_schema": text, "values_schema": param_range},
            "default": {"type": "bool"},
        },
        generation=dict,
        default=False,
    )
    family = _record(
        FamilyFile, {"family": name, "models": {"type": "list", "items_schema": model}}
    )
    return {"range": param_range, "model": model, "family": family}


@functools.cache
def _validator(kind: str) -> SchemaValidator:
    """The compiled validator for ``kind`` (``range``, ``model`` or ``family``), built once."""
    return SchemaValidator(_schemas()[kind])  # pyright: ignore[reportArgumentType]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Data:
    """The loaded catalog; never changed after :func:`_merge` builds it."""

    families: dict[str, list[ModelInfo]] = field(default_factory=dict[str, list[ModelInfo]])
    by_name: dict[str, ModelInfo] = field(default_factory=dict[str, ModelInfo])
    by_lower: dict[str, ModelInfo] = field(default_factory=dict[str, ModelInfo])
    errors: list[str] = field(default_factory=list[str])


def _describe(exc: SchemaError) -> str:
    """One line per problem: ``models[0].context_length: Input should be ...``."""
    parts: list[str] = []
    for error in exc.errors():
        where = ""
        for item in error["loc"]:
            if isinstance(item, int):
                where += f"[{item}]"
            else:
                where += f".{item}" if where else item
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _parse(text: str) -> FamilyFile:
    """Parse one family file; raises ``ValueError`` with a readable message."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    try:
        return FamilyFile.from_dict(raw)
    except SchemaError as exc:
        raise ValueError(f"does not match the schema ({_describe(exc)})") from None


def _merge(files: Sequence[tuple[str, FamilyFile]], errors: list[str]) -> _Data:
    """Merge parsed files (in order) into one catalog; duplicates keep the first."""
    data = _Data(errors=errors)
    default: ModelInfo | None = None
    for source, family_file in files:
        models = data.families.setdefault(family_file.family, [])
        for model in family_file.models:
            first = data.by_name.get(model.name)
            if first is not None:
                _fail(
                    errors,
                    f"{source}: model {model.name!r} is already in family "
                    f"{first.family!r}; keeping that one",
                )
                continue
            kept = model
            if model.default and default is not None:
                _fail(
                    errors,
                    f"{source}: model {model.name!r} is flagged default, but "
                    f"{default.name!r} already is; keeping {default.name!r}",
                )
                kept = replace(model, default=False)
            elif model.default:
                default = model
            models.append(kept)
            data.by_name[kept.name] = kept
            data.by_lower.setdefault(kept.name.lower(), kept)
    return data


def _fail(errors: list[str], message: str) -> None:
    errors.append(message)
    logger.error("Model catalog: %s", message)


def _load(directory: Traversable) -> _Data:
    """Read every ``*.json`` file in ``directory`` (sorted by name); never raises."""
    errors: list[str] = []
    try:
        entries = sorted(
            (e for e in directory.iterdir() if e.name.endswith(".json") and e.is_file()),
            key=lambda e: e.name,
        )
    except OSError as exc:
        _fail(
            errors,
            f"cannot read the metadata directory {directory} ({exc}); "
            f"set {METADATA_ENV} to a directory of <family>.json files",
        )
        return _Data(errors=errors)
    files: list[tuple[str, FamilyFile]] = []
    for entry in entries:
        try:
            text = entry.read_text(encoding="utf-8")
            files.append((str(entry), _parse(text)))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            _fail(errors, f"skipping {entry}: {exc}")
    return _merge(files, errors)


# --------------------------------------------------------------------------- catalog


class Catalog:
    """The model catalog of one metadata directory, loaded lazily and once.

    ``directory`` is a path or an ``importlib.resources`` traversable; ``None``
    means :func:`metadata_dir`. Safe to share between threads.
    """

    def __init__(self, directory: str | os.PathLike[str] | Traversable | None = None) -> None:
        if isinstance(directory, (str, os.PathLike)):
            directory = Path(directory)
        self._directory: Traversable | None = directory
        self._data: _Data | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = self._directory if self._directory is not None else "default"
        state = "loaded" if self._data is not None else "not loaded"
        return f"<Catalog {where} ({state})>"

    def _loaded(self) -> _Data:
        data = self._data
        if data is None:
            with self._lock:
                data = self._data
                if data is None:
                    if self._directory is None:
                        self._directory = metadata_dir()
                    data = self._data = _load(self._directory)
        return data

    @property
    def errors(self) -> list[str]:
        """Problems met while loading (files skipped, duplicate models), in order."""
        return list(self._loaded().errors)

    def families(self) -> list[str]:
        """The family names, sorted."""
        return sorted(self._loaded().families)

    def models(self, family: str | None = None) -> list[str]:
        """Model names, of one family or of all (families sorted, models in file order).

        Raises :class:`ValidationError` for an unknown family.
        """
        data = self._loaded()
        if family is None:
            return [m.name for f in sorted(data.families) for m in data.families[f]]
        models = data.families.get(family)
        if models is None:
            known = ", ".join(sorted(data.families)) or "none"
            raise ValidationError(f"Unknown model family {family!r}. Known families: {known}.")
        return [m.name for m in models]

    def find(self, name: str) -> ModelInfo | None:
        """Look a model up leniently, or return ``None``.

        Tries the name as given, then case-insensitively, then with ``:latest``
        added (when it has no tag) or a trailing ``:latest`` removed.
        """
        data = self._loaded()
        key = name.strip()
        candidates = [key]
        if key and ":" not in key:
            candidates.append(key + _LATEST)
        elif key.lower().endswith(_LATEST) and len(key) > len(_LATEST):
            candidates.append(key[: -len(_LATEST)])
        for candidate in candidates:
            info = data.by_name.get(candidate) or data.by_lower.get(candidate.lower())
            if info is not None:
                return info
        return None

    def model_info(self, name: str) -> ModelInfo:
        """The catalog entry for ``name``; raises :class:`ModelNotFoundError` with close matches."""
        info = self.find(name)
        if info is None:
            raise ModelNotFoundError(name, self.suggestions(name))
        return info

    def model_servers(self, name: str) -> list[ServerEntry]:
        """The servers the catalog lists for ``name``, in preference order."""
        return list(self.model_info(name).servers)

    def suggestions(self, name: str, extra: Iterable[str] = (), limit: int = 5) -> list[str]:
        """Close matches for ``name`` among the catalog's models and ``extra`` names.

        Names that extend ``name`` come first, then names sharing its base (the
        part before ``:``), then names whose base starts with it, then fuzzy
        (difflib) matches; best first, no duplicates.
        """
        pool = list(dict.fromkeys([*self._loaded().by_name, *extra]))
        return _rank(name, pool, limit)

    def suggestions_for_servers(
        self, name: str, available: Iterable[str], limit: int = 5
    ) -> tuple[list[str], list[str]]:
        """Close matches for ``name`` that servers lack: ``(available, not_pulled)``.

        ``available`` are close matches among the names the servers list; ``not_pulled``
        are catalog models close to ``name`` that none of those names is (at most
        ``limit`` in all, the servers' first).
        """
        from ._protocol import model_key  # not at import: it loads pydantic

        listed = list(dict.fromkeys(available))
        near = _rank(name, listed, limit)
        have = {model_key(model) for model in listed}
        others = [m for m in self.suggestions(name, limit=limit) if model_key(m) not in have]
        return near, others[: max(limit - len(near), 0)]

    def default_model(self) -> str:
        """The model to use when none is configured: the one flagged ``default``.

        Falls back to the first model; raises :class:`ValidationError` when the
        catalog is empty.
        """
        data = self._loaded()
        for family in sorted(data.families):
            for model in data.families[family]:
                if model.default:
                    return model.name
        names = self.models()
        if not names:
            raise ValidationError(
                "No default model: the model catalog is empty. "
                "Pass model=... or set AICORTEX_MODEL."
            )
        return names[0]

    def llm_params(self, name: str) -> dict[str, int | float]:
        """The default generation parameters for ``name`` (Ollama ``options``)."""
        return {key: r.default for key, r in self.model_info(name).generation.items()}

    def random_llm_params(self, name: str, seed: int | None = None) -> dict[str, int | float]:
        """Generation parameters for ``name`` drawn uniformly within their ranges.

        Integer parameters stay integers; floats are rounded to 3 decimals. The
        same ``seed`` gives the same result.
        """
        return _draw(self.model_info(name).generation, random.Random(seed))


def _draw(generation: Mapping[str, ParamRange], rng: random.Random) -> dict[str, int | float]:
    """Draw each parameter (in sorted order, so dict order does not matter)."""
    params: dict[str, int | float] = {}
    for key in sorted(generation):
        r = generation[key]
        if isinstance(r.default, int) and isinstance(r.min, int) and isinstance(r.max, int):
            params[key] = rng.randint(r.min, r.max)
        else:
            low, high = float(r.min), float(r.max)
            params[key] = min(max(round(rng.uniform(low, high), 3), low), high)
    return params


def _rank(name: str, pool: Sequence[str], limit: int) -> list[str]:
    """Rank ``pool`` by closeness to ``name``; see :meth:`Catalog.suggestions`."""
    query = name.strip().lower()
    base, sep, _ = query.partition(":")
    tagged = bool(sep)
    if limit <= 0 or not query:
        return []
    scored: list[tuple[int, float, float, int, str]] = []
    for index, candidate in enumerate(pool):
        if candidate == name:
            continue
        lowered = candidate.lower()
        candidate_base = lowered.partition(":")[0]
        whole = difflib.SequenceMatcher(None, query, lowered).ratio()
        partial = difflib.SequenceMatcher(None, base, candidate_base).ratio()
        if candidate_base == base:
            tier = 0 if lowered.startswith(query) else 1
        elif len(base) >= 3 and candidate_base.startswith(base):
            tier = 2
        elif max(whole, partial) >= _CUTOFF:
            tier = 3
        else:
            continue
        # A bare name ("deepseek-r1") keeps its tags in catalog order.
        scored.append((tier, -whole if tagged else 0.0, -partial, index, candidate))
    scored.sort()
    return [candidate for *_, candidate in scored[:limit]]


# --------------------------------------------------------------------------- locations


def metadata_dir() -> Traversable:
    """Where the catalog lives.

    ``$AICORTEX_METADATA_DIR`` if set, else the ``aicortex/metadata`` folder of
    the installed package, else ``metadata/`` of a source checkout.
    """
    override = os.environ.get(METADATA_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    try:
        bundled = importlib.resources.files("aicortex") / "metadata"
        if bundled.is_dir():
            return bundled
    except (ImportError, TypeError, ValueError, OSError):
        pass
    return Path(__file__).resolve().parents[2] / "metadata"


_default_catalog: Catalog | None = None
_default_lock = threading.Lock()


def default_catalog() -> Catalog:
    """The process-wide catalog over :func:`metadata_dir`, created on first call."""
    global _default_catalog
    with _default_lock:
        if _default_catalog is None:
            _default_catalog = Catalog()
        return _default_catalog
