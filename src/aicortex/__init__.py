"""aicortex: use one or many Ollama servers as one.

Async-first (:class:`AsyncCortex`), with a blocking twin (:class:`Cortex` and the
module-level functions), failover between servers, typed streaming events and
an offline model catalog.

Importing the package is cheap: the HTTP stack, pydantic and the catalog load
on first use of a name that needs them.
"""

import logging
from typing import TYPE_CHECKING, Any

from ._config import Timeout as Timeout
from ._events import EventType as EventType
from ._events import Stats as Stats
from ._events import StreamEvent as StreamEvent
from ._events import ToolCall as ToolCall
from ._exceptions import AICortexError as AICortexError
from ._exceptions import Attempt as Attempt
from ._exceptions import CortexTimeoutError as CortexTimeoutError
from ._exceptions import ModelNotFoundError as ModelNotFoundError
from ._exceptions import ServerError as ServerError
from ._exceptions import StreamConsumedError as StreamConsumedError
from ._exceptions import StreamError as StreamError
from ._exceptions import ValidationError as ValidationError
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._api import build_api_request as build_api_request
    from ._api import chat as chat
    from ._api import embed as embed
    from ._api import generate as generate
    from ._api import get_default_cortex as get_default_cortex
    from ._api import server_info as server_info
    from ._catalog import Catalog as Catalog
    from ._catalog import ModelInfo as ModelInfo
    from ._catalog import ParamRange as ParamRange
    from ._catalog import ServerEntry as ServerEntry
    from ._client import ApiRequest as ApiRequest
    from ._client import AsyncCortex as AsyncCortex
    from ._client import ChatArgs as ChatArgs
    from ._client import GenerateArgs as GenerateArgs
    from ._client import RequestArgs as RequestArgs
    from ._embed import EmbedResult as EmbedResult
    from ._health import ServerInfo as ServerInfo
    from ._lookup import families as families
    from ._lookup import llm_params as llm_params
    from ._lookup import model_info as model_info
    from ._lookup import model_servers as model_servers
    from ._lookup import models as models
    from ._lookup import random_llm_params as random_llm_params
    from ._metrics import Observer as Observer
    from ._metrics import RequestRecord as RequestRecord
    from ._prometheus import CortexCollector as CortexCollector
    from ._protocol import Message as Message
    from ._pull import PullProgress as PullProgress
    from ._pull import PullStream as PullStream
    from ._routing import Ejection as Ejection
    from ._routing import Server as Server
    from ._routing import ServerState as ServerState
    from ._stream import AsyncStream as AsyncStream
    from ._sync import Cortex as Cortex
    from ._sync import Stream as Stream

# A library logs; the application decides where it goes. Nothing is printed.
logging.getLogger("aicortex").addHandler(logging.NullHandler())

_LAZY = {
    "build_api_request": "_api",
    "chat": "_api",
    "embed": "_api",
    "generate": "_api",
    "families": "_lookup",
    "get_default_cortex": "_api",
    "llm_params": "_lookup",
    "model_info": "_lookup",
    "model_servers": "_lookup",
    "models": "_lookup",
    "random_llm_params": "_lookup",
    "server_info": "_api",
    "Catalog": "_catalog",
    "ModelInfo": "_catalog",
    "ParamRange": "_catalog",
    "ServerEntry": "_catalog",
    "ApiRequest": "_client",
    "AsyncCortex": "_client",
    "CortexCollector": "_prometheus",
    "ChatArgs": "_client",
    "GenerateArgs": "_client",
    "EmbedResult": "_embed",
    "RequestArgs": "_client",
    "ServerInfo": "_health",
    "Message": "_protocol",
    "Observer": "_metrics",
    "RequestRecord": "_metrics",
    "PullProgress": "_pull",
    "PullStream": "_pull",
    "Ejection": "_routing",
    "Server": "_routing",
    "ServerState": "_routing",
    "AsyncStream": "_stream",
    "Cortex": "_sync",
    "Stream": "_sync",
}

__all__ = [
    "AICortexError",
    "ApiRequest",
    "AsyncCortex",
    "AsyncStream",
    "Attempt",
    "Catalog",
    "ChatArgs",
    "Cortex",
    "CortexCollector",
    "CortexTimeoutError",
    "Ejection",
    "EmbedResult",
    "EventType",
    "GenerateArgs",
    "Message",
    "ModelInfo",
    "ModelNotFoundError",
    "Observer",
    "ParamRange",
    "PullProgress",
    "PullStream",
    "RequestArgs",
    "RequestRecord",
    "Server",
    "ServerEntry",
    "ServerError",
    "ServerInfo",
    "ServerState",
    "Stats",
    "Stream",
    "StreamConsumedError",
    "StreamError",
    "StreamEvent",
    "Timeout",
    "ToolCall",
    "ValidationError",
    "__version__",
    "build_api_request",
    "chat",
    "embed",
    "families",
    "generate",
    "get_default_cortex",
    "llm_params",
    "model_info",
    "model_servers",
    "models",
    "random_llm_params",
    "server_info",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aicortex' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"aicortex.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
