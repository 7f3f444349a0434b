"""Step 2: ask each live server which models it has, and what they are.

For every server that step 1 found up: ``GET /api/tags`` for the installed
models, then ``POST /api/show`` for each (a few at a time) for the family,
parameter size, quantization, context length (``model_info["<arch>.context_length"]``)
and capabilities. Servers are asked concurrently. A server that fails is logged
and reported down; a model whose ``/api/show`` fails keeps what ``/api/tags``
said, with its ``error``.

Python::

    fetched = await fetch(check_report)

Command: ``python -m aicortex.tools.fetch_models [-i CHECK.json] [-o FILE]``.

Input: the output of ``check_models``. Output (``"kind": "aicortex.fetch"``)::

    {
      "version": 1,
      "kind": "aicortex.fetch",
      "metadata_dir": "/path/to/metadata",        # carried over from the check
      "servers": [                                # the same servers, in the same order
        {
          "url": "http://127.0.0.1:11434",
          "address": "http://127.0.0.1:11434",
          "up": true,                             # false: down in step 1, or failed here
          "error": null,
          "models": [
            {
              "name": "tinyllama:1.1b",
              "family": "llama",                  # details.family; null when unknown
              "families": ["llama"],
              "parameter_size": "1.1B",
              "quantization": "Q4_0",
              "size": 637700138,                  # bytes on disk
              "digest": "2644915e...",
              "context_length": 2048,             # null when unknown
              "capabilities": ["completion"],
              "error": null                       # why /api/show failed
            }
          ]
        }
      ]
    }
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel

from .._protocol import TAGS_PATH, json_int, json_object, json_objects
from . import FORMAT_VERSION
from ._common import (
    ArgumentParser,
    blocking,
    load_step,
    positive_seconds,
    read_document,
    run_all,
    run_tool,
    save_step,
    step_parser,
    tool_router,
    write_report,
)
from .check_models import CheckReport, ServerCheck

if TYPE_CHECKING:
    from .._router import Router

__all__ = [
    "FetchReport",
    "FetchedModel",
    "ServerModels",
    "fetch",
    "main",
    "model_from_api",
    "run",
]

_logger = logging.getLogger("aicortex")

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 4

SHOW_PATH = "/api/show"


class FetchedModel(BaseModel, frozen=True):
    """One model as a server describes it."""

    name: str
    family: str | None = None
    families: list[str] = []
    parameter_size: str | None = None
    quantization: str | None = None
    size: int | None = None
    digest: str | None = None
    context_length: int | None = None
    capabilities: list[str] = []
    error: str | None = None


class ServerModels(BaseModel, frozen=True):
    """One server and the models it has."""

    url: str
    address: str
    up: bool
    error: str | None = None
    models: list[FetchedModel] = []


class FetchReport(BaseModel, frozen=True):
    """The output of :func:`fetch`."""

    version: Literal[1] = FORMAT_VERSION
    kind: Literal["aicortex.fetch"] = "aicortex.fetch"
    metadata_dir: str | None = None
    servers: list[ServerModels]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in cast("list[object]", value) if isinstance(v, str)]


def _name(tag: Mapping[str, Any]) -> str | None:
    return _str(tag.get("model")) or _str(tag.get("name"))


def _context_length(model_info: Mapping[str, Any], details: Mapping[str, Any]) -> int | None:
    """``model_info["<general.architecture>.context_length"]``, else any ``*.context_length``."""
    architecture = model_info.get("general.architecture")
    candidates: list[object] = []
    if isinstance(architecture, str):
        candidates.append(model_info.get(f"{architecture}.context_length"))
    candidates += [v for k, v in model_info.items() if k.endswith(".context_length")]
    candidates.append(details.get("context_length"))  # newer /api/tags
    for value in candidates:
        count = json_int(value) or 0
        if count > 0:
            return count
    return None


def model_from_api(
    tag: Mapping[str, Any], show: Mapping[str, Any] | None, error: str | None = None
) -> FetchedModel:
    """Combine one ``/api/tags`` entry and its ``/api/show`` answer (pure)."""
    show = show or {}
    shown = {k: v for k, v in json_object(show.get("details")).items() if v not in (None, "")}
    details = {**json_object(tag.get("details")), **shown}
    return FetchedModel(
        name=_name(tag) or "",
        family=_str(details.get("family")),
        families=_strings(details.get("families")),
        parameter_size=_str(details.get("parameter_size")),
        quantization=_str(details.get("quantization_level")),
        size=json_int(tag.get("size")),
        digest=_str(tag.get("digest")),
        context_length=_context_length(json_object(show.get("model_info")), details),
        capabilities=_strings(show.get("capabilities")) or _strings(tag.get("capabilities")),
        error=error,
    )


async def _get_json(router: Router, address: str, method: str, path: str, **kw: Any) -> Any:
    """One request; raises ``_Failed`` with a readable reason."""
    from .._router import describe_error

    try:
        response = await router.client(address).request(method, path, **kw)
    except Exception as exc:
        raise _Failed(describe_error(exc, router.timeout)) from None
    if response.status_code != 200:
        detail = ""
        try:
            message: object = json_object(response.json()).get("error")
            detail = f": {message}" if isinstance(message, str) else ""
        except ValueError:
            pass
        raise _Failed(f"{method} {path} answered HTTP {response.status_code}{detail}")
    try:
        return response.json()
    except ValueError:
        raise _Failed(f"{method} {path} did not answer with JSON") from None


class _Failed(Exception):
    pass


async def _fetch_server(router: Router, server: ServerCheck, concurrency: int) -> ServerModels:
    import anyio

    address = server.address
    try:
        tags = json_object(await _get_json(router, address, "GET", TAGS_PATH))
    except _Failed as exc:
        _logger.warning("Skipping Ollama server %s: %s", server.url, exc)
        return ServerModels(url=server.url, address=address, up=False, error=str(exc))
    limiter = anyio.CapacityLimiter(concurrency)

    async def show(entry: dict[str, Any]) -> FetchedModel:
        name = _name(entry) or ""
        async with limiter:
            try:
                answer = await _get_json(router, address, "POST", SHOW_PATH, json={"model": name})
            except _Failed as exc:
                _logger.warning("Ollama server %s: no details for %s: %s", server.url, name, exc)
                return model_from_api(entry, None, str(exc))
        return model_from_api(entry, json_object(answer))

    models = await run_all([e for e in json_objects(tags.get("models")) if _name(e)], show)
    return ServerModels(url=server.url, address=address, up=True, models=models)


async def fetch(
    checked: CheckReport,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_result: Callable[[ServerModels], None] | None = None,
) -> FetchReport:
    """Ask every live server of ``checked`` for its models, all servers at once.

    ``timeout`` limits each request; ``concurrency`` is how many ``/api/show``
    requests one server gets at a time. ``on_result`` is called as each server
    is done.
    """
    router = tool_router(min(timeout, 5.0), timeout)

    async def run(server: ServerCheck) -> ServerModels:
        if server.up:
            return await _fetch_server(router, server, concurrency)
        return ServerModels(url=server.url, address=server.address, up=False, error=server.error)

    try:
        servers = await run_all(checked.servers, run, on_result)
    finally:
        await router.aclose()
    return FetchReport(metadata_dir=checked.metadata_dir, servers=servers)


def run(
    checked: CheckReport | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
    workdir: str | os.PathLike[str] | None = None,
) -> FetchReport:
    """Blocking :func:`fetch` of ``checked``, else of the report
    :func:`aicortex.tools.check_models.run` kept in the work directory; this report is
    kept there in turn, for :func:`aicortex.tools.resolve_models.run`."""
    source = checked if checked is not None else load_step(CheckReport, "check_models", workdir)
    report = blocking(lambda: fetch(source, timeout=timeout, concurrency=concurrency))
    save_step(report, "fetch_models", workdir)
    return report


def build_parser(prog: str = "python -m aicortex.tools.fetch_models") -> ArgumentParser:
    """The command's arguments."""
    parser = step_parser(
        prog,
        "Step 2 of the catalog refresh: read check_models' JSON, ask each live server for "
        "its models (/api/tags) and their details (/api/show), and write them as JSON.",
        "check_models' JSON",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit for each request (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"/api/show requests per server at a time (default: {DEFAULT_CONCURRENCY})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aicortex.tools.fetch_models``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    def body() -> None:
        import anyio

        checked = read_document(CheckReport, args.input, "check_models")
        report = anyio.run(
            lambda: fetch(checked, timeout=args.timeout, concurrency=args.concurrency)
        )
        write_report(report, args.output)

    return run_tool("fetch_models", body)


if __name__ == "__main__":
    raise SystemExit(main())
