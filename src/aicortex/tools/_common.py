"""Plumbing shared by the four step commands: arguments, JSON in and out, errors."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from .._exceptions import ValidationError
from . import FORMAT_VERSION, CatalogWriteError, ToolError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .._router import Router

_logger = logging.getLogger("aicortex")

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
_Document = TypeVar("_Document", bound="BaseModel")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def step_parser(prog: str, description: str, reads: str) -> ArgumentParser:
    """A step's parser with ``-i/--input FILE`` (default stdin) and ``-o/--output FILE``."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        default="-",
        help=f"read {reads} from FILE ('-' or default: stdin)",
    )
    add_output_argument(parser)
    return parser


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """``-o/--output FILE``, default stdout."""
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default="-",
        help="write the JSON here (default: stdout)",
    )


def read_text(source: str | None) -> tuple[str, str]:
    """What to call ``source`` in a message, and its text (stdin for ``None`` / ``"-"``)."""
    name = "stdin" if source in (None, "-") else source
    try:
        if source in (None, "-"):
            text = sys.stdin.read()
        else:
            text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"Cannot read {name}: {exc}") from None
    return name, text


def parse_json(text: str, name: str) -> Any:
    """``text`` decoded; a :class:`ToolError` that names ``name`` if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ToolError(f"{name} is not valid JSON ({exc}).") from None


def read_document(model: type[_Document], source: str | None, what: str) -> _Document:
    """Read the previous step's JSON and validate it; a clear :class:`ToolError` if not."""
    import pydantic

    name, text = read_text(source)
    if not text.strip():
        raise ToolError(f"{name} is empty; expected the JSON of the previous step.")
    data = parse_json(text, name)
    if isinstance(data, dict) and data:
        version: object = cast("dict[str, Any]", data).get("version")
        if version != FORMAT_VERSION:
            raise ToolError(
                f"The input is version {version!r} of the {what} format; "
                f"this aicortex reads version {FORMAT_VERSION}."
            )
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise ToolError(f"The input is not a {what} document ({problems}).") from None


def write_text(text: str, target: str | None) -> None:
    """Write ``text`` to a file, or to stdout for ``None`` / ``"-"``."""
    if target in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ToolError(f"Cannot write {target}: {exc}") from None


def dump_json(data: Any) -> str:
    """2-space JSON and a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_report(report: BaseModel, target: str | None) -> None:
    """Write a step's output as :func:`dump_json` does."""
    write_text(dump_json(report.model_dump(mode="json")), target)


def tool_router(connect: float, timeout: float) -> Router:
    """A router without a health cache that sends ``OLLAMA_API_KEY`` as a bearer token."""
    from .._config import Timeout, env_api_key
    from .._router import Router

    api_key = env_api_key()
    return Router(
        timeout=Timeout(connect=connect, first_token=timeout, probe=timeout),
        health_ttl=0.0,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
    )


async def run_all(
    items: Sequence[_Item],
    work: Callable[[_Item], Awaitable[_Result]],
    on_result: Callable[[_Result], None] | None = None,
) -> list[_Result]:
    """``work`` on every item at once; results in item order, each to ``on_result`` when done."""
    import anyio

    results: dict[int, _Result] = {}

    async def run(index: int, item: _Item) -> None:
        result = results[index] = await work(item)
        if on_result is not None:
            on_result(result)

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(items):
            tg.start_soon(run, index, item)
    return [results[index] for index in range(len(items))]


def run_tool(prog: str, body: Callable[[], None]) -> int:
    """Run a step's command: log to stderr, one error line and a status on failure.

    0 ok; 2 bad input or a catalog that fails validation; 1 anything else, such
    as a file that cannot be written or a bug (set ``AICORTEX_DEBUG=1`` for the
    traceback); 130 on Ctrl-C.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(prog))
    _logger.addHandler(handler)
    try:
        body()
        return 0
    except CatalogWriteError as exc:
        _fail(prog, str(exc))
        return 1
    except (ToolError, ValidationError) as exc:
        _fail(prog, str(exc))
        return 2
    except KeyboardInterrupt:
        _fail(prog, "interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("AICORTEX_DEBUG") == "1":
            traceback.print_exc()
        _fail(prog, str(exc) or type(exc).__name__)
        return 1
    finally:
        _logger.removeHandler(handler)


class _Formatter(logging.Formatter):
    """``prog: warning: message``, one line."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self._prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._prog}: {record.levelname.lower()}: {record.getMessage()}"


def _fail(prog: str, message: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"{prog}: error: {message}\n")


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def server_list(values: Sequence[str] | None) -> list[str]:
    """``--server`` values; each may hold several comma-separated URLs."""
    from .._config import split_servers
    from .._exceptions import ValidationError

    urls: list[str] = []
    for value in values or ():
        found = split_servers(value)
        if not found:
            raise ValidationError(
                f"--server {value!r} names no server. Give a URL like "
                "http://127.0.0.1:11434, or leave --server out for the default servers."
            )
        urls += found
    return urls


# ----------------------------------------------------------- run(): the steps chained in Python

WORKDIR_ENV = "AICORTEX_REFRESH_DIR"


def work_directory(workdir: str | os.PathLike[str] | None = None) -> Path:
    """Where each step's ``run()`` keeps its document for the next one: ``workdir``, else
    ``$AICORTEX_REFRESH_DIR``, else ``aicortex/refresh`` in the user's cache folder."""
    if workdir is not None:
        path = Path(workdir).expanduser()
    elif os.environ.get(WORKDIR_ENV, "").strip():
        path = Path(os.environ[WORKDIR_ENV].strip()).expanduser()
    else:
        if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
            cache = Path(os.environ["LOCALAPPDATA"])
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = cache / "aicortex" / "refresh"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolError(
            f"Cannot use {str(path)!r} for the steps' results ({exc}); pass workdir=."
        ) from None
    return path


def save_step(report: BaseModel, step: str, workdir: str | os.PathLike[str] | None) -> Path:
    """Keep ``report`` as ``STEP.json`` in the work directory (replaced whole, atomically)."""
    from .apply_valid_models import write_atomic

    path = work_directory(workdir) / f"{step}.json"
    try:
        write_atomic(path, dump_json(report.model_dump(mode="json")).encode())
    except OSError as exc:
        raise ToolError(f"Cannot write {path}: {exc}") from None
    return path


def load_step(
    model: type[_Document], step: str, workdir: str | os.PathLike[str] | None
) -> _Document:
    """The document ``step``'s ``run()`` kept in the work directory."""
    path = work_directory(workdir) / f"{step}.json"
    if not path.is_file():
        raise ToolError(
            f"There is no {step} result in {path.parent}: call {step}.run() first, or pass "
            "its report to this run()."
        )
    return read_document(model, str(path), step)


def blocking(func: Callable[[], Awaitable[_Result]]) -> _Result:
    """``func()`` run to completion on an event loop of its own. From inside a running
    loop (a notebook cell, an async test) that loop is left alone: a thread runs it."""
    import anyio
    import sniffio

    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return anyio.run(func)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="aicortex-tools") as pool:
        return pool.submit(anyio.run, func).result()
