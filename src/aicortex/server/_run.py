"""``aicortex serve``: run the proxy with uvicorn.

Nothing heavy is imported at module level: the command line imports this module
for every command, and only ``serve`` needs Starlette and uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .._pools import HttpChoice
    from .._routing import Server, Strategy

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "add_serve_arguments",
    "configure_access_log",
    "run_serve",
    "serve",
]

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
    metrics: bool = True,
    metrics_open: bool = False,
    access_log: bool = True,
    log_format: Literal["text", "json"] = "text",
) -> None:
    """Serve the proxy (OpenAI's API and Ollama's) with uvicorn until interrupted (Ctrl-C).

    Binds to 127.0.0.1 unless told otherwise: put the proxy on a public address only
    with API keys (``api_key_file`` or ``AICORTEX_API_KEYS``). ``routing``, ``http``
    and ``max_connections`` are :class:`~aicortex.AsyncCortex`'s; ``allow_management``
    lets Ollama clients pull models onto (and delete them from) every server;
    ``metrics``, ``metrics_open``, ``access_log`` and ``log_format`` are
    :func:`~aicortex.server.create_app`'s. The access log goes to stderr, one line per
    request (instead of uvicorn's own), unless ``log_level`` is above ``info``.
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
        metrics=metrics,
        metrics_open=metrics_open,
        access_log=access_log,
        log_format=log_format,
    )
    if access_log:
        configure_access_log(log_format, log_level)
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False)


_HANDLER_NAME = "aicortex-serve"
_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


def configure_access_log(log_format: Literal["text", "json"], log_level: str = "info") -> None:
    """Send the ``aicortex.access`` lines to stderr: after a timestamp, or as they are
    (JSON lines carry their own ``time``). Lines are INFO records, so a ``log_level``
    above ``info`` hides them."""
    logger = logging.getLogger("aicortex.access")
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    form = "%(message)s" if log_format == "json" else "%(asctime)s %(message)s"
    handler.setFormatter(logging.Formatter(form))
    logger.addHandler(handler)
    logger.setLevel(_LEVELS.get(log_level.lower(), logging.INFO))
    logger.propagate = False  # one line per request, whatever the root logger has


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
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level, and the access log's: above info hides it (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="the access log on stderr, one line per request: key=value pairs after a "
        "timestamp, or JSON objects (default: text)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="write no access log",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="serve no GET /metrics (Prometheus metrics, on by default)",
    )
    parser.add_argument(
        "--metrics-open",
        action="store_true",
        help="serve GET /metrics without an API key even when keys are required",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run ``aicortex serve`` with the parsed ``args``; returns the exit status."""
    from .._config import split_servers
    from .._exceptions import ValidationError

    # Each --server may hold several comma-separated URLs, as AICORTEX_SERVERS does.
    servers = [url for value in args.servers or () for url in split_servers(value)]
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
            metrics=getattr(args, "metrics", True),
            metrics_open=getattr(args, "metrics_open", False),
            access_log=getattr(args, "access_log", True),
            log_format=getattr(args, "log_format", "text"),
        )
    except (ValidationError, ValueError) as exc:
        print(f"aicortex serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
