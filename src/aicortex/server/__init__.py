"""A proxy in front of one or many model servers that speaks OpenAI's API and Ollama's.

``create_app()`` returns a Starlette (ASGI) app: serve it with uvicorn, or mount it
inside an existing Starlette or FastAPI app. Every OpenAI client (``/v1/*``) and every
Ollama client (``/api/*``, e.g. with ``OLLAMA_HOST`` pointed at it) can then use a whole
fleet of servers as one, with failover::

    from aicortex import AsyncCortex
    from aicortex.server import create_app

    app = create_app(AsyncCortex(["http://gpu-box:11434", "http://cpu-box:11434"]))

    # uvicorn module:app, or mounted:
    # Starlette(routes=[Mount("/llm", app=app)])

``serve()`` (and ``aicortex serve`` on the command line) runs it with uvicorn.
Needs the ``server`` extra: ``pip install 'aicortex-core[server]'``.
"""

from typing import TYPE_CHECKING, Any

from ._run import serve as serve

if TYPE_CHECKING:
    from ._app import create_app as create_app

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Starlette loads on first use, so `aicortex serve --help` and the CLI stay fast.
    if name == "create_app":
        from ._app import create_app

        globals()["create_app"] = create_app
        return create_app
    raise AttributeError(f"module 'aicortex.server' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
