"""The ``aicortex`` command (also ``python -m aicortex``).

::

    aicortex chat [PROMPT] [--model M] [--server URL ...] [--system S] [--temperature T]
                  [--max-tokens N] [--seed N] [--format F] [--think [LEVEL]] [-o KEY=VALUE]
                  [--json] [--verbose]         no PROMPT on a terminal: an interactive chat
    aicortex models [--family F] [--json]      offline, from the catalog
    aicortex families [--json]                 offline
    aicortex info MODEL [--json]               offline
    aicortex servers [MODEL] [--server URL ...] [--json]
    aicortex config [--config PATH] [--json]   the resolved configuration, and its sources
    aicortex pull MODEL [--server URL ...]     onto every server at once
    aicortex refresh [--metadata-dir DIR] [--server URL ...] [--dry-run]
    aicortex serve ...                         the OpenAI-compatible proxy (extra "server")

Exit status: 0 ok; 1 internal error, a failed catalog write or a pull that failed on some
server; 2 bad input or unknown model; 3 no reachable server; 4 the answer broke off
mid-stream; 130 interrupted (Ctrl-C);
141 stdout was closed early (a pipe). Every error is one line on stderr,
``aicortex: error: ...``; ``AICORTEX_DEBUG=1`` adds the traceback of an
internal error.

The offline commands load only the catalog: nothing of the HTTP stack is
imported unless a command goes online.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

from ._exceptions import (
    AICortexError,
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    StreamError,
    ValidationError,
    without_advice,
)
from ._version import __version__
from .tools._common import positive_seconds, server_list

if TYPE_CHECKING:
    from ._catalog import Catalog, ModelInfo
    from ._client import ChatArgs
    from ._health import ServerInfo
    from ._pull import PullProgress
    from ._sync import Stream
    from .tools.check_models import ServerCheck
    from .tools.fetch_models import ServerModels

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NO_SERVER",
    "EXIT_OK",
    "EXIT_STREAM_BROKE",
    "main",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_NO_SERVER = 3
EXIT_STREAM_BROKE = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

PROG = "aicortex"
SERVER_EXTRA = "aicortex-core[server]"
NO_PROXY = f"the proxy is not available in this installation (install {SERVER_EXTRA})"

EXIT_STATUSES = """\
exit status:
  0    ok
  1    internal error (AICORTEX_DEBUG=1 shows the traceback), a catalog write failed,
       or a pull failed on some server
  2    bad input, or an unknown model (with suggestions)
  3    no server could be reached (each one tried is named)
  4    the answer broke off mid-stream
  130  interrupted (Ctrl-C)
  141  stdout was closed early (a pipe)
"""

logger = logging.getLogger("aicortex")

Command = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """A failure to report as one line, with its exit status."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


# --------------------------------------------------------------------------- output helpers


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _print_json(data: Any) -> None:
    _out(json.dumps(data, indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def _context(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


# --------------------------------------------------------------------------- offline commands


def _catalog(args: argparse.Namespace) -> Catalog:
    from ._catalog import Catalog, default_catalog

    directory: str | None = args.metadata_dir
    if directory is None:
        return default_catalog()
    if not os.path.isdir(directory):
        raise CLIError(f"the catalog directory {directory!r} does not exist")
    return Catalog(directory)


def _model_row(info: ModelInfo) -> list[str]:
    return [
        info.name + (" *" if info.default else ""),
        info.family,
        info.parameters,
        info.quantization,
        _context(info.context_length),
        info.size,
        ", ".join(info.tags),
    ]


def cmd_models(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    infos = [catalog.model_info(name) for name in catalog.models(args.family)]
    if args.json:
        _print_json([info.to_dict() for info in infos])
        return EXIT_OK
    if not infos:
        _err(f"{PROG}: the catalog has no models")
        return EXIT_OK
    headers = ["MODEL", "FAMILY", "PARAMS", "QUANT", "CONTEXT", "SIZE", "TAGS"]
    _out(_table(headers, [_model_row(info) for info in infos]))
    if any(info.default for info in infos):
        _out("* the default model")
    return EXIT_OK


def cmd_families(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    families = {family: catalog.models(family) for family in catalog.families()}
    if args.json:
        _print_json([{"family": f, "models": names} for f, names in families.items()])
        return EXIT_OK
    rows = [[f, str(len(names)), ", ".join(names)] for f, names in families.items()]
    _out(_table(["FAMILY", "COUNT", "MODELS"], rows))
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    info = _catalog(args).model_info(args.model)
    if args.json:
        _print_json(info.to_dict())
        return EXIT_OK
    fields = [
        ("model", info.name),
        ("family", info.family),
        ("parameters", info.parameters),
        ("quantization", info.quantization),
        ("size", info.size),
        ("context length", f"{info.context_length} tokens"),
        ("default model", "yes" if info.default else "no"),
        ("tags", ", ".join(info.tags) or "-"),
        ("description", info.description or "-"),
    ]
    width = max(len(key) for key, _ in fields) + 2
    for key, value in fields:
        _out(f"{key + ':':<{width}}{value}")
    _out("servers (last known status):")
    if info.servers:
        _out(_indent(_table(["URL", "STATUS"], [[s.url, s.status] for s in info.servers])))
    else:
        _out("  none listed")
    if info.generation:
        _out("generation parameters:")
        rows = [[key, str(r.default), str(r.min), str(r.max)] for key, r in info.generation.items()]
        _out(_indent(_table(["PARAMETER", "DEFAULT", "MIN", "MAX"], rows)))
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --------------------------------------------------------------------------- online commands


class _Answer:
    """An answer being written to stdout, and whether its last line is still open (so
    that an interruption or an error starts on a line of its own)."""

    def __init__(self) -> None:
        self.open_line = False
        self.thinking = False

    def write(self, text: str) -> None:
        if self.thinking:
            self.thinking = False
            sys.stderr.write("\n...done thinking.\n")
            sys.stderr.flush()
        # Open first: Ctrl-C may come as soon as the text is out.
        self.open_line = True
        sys.stdout.write(text)
        sys.stdout.flush()
        self.open_line = not text.endswith("\n")

    def think(self, text: str) -> None:
        if not self.thinking:
            self.thinking = True
            sys.stderr.write("Thinking...\n")
        sys.stderr.write(text)
        sys.stderr.flush()

    def end_line(self) -> None:
        if self.thinking:
            self.thinking = False
            sys.stderr.write("\n")
            sys.stderr.flush()
        if self.open_line:
            self.open_line = False
            sys.stdout.write("\n")
            sys.stdout.flush()


def _request(args: argparse.Namespace) -> ChatArgs:
    """The chat request's arguments from the command line (options, format, think)."""
    from ._repl import OptionError, parse_format, parse_think, request_options

    try:
        options = request_options(
            args.option,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        request: ChatArgs = {"system": args.system}
        if options:
            request["options"] = options
        if args.format is not None:
            request["format"] = parse_format(args.format)
        if args.think is not None:
            request["think"] = parse_think(args.think)
    except OptionError as exc:
        raise CLIError(str(exc)) from None
    return request


def _show(stream: Stream, *, quiet: bool = False, verbose: bool = False) -> str:
    """Write the answer as it streams (not with ``quiet``) and return its text; with
    ``verbose``, say on stderr who answers and, at the end, the token stats."""
    from ._events import EventType

    if verbose:
        _err(f"{PROG}: {stream.model} is answering from {stream.server}")
    answer = _Answer()
    try:
        for event in stream:
            if event.type is not EventType.TOKEN or quiet:
                continue
            if event.thinking:
                answer.think(event.thinking)
            if event.content:
                answer.write(event.content)
        text = stream.text()
    finally:
        answer.end_line()
    if verbose:
        _err(_stats_line(stream.server, stream.model, stream.stats))
    return text


def _broke_off(exc: StreamError, again: str) -> str:
    return f"{without_advice(exc)} The answer is incomplete; {again} for a full one."


def cmd_chat(args: argparse.Namespace) -> int:
    request = _request(args)
    given: str | None = args.prompt
    if given is None and sys.stdin.isatty():
        if args.json:
            raise CLIError("--json needs a PROMPT (or '-' to read it from stdin)")
        return _chat_interactively(args, request)
    prompt = sys.stdin.read() if given is None or given == "-" else given
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    from ._sync import Cortex

    options = _cortex_options(args)
    if args.model:
        options["model"] = args.model
    with Cortex(**options) as cortex:
        stream = cortex.chat(prompt, stream=True, **request)
        with stream:
            try:
                text = _show(stream, quiet=args.json, verbose=args.verbose)
            except StreamError as exc:
                raise CLIError(_broke_off(exc, "run the command again"), EXIT_STREAM_BROKE) from exc
        if args.json:
            stats = stream.stats
            _print_json(
                {
                    "text": text,
                    "model": stream.model,
                    "server": stream.server,
                    "done_reason": stream.done_reason,
                    "stats": _stats_json(stats) if stats is not None else None,
                }
            )
    return EXIT_OK


def _chat_interactively(args: argparse.Namespace, request: ChatArgs) -> int:
    """The chat at the ``>>>`` prompt, until ``/bye`` or Ctrl-D."""
    from ._repl import Conversation, interactive
    from ._sync import Cortex

    def report(exc: BaseException) -> None:
        text = _broke_off(exc, "ask again") if isinstance(exc, StreamError) else _one_line(exc)
        _err(f"{PROG}: error: {text}")

    def show(stream: Stream) -> str:
        return _show(stream, verbose=args.verbose)

    with Cortex(**_cortex_options(args)) as cortex:
        interactive(
            cortex,
            Conversation(model=args.model),
            request=request,
            show=show,
            report=report,
        )
    return EXIT_OK


def _cortex_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client's arguments for an online command: the configuration (``--config``,
    the ``AICORTEX_*`` variables, the file), with the command's ``--server`` over it. A
    command that sends a few requests uses httpx's transport unless configured."""
    from ._settings import load_settings

    resolved = load_settings(getattr(args, "config", None))
    options = resolved.settings.cortex_arguments()
    servers = server_list(getattr(args, "server", None))
    if servers:
        options.update(servers=servers, fallback=False)
    if resolved.source("http") == "default":
        options["http"] = _one_shot_http()
    return options


def _one_shot_http() -> Literal["httpx"] | None:
    """The transport of a command that sends a few requests: httpx's own, unless
    ``AICORTEX_HTTP`` says otherwise. Importing aiohttp would cost a one-shot command
    more time than its faster reading saves."""
    return None if os.environ.get("AICORTEX_HTTP", "").strip() else "httpx"


def _stats_json(stats: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data: dict[str, Any] = asdict(stats)
    data["tokens_per_second"] = stats.tokens_per_second
    return data


def _stats_line(server: str, model: str, stats: Any) -> str:
    line = f"{PROG}: server {server}, model {model}"
    if stats is None:
        return line + ", no token stats"
    parts: list[str] = []
    if stats.prompt_tokens is not None:
        parts.append(f"{stats.prompt_tokens} prompt tokens")
    if stats.completion_tokens is not None:
        parts.append(f"{stats.completion_tokens} completion tokens")
    if stats.tokens_per_second is not None:
        parts.append(f"{stats.tokens_per_second:.1f} tokens/s")
    if stats.total_duration is not None:
        parts.append(f"{stats.total_duration / 1e9:.2f} s total")
    return line + (": " + ", ".join(parts) if parts else "")


def cmd_servers(args: argparse.Namespace) -> int:
    import anyio

    from ._client import AsyncCortex

    model: str | None = args.model
    options = _cortex_options(args)
    options["timeout"] = dataclasses.replace(options["timeout"], probe=args.timeout)

    async def probe() -> tuple[list[ServerInfo], tuple[list[str], list[str]]]:
        async with AsyncCortex(**options) as cortex:
            if args.verbose:
                _err(f"{PROG}: HTTP transport: {cortex.transport()} (http={cortex.http})")
            infos = await cortex.probe_servers(model)
            live = [name for info in infos if info.up for name in info.models]
            none: tuple[list[str], list[str]] = ([], [])
            return infos, cortex.catalog.suggestions_for_servers(model, live) if model else none

    infos, (near, not_pulled) = anyio.run(probe)
    if args.json:
        _print_json([_server_json(info) for info in infos])
    else:
        headers = ["SERVER", "STATUS", "LATENCY", "VERSION"]
        headers += [f"HAS {model}"] if model else ["MODELS"]
        rows = [_server_row(info, model) for info in infos]
        _out(_table([*headers, "NOTE"], rows))
    sys.stdout.flush()
    up = [info for info in infos if info.up]
    if not up:
        tried = "; ".join(f"{i.url} ({i.error or 'down'})" for i in infos)
        raise CLIError(f"no reachable server; tried: {tried}", EXIT_NO_SERVER)
    if model and not any(info.has_model for info in up):
        raise ModelNotFoundError(model, near, servers=[i.url for i in up], not_pulled=not_pulled)
    return EXIT_OK


def _server_json(info: ServerInfo) -> dict[str, Any]:
    return {
        "url": info.url,
        "up": info.up,
        "latency": info.latency,
        "version": info.version,
        "models": list(info.models),
        "model": info.model,
        "has_model": info.has_model,
        "error": info.error,
    }


def _server_row(info: ServerInfo, model: str | None) -> list[str]:
    if model:
        has = "-" if info.has_model is None else ("yes" if info.has_model else "no")
    else:
        has = str(len(info.models)) if info.up else "-"
    return [
        info.url,
        "up" if info.up else "down",
        _ms(info.latency),
        info.version or "-",
        has,
        info.error or "",
    ]


def cmd_pull(args: argparse.Namespace) -> int:
    model: str = args.model
    if not model.strip():
        raise CLIError("the model name is empty")
    import anyio

    from ._client import AsyncCortex

    options = _cortex_options(args)
    targets: list[str] = []
    last: dict[str, PullProgress] = {}

    async def run() -> None:
        async with AsyncCortex(**options) as cortex:
            pulling = cortex.pull(model)
            targets.extend(pulling.servers)
            with _pull_display(pulling.servers) as show:
                async with pulling:
                    async for progress in pulling:
                        show(progress)
                        if progress.done:
                            last[progress.server] = progress

    anyio.run(run)
    rows: list[list[str]] = []
    failed: list[str] = []
    for url in targets:
        progress = last.get(url)
        if progress is not None and progress.error is None:
            rows.append([url, "pulled"])
            continue
        reason = "no answer" if progress is None else progress.error or "failed"
        unreachable = progress is not None and progress.unreachable
        rows.append([url, f"{'unreachable' if unreachable else 'failed'}: {reason}"])
        failed.append(f"{url} ({reason})")
    _out()
    _out(_table(["SERVER", "RESULT"], rows))
    sys.stdout.flush()
    if failed:
        none_reached = all(p.unreachable for p in last.values()) and len(last) == len(targets)
        code = EXIT_NO_SERVER if none_reached else EXIT_INTERNAL
        where = f"{len(failed)} of {len(targets)} servers" if len(targets) > 1 else "the server"
        raise CLIError(f"could not pull {model!r} onto {where}: {'; '.join(failed)}", code)
    return EXIT_OK


class _PullDisplay(Protocol):
    """Shows a pull's progress while it runs."""

    def __enter__(self) -> Callable[[PullProgress], None]: ...

    def __exit__(self, *exc: object) -> None: ...


def _pull_display(servers: Sequence[str]) -> _PullDisplay:
    """Live bars on a terminal, when rich is installed; plain lines otherwise."""
    if sys.stdout.isatty():
        try:
            return _PullBars(servers)
        except ImportError:  # rich is optional (the "cli" extra)
            pass
    return _PullLines(servers)


class _PullLines:
    """A pull's progress as plain lines: each status of each server once, a layer's
    line again whenever it has advanced by a point or more, and every server's last."""

    def __init__(self, servers: Sequence[str]) -> None:
        self._width = max((len(url) for url in servers), default=0)
        self._shown: dict[tuple[str, str], float] = {}  # (server, status): percent shown

    def __enter__(self) -> Callable[[PullProgress], None]:
        return self.show

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, progress: PullProgress) -> None:
        line = self.line(progress)
        if line is not None:
            _out(line)
            sys.stdout.flush()

    def line(self, progress: PullProgress) -> str | None:
        """The line for ``progress``, or None when it would say nothing new."""
        where = progress.server.ljust(self._width)
        if progress.done:
            text = "success" if progress.error is None else f"failed: {progress.error}"
            return f"{where}  {text}"
        key = (progress.server, progress.status)
        total, completed = progress.total, progress.completed
        if not total or completed is None:
            if key in self._shown:
                return None
            self._shown[key] = 0.0
            return f"{where}  {progress.status}"
        percent = min(completed * 100 / total, 100.0)
        before = self._shown.get(key)
        finished = percent >= 100.0 and (before is None or before < 100.0)
        if before is not None and percent - before < 1.0 and not finished:
            return None
        self._shown[key] = percent
        sizes = f"{_size(completed)}/{_size(total)}"
        return f"{where}  {progress.status}  {int(percent)}% ({sizes})"


class _PullBars:
    """A pull's progress as one live rich progress bar per server."""

    def __init__(self, servers: Sequence[str], console: Any = None) -> None:
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TransferSpeedColumn,
        )

        self._escape = escape
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        width = max((len(url) for url in servers), default=0)
        self._tasks = {
            url: self._bars.add_task(escape(url.ljust(width)), total=None, status="waiting")
            for url in servers
        }

    def __enter__(self) -> Callable[[PullProgress], None]:
        self._bars.start()
        return self.show

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def show(self, progress: PullProgress) -> None:
        task = self._tasks.get(progress.server)
        if task is None:
            return
        if progress.done and progress.error is None:
            size = max(progress.bytes_total, 1)
            self._bars.update(task, total=size, completed=size, status="[green]success[/]")
        elif progress.done:
            self._bars.update(task, status=f"[red]failed: {self._escape(progress.error or '')}[/]")
        else:
            self._bars.update(
                task,
                total=progress.bytes_total or None,
                completed=progress.bytes_completed,
                status=self._escape(progress.status),
            )


def _size(count: int) -> str:
    """Bytes in decimal units, as Ollama shows them: 512 B, 41.0 MB, 2.9 GB."""
    if count < 1000:
        return f"{count} B"
    value = count / 1000
    units = ["KB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def cmd_config(args: argparse.Namespace) -> int:
    from ._settings import config_path, load_settings

    file, why = config_path(args.config)
    resolved = load_settings(args.config)
    rows = list(resolved.rows())
    if args.json:
        _print_json(
            {
                "file": None if file is None else str(file),
                "settings": {key: {"value": value, "source": src} for key, value, src in rows},
            }
        )
        return EXIT_OK
    _out(f"configuration file: {file} (from {why})" if file else "configuration file: none")
    table = [[key, json.dumps(value), src] for key, value, src in rows]
    _out(_table(["KEY", "VALUE", "FROM"], table))
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    import anyio

    from ._urls import server_url
    from .tools import catalog_directory
    from .tools.apply_valid_models import apply, validate_directory
    from .tools.check_models import check
    from .tools.fetch_models import fetch
    from .tools.resolve_models import resolve

    servers = server_list(args.server)
    if args.no_catalog and not servers:
        raise CLIError("--no-catalog needs at least one --server")
    for url in servers:
        server_url(url)  # a malformed URL is bad input, before anything goes online
    directory = catalog_directory(args.metadata_dir)
    validate_directory(directory)
    _err(f"{PROG}: probing servers (timeout {args.timeout:g}s) for the catalog in {directory}")

    def progress(result: ServerCheck) -> None:
        if result.up:
            count = len(result.models)
            detail = f"{_ms(result.latency)}, Ollama {result.version or '?'}, {count} models"
        else:
            detail = result.error or "down"
        where = (
            result.url if result.address == result.url else f"{result.url} (at {result.address})"
        )
        _err(f"  {'up' if result.up else 'down':<4}  {where}  {detail}")

    checked = anyio.run(
        lambda: check(
            servers,
            metadata_dir=directory,
            include_catalog=not args.no_catalog,
            timeout=args.timeout,
            on_result=progress,
        )
    )
    live = checked.live()
    _err(f"{PROG}: {len(live)} of {len(checked.servers)} servers up")
    if live:
        _err(f"{PROG}: fetching model details")
    live_urls = {server.url for server in live}

    def fetched_one(result: ServerModels) -> None:
        if result.url in live_urls:
            detail = f"{len(result.models)} models" if result.up else result.error
            _err(f"  {result.url}  {detail}")

    fetched = anyio.run(lambda: fetch(checked, on_result=fetched_one))
    resolved = resolve(directory, fetched)
    for warning in resolved.warnings:
        _err(f"{PROG}: warning: {warning}")
    report = apply(resolved, directory, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(report.diff)
        _err(
            f"{PROG}: dry run: {len(report.written)} of {len(report.files)} files would change; "
            "nothing was written"
        )
        return EXIT_OK
    for change in resolved.changes:
        _out(str(change))
    if report.written:
        done = ", ".join(f"{f.file} ({f.status})" for f in report.files if f.status != "unchanged")
        _out(f"wrote {done}")
    else:
        _out("the catalog is up to date; no file changed")
    return EXIT_OK


# --------------------------------------------------------------------------- serve (another module)


def _serve_module() -> Any | None:
    """``aicortex.server._run``, or ``None`` when the proxy (or its extra) is not installed."""
    import importlib
    import importlib.util

    # The module imports Starlette and uvicorn only when serving: check for them here.
    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn")):
        return None
    try:
        module = importlib.import_module("aicortex.server._run")
    except ImportError as exc:
        missing = exc.name or ""
        if missing.split(".")[0] in ("starlette", "uvicorn") or missing in (
            "aicortex.server",
            "aicortex.server._run",
        ):
            return None
        raise
    return module


def _add_serve(subparsers: Any, wanted: bool, asks_help: bool = False) -> None:
    """The ``serve`` subcommand; the proxy's own arguments are loaded only when it is run.
    Without the proxy's extra, ``serve --help`` says how to install it."""
    help_text = "run the proxy for OpenAI and Ollama clients (needs aicortex-core[server])"
    module = _serve_module() if wanted else None
    description = help_text
    if wanted and module is None:
        if not asks_help:
            raise CLIError(NO_PROXY)
        description = (
            f"{help_text}.\n\nThe proxy is not installed here. Install it with:\n\n"
            f"    python3 -m pip install '{SERVER_EXTRA}'"
        )
    parser = subparsers.add_parser(
        "serve",
        help=help_text,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if module is not None:
        module.add_serve_arguments(parser)
        parser.set_defaults(run=module.run_serve)


# --------------------------------------------------------------------------- parser and main


def _add_catalog_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metadata-dir",
        metavar="DIR",
        help="read this catalog directory instead (default: $AICORTEX_METADATA_DIR or the "
        "bundled one)",
    )


def _add_server(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-s",
        "--server",
        action="append",
        metavar="URL",
        help=f"{what} (repeat, or separate with commas)",
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the configuration file (default: $AICORTEX_CONFIG, else ./aicortex.toml, "
        "else the user's config folder)",
    )


def _number(kind: Callable[[str], float] | Callable[[str], int]) -> Callable[[str], Any]:
    """An argparse type that says which kind of number it wanted."""
    name = "a whole number" if kind is int else "a number"

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None

    return convert


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` tells whether ``serve`` is wanted (only then is the proxy imported)."""
    parser = _Parser(
        prog=PROG,
        description="Use one or many Ollama servers as one: chat, list the model catalog, "
        "check servers, pull models onto them, refresh the catalog.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aicortex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    chat = sub.add_parser(
        "chat",
        help="send a prompt and stream the answer, or chat at a prompt",
        description="Send PROMPT to the best available server and stream the answer to stdout "
        "as it arrives. With no PROMPT on a terminal, chat interactively: the conversation "
        "is kept, /help lists the commands, Ctrl-C stops an answer, /bye or Ctrl-D leaves. "
        "With no PROMPT and stdin not a terminal, the prompt is read from stdin.",
    )
    chat.add_argument(
        "prompt",
        metavar="PROMPT",
        nargs="?",
        help="the prompt ('-' reads it from stdin; none on a terminal: the interactive chat)",
    )
    chat.add_argument(
        "-m", "--model", help="the model (default: $AICORTEX_MODEL or the catalog's default)"
    )
    _add_server(chat, "use only this server instead of the usual candidates")
    chat.add_argument("--system", metavar="S", help="a system prompt")
    chat.add_argument(
        "--temperature", type=_number(float), metavar="T", help="sampling temperature (0: greedy)"
    )
    chat.add_argument(
        "--max-tokens",
        type=_number(int),
        metavar="N",
        help="stop the answer after N tokens (Ollama's num_predict)",
    )
    chat.add_argument(
        "--seed", type=_number(int), metavar="N", help="seed for reproducible answers"
    )
    chat.add_argument(
        "--format",
        metavar="FORMAT",
        help="'json' for a JSON answer, or a JSON schema (an object) the answer must follow",
    )
    chat.add_argument(
        "--think",
        nargs="?",
        const="true",
        metavar="LEVEL",
        help="let a thinking model think first (shown on stderr); LEVEL: true (the "
        "default), false, low, medium, high or max",
    )
    chat.add_argument(
        "-o",
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="any Ollama model option, such as -o num_ctx=8192 (repeat; VALUE is read as "
        "JSON, else as text)",
    )
    chat.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end (text, model, server, done_reason, stats) "
        "instead of streaming",
    )
    chat.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report the server, failover warnings and token stats on stderr",
    )
    _add_config(chat)
    chat.set_defaults(run=cmd_chat)

    models = sub.add_parser(
        "models",
        help="list the catalog's models (offline)",
        description="List the models of the offline catalog.",
    )
    models.add_argument("-f", "--family", help="only this family")
    models.add_argument("--json", action="store_true", help="print JSON")
    _add_catalog_dir(models)
    models.set_defaults(run=cmd_models)

    families = sub.add_parser(
        "families",
        help="list the catalog's model families (offline)",
        description="List the model families of the offline catalog.",
    )
    families.add_argument("--json", action="store_true", help="print JSON")
    _add_catalog_dir(families)
    families.set_defaults(run=cmd_families)

    info = sub.add_parser(
        "info",
        help="show what the catalog knows about a model (offline)",
        description="Show the catalog entry of MODEL: sizes, context length, description, "
        "tags, servers and generation parameters.",
    )
    info.add_argument("model", metavar="MODEL")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_catalog_dir(info)
    info.set_defaults(run=cmd_info)

    servers = sub.add_parser(
        "servers",
        help="probe the servers now: up/down, latency, version, models",
        description="Probe the candidate servers (for MODEL, if given) concurrently and show "
        "a table: server, up/down, latency, version, whether it has the model.",
    )
    servers.add_argument("model", metavar="MODEL", nargs="?")
    _add_server(servers, "probe only this server instead of the usual candidates")
    servers.add_argument(
        "--timeout",
        type=positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="give up on a server after this long (default: 2)",
    )
    servers.add_argument("--json", action="store_true", help="print JSON")
    servers.add_argument(
        "-v", "--verbose", action="store_true", help="log warnings; name the HTTP transport"
    )
    _add_config(servers)
    servers.set_defaults(run=cmd_servers)

    pull = sub.add_parser(
        "pull",
        help="pull a model onto every server at once",
        description="Pull MODEL onto every server at once (Ollama's /api/pull), with a live "
        "progress bar per server on a terminal (plain lines otherwise), then a summary: "
        "which servers have it now and why the others failed.",
    )
    pull.add_argument("model", metavar="MODEL")
    _add_server(pull, "pull onto this server (default: $AICORTEX_SERVERS, else $OLLAMA_HOST)")
    _add_config(pull)
    pull.set_defaults(run=cmd_pull)

    config = sub.add_parser(
        "config",
        help="show the resolved configuration and where each value came from",
        description="Show every setting as aicortex resolves it (arguments, then the "
        "AICORTEX_* variables, then the configuration file, then the defaults) and where "
        "each came from; secrets are masked. An invalid file is reported with its key.",
    )
    _add_config(config)
    config.add_argument("--json", action="store_true", help="print JSON")
    config.set_defaults(run=cmd_config)

    refresh = sub.add_parser(
        "refresh",
        help="refresh the catalog from the live servers",
        description="Probe the catalog's servers and the given ones, fetch their models, merge "
        "them into the catalog and write the family files that changed (atomically). "
        "Progress goes to stderr; the changes (or with --dry-run a diff) to stdout.",
    )
    refresh.add_argument(
        "--metadata-dir",
        metavar="DIR",
        help="the catalog directory to refresh (default: $AICORTEX_METADATA_DIR or the "
        "one aicortex reads)",
    )
    _add_server(refresh, "also probe this server and add its models")
    refresh.add_argument("--no-catalog", action="store_true", help="probe only the given servers")
    refresh.add_argument("--dry-run", action="store_true", help="print a diff, write nothing")
    refresh.add_argument(
        "--timeout",
        type=positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="probe timeout per server (default: 2)",
    )
    refresh.add_argument("-v", "--verbose", action="store_true", help="log warnings")
    refresh.set_defaults(run=cmd_refresh)

    wanted = _command_of(argv) == "serve"
    _add_serve(sub, wanted, asks_help=wanted and ("-h" in argv or "--help" in argv))
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (ModelNotFoundError, ValidationError, CLIError)):
        return exc.code if isinstance(exc, CLIError) else EXIT_BAD_INPUT
    if isinstance(exc, (ServerError, CortexTimeoutError)):
        return EXIT_NO_SERVER
    if isinstance(exc, StreamError):
        return EXIT_STREAM_BROKE
    from .tools import CatalogWriteError, ToolError

    if isinstance(exc, ToolError) and not isinstance(exc, CatalogWriteError):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aicortex`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    try:
        try:
            args = build_parser(args_list).parse_args(args_list)
        except SystemExit as exc:  # --help, --version, a usage error
            return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        handler.setLevel(logging.WARNING if getattr(args, "verbose", True) else logging.ERROR)
        run: Command = args.run
        status = run(args)
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return status
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``aicortex models | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (AICortexError, CLIError) as exc:
        _err(f"{PROG}: error: {_one_line(exc)}")
        return _exit_code(exc)
    except Exception as exc:
        if os.environ.get("AICORTEX_DEBUG") == "1":
            traceback.print_exc()
        _err(
            f"{PROG}: error: {_one_line(exc) or type(exc).__name__} (internal error; set "
            "AICORTEX_DEBUG=1 for the traceback)"
        )
        return EXIT_INTERNAL
    finally:
        logger.removeHandler(handler)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ServerError):
        # The library's advice names its Python arguments; say it the command line's way.
        from ._client import NO_SERVER_ADVICE

        text = text.replace(NO_SERVER_ADVICE, "--server URL or OLLAMA_HOST")
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover - python -m aicortex._cli
    raise SystemExit(main())
