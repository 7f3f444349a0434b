"""Keeping the model catalog current: four steps that chain.

::

    check_models → fetch_models → resolve_models → apply_valid_models

1. :mod:`~aicortex.tools.check_models` probes every server the catalog names,
   plus extra ones, concurrently: reachable, latency, version.
2. :mod:`~aicortex.tools.fetch_models` asks each live server for its models
   (``GET /api/tags``) and their details (``POST /api/show``).
3. :mod:`~aicortex.tools.resolve_models` merges what was found into the
   catalog: new models are added, each model's server list and statuses are
   updated, nothing hand-written is lost and no model is dropped.
4. :mod:`~aicortex.tools.apply_valid_models` validates the result with the
   catalog's own schema and rewrites the family files that changed, atomically.

Each step is a function (``check``, ``fetch``, ``resolve``, ``apply``) and a
command (``python -m aicortex.tools.NAME --help``). Every step reads the
previous step's JSON (``-i FILE``, default stdin) and writes its own (``-o
FILE``, default stdout), so they chain in a shell pipe::

    python -m aicortex.tools.check_models --server http://gpu-box:11434 \\
      | python -m aicortex.tools.fetch_models \\
      | python -m aicortex.tools.resolve_models \\
      | python -m aicortex.tools.apply_valid_models --dry-run

:func:`refresh` runs the four in one go; ``aicortex refresh`` is its command.
A server that fails is logged (WARNING, ``aicortex`` logger) and skipped; it
never stops the run. Every JSON document carries ``"version": 1`` and a
``"kind"``; each module's docstring describes its format.

This package imports nothing heavy; each step loads what it needs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .._exceptions import AICortexError

if TYPE_CHECKING:
    from .apply_valid_models import ApplyReport
    from .check_models import ServerCheck

__all__ = [
    "FORMAT_VERSION",
    "CatalogWriteError",
    "ToolError",
    "catalog_directory",
    "read_family_files",
    "refresh",
]

FORMAT_VERSION = 1

_logger = logging.getLogger("aicortex")


class ToolError(AICortexError):
    """A pipeline step cannot go on: bad input, or a catalog that fails validation."""


class CatalogWriteError(ToolError):
    """Writing a family file failed; files written before it are new, the others old."""


# --------------------------------------------------------------------------- the catalog on disk


def catalog_directory(directory: str | os.PathLike[str] | None = None) -> Path:
    """The catalog folder to read and write: ``directory``, else the one the library reads.

    Raises :class:`ToolError` when it is not a directory on disk.
    """
    if directory is None:
        from .._catalog import metadata_dir

        path = metadata_dir()
        if not isinstance(path, Path):
            raise ToolError(
                f"The catalog at {path} is not a directory on disk; pass --metadata-dir."
            )
    else:
        path = Path(directory).expanduser()
    if not path.is_dir():
        raise ToolError(f"The catalog directory {str(path)!r} does not exist.")
    return path.resolve()


def read_family_files(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every ``*.json`` family file in ``directory`` as raw JSON, in name order.

    A file that is not a JSON object with a ``family`` string and a ``models``
    list is logged and left out (so later steps never touch it).
    """
    files: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(directory.glob("*.json")):
        if not path.is_file():
            continue
        try:
            data: object = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            _logger.error("Skipping catalog file %s: cannot read it as JSON (%s)", path, exc)
            continue
        raw: dict[str, Any] = cast("dict[str, Any]", data) if isinstance(data, dict) else {}
        if not (isinstance(raw.get("family"), str) and isinstance(raw.get("models"), list)):
            _logger.error("Skipping catalog file %s: not a family file", path)
            continue
        files.append((path.name, raw))
    return files


# --------------------------------------------------------------------------- the whole pipeline


async def refresh(
    servers: Sequence[str] = (),
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    include_catalog: bool = True,
    probe_timeout: float = 2.0,
    on_probe: Callable[[ServerCheck], None] | None = None,
) -> ApplyReport:
    """Run the four steps on the catalog in ``metadata_dir`` (default: the library's).

    The catalog must be valid before it starts (else :class:`ToolError`, and
    nothing goes online). ``on_probe`` is called as each server's probe
    completes. With ``dry_run`` nothing is written; the report's ``diff`` shows
    what would change.
    """
    from .apply_valid_models import apply, validate_directory
    from .check_models import check
    from .fetch_models import fetch
    from .resolve_models import resolve

    directory = catalog_directory(metadata_dir)
    validate_directory(directory)
    checked = await check(
        servers,
        metadata_dir=directory,
        include_catalog=include_catalog,
        timeout=probe_timeout,
        on_result=on_probe,
    )
    fetched = await fetch(checked)
    resolved = resolve(directory, fetched)
    return apply(resolved, directory, dry_run=dry_run)
