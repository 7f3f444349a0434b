"""The :class:`AsyncCortex` behind an app, and the base of its routes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._client import AsyncCortex
from .._config import DEFAULT_HEALTH_TTL, Timeout
from .._metrics import Observer
from .._pools import HttpChoice, connection_limits, http_choice
from .._routing import Ejection, Server, Strategy, routing_choice

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
        health_ttl: float | None = None,
        ejection: Ejection | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self._cortex = cortex
        self._servers = servers
        self._timeout = timeout
        self._health_ttl = health_ttl
        self._ejection = ejection
        # Checked now, so that a bad setting fails at start rather than on a first request.
        self._routing: Strategy = routing_choice(routing)
        self._http: HttpChoice = http_choice(http)
        self._limits = connection_limits(None, max_connections)
        self._observers = tuple(observers)
        self.owned = cortex is None
        # Cortexes replaced by reconfigure(): closed once their requests have ended.
        self._retired: list[AsyncCortex] = []
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
                health_ttl=DEFAULT_HEALTH_TTL if self._health_ttl is None else self._health_ttl,
                ejection=self._ejection,
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

    def reconfigure(
        self,
        servers: Sequence[str | Server] | str | None = None,
        timeout: Timeout | None = None,
        http: HttpChoice | None = None,
        max_connections: int | None = None,
        routing: Strategy | None = None,
        health_ttl: float | None = None,
        ejection: Ejection | None = None,
    ) -> None:
        """New settings for the requests that start from now on. Requests already
        running finish on the cortex they started on, which :meth:`sweep` closes once
        none is left. Raises (and changes nothing) when a setting is invalid, or when
        the cortex was passed in (the app does not own it)."""
        if not self.owned:
            raise RuntimeError("This app was given its AsyncCortex; reconfigure that instead.")
        routing_checked = routing_choice(routing)
        http_checked = http_choice(http)
        limits = connection_limits(None, max_connections)
        self._servers, self._timeout, self._health_ttl = servers, timeout, health_ttl
        self._ejection = ejection
        self._routing, self._http, self._limits = routing_checked, http_checked, limits
        old, self._cortex = self._cortex, None
        if old is not None:
            self._retired.append(old)

    @property
    def retiring(self) -> int:
        """How many replaced cortexes still have requests running."""
        return len(self._retired)

    async def sweep(self) -> None:
        """Close every replaced cortex that has no request in flight any more."""
        for cortex in list(self._retired):
            if not any(state.in_flight for state in cortex.server_states()):
                self._retired.remove(cortex)
                await cortex.aclose()

    async def aclose(self) -> None:
        """Close the cortex if the app created it (and any it replaced); a later request
        creates a new one."""
        retired, self._retired = self._retired, []
        for old in retired:
            await old.aclose()
        if self.owned and self._cortex is not None:
            cortex, self._cortex = self._cortex, None
            await cortex.aclose()


class Endpoint:
    """Base of the routes: raw ASGI callables that share the app's settings."""

    def __init__(self, handle: CortexHandle, max_body_size: int, started: int) -> None:
        self.handle = handle
        self.max_body_size = max_body_size
        self.started = started
