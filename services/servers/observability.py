"""Metrics and log lines every wlcad process shares (prometheus-client; one registry per process).

Names are the same in every process; Prometheus's ``job`` label tells the gateway from the services.
Log lines carry the method, status, duration and the *field* of an input error — never the message
of an exception raised while reading an image, which could quote file contents.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "wlcad_requests",
    "Requests finished, by component, method and status code.",
    ["component", "method", "code"],
)
LATENCY = Histogram(
    "wlcad_request_duration_seconds", "Request latency.", ["component", "method"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("wlcad_in_flight_requests", "Requests being handled now.", ["component"])
QUEUE_DEPTH = Gauge("wlcad_queue_depth", "Requests admitted but waiting for a worker.", ["component"])
INFERENCE = Histogram(
    "wlcad_inference_duration_seconds",
    "Time in the estimation method itself, by model (method) and version.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_UP = Gauge(
    "wlcad_upstream_up", "1 when the gateway's last call to an upstream reached it.", ["route"]
)
RETRIES = Counter("wlcad_gateway_retries", "Upstream calls retried after UNAVAILABLE.", ["route", "method"])

log = logging.getLogger("wlcad.serving")


def observe(component: str, method: str, code: str, started: float) -> None:
    """Count one finished request and log one line about it."""
    elapsed = time.perf_counter() - started
    REQUESTS.labels(component, method, code).inc()
    LATENCY.labels(component, method).observe(elapsed)
    log.info("%s %s %s %.1fms", component, method, code, elapsed * 1000)


class MethodMetrics:
    """One method's request counter and latency children, looked up once: ``labels()`` costs a lock
    and a dict lookup per call, which is a measurable share of a pass-through hop's ~1 ms."""

    __slots__ = ("_component", "_counts", "_latency", "_method")

    def __init__(self, component: str, method: str) -> None:
        self._component, self._method = component, method
        self._latency = LATENCY.labels(component, method)
        self._counts: dict[str, Counter] = {}

    def observe(self, code: str, started: float) -> None:
        """Same effect as :func:`observe` for this method."""
        elapsed = time.perf_counter() - started
        count = self._counts.get(code)
        if count is None:
            count = self._counts[code] = REQUESTS.labels(self._component, self._method, code)
        count.inc()
        self._latency.observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s %.1fms", self._component, self._method, code, elapsed * 1000)
