"""``aicortex serve``: run the proxy with uvicorn.

Nothing heavy is imported at module level: the command line imports this module
for every command, and only ``serve`` needs Starlette and uvicorn.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._exceptions import ValidationError

if TYPE_CHECKING:
    from .._config import Timeout
    from .._pools import HttpChoice
    from .._settings import Settings
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
    timeout: Timeout | None = None,
    health_ttl: float | None = None,
    allowed_origins: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    body_timeout: float | None = None,
    metrics: bool = True,
    metrics_open: bool = False,
    access_log: bool = True,
    log_format: Literal["text", "json"] = "text",
) -> None:
    """Serve the proxy (OpenAI's API and Ollama's) with uvicorn until interrupted (Ctrl-C).

    Binds to 127.0.0.1 unless told otherwise: put the proxy on a public address only
    with API keys (``api_key_file`` or ``AICORTEX_API_KEYS``). ``routing``, ``http``,
    ``max_connections``, ``timeout`` and ``health_ttl`` are :class:`~aicortex.AsyncCortex`'s;
    ``allow_management`` lets Ollama clients pull models onto (and delete them from)
    every server. ``allowed_origins``, ``allowed_hosts``, ``body_timeout``,
    ``metrics``, ``metrics_open``, ``access_log`` and ``log_format`` are
    :func:`~aicortex.server.create_app`'s (None: their environment variables, else the
    defaults). The access log goes to stderr, one line per request (instead of
    uvicorn's own), unless ``log_level`` is above ``info``. uvicorn's own limits stay
    its defaults (an idle keep-alive connection is closed after 5 s).
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
        timeout=timeout,
        health_ttl=health_ttl,
        allowed_origins=None if allowed_origins is None else list(allowed_origins),
        allowed_hosts=None if allowed_hosts is None else list(allowed_hosts),
        body_timeout=body_timeout,
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


def _serve_settings(load: Callable[[], Settings], log_level: str) -> None:
    """Serve what ``load()`` configures; on SIGHUP, ``load()`` again and use its servers,
    client settings and API keys for the requests that start from then on (running
    ones finish where they are)."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "aicortex serve needs the server extra: pip install 'aicortex-core[server]'"
        ) from None
    from ._auth import load_keys

    settings = load()
    proxy = settings.proxy
    # uvicorn raises the signal that stopped it again once it has stopped: a SIGTERM
    # then ends the command as a normal stop, not as a process killed by it.
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _stopped)
    # uvicorn's own limit comes after ours, so that the answers still running at the
    # end of the grace period get their error frame before uvicorn cancels them.
    graceful = math.ceil(proxy.grace + _FRAME_TIME)
    if proxy.access_log:
        configure_access_log(proxy.log_format, log_level)
    if proxy.workers > 1:
        if settings.metrics.enabled and not os.environ.get(MULTIPROC_DIR):
            # The workers' counters add up in files of one folder, for as long as it runs.
            scratch = tempfile.TemporaryDirectory(prefix="aicortex-metrics-")
            os.environ[MULTIPROC_DIR] = scratch.name
        os.environ[WORKER_LOG_LEVEL] = log_level
        uvicorn.run(
            "aicortex.server._run:worker_app",
            factory=True,
            workers=proxy.workers,
            host=proxy.host,
            port=proxy.port,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=graceful,
            access_log=False,
        )
        return
    app = _make_app(settings)

    def reload() -> None:
        try:
            fresh = load()
            keys = load_keys(None, fresh.proxy.api_keys_file)
            app.state.aicortex.reconfigure(**_client_options(fresh))
        except (ValidationError, ValueError) as exc:
            _say(f"the configuration was not reloaded (the running one is kept): {exc}")
            return
        app.state.aicortex_keys.replace(keys)
        kept = [
            name
            for name in (
                "host",
                "port",
                "max_body_size",
                "allow_management",
                "allowed_origins",
                "allowed_hosts",
                "body_timeout",
                "grace",
            )
            if getattr(fresh.proxy, name) != getattr(proxy, name)
        ]
        count = len(fresh.servers)
        _say(
            f"reloaded the configuration: {count} server{'s' if count != 1 else ''}, "
            f"{len(keys)} API key{'s' if len(keys) != 1 else ''}"
            + (f"; restart to change proxy.{', proxy.'.join(kept)}" if kept else "")
        )

    uvicorn.run(
        _ReloadOnHangup(app, reload),
        host=proxy.host,
        port=proxy.port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=graceful,
        access_log=False,
    )


_FRAME_TIME = 5.0  # seconds, past the grace period, to write the last error frames
WORKER_SETTINGS = "AICORTEX_SERVE_SETTINGS"  # how `serve --workers` tells its workers
WORKER_LOG_LEVEL = "AICORTEX_SERVE_LOG_LEVEL"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's, for several processes


def _make_app(settings: Settings) -> Any:
    from ._app import create_app

    proxy = settings.proxy
    return create_app(
        api_key_file=proxy.api_keys_file,
        max_body_size=proxy.max_body_size,
        allow_management=proxy.allow_management,
        shutdown_grace=proxy.grace,
        allowed_origins=proxy.allowed_origins,
        allowed_hosts=proxy.allowed_hosts,
        body_timeout=proxy.body_timeout,
        metrics=settings.metrics.enabled,
        metrics_open=settings.metrics.open,
        access_log=proxy.access_log,
        log_format=proxy.log_format,
        **_client_options(settings),
    )


def worker_app() -> Any:
    """The app of one worker of ``aicortex serve --workers N`` (a uvicorn factory): the
    configuration as the command resolved it, read again, so that the restart of the
    workers that SIGHUP makes picks up a changed file."""
    import json

    from .._settings import load_settings

    told = json.loads(os.environ[WORKER_SETTINGS])
    settings = load_settings(told["config"], overrides=told["flags"], labels=told["labels"])
    if settings.settings.proxy.access_log:
        log_format = settings.settings.proxy.log_format
        configure_access_log(log_format, os.environ.get(WORKER_LOG_LEVEL, "info"))
    return _make_app(settings.settings)


class Stopped(Exception):
    """The server stopped on SIGTERM, as asked."""


def _stopped(sig: int, frame: Any) -> None:
    raise Stopped


def _client_options(settings: Settings) -> dict[str, Any]:
    """``create_app()``'s (and ``reconfigure()``'s) arguments for the client."""
    return {
        "servers": [entry.server() for entry in settings.servers] or None,
        "timeout": settings.timeouts.timeout(),
        "http": settings.http,
        "max_connections": settings.max_connections,
        "routing": settings.routing.strategy,
        "health_ttl": settings.routing.health_ttl,
        "ejection": settings.routing.ejection(),
    }


def _say(message: str) -> None:
    print(f"aicortex serve: {message}", file=sys.stderr, flush=True)


class _ReloadOnHangup:
    """The app, with ``reload`` run on SIGHUP from the server's start (POSIX only)."""

    def __init__(self, app: Any, reload: Callable[[], None]) -> None:
        self.app = app
        self.reload = reload

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and hasattr(signal, "SIGHUP"):
            import asyncio

            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        await self.app(scope, receive, send)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``aicortex serve`` to ``parser``."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the configuration file (default: $AICORTEX_CONFIG, else ./aicortex.toml, "
        "else the user's config folder); flags win over it, and AICORTEX_* variables too",
    )
    parser.add_argument(
        "--host",
        help=f"address to listen on (default: {DEFAULT_HOST}; use keys before going public)",
    )
    parser.add_argument("--port", type=int, help=f"port (default: {DEFAULT_PORT})")
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
    for name, what, default in (
        ("connect", "opening a connection to a server", "5"),
        ("first-token", "the first chunk of an answer, failover before it", "120"),
        ("idle", "the longest gap between two chunks", "60"),
        ("total", "a whole request, failover included", "none"),
        ("probe", "one health probe of a server", "2"),
    ):
        parser.add_argument(
            f"--{name}-timeout",
            type=float,
            metavar="SECONDS",
            help=f"limit on {what} (default: {default}; 0: none)",
        )
    parser.add_argument(
        "--failures-to-eject",
        type=int,
        metavar="N",
        help="failures in a row that take a server (or a model on it) out of the rotation "
        "(default: 3; a connection failure does at once)",
    )
    parser.add_argument(
        "--eject-first",
        type=float,
        metavar="SECONDS",
        help="how long a first ejection lasts (default: 1; it doubles with each one in a row)",
    )
    parser.add_argument(
        "--eject-max",
        type=float,
        metavar="SECONDS",
        help="the longest an ejection lasts (default: 30)",
    )
    parser.add_argument(
        "--health-ttl",
        type=float,
        metavar="SECONDS",
        help="how long a probe's result is trusted (default: 60)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port (default: 1); on SIGHUP they are "
        "replaced one by one, reading the configuration again",
    )
    parser.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, how long running answers may take to finish; the "
        "rest end with an error (default: 30)",
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
        help="uvicorn's log level, and the access log's: above info hides it (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
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


# The options whose names are not their settings' last part.
_FLAGS = {
    "servers": "--server",
    "proxy.api_keys_file": "--api-key-file",
    "routing.strategy": "--routing",
    "timeouts.connect": "--connect-timeout",
    "timeouts.first_token": "--first-token-timeout",
    "timeouts.idle": "--idle-timeout",
    "timeouts.total": "--total-timeout",
    "timeouts.probe": "--probe-timeout",
    "proxy.allowed_origins": "--allowed-origin",
    "proxy.allowed_hosts": "--allowed-host",
    "proxy.access_log": "--no-access-log",
    "metrics.enabled": "--no-metrics",
    "metrics.open": "--metrics-open",
}


def run_serve(args: argparse.Namespace) -> int:
    """Run ``aicortex serve`` with the parsed ``args``; returns the exit status."""
    import json

    from .._config import split_servers
    from .._settings import load_settings

    # Each --server may hold several comma-separated URLs, as AICORTEX_SERVERS does.
    servers = [url for value in args.servers or () for url in split_servers(value)]
    flags: dict[str, object] = {
        "servers": servers or None,
        "proxy.host": args.host,
        "proxy.port": args.port,
        "proxy.api_keys_file": args.api_key_file,
        "proxy.max_body_size": getattr(args, "max_body_size", None),
        "proxy.allow_management": True if getattr(args, "allow_management", False) else None,
        "proxy.workers": getattr(args, "workers", None),
        "proxy.grace": getattr(args, "grace", None),
        # Each --allowed-origin and --allowed-host may hold several, comma-separated.
        "proxy.allowed_origins": _listed(getattr(args, "allowed_origins", None)),
        "proxy.allowed_hosts": _listed(getattr(args, "allowed_hosts", None)),
        "proxy.body_timeout": getattr(args, "body_timeout", None),
        "proxy.log_format": getattr(args, "log_format", None),
        "proxy.access_log": False if getattr(args, "access_log", True) is False else None,
        "metrics.enabled": False if getattr(args, "metrics", True) is False else None,
        "metrics.open": True if getattr(args, "metrics_open", False) else None,
        "http": getattr(args, "http", None),
        "max_connections": getattr(args, "max_connections", None),
        "routing.strategy": getattr(args, "routing", None),
        "routing.health_ttl": getattr(args, "health_ttl", None),
        "routing.failures_to_eject": getattr(args, "failures_to_eject", None),
        "routing.eject_first": getattr(args, "eject_first", None),
        "routing.eject_max": getattr(args, "eject_max", None),
    }
    for name in ("connect", "first_token", "idle", "total", "probe"):
        flags[f"timeouts.{name}"] = getattr(args, f"{name}_timeout", None)
    try:
        labels = {
            key: _FLAGS.get(key, "--" + key.rpartition(".")[2].replace("_", "-")) for key in flags
        }
        path = getattr(args, "config", None)
        # Workers are new processes: they get what to read as the environment.
        os.environ[WORKER_SETTINGS] = json.dumps({"config": path, "flags": flags, "labels": labels})
        _serve_settings(
            lambda: load_settings(path, overrides=flags, labels=labels).settings,
            getattr(args, "log_level", "info"),
        )
    except (ValidationError, ValueError) as exc:
        print(f"aicortex serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Stopped:
        return 0
    return 0


def _listed(values: Sequence[str] | None) -> list[str] | None:
    """The entries of a repeatable option whose values may be comma-separated; None
    when the option was not given (so that its environment variable applies)."""
    if values is None:
        return None
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]
