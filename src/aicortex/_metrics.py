"""What a cortex's requests did, for metrics and logs: the record of each request, the
observers a cortex tells, and a recorder that adds records up.

Pure: no I/O and no dependency. :class:`AsyncCortex` builds one :class:`RequestRecord`
per request when it ends (a stream: when it is released) and hands it to its observers;
nothing is done per token. The Prometheus collector (``aicortex.CortexCollector``) and
the proxy's ``/metrics`` and access log are observers.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from ._events import Stats
from ._exceptions import (
    Attempt,
    AttemptKind,
    CortexTimeoutError,
    ModelNotFoundError,
    StreamError,
    ValidationError,
)

__all__ = [
    "DURATION",
    "FAILOVERS",
    "IN_FLIGHT",
    "LOAD",
    "OUTCOMES",
    "REQUESTS",
    "SERVER_STATE",
    "STATES",
    "TOKENS",
    "TOKENS_PER_SECOND",
    "TTFT",
    "AnswerFigures",
    "Histogram",
    "Kind",
    "Meter",
    "MetricSpec",
    "Observer",
    "Observers",
    "Outcome",
    "Recorder",
    "RequestRecord",
    "Snapshot",
    "answer_figures",
    "outcome_of",
]

logger = logging.getLogger("aicortex")

Kind = Literal["chat", "generate", "embed"]
"""What a request asked for: a chat, a completion (``generate``) or embeddings."""

Outcome = Literal["ok", "error", "timeout", "model_missing", "invalid", "client_gone"]
"""How a request ended: ``ok``; ``error`` (no server could serve it, or the answer broke
after its first token); ``timeout`` (a :class:`~aicortex.Timeout` limit ran out);
``model_missing`` (no server has the model); ``invalid`` (the request was refused as
invalid); ``client_gone`` (the caller left, or closed the stream, before the end)."""

OUTCOMES: tuple[Outcome, ...] = (
    "ok",
    "error",
    "timeout",
    "model_missing",
    "invalid",
    "client_gone",
)

# The states of aicortex_server_state, as ServerState.state names them.
STATES = ("unknown", "healthy", "probing", "ejected", "busy")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request of an :class:`~aicortex.AsyncCortex`, as its observers get it.

    ``kind`` is ``"chat"``, ``"generate"`` or ``"embed"``; ``model`` the model asked
    for; ``server`` the server that answered (``""`` when none did; an embedding
    request served by several lists them, ``", "``-separated). ``outcome`` is one of
    ``ok``, ``error``, ``timeout``, ``model_missing``, ``invalid`` and ``client_gone``
    (the caller left, or closed the stream, before the end). ``duration`` is in
    seconds from the start of routing to the end (for a stream, until it was closed);
    ``first_token`` the seconds until the first token arrived (``None`` for
    embeddings, and when no token came). ``stats`` holds the final chunk's counts and
    timings (``None`` when the answer did not end). ``attempts`` are the servers
    passed over or failed on the way, each with why (its ``kind``: ``unreachable``,
    ``busy``, ``failed``, ``model_missing`` or ``ejected``), whether or not another
    server then answered.
    """

    kind: Kind
    model: str
    server: str
    outcome: Outcome
    duration: float
    first_token: float | None = None
    stats: Stats | None = None
    attempts: tuple[Attempt, ...] = ()


class Observer:
    """Told about every request of the :class:`~aicortex.AsyncCortex` it is added to
    (``AsyncCortex(observers=[...])`` or :meth:`~aicortex.AsyncCortex.add_observer`).

    Subclass it and override :meth:`request_finished`. It is called on the client's
    event loop (for a :class:`~aicortex.Cortex`, in its background thread) once per
    request, when the request ends; it must be quick and must not block. An exception
    it raises is logged and ignored.
    """

    def request_finished(self, record: RequestRecord) -> None:
        """A request ended; ``record`` says how."""


class Observers:
    """Several observers told as one; each one's failure is logged, not raised."""

    __slots__ = ("_all",)

    def __init__(self, observers: Iterable[Observer]) -> None:
        self._all = tuple(observers)

    def request_finished(self, record: RequestRecord) -> None:
        for observer in self._all:
            try:
                observer.request_finished(record)
            except Exception:  # an observer must not break a request
                logger.exception("An aicortex observer failed on a finished request")


def outcome_of(exc: BaseException, cancelled: type[BaseException]) -> Outcome:
    """The outcome of a request that raised ``exc`` (``cancelled``: the event loop's
    cancellation exception, which means the caller left)."""
    if isinstance(exc, cancelled):
        return "client_gone"
    if isinstance(exc, CortexTimeoutError):
        return "timeout"
    if isinstance(exc, ModelNotFoundError):
        return "model_missing"
    if isinstance(exc, ValidationError):
        return "invalid"
    if isinstance(exc, StreamError) and isinstance(exc.__cause__, CortexTimeoutError):
        return "timeout"
    return "error"


class Meter:
    """The record of a streamed request still being read: filled in when the stream is
    released (:meth:`ended`)."""

    __slots__ = ("_attempts", "_first_token", "_kind", "_model", "_observer", "_started")

    def __init__(
        self,
        observer: Observers,
        kind: Kind,
        model: str,
        started: float,
        first_token: float,
        attempts: Sequence[Attempt],
    ) -> None:
        self._observer = observer
        self._kind: Kind = kind
        self._model = model
        self._started = started
        self._first_token = first_token
        self._attempts = tuple(attempts)

    def ended(self, server: str, outcome: Outcome, stats: Stats | None, now: float) -> None:
        """The stream was released at ``now`` (``time.perf_counter()``)."""
        self._observer.request_finished(
            RequestRecord(
                self._kind,
                self._model,
                server,
                outcome,
                now - self._started,
                self._first_token,
                stats,
                self._attempts,
            )
        )


class AnswerFigures(NamedTuple):
    """What a record's final statistics say, in the units metrics use."""

    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_second: float | None  # eval_count / eval_duration
    load_seconds: float | None  # load_duration


def answer_figures(stats: Stats | None) -> AnswerFigures:
    """Token counts, generation speed and model load time of a finished answer."""
    if stats is None:
        return AnswerFigures(None, None, None, None)
    load = stats.load_duration
    return AnswerFigures(
        stats.prompt_tokens,
        stats.completion_tokens,
        stats.tokens_per_second,
        None if load is None else load / 1e9,
    )


# --- the metrics, as both the library's collector and the proxy name them ------------------


class MetricSpec(NamedTuple):
    """One metric: its Prometheus name, type, help text, labels and histogram buckets."""

    name: str
    type: Literal["counter", "histogram", "gauge"]
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = MetricSpec(
    "aicortex_requests_total",
    "counter",
    "Requests, by route (the proxy's HTTP route; for a program: chat, generate or embed), "
    "model, server that answered and outcome.",
    ("route", "model", "server", "outcome"),
)
DURATION = MetricSpec(
    "aicortex_request_duration_seconds",
    "histogram",
    "How long requests took, to the end of the answer.",
    ("route", "outcome"),
    _SECONDS,
)
TTFT = MetricSpec(
    "aicortex_time_to_first_token_seconds",
    "histogram",
    "Seconds from the start of a request to its first token (failovers included).",
    ("model", "server"),
    _SECONDS[:-2],
)
TOKENS = MetricSpec(
    "aicortex_tokens_total",
    "counter",
    "Tokens of finished answers as the servers counted them: kind prompt or completion.",
    ("model", "server", "kind"),
)
TOKENS_PER_SECOND = MetricSpec(
    "aicortex_generation_tokens_per_second",
    "histogram",
    "Generation speed of each finished answer (eval_count / eval_duration).",
    ("model", "server"),
    (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0),
)
LOAD = MetricSpec(
    "aicortex_model_load_seconds",
    "histogram",
    "The load_duration servers reported: time spent loading the model for an answer.",
    ("model", "server"),
    (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
IN_FLIGHT = MetricSpec(
    "aicortex_in_flight",
    "gauge",
    "Requests in flight to each server now.",
    ("server",),
)
SERVER_STATE = MetricSpec(
    "aicortex_server_state",
    "gauge",
    "Each server's routing state: 1 for the current state (unknown, healthy, probing, "
    "ejected, busy), 0 for the others.",
    ("server", "state"),
)
FAILOVERS = MetricSpec(
    "aicortex_failovers_total",
    "counter",
    "Servers a request passed over or failed on, by why: unreachable, busy, failed, "
    "model_missing or ejected.",
    ("reason",),
)


class Histogram:
    """Observations counted into buckets (each value into the first bound >= it, or past
    the last), with their sum: what a Prometheus histogram exposes, not cumulative."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for each bound, then ``inf``."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    def copy(self) -> Histogram:
        other = Histogram(self.bounds)
        other.counts = list(self.counts)
        other.sum = self.sum
        return other


class Snapshot(NamedTuple):
    """A :class:`Recorder`'s figures at one moment, keyed by label values in the order of
    each metric's labels."""

    requests: dict[tuple[str, str, str, str], int]
    durations: dict[tuple[str, str], Histogram]
    first_tokens: dict[tuple[str, str], Histogram]
    tokens: dict[tuple[str, str, str], int]
    tokens_per_second: dict[tuple[str, str], Histogram]
    loads: dict[tuple[str, str], Histogram]
    failovers: dict[str, int]


class Recorder(Observer):
    """An observer that adds up every record: request counts and durations, first-token
    times, tokens, generation speed, load times and failovers. Safe to read from another
    thread (:meth:`snapshot`) while the client's loop records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._first_tokens: dict[tuple[str, str], Histogram] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}
        self._tokens_per_second: dict[tuple[str, str], Histogram] = {}
        self._loads: dict[tuple[str, str], Histogram] = {}
        self._failovers: dict[str, int] = {}

    def request_finished(self, record: RequestRecord) -> None:
        kind, model, server, outcome = record.kind, record.model, record.server, record.outcome
        # As in the proxy, the model is a label only once a server answered for it.
        named = model if server else ""
        figures = answer_figures(record.stats)
        with self._lock:
            key = (kind, named, server, outcome)
            self._requests[key] = self._requests.get(key, 0) + 1
            _observe(self._durations, (kind, outcome), DURATION.buckets, record.duration)
            pair = (model, server)
            if record.first_token is not None and server:
                _observe(self._first_tokens, pair, TTFT.buckets, record.first_token)
            if server:
                for count, which in (
                    (figures.prompt_tokens, "prompt"),
                    (figures.completion_tokens, "completion"),
                ):
                    if count:
                        tokens = (model, server, which)
                        self._tokens[tokens] = self._tokens.get(tokens, 0) + count
                if figures.tokens_per_second is not None:
                    _observe(
                        self._tokens_per_second,
                        pair,
                        TOKENS_PER_SECOND.buckets,
                        figures.tokens_per_second,
                    )
                if figures.load_seconds is not None:
                    _observe(self._loads, pair, LOAD.buckets, figures.load_seconds)
            for attempt in record.attempts:
                reason: AttemptKind = attempt.kind
                self._failovers[reason] = self._failovers.get(reason, 0) + 1

    def snapshot(self) -> Snapshot:
        """Copies of every figure so far."""
        with self._lock:
            return Snapshot(
                dict(self._requests),
                {k: h.copy() for k, h in self._durations.items()},
                {k: h.copy() for k, h in self._first_tokens.items()},
                dict(self._tokens),
                {k: h.copy() for k, h in self._tokens_per_second.items()},
                {k: h.copy() for k, h in self._loads.items()},
                dict(self._failovers),
            )


def _observe(
    histograms: dict[tuple[str, str], Histogram],
    key: tuple[str, str],
    bounds: Sequence[float],
    value: float,
) -> None:
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram(bounds)
    histogram.observe(value)
