"""``aicortex serve``: run the proxy with uvicorn.

Nothing heavy is imported at module level: the command line imports this module
for every command, and only ``serve`` needs Starlette and uvicorn.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._pools import HttpChoice
    from .._routing import Server, Strategy

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "add_serve_arguments", "run_serve", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    servers: Sequence[str | Server] | None = None,
    api_key_file: str | os.PathLike[str] | None = None,
    *,
    max_body_size: int | None = None,
    log_level: str = "info",
    http: HttpChoice | None = None,
    max_connections: int | None = None,
    routing: Strategy | None = None,
    allow_management: bool = False,
    allowed_origins: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    body_timeout: float | None = None,
) -> None:
    """Serve the proxy (OpenAI's API and Ollama's) with uvicorn until interrupted (Ctrl-C).

    Binds to 127.0.0.1 unless told otherwise: put the proxy on a public address only
    with API keys (``api_key_file`` or ``AICORTEX_API_KEYS``). ``routing``, ``http``
    and ``max_connections`` are :class:`~aicortex.AsyncCortex`'s; ``allow_management``
    lets Ollama clients pull models onto (and delete them from) every server.
    ``allowed_origins``, ``allowed_hosts`` and ``body_timeout`` are
    :func:`~aicortex.server.create_app`'s (None: their environment variables, else the
    defaults). uvicorn's own limits stay its defaults (an idle keep-alive connection
    is closed after 5 s).
    """
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "aicortex serve needs the server extra: pip install 'aicortex-core[server]'"
        ) from None
    from ._app import DEFAULT_MAX_BODY_SIZE, create_app

    app = create_app(
        servers=list(servers) if servers else None,
        api_key_file=api_key_file,
        max_body_size=DEFAULT_MAX_BODY_SIZE if max_body_size is None else max_body_size,
        http=http,
        max_connections=max_connections,
        routing=routing,
        allow_management=allow_management,
        allowed_origins=None if allowed_origins is None else list(allowed_origins),
        allowed_hosts=None if allowed_hosts is None else list(allowed_hosts),
        body_timeout=body_timeout,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``aicortex serve`` to ``parser``."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}; use keys before going public)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--server",
        dest="servers",
        action="append",
        metavar="URL",
        help="an Ollama server to use; repeat for several, in order of preference "
        "(default: AICORTEX_SERVERS, else OLLAMA_HOST, else http://127.0.0.1:11434)",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="require one of the keys in this file (one per line, # comments) "
        "(default: AICORTEX_API_KEYS, comma-separated; none: no key needed)",
    )
    parser.add_argument(
        "--max-body-size",
        type=int,
        metavar="BYTES",
        help="largest request body accepted (default: 10 MiB)",
    )
    parser.add_argument(
        "--http",
        choices=["auto", "httpx", "aiohttp"],
        help="HTTP transport to the servers (default: AICORTEX_HTTP, else auto: "
        "httpx-aiohttp on asyncio when installed, else httpx)",
    )
    parser.add_argument(
        "--routing",
        choices=["priority", "least_busy", "round_robin"],
        help="how requests are spread over the servers (default: AICORTEX_ROUTING, else "
        "priority: the first healthy server in order)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="most requests in flight to each server; more wait for a free connection "
        "(default: 1000)",
    )
    parser.add_argument(
        "--allow-management",
        action="store_true",
        help="let Ollama clients pull models onto every server (POST /api/pull) and delete "
        "them from every server (DELETE /api/delete); refused by default",
    )
    parser.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        metavar="ORIGIN",
        help="also serve web pages from this origin (CORS): exact, or with * as a wildcard "
        "(https://*.example.com), or * for all; repeat for several (default: "
        "AICORTEX_ALLOWED_ORIGINS, comma-separated; localhost pages are always served)",
    )
    parser.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        metavar="HOST",
        help="also answer to this Host name on a loopback address (with * as a wildcard, "
        "or * to turn the check off); repeat for several (default: AICORTEX_ALLOWED_HOSTS, "
        "comma-separated; localhost and 127.x are always answered)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for a whole request body; a slower one gets 408 "
        "(default: AICORTEX_BODY_TIMEOUT, else 30)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run ``aicortex serve`` with the parsed ``args``; returns the exit status."""
    from .._config import split_servers
    from .._exceptions import ValidationError

    # Each --server may hold several comma-separated URLs, as AICORTEX_SERVERS does.
    servers = [url for value in args.servers or () for url in split_servers(value)]
    # Each --allowed-origin and --allowed-host may hold several, comma-separated.
    origins = _listed(getattr(args, "allowed_origins", None))
    hosts = _listed(getattr(args, "allowed_hosts", None))
    try:
        serve(
            host=args.host,
            port=args.port,
            servers=servers,
            api_key_file=args.api_key_file,
            max_body_size=getattr(args, "max_body_size", None),
            log_level=getattr(args, "log_level", "info"),
            http=getattr(args, "http", None),
            max_connections=getattr(args, "max_connections", None),
            routing=getattr(args, "routing", None),
            allow_management=getattr(args, "allow_management", False),
            allowed_origins=origins,
            allowed_hosts=hosts,
            body_timeout=getattr(args, "body_timeout", None),
        )
    except (ValidationError, ValueError) as exc:
        print(f"aicortex serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _listed(values: Sequence[str] | None) -> list[str] | None:
    """The entries of a repeatable option whose values may be comma-separated; None
    when the option was not given (so that its environment variable applies)."""
    if values is None:
        return None
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]
