"""The :class:`AsyncCortex` behind an app, and the base of its routes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._client import AsyncCortex
from .._config import Timeout
from .._metrics import Observer
from .._pools import HttpChoice, connection_limits, http_choice
from .._routing import Server, Strategy, routing_choice

__all__ = ["CortexHandle", "Endpoint"]


class CortexHandle:
    """The :class:`AsyncCortex` behind an app: the one passed in, or one made on first use.

    ``observers`` are added to that cortex (to one passed in, at once).
    ``app.state.aicortex`` is this handle. A cortex the app created itself is closed by
    :meth:`aclose` (the app's lifespan calls it at shutdown); a cortex passed in is
    never closed by the app.
    """

    def __init__(
        self,
        cortex: AsyncCortex | None,
        servers: Sequence[str | Server] | str | None = None,
        timeout: Timeout | None = None,
        http: HttpChoice | None = None,
        max_connections: int | None = None,
        routing: Strategy | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self._cortex = cortex
        self._servers = servers
        self._timeout = timeout
        # Checked now, so that a bad setting fails at start rather than on a first request.
        self._routing: Strategy = routing_choice(routing)
        self._http: HttpChoice = http_choice(http)
        self._limits = connection_limits(None, max_connections)
        self._observers = tuple(observers)
        self.owned = cortex is None
        if cortex is not None:
            for observer in self._observers:
                cortex.add_observer(observer)

    @property
    def cortex(self) -> AsyncCortex:
        """The cortex, created now if needed (creating one does no I/O, so no lock is needed:
        nothing can run between the check and the assignment)."""
        cortex = self._cortex
        if cortex is None:
            # Servers named explicitly are the whole fleet; otherwise the usual defaults.
            self._cortex = cortex = AsyncCortex(
                self._servers,
                fallback=not self._servers,
                timeout=self._timeout,
                routing=self._routing,
                http=self._http,
                limits=self._limits,
                observers=self._observers,
            )
        return cortex

    @property
    def created(self) -> bool:
        """Whether a cortex exists (passed in, or created by a first request)."""
        return self._cortex is not None

    async def aclose(self) -> None:
        """Close the cortex if the app created it; a later request creates a new one."""
        if self.owned and self._cortex is not None:
            cortex, self._cortex = self._cortex, None
            await cortex.aclose()


class Endpoint:
    """Base of the routes: raw ASGI callables that share the app's settings."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int) -> None:
        self.handle = handle
        self.max_body_size = max_body_size
        self.started = started
