"""Step 3: merge what the servers said into the catalog (pure; reads, never writes).

The rules:

* Models are matched by name the way Ollama matches them (case-insensitive,
  ``:latest`` implied), so a model on several servers is one entry.
* A model the catalog has keeps every field as written (description, tags,
  sizes, generation parameters); only its ``servers`` change. Each server that
  was probed gets a fresh ``status``: ``"up"`` if the server answered and lists
  the model, ``"down"`` if it did not answer or no longer has the model. A live
  server that has the model and was not listed is appended with ``"up"``.
  Servers that were not probed keep their status. No model is ever dropped.
* A model the catalog lacks is added to the file of its family, with the
  servers that have it. Its family is the catalog family of a model with the
  same base name (``qwen2.5:3b`` joins ``qwen2.5:7b``), else Ollama's
  ``details.family`` without trailing digits (``qwen2`` → ``qwen``, ``gemma3``
  → ``gemma``) when the catalog has that family, else a new family in a new
  file ``<family>.json``. Its ``description`` is left empty for a human to
  write, its ``tags`` come from the capabilities (``completion`` → ``chat``,
  ``thinking`` → ``reasoning``). A model whose context length is unknown (its
  ``/api/show`` failed) cannot be described and is not added; a warning says so.

Python::

    resolved = resolve("metadata", fetched)

Command: ``python -m aicortex.tools.resolve_models [-i FETCH.json] [--metadata-dir DIR]``.

Input: the output of ``fetch_models``. Output (``"kind": "aicortex.resolved"``)::

    {
      "version": 1,
      "kind": "aicortex.resolved",
      "metadata_dir": "/path/to/metadata",
      "files": {                                  # every family file, by file name,
        "llama.json": {"family": "llama", "models": [...]},   # in the catalog's format
        "tinyllama.json": {"family": "tinyllama", "models": [...]}
      },
      "changes": [
        {"file": "tinyllama.json", "model": "tinyllama:1.1b", "change": "added",
         "server": null, "detail": "new model of family 'tinyllama' on http://..."},
        {"file": "llama.json", "model": "llama3.2:3b", "change": "server_added",
         "server": "http://127.0.0.1:11434", "detail": "up"},
        {"file": "llama.json", "model": "llama3.2:3b", "change": "status",
         "server": "http://localhost:11434", "detail": "unknown -> down (connection refused)"}
      ],
      "warnings": ["tinyllama:latest on http://...: not added, its context length is unknown"]
    }
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pydantic import BaseModel

from .._exceptions import ValidationError
from .._protocol import json_objects, model_key
from .._urls import normalize_host
from . import FORMAT_VERSION, catalog_directory, read_family_files
from ._common import (
    ArgumentParser,
    load_step,
    read_document,
    run_tool,
    save_step,
    step_parser,
    write_report,
)
from .fetch_models import FetchedModel, FetchReport

__all__ = ["Change", "ResolvedCatalog", "human_size", "main", "merge", "resolve", "run"]

_TAGS = {"completion": "chat", "thinking": "reasoning"}


class Change(BaseModel, frozen=True):
    """One difference ``resolve`` made to the catalog."""

    file: str
    model: str
    change: Literal["added", "server_added", "status"]
    server: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.change == "added":
            return f"{self.model}: added to {self.file} ({self.detail})"
        if self.change == "server_added":
            return f"{self.model}: on {self.server} ({self.detail})"
        return f"{self.model}: {self.server} {self.detail}"


class ResolvedCatalog(BaseModel, frozen=True):
    """The output of :func:`resolve`: the whole catalog, ready to validate and write."""

    version: Literal[1] = FORMAT_VERSION
    kind: Literal["aicortex.resolved"] = "aicortex.resolved"
    metadata_dir: str | None = None
    files: dict[str, dict[str, Any]]
    changes: list[Change] = []
    warnings: list[str] = []


# --------------------------------------------------------------------------- pure helpers


def human_size(size: int | None) -> str:
    """Bytes the way the catalog (and ``ollama list``) writes them: ``4.7GB``, ``815MB``."""
    if size is None or size < 0:
        return ""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"
    return f"{size}B"


def _base(name: str) -> str:
    """``library/qwen2.5:7b`` → ``qwen2.5``."""
    return model_key(name).rsplit("/", 1)[-1].partition(":")[0]


def _strip_version(family: str) -> str:
    """``qwen2`` → ``qwen``, ``gemma3`` → ``gemma``; unchanged when nothing is left."""
    return re.sub(r"[\d._-]+$", "", family) or family


def _tags(capabilities: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(_TAGS.get(c, c) for c in capabilities))


def _normal(url: str) -> str:
    try:
        return normalize_host(url)
    except ValidationError:
        return url


@dataclass
class _Server:
    url: str
    up: bool
    error: str | None
    keys: set[str] = field(default_factory=set[str])

    def status(self, key: str) -> tuple[str, str]:
        """This server's status for a model, and why."""
        if not self.up:
            return "down", self.error or "server down"
        if key in self.keys:
            return "up", ""
        return "down", "the server does not have it"


@dataclass
class _Merge:
    files: dict[str, dict[str, Any]]
    servers: list[_Server]
    by_url: dict[str, _Server]
    changes: list[Change] = field(default_factory=list[Change])
    warnings: list[str] = field(default_factory=list[str])


def merge(
    files: Sequence[tuple[str, dict[str, Any]]], fetched: FetchReport
) -> tuple[dict[str, dict[str, Any]], list[Change], list[str]]:
    """Merge ``fetched`` into raw family ``files`` (name, JSON); the inputs are not changed.

    Returns the new files by name (sorted), the changes and the warnings.
    """
    servers = [
        _Server(s.url, s.up, s.error, {model_key(m.name) for m in s.models})
        for s in fetched.servers
    ]
    state = _Merge(
        {name: copy.deepcopy(data) for name, data in files},
        servers,
        {_normal(s.url): s for s in servers},
    )
    index: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, data in state.files.items():
        for model in json_objects(data.get("models")):
            key = model_key(str(model.get("name", "")))
            first = index.get(key)
            if first is not None:
                state.warnings.append(
                    f"model {model.get('name')!r} is in {first[0]} and again in {name}; "
                    "the catalog loader ignores the second one"
                )
            else:
                index[key] = (name, model)
            _update_servers(state, name, model, key)
    _add_new(state, index, fetched)
    return dict(sorted(state.files.items())), state.changes, state.warnings


def _update_servers(state: _Merge, file: str, model: dict[str, Any], key: str) -> None:
    name = str(model.get("name", ""))
    raw: object = model.get("servers")
    entries = cast("list[object]", raw) if isinstance(raw, list) else []
    listed: set[str] = set()
    for entry in json_objects(entries):
        url = str(entry.get("url", ""))
        server = state.by_url.get(_normal(url))
        if server is None:
            continue
        listed.add(_normal(server.url))
        status, why = server.status(key)
        old = entry.get("status", "unknown")
        if old != status:
            entry["status"] = status
            detail = f"{old} -> {status}" + (f" ({why})" if why else "")
            state.changes.append(
                Change(file=file, model=name, change="status", server=url, detail=detail)
            )
    for server in state.servers:
        if server.up and key in server.keys and _normal(server.url) not in listed:
            entries.append({"url": server.url, "status": "up"})
            listed.add(_normal(server.url))
            state.changes.append(
                Change(file=file, model=name, change="server_added", server=server.url, detail="up")
            )
    if entries and not isinstance(raw, list):
        model["servers"] = entries


def _add_new(
    state: _Merge, index: dict[str, tuple[str, dict[str, Any]]], fetched: FetchReport
) -> None:
    families: dict[str, str] = {}  # family -> file, first file in name order
    for name, data in sorted(state.files.items()):
        families.setdefault(str(data.get("family")), name)
    bases: dict[str, str] = {}
    for _, known in index.values():
        bases.setdefault(_base(str(known.get("name", ""))), str(known.get("family")))
    for server in fetched.servers:
        if not server.up:
            continue
        for found in server.models:
            key = model_key(found.name)
            if not found.name or key in index:
                continue  # known (servers were updated above) or already added
            if found.context_length is None:
                reason = f" ({found.error})" if found.error else ""
                state.warnings.append(
                    f"{found.name} on {server.url}: not added, its context length is "
                    f"unknown{reason}"
                )
                continue
            family = _family(found, bases, families)
            file = families.get(family) or _new_file(state, family)
            families.setdefault(family, file)
            bases.setdefault(_base(found.name), family)
            holders = [s.url for s in state.servers if s.up and key in s.keys]
            model = _new_model(found, family, holders)
            state.files[file].setdefault("models", []).append(model)
            index[key] = (file, model)
            state.changes.append(
                Change(
                    file=file,
                    model=found.name,
                    change="added",
                    server=None,
                    detail=f"family {family!r}, on {', '.join(holders)}",
                )
            )


def _family(found: FetchedModel, bases: dict[str, str], families: dict[str, str]) -> str:
    known = bases.get(_base(found.name))
    if known is not None:
        return known
    raw = (found.family or "").strip().lower()
    for candidate in (raw, _strip_version(raw)):
        if candidate and candidate in families:
            return candidate
    return _strip_version(raw) or _strip_version(_base(found.name)) or "other"


def _new_file(state: _Merge, family: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", family.lower()).strip(".-") or "family"
    name, n = f"{stem}.json", 1
    while name in state.files:
        n += 1
        name = f"{stem}-{n}.json"
    state.files[name] = {"family": family, "models": []}
    return name


def _new_model(found: FetchedModel, family: str, servers: list[str]) -> dict[str, Any]:
    """A catalog entry in the files' key order; ``description`` is for a human to write."""
    return {
        "name": found.name,
        "family": family,
        "size": human_size(found.size),
        "parameters": found.parameter_size or "",
        "quantization": found.quantization or "",
        "context_length": found.context_length,
        "description": "",
        "tags": _tags(found.capabilities),
        "servers": [{"url": url, "status": "up"} for url in servers],
    }


# --------------------------------------------------------------------------- I/O


def resolve(
    existing_catalog_dir: str | os.PathLike[str] | None, fetched: FetchReport
) -> ResolvedCatalog:
    """Merge ``fetched`` into the catalog in ``existing_catalog_dir``.

    ``None`` means the directory ``fetched`` came from (else the library's catalog).
    Reads the family files; writes nothing.
    """
    if existing_catalog_dir is None:
        existing_catalog_dir = fetched.metadata_dir
    directory = catalog_directory(existing_catalog_dir)
    files, changes, warnings = merge(read_family_files(directory), fetched)
    return ResolvedCatalog(
        metadata_dir=str(directory), files=files, changes=changes, warnings=warnings
    )


def run(
    fetched: FetchReport | None = None,
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> ResolvedCatalog:
    """:func:`resolve` ``fetched``, else the report :func:`aicortex.tools.fetch_models.run`
    kept in the work directory, into the catalog in ``metadata_dir`` (default: the one
    that was checked). The result is kept there in turn, for
    :func:`aicortex.tools.apply_valid_models.run`; no catalog file is written."""
    source = fetched if fetched is not None else load_step(FetchReport, "fetch_models", workdir)
    resolved = resolve(metadata_dir, source)
    save_step(resolved, "resolve_models", workdir)
    return resolved


def build_parser(prog: str = "python -m aicortex.tools.resolve_models") -> ArgumentParser:
    """The command's arguments."""
    parser = step_parser(
        prog,
        "Step 3 of the catalog refresh: read fetch_models' JSON and merge it into the "
        "catalog: add new models, update server lists and statuses, keep everything "
        "hand-written. Writes the merged catalog as JSON; changes no file.",
        "fetch_models' JSON",
    )
    parser.add_argument(
        "--metadata-dir",
        metavar="DIR",
        help="the catalog to merge into (default: the one the input names, else aicortex's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aicortex.tools.resolve_models``."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        import logging

        fetched = read_document(FetchReport, args.input, "fetch_models")
        resolved = resolve(args.metadata_dir, fetched)
        for warning in resolved.warnings:
            logging.getLogger("aicortex").warning("%s", warning)
        write_report(resolved, args.output)

    return run_tool("resolve_models", body)


if __name__ == "__main__":
    raise SystemExit(main())
