"""The proxy's Prometheus metrics: ``prometheus_client`` metrics fed once per request, and
``GET /metrics``.

Imported only by ``create_app(metrics=True)``. In one process the metrics live in the
app's own registry, and in-flight requests and server states are read from the fleet
when scraped. With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes),
``prometheus_client``'s multiprocess mode is used: every worker writes its figures to
files in that directory, a scrape of any worker adds up every worker's, and each worker
writes its view of the fleet there every second (and when it serves a scrape).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        multiprocess,
        values,
    )
    from prometheus_client.core import Metric
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "create_app(metrics=True) needs prometheus-client: "
        "pip install 'aicortex-core[server]', or pass metrics=False"
    ) from None

from .._metrics import (
    DURATION,
    FAILOVERS,
    IN_FLIGHT,
    LOAD,
    REQUESTS,
    SERVER_STATE,
    STATES,
    TOKENS,
    TOKENS_PER_SECOND,
    TTFT,
    MetricSpec,
    RequestRecord,
    answer_figures,
)
from .._prometheus import fleet_metrics
from .._routing import ServerState
from ._gateway import Receive, Send

__all__ = ["MULTIPROC_ENV", "MetricsRoute", "ProxyMetrics", "proxy_metrics"]

logger = logging.getLogger("aicortex.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DISCONNECTS = MetricSpec(
    "aicortex_client_disconnects_total",
    "counter",
    "Requests whose client went away before the end of the answer.",
    (),
)
FLEET_REFRESH = 1.0  # seconds between a worker's writes of its fleet view (multiprocess)
# What generate_latest() writes: Prometheus' text format, which every version reads.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

States = Callable[[], Iterable[ServerState]]


def _counter(spec: MetricSpec, registry: CollectorRegistry | None) -> Counter:
    return Counter(spec.name, spec.help, spec.labels, registry=registry)


def _histogram(spec: MetricSpec, registry: CollectorRegistry | None) -> Histogram:
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


class ProxyMetrics:
    """The proxy's metrics, and the children of each label set, cached (a label lookup in
    ``prometheus_client`` takes a lock and checks the values on every call)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.multiprocess = registry is None
        self.registry = registry
        self._requests = _counter(REQUESTS, registry)
        self._durations = _histogram(DURATION, registry)
        self._first_tokens = _histogram(TTFT, registry)
        self._tokens = _counter(TOKENS, registry)
        self._speeds = _histogram(TOKENS_PER_SECOND, registry)
        self._loads = _histogram(LOAD, registry)
        self._failovers = _counter(FAILOVERS, registry)
        self._disconnects = _counter(DISCONNECTS, registry)
        self._children: dict[tuple[str, ...], Any] = {}
        # Written by each worker in multiprocess mode; read from the fleet otherwise.
        self._in_flight: Gauge | None = None
        self._states: Gauge | None = None
        if self.multiprocess:
            self._in_flight = Gauge(
                IN_FLIGHT.name,
                IN_FLIGHT.help,
                IN_FLIGHT.labels,
                registry=None,
                multiprocess_mode="livesum",
            )
            self._states = Gauge(
                SERVER_STATE.name,
                SERVER_STATE.help,
                SERVER_STATE.labels,
                registry=None,
                multiprocess_mode="livemax",
            )

    def _child(self, metric: Counter | Histogram, key: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*key[1:])
        return child

    def request_done(
        self,
        route: str,
        outcome: str,
        duration: float,
        record: RequestRecord | None,
    ) -> None:
        """Count one HTTP request, and what its answer (``record``) says."""
        server = "" if record is None else record.server
        model = record.model if record is not None and server else ""
        self._child(self._requests, ("r", route, model, server, outcome)).inc()
        self._child(self._durations, ("d", route, outcome)).observe(duration)
        if outcome == "client_gone":
            self._disconnects.inc()
        if record is None:
            return
        for attempt in record.attempts:
            self._child(self._failovers, ("f", attempt.kind)).inc()
        if not server:
            return
        if record.first_token is not None:
            self._child(self._first_tokens, ("t", model, server)).observe(record.first_token)
        figures = answer_figures(record.stats)
        if figures.prompt_tokens:
            self._child(self._tokens, ("k", model, server, "prompt")).inc(figures.prompt_tokens)
        if figures.completion_tokens:
            self._child(self._tokens, ("k", model, server, "completion")).inc(
                figures.completion_tokens
            )
        if figures.tokens_per_second is not None:
            self._child(self._speeds, ("s", model, server)).observe(figures.tokens_per_second)
        if figures.load_seconds is not None:
            self._child(self._loads, ("l", model, server)).observe(figures.load_seconds)

    def write_fleet(self, states: Iterable[ServerState]) -> None:
        """Write this worker's view of the fleet (multiprocess mode only)."""
        if self._in_flight is None or self._states is None:
            return
        for state in states:
            self._in_flight.labels(state.url).set(state.in_flight)
            for name in STATES:
                self._states.labels(state.url, name).set(1.0 if state.state == name else 0.0)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format: this process's, or with several
        workers, every worker's added up."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    async def keep_fleet_written(self, states: States) -> None:
        """Write this worker's fleet view every second, until cancelled (multiprocess)."""
        while True:
            try:
                self.write_fleet(states())
            except Exception:  # a metric must never stop the worker
                logger.exception("Writing the fleet's metrics failed")
            await anyio.sleep(FLEET_REFRESH)

    def worker_done(self) -> None:
        """This worker stops: its in-flight counts and server states no longer count."""
        if self.multiprocess:
            directory = os.environ.get(MULTIPROC_ENV)
            if directory:
                multiprocess.mark_process_dead(os.getpid(), directory)  # pyright: ignore[reportUnknownMemberType]


class _Fleet:
    """Reads ``aicortex_in_flight`` and ``aicortex_server_state`` from the fleet when
    scraped (one process)."""

    def __init__(self, states: States) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        yield from fleet_metrics(self._states())


_SHARED: list[ProxyMetrics] = []  # the one set of metrics of a process in multiprocess mode


def proxy_metrics(states: States) -> ProxyMetrics:
    """The metrics of a new app: its own registry, with the fleet read from ``states``;
    with ``PROMETHEUS_MULTIPROC_DIR`` set, the process's multiprocess metrics."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        registry = CollectorRegistry()
        metrics = ProxyMetrics(registry)
        registry.register(_Fleet(states))
        return metrics
    if not os.path.isdir(directory):
        raise ValueError(f"{MULTIPROC_ENV}={directory!r} is not a directory; create it first.")
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(
            f"{MULTIPROC_ENV} is set, but prometheus_client was imported before it was, so "
            "it keeps its figures in memory: set it before the process starts."
        )
    if not _SHARED:
        _SHARED.append(ProxyMetrics(None))
    return _SHARED[0]


class MetricsRoute:
    """``GET /metrics``: every metric, in Prometheus' text format."""

    def __init__(self, metrics: ProxyMetrics, states: States) -> None:
        self.metrics = metrics
        self.states = states

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        metrics = self.metrics
        if metrics.multiprocess:
            metrics.write_fleet(self.states())  # this worker's view, as of now
            body = await anyio.to_thread.run_sync(metrics.exposition)  # reads every file
        else:
            body = metrics.exposition()
        head = [
            (b"content-type", CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body, "more_body": False})
