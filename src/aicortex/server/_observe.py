"""What the proxy tells about each request: one access-log line (logger
``aicortex.access``) and, with metrics on, its counts and timings.

:class:`Observe` is pure ASGI middleware around the whole app. The answer's own figures
(model, server, first token, tokens) come from the cortex: :class:`RecordTaker` is the
cortex's observer, and hands each request's record to the HTTP request under way (a
context variable, so nothing is looked up per token). Nothing of a request's body,
headers or answer is logged: no key, no prompt, no answer.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from starlette.routing import BaseRoute, Match, Route

from .._metrics import Observer, RequestRecord
from ._gateway import REQUEST_ID, Receive, Send

if TYPE_CHECKING:
    from ._prom import ProxyMetrics

__all__ = ["ACCESS_LOGGER", "LogFormat", "Observe", "RecordTaker", "access_fields", "format_line"]

ACCESS_LOGGER = logging.getLogger("aicortex.access")

LogFormat = Literal["text", "json"]

_MAX_VALUE = 200  # longest value logged (a model name is the client's to choose)
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+\-]*")
_CONVERTER = re.compile(r"\{(\w+):\w+\}")  # /v1/models/{model:path} -> /v1/models/{model}


class _Exchange:
    """One HTTP request under way: its status, and the record of its answer."""

    __slots__ = ("complete", "record", "status")

    def __init__(self) -> None:
        self.record: RequestRecord | None = None
        self.status = 0
        self.complete = False  # the last body message went out


_CURRENT: ContextVar[_Exchange | None] = ContextVar("aicortex_exchange", default=None)


class RecordTaker(Observer):
    """The cortex's observer for an app: gives each request's record to the HTTP request
    that made it (the cortex's other callers have none, and are left alone)."""

    def request_finished(self, record: RequestRecord) -> None:
        exchange = _CURRENT.get()
        if exchange is not None:
            exchange.record = record


def http_outcome(exchange: _Exchange) -> str:
    """How an HTTP request ended, in the words of the metrics' ``outcome`` label."""
    if not exchange.complete:
        return "client_gone"
    status = exchange.status
    record = exchange.record
    if record is not None and not (status >= 500 and record.outcome == "ok"):
        return record.outcome
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 504:
        return "timeout"
    return "error" if status >= 500 else "invalid"


def access_fields(
    request_id: str,
    method: str,
    route: str,
    exchange: _Exchange,
    outcome: str,
    duration: float,
) -> dict[str, Any]:
    """The fields of one access-log line (None: not known, or not applicable)."""
    record = exchange.record
    prompt = completion = first = None
    if record is not None:
        if record.first_token is not None:
            first = round(record.first_token * 1000, 1)
        if record.stats is not None:
            prompt, completion = record.stats.prompt_tokens, record.stats.completion_tokens
    return {
        "request_id": request_id,
        "method": method,
        "route": route,
        "model": None if record is None else record.model,
        "server": (record.server or None) if record is not None else None,
        "status": exchange.status or None,
        "first_token_ms": first,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "duration_ms": round(duration * 1000, 1),
        "outcome": outcome,
        "client_gone": not exchange.complete,
    }


def format_line(fields: Mapping[str, Any], log_format: LogFormat) -> str:
    """One access-log line: ``key=value`` pairs (a value with anything but plain
    characters quoted and escaped, so a line is always one line), or a JSON object."""
    if log_format == "json":
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return json.dumps({"time": now.replace("+00:00", "Z"), **_clipped(fields)})
    parts: list[str] = []
    for key, value in _clipped(fields).items():
        if value is None:
            text = "-"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
            if not _PLAIN.fullmatch(text) or not text:
                text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _clipped(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value[:_MAX_VALUE] + "..."
        if isinstance(value, str) and len(value) > _MAX_VALUE
        else value
        for key, value in fields.items()
    }


def route_label(route: BaseRoute) -> str:
    """A route's path as a label: ``/v1/models/{model}``."""
    path: str = getattr(route, "path", "") or ""
    return _CONVERTER.sub(r"{\1}", path)


class Observe:
    """Pure ASGI middleware: for each HTTP request, the metrics (``metrics``, when on)
    and the access-log line (``log_format``; None: no log), once it has ended."""

    def __init__(
        self,
        app: Any,
        *,
        metrics: ProxyMetrics | None,
        log_format: LogFormat | None,
        routes: Iterable[BaseRoute],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_format: LogFormat | None = log_format
        self.routes = list(routes)
        # The route each endpoint serves, by the endpoint object the router puts in the scope.
        self.labels: dict[int, str] = {
            id(route.endpoint): route_label(route)
            for route in self.routes
            if isinstance(route, Route)
        }
        self.now: Callable[[], float] = time.perf_counter

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self.now()
        exchange = _Exchange()
        token = _CURRENT.set(exchange)

        # A plain function that hands back send's own awaitable: no coroutine of its
        # own for each chunk of a stream.
        def watched_send(message: dict[str, Any]) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.start":
                exchange.status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            return send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            _CURRENT.reset(token)
            try:
                self._done(scope, exchange, self.now() - started)
            except Exception:  # what is told about a request never fails it
                logging.getLogger("aicortex.server").exception("Recording a request failed")

    def _route(self, scope: dict[str, Any]) -> str | None:
        """The label of the route that served the request; None when none matches."""
        endpoint = scope.get("endpoint")
        if endpoint is not None:
            label = self.labels.get(id(endpoint))
            if label is not None:
                return label
        # Refused before routing (a missing key): find the route it was meant for.
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route_label(route)
        return None

    def _done(self, scope: dict[str, Any], exchange: _Exchange, duration: float) -> None:
        outcome = http_outcome(exchange)
        route = self._route(scope)
        metrics = self.metrics
        if metrics is not None:
            metrics.request_done(route or "unmatched", outcome, duration, exchange.record)
        log_format = self.log_format
        if log_format is not None and ACCESS_LOGGER.isEnabledFor(logging.INFO):
            request_id: str = scope.get(REQUEST_ID) or "-"
            fields = access_fields(
                request_id, scope["method"], route or scope["path"], exchange, outcome, duration
            )
            ACCESS_LOGGER.info(
                format_line(fields, log_format),
                extra={"request_id": request_id, "access": fields},
            )
