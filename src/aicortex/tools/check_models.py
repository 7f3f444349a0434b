"""Step 1: probe the catalog's servers (and extra ones) concurrently.

Every server URL the catalog lists, then every extra server, is probed at once
with the same probe the client uses (``GET /api/tags`` and ``/api/version``).
The catalog's ``http://localhost:11434`` means "this machine's Ollama", so it
is probed at ``OLLAMA_HOST`` when that is set, and still reported under the
catalog's URL. A server that fails is logged and reported down; it never stops
the run.

Python::

    report = await check(["http://gpu-box:11434"], metadata_dir="metadata")

Command: ``python -m aicortex.tools.check_models [--server URL ...] [-o FILE]``.
It reads no input unless ``-i FILE`` names a file of extra servers (a JSON
list of URLs, or one URL per line).

Output (``"kind": "aicortex.check"``)::

    {
      "version": 1,
      "kind": "aicortex.check",
      "metadata_dir": "/path/to/metadata",       # the catalog whose servers were probed
      "checked_at": "2025-05-04T17:37:44Z",      # UTC
      "probe_timeout": 2.0,
      "servers": [                               # catalog servers first, then extra ones
        {
          "url": "http://localhost:11434",       # as the catalog writes it (extra: normalised)
          "address": "http://127.0.0.1:11434",   # where it was probed
          "source": "catalog",                   # "catalog", "argument" or "both"
          "up": true,
          "latency": 0.0042,                     # seconds; null when down
          "version": "0.5.1",                    # null when unknown
          "models": ["llama3.2:3b"],             # what /api/tags listed
          "error": null                          # why it is down
        }
      ]
    }
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from pydantic import BaseModel

from .._exceptions import ValidationError
from .._protocol import json_objects
from . import FORMAT_VERSION, ToolError, catalog_directory, read_family_files
from ._common import (
    ArgumentParser,
    add_output_argument,
    blocking,
    parse_json,
    positive_seconds,
    read_text,
    run_all,
    run_tool,
    save_step,
    server_list,
    tool_router,
    write_report,
)

__all__ = ["CheckReport", "ServerCheck", "catalog_servers", "check", "main", "run"]

DEFAULT_PROBE_TIMEOUT = 2.0

Source = Literal["catalog", "argument", "both"]


class ServerCheck(BaseModel, frozen=True):
    """What one probe found."""

    url: str
    address: str
    source: Source
    up: bool
    latency: float | None = None
    version: str | None = None
    models: list[str] = []
    error: str | None = None


class CheckReport(BaseModel, frozen=True):
    """The output of :func:`check`."""

    version: Literal[1] = FORMAT_VERSION
    kind: Literal["aicortex.check"] = "aicortex.check"
    metadata_dir: str | None = None
    checked_at: str
    probe_timeout: float
    servers: list[ServerCheck]

    def live(self) -> list[ServerCheck]:
        """The servers that answered."""
        return [s for s in self.servers if s.up]


def catalog_servers(directory: Path) -> list[str]:
    """Every server URL the catalog's files list, in file and model order, without repeats."""
    urls: list[str] = []
    for _, data in read_family_files(directory):
        for model in json_objects(data.get("models")):
            for entry in json_objects(model.get("servers")):
                url: object = entry.get("url")
                if isinstance(url, str) and url not in urls:
                    urls.append(url)
    return urls


@dataclass
class _Target:
    url: str
    address: str | None  # None: the URL is invalid, and ``error`` says why
    source: Source
    error: str | None = None


def _targets(catalog: Iterable[str], extra: Iterable[str]) -> list[_Target]:
    """Catalog servers then extra ones, deduplicated by the address they are probed at."""
    from .._config import env_host
    from .._urls import is_local_default, normalize_host, server_url

    local = normalize_host(env_host())
    targets: list[_Target] = []
    by_address: dict[str, _Target] = {}
    groups: tuple[tuple[Source, Iterable[str]], ...] = (("catalog", catalog), ("argument", extra))
    for source, urls in groups:
        for url in urls:
            try:
                normal = server_url(url)
            except ValidationError as exc:
                if source == "argument":
                    raise
                targets.append(_Target(url, None, source, f"invalid URL ({exc})"))
                continue
            address = local if is_local_default(normal) else normal
            known = by_address.get(address)
            if known is not None:
                if known.source != source:
                    known.source = "both"
                continue
            target = _Target(url if source == "catalog" else normal, address, source)
            by_address[address] = target
            targets.append(target)
    return targets


async def check(
    servers: Sequence[str] = (),
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    include_catalog: bool = True,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    on_result: Callable[[ServerCheck], None] | None = None,
) -> CheckReport:
    """Probe the catalog's servers and ``servers`` concurrently.

    ``on_result`` is called with each server's result as soon as its probe
    completes. Raises :class:`~aicortex.ValidationError` for a malformed URL in
    ``servers``; a malformed URL in the catalog is reported down instead.
    """
    directory: Path | None = None
    catalog: list[str] = []
    if include_catalog or metadata_dir is not None:
        directory = catalog_directory(metadata_dir)
        if include_catalog:
            catalog = catalog_servers(directory)
    targets = _targets(catalog, servers)
    router = tool_router(timeout, timeout)

    async def probe(target: _Target) -> ServerCheck:
        if target.address is None:
            return ServerCheck(
                url=target.url,
                address=target.url,
                source=target.source,
                up=False,
                error=target.error,
            )
        health = await router.probe(target.address)
        return ServerCheck(
            url=target.url,
            address=target.address,
            source=target.source,
            up=health.up,
            latency=round(health.latency, 4) if health.latency is not None else None,
            version=health.version,
            models=list(health.models),
            error=health.error,
        )

    try:
        results = await run_all(targets, probe, on_result)
    finally:
        await router.aclose()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return CheckReport(
        metadata_dir=str(directory) if directory is not None else None,
        checked_at=now.isoformat().replace("+00:00", "Z"),
        probe_timeout=timeout,
        servers=results,
    )


def run(
    servers: Sequence[str] = (),
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    include_catalog: bool = True,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    workdir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Blocking :func:`check`; the report is also kept in the work directory for
    :func:`aicortex.tools.fetch_models.run` (``workdir``, else ``$AICORTEX_REFRESH_DIR``,
    else ``aicortex/refresh`` in the user's cache folder)::

        check_models.run()
        fetch_models.run()
        resolve_models.run()
        apply_valid_models.run()
    """
    report = blocking(
        lambda: check(
            servers, metadata_dir=metadata_dir, include_catalog=include_catalog, timeout=timeout
        )
    )
    save_step(report, "check_models", workdir)
    return report


def _extra_servers(source: str) -> list[str]:
    """Servers from a file: a JSON list of URLs, or one URL per line."""
    name, text = read_text(source)
    stripped = text.strip()
    if stripped.startswith("["):
        data: object = parse_json(stripped, name)
        items = cast("list[object]", data) if isinstance(data, list) else None
        if items is None or not all(isinstance(u, str) for u in items):
            raise ToolError(f"{name} must hold a JSON list of server URLs.")
        return [str(u) for u in items]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def build_parser(prog: str = "python -m aicortex.tools.check_models") -> ArgumentParser:
    """The command's arguments."""
    parser = ArgumentParser(
        prog=prog,
        description=(
            "Step 1 of the catalog refresh: probe every server the catalog lists, plus the "
            "given ones, concurrently (reachable, latency, version, models), and write the "
            "results as JSON."
        ),
    )
    parser.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="also probe this server (repeat, or separate with commas)",
    )
    parser.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="read more servers from FILE: a JSON list or one URL per line ('-': stdin)",
    )
    parser.add_argument(
        "--metadata-dir",
        metavar="DIR",
        help="the catalog whose servers to probe (default: the one aicortex reads)",
    )
    parser.add_argument(
        "--no-catalog",
        action="store_true",
        help="probe only the given servers, not the catalog's",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a server after this long (default: {DEFAULT_PROBE_TIMEOUT:g})",
    )
    add_output_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aicortex.tools.check_models``."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        import anyio

        servers = server_list(args.server)
        if args.input is not None:
            servers += _extra_servers(args.input)
        if args.no_catalog and not servers:
            raise ToolError("--no-catalog needs at least one --server.")
        report = anyio.run(
            lambda: check(
                servers,
                metadata_dir=args.metadata_dir,
                include_catalog=not args.no_catalog,
                timeout=args.timeout,
            )
        )
        write_report(report, args.output)

    return run_tool("check_models", body)


if __name__ == "__main__":
    raise SystemExit(main())
