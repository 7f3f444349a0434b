"""Routing: what aicortex knows about each server, and where a request goes next.

Everything here is pure: time is passed in and nothing does I/O. Probes and requests
report what happened (``_router``, ``_client``); :class:`Fleet` turns that into each
server's state and picks a server by the routing strategy.

The rules for one server:

- A connection failure, or a failed probe, ejects it at once; other failures of the
  server (5xx, answers that are not Ollama's) eject it after three in a row. An
  ejection lasts 1 s, doubles with each ejection in a row, and is capped at 30 s.
- When an ejection ends the server is probed before traffic returns to it, and until
  it serves a request again one more failure ejects it again.
- A failure that may be the model's (an answer that breaks, an ``{"error"}`` line,
  HTTP 500) makes the server *suspect*: it is probed before the next request uses it.
  The failure counts against the (server, model) pair: three in a row eject the pair
  with the same backoff, while the server's other models keep flowing. If the probe
  finds the server gone, the server is ejected.
- HTTP 503 (Ollama's queue is full) or 429 make it *busy* for 0.5 s, doubling to 8 s.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

from ._exceptions import ValidationError
from ._protocol import model_key

__all__ = [
    "STRATEGIES",
    "Breaker",
    "Ejection",
    "Fleet",
    "Node",
    "Server",
    "ServerState",
    "Strategy",
    "backoff",
    "rendezvous",
    "routing_choice",
]

Strategy = Literal["priority", "least_busy", "round_robin"]
ApiKind = Literal["auto", "ollama", "openai"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

FailureKind = Literal["unreachable", "failed", "model", "busy"]
"""What went wrong, as the state machine sees it: ``unreachable`` (no connection, or a
failed probe), ``failed`` (the server answered wrongly), ``model`` (an answer broke in a
way the model may have caused), ``busy`` (503 or 429)."""

StateName = Literal["unknown", "healthy", "probing", "ejected", "busy"]

FAILURES_TO_EJECT = 3
EJECT_FIRST = 1.0
EJECT_MAX = 30.0
BUSY_FIRST = 0.5
BUSY_MAX = 8.0
_AFFINITY_CACHE = 4096

# What keeps a candidate from being picked (see Fleet.hold).
DOWN, BUSY, FULL, MODEL, UNLISTED = "down", "busy", "full", "model", "unlisted"


def backoff(first: float, cap: float, times: int) -> float:
    """``first`` doubled for each time after the first, at most ``cap``."""
    return min(first * 2.0 ** min(times - 1, 32), cap)


@dataclass(frozen=True, slots=True)
class Server:
    """A server URL with its options; accepted wherever a URL string is.

    ``api`` is the wire protocol: ``"ollama"`` (``/api/*``), ``"openai"``
    (``/v1/chat/completions``: llama.cpp, vLLM, LM Studio, ...) or ``"auto"`` (the
    first probe finds out). ``api_key`` (or the environment variable named by
    ``api_key_env``) is sent to this server only, as a bearer token; it never
    appears in ``repr``, logs or errors. ``models`` maps a model name, as callers
    ask for it, to this server's own name for it. ``weight`` (default 1) scales
    the share of requests ``least_busy`` and ``round_robin`` send to it, and its
    pull in affinity hashing; ``max_concurrency`` caps its requests in flight:
    past it, new requests go to the next choice.
    """

    url: str
    weight: float = 1.0
    max_concurrency: int | None = None
    api: ApiKind = "auto"
    api_key: str | None = field(default=None, repr=False, compare=False)
    api_key_env: str | None = None
    models: Mapping[str, str] | None = field(default=None, hash=False)

    def bearer(self) -> str | None:
        """The API key to send: ``api_key``, else the variable ``api_key_env`` names."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "").strip() or None
        return None

    def __post_init__(self) -> None:
        if self.api not in ("auto", "ollama", "openai"):
            raise ValidationError(
                f"Server api must be 'auto', 'ollama' or 'openai', not {self.api!r}."
            )
        if self.models is not None:
            names = cast(object, self.models)
            if not isinstance(names, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str)
                for k, v in cast("Mapping[object, object]", names).items()
            ):
                raise ValidationError("Server models must map model names to names (strings).")
            object.__setattr__(self, "models", dict(cast("Mapping[str, str]", names)))
        if not isinstance(self.url, str) or not self.url.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(f"Server url must be a non-empty string, not {self.url!r}.")
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))  # pyright: ignore[reportUnnecessaryIsInstance]
            or not (0 < weight < math.inf)
        ):
            raise ValidationError(f"Server weight must be a number > 0, not {weight!r}.")
        cap = self.max_concurrency
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValidationError(
                f"Server max_concurrency must be a whole number >= 1 or None, not {cap!r}."
            )


@dataclass(frozen=True, slots=True)
class Ejection:
    """When a failing server (or a model on it) is taken out of the rotation, and for
    how long: after ``failures`` failures in a row (a connection failure ejects at
    once), for ``first`` seconds, doubling with each ejection in a row up to ``max``.
    While ejected it gets no traffic; it is probed before traffic returns to it."""

    failures: int = FAILURES_TO_EJECT
    first: float = EJECT_FIRST
    max: float = EJECT_MAX

    def __post_init__(self) -> None:
        count = cast(object, self.failures)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValidationError(
                f"Ejection.failures must be a whole number >= 1, not {self.failures!r}."
            )
        for name in ("first", "max"):
            value = cast(object, getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValidationError(
                    f"Ejection.{name} must be a positive number of seconds, not {value!r}."
                )
        if self.max < self.first:
            raise ValidationError(
                f"Ejection.max ({self.max:g}s) must not be shorter than Ejection.first "
                f"({self.first:g}s)."
            )


_DEFAULT_EJECTION = Ejection()


@dataclass(slots=True)
class Breaker:
    """Failures in a row of a server, or of one model on it, and the ejection they led to."""

    failures: int = 0
    ejections: int = 0  # in a row: each lasts twice as long as the one before
    until: float = -math.inf  # ejected until then
    reason: str | None = None

    def fail(
        self,
        now: float,
        reason: str,
        *,
        at_once: bool = False,
        policy: Ejection = _DEFAULT_EJECTION,
    ) -> bool:
        """Count one failure; True when it ejects.

        After an ejection, and until a success, one failure is enough. Failures while
        ejected (requests that were already under way) change nothing.
        """
        self.reason = reason
        if self.until > now:
            return False
        self.failures += 1
        if at_once or self.ejections or self.failures >= policy.failures:
            self.ejections += 1
            self.failures = 0
            self.until = now + backoff(policy.first, policy.max, self.ejections)
            return True
        return False

    def succeed(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = -math.inf
        self.reason = None


@dataclass(slots=True, eq=False)
class Node:
    """Everything known about one server."""

    url: str
    weight: float = 1.0
    cap: float = math.inf  # max_concurrency
    breaker: Breaker = field(default_factory=Breaker)
    pairs: dict[str, Breaker] = field(default_factory=dict[str, Breaker])  # by model key
    names: dict[str, str] = field(default_factory=dict[str, str])  # key -> name as asked
    # Broken answers (model key, name, reason) waiting for the probe that attributes them.
    pending: list[tuple[str, str, str]] = field(default_factory=list[tuple[str, str, str]])
    busy_until: float = -math.inf
    busy_times: int = 0
    inflight: int = 0
    probed_at: float | None = None  # when a probe last answered
    suspect: bool = True  # must answer a probe before traffic goes to it
    open_at: float = math.inf  # usable from then on (not ejected, suspect or busy)
    probing: bool = False
    keys: frozenset[str] = frozenset()  # model keys /api/tags listed
    models: tuple[str, ...] = ()
    loaded: frozenset[str] | None = None  # model keys /api/ps listed; None: not known
    latency: float = math.inf
    version: str | None = None
    error: str | None = None  # why the server is ejected, or busy
    current: float = 0.0  # smooth weighted round robin
    kind: Literal["ollama", "openai"] | None = None  # the wire protocol; None: not known yet
    names_here: dict[str, str] = field(default_factory=dict[str, str])  # key -> its name here
    public_names: tuple[str, ...] = ()  # the keys of names_here, as the caller wrote them

    def state(self, now: float) -> StateName:
        if self.breaker.until > now:
            return "ejected"
        if self.probing:
            return "probing"
        if self.probed_at is None:
            return "unknown"
        if self.busy_until > now:
            return "busy"
        return "healthy"


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server as :meth:`AsyncCortex.server_states` reports it.

    ``state`` is ``"healthy"``, ``"ejected"`` (``retry_in`` seconds left),
    ``"busy"`` (it answered 503 or 429; ``retry_in`` seconds of backoff left),
    ``"probing"``, or ``"unknown"`` (not probed yet). ``failures`` counts its
    failures in a row, ``ejections`` its ejections in a row. ``loaded`` lists the
    models in memory (``None`` when the server does not say). ``ejected_models``
    maps each model ejected on this server alone to the seconds left. ``api`` is its
    wire protocol, ``"ollama"`` or ``"openai"`` (``None`` until a probe tells).
    """

    url: str
    state: StateName
    retry_in: float | None
    in_flight: int
    failures: int
    ejections: int
    latency: float | None
    version: str | None
    models: tuple[str, ...]
    loaded: tuple[str, ...] | None
    ejected_models: dict[str, float]
    error: str | None
    weight: float
    max_concurrency: int | None
    api: Literal["ollama", "openai"] | None = None


class Fleet:
    """The state of every server aicortex has talked to, and the routing decisions.

    Probe results are trusted for ``ttl`` seconds; ``options`` gives a server's
    weight and ``max_concurrency``.
    """

    def __init__(
        self, ttl: float, options: Iterable[Server] = (), ejection: Ejection | None = None
    ) -> None:
        self.ttl = ttl
        self.ejection = ejection if ejection is not None else _DEFAULT_EJECTION
        self.nodes: dict[str, Node] = {}
        self._options = {s.url: s for s in options}
        self._turn = 0
        self._rankings: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}

    def node(self, url: str) -> Node:
        """The node for ``url``, made on first use."""
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Node(url)
            option = self._options.get(url)
            if option is not None:
                _apply(node, option)
        return node

    def option(self, url: str) -> Server | None:
        """The :class:`Server` options given for ``url``, if any."""
        return self._options.get(url)

    def configure(self, server: Server) -> None:
        """Use ``server``'s weight and ``max_concurrency`` for its URL from now on."""
        self._options[server.url] = server
        if server.url in self.nodes:
            _apply(self.nodes[server.url], server)

    # -- what happened -------------------------------------------------------

    def probed(
        self,
        url: str,
        now: float,
        *,
        latency: float,
        version: str | None,
        models: tuple[str, ...],
        keys: frozenset[str],
        loaded: frozenset[str] | None,
    ) -> list[str]:
        """A probe of ``url`` answered. An ejection still runs its time, but the server
        no longer needs a probe before traffic returns. The broken answers waiting for
        this probe count against their (server, model) pairs now; returns the models
        that ejects."""
        node = self.node(url)
        node.probed_at = now
        node.suspect = False
        node.latency = latency
        node.version = version
        node.models = models
        node.keys = keys
        node.loaded = loaded
        if not node.breaker.until > now:
            node.error = None
        _reopen(node)
        ejected: list[str] = []
        pending, node.pending = node.pending, []
        for key, name, reason in pending:
            pair = node.pairs.get(key)
            if pair is None:
                pair = node.pairs[key] = Breaker()
                node.names[key] = name
            if pair.fail(now, reason, policy=self.ejection):
                ejected.append(name)
        return ejected

    def failed(
        self,
        url: str,
        kind: FailureKind,
        reason: str,
        now: float,
        model: str | None = None,
        name: str | None = None,
    ) -> bool:
        """Record a failure of ``url`` (for ``kind="model"``, of the model key ``model``
        on it, once a probe has shown the server works; ``name`` is the model as asked
        for, for reports).

        Returns True when it ejected the server.
        """
        node = self.node(url)
        try:
            if kind == "busy":
                node.busy_times += 1
                node.busy_until = now + backoff(BUSY_FIRST, BUSY_MAX, node.busy_times)
                node.error = reason
                return False
            if kind == "model" and model is not None:
                # Probe the server before trusting it again: if it answers, the failure
                # was the model's (see probed); if not, the probe ejects the server.
                node.suspect = True
                node.pending.append((model, name or model, reason))
                return False
            ejected = node.breaker.fail(
                now, reason, at_once=kind == "unreachable", policy=self.ejection
            )
            if ejected:
                node.suspect = True
                node.error = reason
                node.pending.clear()  # the server failed, not its models
            return ejected
        finally:
            _reopen(node)

    def answered(self, url: str) -> None:
        """``url`` answered a request properly (its first token arrived)."""
        node = self.node(url)
        node.breaker.succeed()
        node.busy_times = 0
        node.busy_until = -math.inf
        node.error = None
        _reopen(node)

    def served(self, url: str, model: str) -> None:
        """``url`` finished an answer of ``model``: the pair is well, the model loaded."""
        node = self.node(url)
        pair = node.pairs.pop(model, None)
        if pair is not None:
            node.names.pop(model, None)
        if node.loaded is not None and model not in node.loaded:
            node.loaded = node.loaded | {model}

    # -- what to do ----------------------------------------------------------

    def to_probe(self, candidates: Sequence[str], now: float) -> tuple[list[str], list[str]]:
        """The candidates to probe before routing (never probed, suspect, or not
        probed for ``ttl`` seconds), and those to probe alongside the request (their
        ejection is over): a request never waits for a server that may still be dead."""
        before: list[str] = []
        alongside: list[str] = []
        ttl = self.ttl
        for url in candidates:
            node = self.node(url)
            if node.breaker.until > now:
                continue
            if node.suspect and node.breaker.ejections:
                alongside.append(url)
            elif self._probe_first(node, now, ttl):
                before.append(url)
        return before, alongside

    @staticmethod
    def _probe_first(node: Node, now: float, ttl: float) -> bool:
        """Whether a request must wait for a probe of ``node`` before routing: it was
        never probed, is suspect, or its probe is older than the TTL (and it is not
        ejected, nor just back from an ejection: those are probed alongside)."""
        if node.breaker.until > now or (node.suspect and node.breaker.ejections):
            return False
        return node.suspect or node.probed_at is None or now - node.probed_at >= ttl

    def settled(
        self, candidates: Sequence[str], model: str, now: float, strategy: Strategy, *, spread: bool
    ) -> bool:
        """Whether probing the servers still unsettled could no longer change the pick.

        In priority order that is once a usable server that lists the model has every
        server before it settled; with ``spread`` (another strategy, or affinity) the
        pick weighs every candidate, so all must be settled.
        """
        ttl = self.ttl
        for url in candidates:
            node = self.nodes.get(url)
            if node is None:
                return False
            if self._probe_first(node, now, ttl):
                return False
            if not spread and model in node.keys and self._usable(node, model, now):
                return True
        return True

    @staticmethod
    def _usable(node: Node, model: str, now: float) -> bool:
        if node.open_at > now or node.inflight >= node.cap:
            return False
        if node.pairs:
            pair = node.pairs.get(model)
            if pair is not None and pair.until > now:
                return False
        return True

    def pick(
        self,
        candidates: Sequence[str],
        model: str,
        now: float,
        strategy: Strategy = "priority",
        affinity: str | None = None,
        *,
        explicit: bool = False,
    ) -> str | None:
        """The server to try next among ``candidates`` (each probed already) for the
        model key ``model``; None when every one is held back (see :meth:`hold`).

        A server that lists the model beats an Ollama server that does not (its list
        may be stale, or it knows the model by another name). An OpenAI-style server
        that does not list it is never picked, unless ``explicit`` (the caller named
        it): llama.cpp, for one, answers any model name with the model it has. Within
        that:

        - ``affinity``: the first in the key's rendezvous ranking;
        - ``priority``: the first in list order;
        - ``least_busy``: the fewest requests in flight per unit of weight, then one
          where the model is loaded, then the lowest probe latency;
        - ``round_robin``: the next in turn (smooth weighted when weights differ).
        """
        nodes = self.nodes
        if affinity is not None:
            candidates = self.ranking(affinity, candidates)
            strategy = "priority"
        if strategy == "priority":
            fallback = None
            for url in candidates:
                node = nodes.get(url)
                if node is None or not self._usable(node, model, now):
                    continue
                if model in node.keys:
                    return url
                if fallback is None and (explicit or node.kind != "openai"):
                    fallback = url
            return fallback
        if strategy == "least_busy":
            return self._least_busy(candidates, model, now, explicit)
        return self._next_in_turn(candidates, model, now, explicit)

    def _least_busy(
        self, candidates: Sequence[str], model: str, now: float, explicit: bool
    ) -> str | None:
        # One pass, comparing (unlisted, load, not loaded, latency) a field at a time:
        # most servers are passed over on the load alone.
        nodes = self.nodes
        best: Node | None = None
        best_rank = 2
        best_load = best_cold = best_latency = math.inf
        for url in candidates:
            node = nodes.get(url)
            if node is None or node.open_at > now or node.inflight >= node.cap:
                continue
            if node.pairs and not self._usable(node, model, now):
                continue
            rank = 0 if model in node.keys else 1
            if rank > best_rank or (rank and node.kind == "openai" and not explicit):
                continue
            load = node.inflight / node.weight
            loaded = node.loaded
            if rank == best_rank:
                if load > best_load:
                    continue
                if load == best_load:
                    cold = 0 if loaded is not None and model in loaded else 1
                    if cold > best_cold or (cold == best_cold and node.latency >= best_latency):
                        continue
            best, best_rank, best_load = node, rank, load
            best_cold = 0 if loaded is not None and model in loaded else 1
            best_latency = node.latency
        return None if best is None else best.url

    def _next_in_turn(
        self, candidates: Sequence[str], model: str, now: float, explicit: bool
    ) -> str | None:
        listed: list[Node] = []
        others: list[Node] = []
        nodes = self.nodes
        for url in candidates:
            node = nodes.get(url)
            if node is None or node.open_at > now or node.inflight >= node.cap:
                continue
            if node.pairs and not self._usable(node, model, now):
                continue
            if model in node.keys:
                listed.append(node)
            elif explicit or node.kind != "openai":
                others.append(node)
        group = listed or others
        if not group:
            return None
        if all(n.weight == group[0].weight for n in group):
            self._turn += 1
            return group[self._turn % len(group)].url
        total = 0.0
        best = group[0]
        for node in group:
            node.current += node.weight
            total += node.weight
            if node.current > best.current:
                best = node
        best.current -= total
        return best.url

    def ranking(self, key: str, candidates: Sequence[str]) -> tuple[str, ...]:
        """``candidates`` in ``key``'s rendezvous order (weighted); cached per key."""
        cache_key = (key, tuple(candidates))
        ranked = self._rankings.get(cache_key)
        if ranked is None:
            weights = {url: self.node(url).weight for url in candidates}
            ranked = rendezvous(key, weights)
            if len(self._rankings) >= _AFFINITY_CACHE:
                del self._rankings[next(iter(self._rankings))]
            self._rankings[cache_key] = ranked
        return ranked

    def hold(
        self, url: str, model: str, now: float, *, explicit: bool = False
    ) -> tuple[str, float]:
        """Why :meth:`pick` passes ``url`` over, and when that may end:
        ``down`` (ejected, or not probed since), ``busy``, ``full`` (at
        ``max_concurrency``), ``unlisted`` (an OpenAI-style server without the
        model), ``model`` (the pair is ejected)."""
        node = self.node(url)
        if node.breaker.until > now or node.suspect:
            return DOWN, node.breaker.until
        if node.busy_until > now:
            return BUSY, node.busy_until
        if node.inflight >= node.cap:
            return FULL, now
        if node.kind == "openai" and model not in node.keys and not explicit:
            return UNLISTED, math.inf
        pair = node.pairs.get(model)
        return MODEL, -math.inf if pair is None else pair.until

    # -- inspection ----------------------------------------------------------

    def snapshot(self, url: str, now: float) -> ServerState:
        node = self.node(url)
        state = node.state(now)
        until = node.breaker.until if state == "ejected" else node.busy_until
        ejected = {
            node.names.get(key, key): round(pair.until - now, 3)
            for key, pair in node.pairs.items()
            if pair.until > now
        }
        return ServerState(
            url=url,
            state=state,
            retry_in=round(until - now, 3) if state in ("ejected", "busy") else None,
            in_flight=node.inflight,
            failures=node.breaker.failures,
            ejections=node.breaker.ejections,
            latency=None if node.latency == math.inf else node.latency,
            version=node.version,
            models=node.models,
            loaded=None if node.loaded is None else tuple(sorted(node.loaded)),
            ejected_models=ejected,
            error=node.error if state in ("ejected", "busy") else None,
            weight=node.weight,
            max_concurrency=None if node.cap == math.inf else int(node.cap),
            api=node.kind,
        )


def _apply(node: Node, server: Server) -> None:
    node.weight = float(server.weight)
    node.cap = math.inf if server.max_concurrency is None else server.max_concurrency
    if server.api != "auto":
        node.kind = server.api
    node.names_here = {model_key(k): v for k, v in (server.models or {}).items()}
    node.public_names = tuple(server.models or {})


def _reopen(node: Node) -> None:
    """Recompute when ``node`` may take traffic, after any change to its state."""
    node.open_at = math.inf if node.suspect else max(node.breaker.until, node.busy_until)


def rendezvous(key: str, weights: dict[str, float]) -> tuple[str, ...]:
    """The servers in ``weights`` ranked for ``key`` by weighted rendezvous hashing.

    Each server scores ``-weight / ln(h)`` with ``h`` a hash of (key, server) in (0, 1):
    the order depends only on the key and the set, so every process agrees, and a
    server leaving the set moves only the keys it ranked first.
    """
    prefix = key.encode() + b"\0"
    scored: list[tuple[float, str]] = []
    for url, weight in weights.items():
        digest = hashlib.blake2b(prefix + url.encode(), digest_size=8).digest()
        h = (int.from_bytes(digest, "big") + 1) / (2.0**64 + 2)
        scored.append((-weight / math.log(h), url))
    scored.sort(reverse=True)
    return tuple(url for _, url in scored)


def routing_choice(value: object) -> Strategy:
    """``routing=`` checked, or ``AICORTEX_ROUTING`` when it is None (default priority)."""
    source = "routing"
    if value is None:
        value = os.environ.get("AICORTEX_ROUTING", "").strip() or "priority"
        source = "AICORTEX_ROUTING"
    for strategy in STRATEGIES:
        if value == strategy:
            return strategy
    raise ValidationError(
        f"{source} must be one of {', '.join(map(repr, STRATEGIES))}, not {value!r}."
    )
