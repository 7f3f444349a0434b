"""Module-level blocking functions that go online, on a default Cortex made on first use."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from ._client import (
    DEFAULT_BATCH_SIZE,
    ApiRequest,
    AsyncCortex,
    ChatArgs,
    GenerateArgs,
    Prompt,
    RequestArgs,
)
from ._config import Timeout
from ._embed import EmbedResult
from ._health import ServerInfo
from ._routing import Server
from ._sync import Cortex, Stream

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "build_api_request",
    "chat",
    "embed",
    "generate",
    "get_default_cortex",
    "server_info",
]

_lock = threading.Lock()
_default: Cortex | None = None


def get_default_cortex() -> Cortex:
    """The process-wide :class:`Cortex` behind the module-level functions.

    Created on first use from the environment (``AICORTEX_SERVERS``,
    ``AICORTEX_MODEL``, ``OLLAMA_HOST``) and closed when the interpreter exits.
    """
    global _default
    with _lock:
        if _default is None or _default.closed:
            _default = Cortex()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


@overload
def chat(
    prompt: Prompt,
    *,
    model: str | None = None,
    stream: Literal[False] = False,
    **args: Unpack[ChatArgs],
) -> str: ...


@overload
def chat(
    prompt: Prompt, *, model: str | None = None, stream: Literal[True], **args: Unpack[ChatArgs]
) -> Stream: ...


@overload
def chat(
    prompt: Prompt, *, model: str | None = None, stream: bool, **args: Unpack[ChatArgs]
) -> str | Stream: ...


def chat(
    prompt: Prompt, *, model: str | None = None, stream: bool = False, **args: Unpack[ChatArgs]
) -> str | Stream:
    """Chat through the default :class:`Cortex`; see :meth:`AsyncCortex.chat`."""
    return get_default_cortex().chat(prompt, model=model, stream=stream, **args)


@overload
def generate(
    prompt: str,
    *,
    model: str | None = None,
    stream: Literal[False] = False,
    **args: Unpack[GenerateArgs],
) -> str: ...


@overload
def generate(
    prompt: str, *, model: str | None = None, stream: Literal[True], **args: Unpack[GenerateArgs]
) -> Stream: ...


@overload
def generate(
    prompt: str, *, model: str | None = None, stream: bool, **args: Unpack[GenerateArgs]
) -> str | Stream: ...


def generate(
    prompt: str, *, model: str | None = None, stream: bool = False, **args: Unpack[GenerateArgs]
) -> str | Stream:
    """Complete a prompt through the default :class:`Cortex`; see :meth:`AsyncCortex.generate`."""
    return get_default_cortex().generate(prompt, model=model, stream=stream, **args)


def embed(
    input: str | Sequence[str],
    *,
    model: str | None = None,
    truncate: bool | None = None,
    dimensions: int | None = None,
    keep_alive: float | str | None = None,
    server_url: str | Server | None = None,
    options: Mapping[str, Any] | None = None,
    timeout: Timeout | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int | None = None,
) -> EmbedResult:
    """Embed texts through the default :class:`Cortex`; see :meth:`AsyncCortex.embed`."""
    return get_default_cortex().embed(
        input,
        model=model,
        truncate=truncate,
        dimensions=dimensions,
        keep_alive=keep_alive,
        server_url=server_url,
        options=options,
        timeout=timeout,
        batch_size=batch_size,
        concurrency=concurrency,
    )


def server_info(model: str | None = None, server_url: str | None = None) -> ServerInfo:
    """Live facts about the server that would serve ``model`` (see ``AsyncCortex.server_info``)."""
    return get_default_cortex().server_info(model, server_url)


def build_api_request(
    model: str, prompt: Prompt, *, stream: bool = True, **args: Unpack[RequestArgs]
) -> ApiRequest:
    """The request a chat would send, without sending it (no I/O)."""
    return AsyncCortex().build_api_request(model, prompt, stream=stream, **args)
