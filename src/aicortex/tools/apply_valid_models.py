"""Step 4: validate the merged catalog and write the family files that changed.

Every file is first validated with the schema the library's loader uses
(:class:`aicortex._catalog.FamilyFile`), and a model name may appear in only
one file; if anything fails, nothing is written. Each file is then written as
``json.dumps(data, indent=2)`` plus a newline, only if its bytes differ from
what is on disk, and atomically: a temporary file in the same folder, flushed
and fsynced, then ``os.replace``, then an fsync of the folder. A crash leaves
every file either fully old or fully new, and a failed write removes its
temporary file. No file is ever deleted.

Python::

    report = apply(resolved)                  # or apply(resolved, "metadata", dry_run=True)

Command: ``python -m aicortex.tools.apply_valid_models [-i RESOLVED.json] [--dry-run]``.
With ``--dry-run`` it prints a unified diff and writes nothing.

Input: the output of ``resolve_models``. Output (``"kind": "aicortex.apply"``)::

    {
      "version": 1,
      "kind": "aicortex.apply",
      "metadata_dir": "/path/to/metadata",
      "dry_run": false,
      "files": [                                # in name order
        {"file": "llama.json", "status": "updated"},   # "created", "updated", "unchanged"
        {"file": "tinyllama.json", "status": "created"}
      ],
      "diff": "--- a/llama.json\\n+++ b/llama.json\\n..."   # what changed (also when written)
    }
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from . import FORMAT_VERSION, CatalogWriteError, ToolError, catalog_directory, read_family_files
from ._common import (
    ArgumentParser,
    dump_json,
    load_step,
    read_document,
    run_tool,
    step_parser,
    write_text,
)
from .resolve_models import ResolvedCatalog

__all__ = [
    "ApplyReport",
    "FileResult",
    "apply",
    "main",
    "render",
    "run",
    "validate",
    "validate_directory",
]

# The step that makes a new file visible; tests replace it to inject a crash.
_replace = os.replace

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.json")
_NEW_FILE_MODE = 0o644


class FileResult(BaseModel, frozen=True):
    """What happened to one family file."""

    file: str
    status: Literal["created", "updated", "unchanged"]


class ApplyReport(BaseModel, frozen=True):
    """The output of :func:`apply`."""

    version: Literal[1] = FORMAT_VERSION
    kind: Literal["aicortex.apply"] = "aicortex.apply"
    metadata_dir: str
    dry_run: bool
    files: list[FileResult]
    diff: str = ""

    @property
    def written(self) -> list[str]:
        """The files that were (or, in a dry run, would be) written."""
        return [f.file for f in self.files if f.status != "unchanged"]


def render(data: dict[str, Any]) -> bytes:
    """A family file's bytes: 2-space JSON and a final newline, as the catalog is written."""
    return dump_json(data).encode("utf-8")


def validate(
    files: dict[str, dict[str, Any]],
    failure: str = "The catalog is not valid, so nothing was written",
) -> None:
    """Check every file against the loader's schema; :class:`ToolError` lists every problem.

    ``failure`` starts the error message.
    """
    from pydantic_core import ValidationError as SchemaError

    from .._catalog import FamilyFile, _describe  # pyright: ignore[reportPrivateUsage]

    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, data in files.items():
        if not _FILE_NAME.fullmatch(name):
            problems.append(f"{name!r} is not a plain <family>.json file name")
            continue
        try:
            family = FamilyFile.from_dict(data)
        except SchemaError as exc:
            problems.append(f"{name}: {_describe(exc)}")
            continue
        for model in family.models:
            first = owner.setdefault(model.name, name)
            if first != name:
                problems.append(f"{name}: model {model.name!r} is already in {first}")
    if problems:
        raise ToolError(f"{failure}: " + "; ".join(problems) + ".")


def validate_directory(directory: Path) -> None:
    """Validate the catalog as it is on disk (before a refresh touches it)."""
    validate(
        dict(read_family_files(directory)),
        f"The catalog in {directory} is not valid; fix it before refreshing",
    )


def apply(
    resolved: ResolvedCatalog,
    metadata_dir: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
) -> ApplyReport:
    """Validate ``resolved`` and write its changed files into ``metadata_dir``.

    ``None`` means the directory ``resolved`` came from (else the library's
    catalog). Raises :class:`ToolError` when validation fails (nothing is
    written), :class:`CatalogWriteError` when a write fails (files written
    before it stay new, the rest old).
    """
    if metadata_dir is None:
        metadata_dir = resolved.metadata_dir
    directory = catalog_directory(metadata_dir)
    validate(resolved.files)
    results: list[FileResult] = []
    diffs: list[str] = []
    pending: list[tuple[Path, bytes]] = []
    for name in sorted(resolved.files):
        path = directory / name
        new = render(resolved.files[name])
        try:
            old: bytes | None = path.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise ToolError(f"Cannot read {path}: {exc}") from None
        if old == new:
            results.append(FileResult(file=name, status="unchanged"))
            continue
        results.append(FileResult(file=name, status="created" if old is None else "updated"))
        diffs.append(_diff(name, old, new))
        pending.append((path, new))
    if not dry_run:
        done: list[str] = []
        for path, data in pending:
            try:
                write_atomic(path, data)
            except OSError as exc:
                wrote = f" ({', '.join(done)} already written)" if done else ""
                raise CatalogWriteError(f"Cannot write {path}: {exc}{wrote}.") from exc
            done.append(path.name)
    return ApplyReport(
        metadata_dir=str(directory), dry_run=dry_run, files=results, diff="".join(diffs)
    )


def run(
    resolved: ResolvedCatalog | None = None,
    metadata_dir: str | os.PathLike[str] | None = None,
    *,
    dry_run: bool = False,
    workdir: str | os.PathLike[str] | None = None,
) -> ApplyReport:
    """:func:`apply` ``resolved``, else the result :func:`aicortex.tools.resolve_models.run`
    kept in the work directory: the last step, which writes the catalog files."""
    source = (
        resolved if resolved is not None else load_step(ResolvedCatalog, "resolve_models", workdir)
    )
    return apply(source, metadata_dir, dry_run=dry_run)


def _diff(name: str, old: bytes | None, new: bytes) -> str:
    before = old.decode("utf-8", "replace").splitlines(keepends=True) if old is not None else []
    lines = difflib.unified_diff(
        before,
        new.decode("utf-8").splitlines(keepends=True),
        fromfile=f"a/{name}" if old is not None else "/dev/null",
        tofile=f"b/{name}",
    )
    return "".join(lines)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.

    The file keeps its permission bits (a new file gets 0644).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, kept on success
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, mode)
        _replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not possible (nor needed) on every platform."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def build_parser(prog: str = "python -m aicortex.tools.apply_valid_models") -> ArgumentParser:
    """The command's arguments."""
    parser = step_parser(
        prog,
        "Step 4 of the catalog refresh: read resolve_models' JSON, validate it with the "
        "catalog schema, and write each family file that changed, atomically. Writes a "
        "JSON report, or with --dry-run a diff and no file.",
        "resolve_models' JSON",
    )
    parser.add_argument(
        "--metadata-dir",
        metavar="DIR",
        help="the catalog to write (default: the one the input names, else aicortex's)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print a unified diff instead of writing"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aicortex.tools.apply_valid_models``."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        resolved = read_document(ResolvedCatalog, args.input, "resolve_models")
        report = apply(resolved, args.metadata_dir, dry_run=args.dry_run)
        if args.dry_run:
            write_text(report.diff, args.output)
        else:
            write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n", args.output)

    return run_tool("apply_valid_models", body)


if __name__ == "__main__":
    raise SystemExit(main())
