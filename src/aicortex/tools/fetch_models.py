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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict

from . import FORMAT_VERSION
from ._common import (
    ArgumentParser,
    add_input_argument,
    add_output_argument,
    dump_json,
    parse_document,
    positive_seconds,
    read_json,
    run_tool,
    write_text,
)
from .check_models import CheckReport, ServerCheck

if TYPE_CHECKING:
    from .._router import Router

__all__ = ["FetchReport", "FetchedModel", "ServerModels", "fetch", "main", "model_from_api"]

_logger = logging.getLogger("aicortex")

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 4

TAGS_PATH = "/api/tags"
SHOW_PATH = "/api/show"


class FetchedModel(BaseModel):
    """One model as a server describes it."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True)

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


class ServerModels(BaseModel):
    """One server and the models it has."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True)

    url: str
    address: str
    up: bool
    error: str | None = None
    models: list[FetchedModel] = []


class FetchReport(BaseModel):
    """The output of :func:`fetch`."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True)

    version: Literal[1] = FORMAT_VERSION
    kind: Literal["aicortex.fetch"] = "aicortex.fetch"
    metadata_dir: str | None = None
    servers: list[ServerModels]


def _dict(value: object) -> dict[str, Any]:
    return cast("dict[str, Any]", value) if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in cast("list[object]", value) if isinstance(v, str)]


def _context_length(model_info: Mapping[str, Any], details: Mapping[str, Any]) -> int | None:
    """``model_info["<general.architecture>.context_length"]``, else any ``*.context_length``."""
    architecture = model_info.get("general.architecture")
    candidates: list[object] = []
    if isinstance(architecture, str):
        candidates.append(model_info.get(f"{architecture}.context_length"))
    candidates += [v for k, v in model_info.items() if k.endswith(".context_length")]
    candidates.append(details.get("context_length"))  # newer /api/tags
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_from_api(
    tag: Mapping[str, Any], show: Mapping[str, Any] | None, error: str | None = None
) -> FetchedModel:
    """Combine one ``/api/tags`` entry and its ``/api/show`` answer (pure)."""
    tag_details = _dict(tag.get("details"))
    show_details = _dict(show.get("details")) if show is not None else {}
    details = {**tag_details, **{k: v for k, v in show_details.items() if v not in (None, "")}}
    model_info = _dict(show.get("model_info")) if show is not None else {}
    capabilities = _strings(show.get("capabilities")) if show is not None else []
    size: object = tag.get("size")
    return FetchedModel(
        name=_str(tag.get("model")) or _str(tag.get("name")) or "",
        family=_str(details.get("family")),
        families=_strings(details.get("families")),
        parameter_size=_str(details.get("parameter_size")),
        quantization=_str(details.get("quantization_level")),
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        digest=_str(tag.get("digest")),
        context_length=_context_length(model_info, details),
        capabilities=capabilities or _strings(tag.get("capabilities")),
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
            message: object = _dict(response.json()).get("error")
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
        tags = _dict(await _get_json(router, address, "GET", TAGS_PATH))
    except _Failed as exc:
        _logger.warning("Skipping Ollama server %s: %s", server.url, exc)
        return ServerModels(url=server.url, address=address, up=False, error=str(exc))
    entries = [_dict(e) for e in cast("list[object]", tags.get("models") or []) if e]
    entries = [e for e in entries if _str(e.get("model")) or _str(e.get("name"))]
    limiter = anyio.CapacityLimiter(concurrency)
    found: list[FetchedModel | None] = [None] * len(entries)

    async def show(index: int, entry: dict[str, Any]) -> None:
        name = _str(entry.get("model")) or _str(entry.get("name")) or ""
        async with limiter:
            try:
                answer = _dict(
                    await _get_json(router, address, "POST", SHOW_PATH, json={"model": name})
                )
            except _Failed as exc:
                _logger.warning("Ollama server %s: no details for %s: %s", server.url, name, exc)
                found[index] = model_from_api(entry, None, str(exc))
                return
        found[index] = model_from_api(entry, answer)

    async with anyio.create_task_group() as tg:
        for index, entry in enumerate(entries):
            tg.start_soon(show, index, entry)
    return ServerModels(
        url=server.url, address=address, up=True, models=[m for m in found if m is not None]
    )


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
    import anyio

    from .._config import Timeout, env_api_key
    from .._router import Router

    api_key = env_api_key()
    router = Router(
        timeout=Timeout(connect=min(timeout, 5.0), first_token=timeout, probe=timeout),
        health_ttl=0.0,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
    )
    results: list[ServerModels | None] = [None] * len(checked.servers)

    async def run(index: int, server: ServerCheck) -> None:
        if server.up:
            result = await _fetch_server(router, server, concurrency)
        else:
            result = ServerModels(
                url=server.url, address=server.address, up=False, error=server.error
            )
        results[index] = result
        if on_result is not None:
            on_result(result)

    try:
        async with anyio.create_task_group() as tg:
            for index, server in enumerate(checked.servers):
                tg.start_soon(run, index, server)
    finally:
        await router.aclose()
    return FetchReport(
        metadata_dir=checked.metadata_dir, servers=[r for r in results if r is not None]
    )


def build_parser(prog: str = "python -m aicortex.tools.fetch_models") -> ArgumentParser:
    """The command's arguments."""
    parser = ArgumentParser(
        prog=prog,
        description=(
            "Step 2 of the catalog refresh: read check_models' JSON, ask each live server for "
            "its models (/api/tags) and their details (/api/show), and write them as JSON."
        ),
    )
    add_input_argument(parser, "check_models' JSON")
    add_output_argument(parser)
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

    def body() -> int:
        import anyio

        checked: CheckReport = parse_document(CheckReport, read_json(args.input), "check_models")
        report = anyio.run(
            lambda: fetch(checked, timeout=args.timeout, concurrency=args.concurrency)
        )
        write_text(dump_json(report.model_dump(mode="json")), args.output)
        return 0

    return run_tool("fetch_models", body)


if __name__ == "__main__":
    raise SystemExit(main())
