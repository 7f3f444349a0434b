"""``CortexCollector``: a client's figures as Prometheus metrics, for a program's own registry.

Imported only when ``aicortex.CortexCollector`` is first used: it needs
``prometheus-client`` (``pip install 'aicortex-core[metrics]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aicortex.CortexCollector needs prometheus-client: pip install 'aicortex-core[metrics]'"
    ) from None

from ._client import AsyncCortex
from ._metrics import (
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
    Histogram,
    MetricSpec,
    Recorder,
)
from ._routing import ServerState
from ._sync import Cortex

__all__ = ["CortexCollector", "fleet_metrics", "histogram_family"]


class CortexCollector:
    """A ``prometheus_client`` collector of one client's requests and servers::

        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(aicortex.CortexCollector(cortex))

    ``cortex`` is an :class:`~aicortex.AsyncCortex` or a :class:`~aicortex.Cortex`;
    the collector adds itself to it as an :class:`~aicortex.Observer` and counts its
    requests from then on. It exposes the proxy's metrics (see the documentation), with
    ``route`` the kind of request: ``chat``, ``generate`` or ``embed``. In-flight
    requests and server states are read from the client when collected. :meth:`close`
    stops counting.
    """

    def __init__(self, cortex: AsyncCortex | Cortex) -> None:
        target = cortex if isinstance(cortex, AsyncCortex) else cortex._async  # pyright: ignore[reportPrivateUsage]
        self._cortex = target
        self._states: Callable[[], list[ServerState]] = cortex.server_states
        self._recorder = Recorder()
        target.add_observer(self._recorder)

    def close(self) -> None:
        """Stop counting this client's requests (what was counted stays)."""
        self._cortex.remove_observer(self._recorder)

    def describe(self) -> Iterator[Metric]:
        """The metrics this collector exposes, without samples (for the registry's checks)."""
        for spec in (REQUESTS, DURATION, TTFT, TOKENS, TOKENS_PER_SECOND, LOAD, FAILOVERS):
            yield _family(spec)
        yield from fleet_metrics(())

    def collect(self) -> Iterator[Metric]:
        """Every metric, as it stands now."""
        figures = self._recorder.snapshot()
        yield _counter(REQUESTS, figures.requests)
        yield histogram_family(DURATION, figures.durations)
        yield histogram_family(TTFT, figures.first_tokens)
        yield _counter(TOKENS, figures.tokens)
        yield histogram_family(TOKENS_PER_SECOND, figures.tokens_per_second)
        yield histogram_family(LOAD, figures.loads)
        yield _counter(FAILOVERS, {(reason,): n for reason, n in figures.failovers.items()})
        try:
            states = self._states()
        except RuntimeError:  # a Cortex that was closed: its servers are no more
            states = []
        yield from fleet_metrics(states)


def fleet_metrics(states: Iterable[ServerState]) -> list[Metric]:
    """``aicortex_in_flight`` and ``aicortex_server_state`` for these servers."""
    in_flight = GaugeMetricFamily(IN_FLIGHT.name, IN_FLIGHT.help, labels=IN_FLIGHT.labels)
    state = GaugeMetricFamily(SERVER_STATE.name, SERVER_STATE.help, labels=SERVER_STATE.labels)
    for server in states:
        in_flight.add_metric([server.url], server.in_flight)
        for name in STATES:
            state.add_metric([server.url, name], 1.0 if server.state == name else 0.0)
    return [in_flight, state]


def _family(spec: MetricSpec) -> Metric:
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.type == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def _counter(spec: MetricSpec, values: Mapping[tuple[str, ...], int]) -> Metric:
    family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    for labels, value in values.items():
        family.add_metric(list(labels), value)
    return family


def histogram_family(spec: MetricSpec, values: Mapping[tuple[str, ...], Histogram]) -> Metric:
    """A histogram metric with one series per label values."""
    family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    for labels, histogram in values.items():
        buckets = [(_bound(bound), float(n)) for bound, n in histogram.cumulative()]
        family.add_metric(list(labels), buckets, histogram.sum)
    return family


def _bound(value: float) -> str:
    """A bucket bound as Prometheus writes it."""
    return "+Inf" if value == math.inf else repr(float(value))
