"""Prometheus metrics of one edge server, in a registry of its own (not the process-wide default), so that tests
and several apps in one process count apart.

Counted as they happen: requests by endpoint (the route's template, so a path is never a label) and status code,
their latency, and admission's refusals. Read from the server's state when scraped: the model served (info and
version), its readiness, swaps and rollbacks, failed loads, and requests in the model and waiting.
`GET /metrics` is open like the inference endpoints: it holds counts and versions, no data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

if TYPE_CHECKING:
    from edge.admission import Admission
    from edge.server import ModelWatcher

PREFIX = "maxfl_edge"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE = ("/v1/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
OTHER = "other"  # any path no route matches: bounded labels, whatever clients send
SWAP_KINDS = ("update", "rollback", "variant")
REFUSALS = ("busy", "wait")


class EndpointStats(BaseModel):
    """Requests to some endpoints since the server started, and their latency estimated from the histogram."""

    endpoint: str
    total: int
    by_code: dict[str, int]
    mean_ms: float | None
    p50_ms: float | None  # as Prometheus' histogram_quantile estimates it: linear within a bucket
    p99_ms: float | None


class RequestStats(BaseModel):
    inference: EndpointStats  # /v1/predict and the v2 infer endpoints together
    endpoints: list[EndpointStats]
    admission_rejections: dict[str, int]


class EdgeMetrics:
    """The registry of one app, its instruments and its view of the served model."""

    def __init__(self, watcher: ModelWatcher) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by endpoint (route template) and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds", "Time from a request's arrival to the end of its answer, by endpoint",
                                 ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.rejections = Counter(f"{PREFIX}_admission_rejections", "Inference requests refused with 503 by admission control: busy "
                                  "(model threads and queue full) or wait (no model thread within the request's time)",
                                  ["reason"], registry=self.registry)
        for reason in REFUSALS:
            self.rejections.labels(reason)
        self._state = _ServerState(watcher)
        self.registry.register(self._state)

    def watch_admission(self, admission: Admission) -> None:
        self._state.admission = admission

    def admission_refused(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def stats(self) -> RequestStats:
        """What the plant page shows: counts by status and latency, for inference and per endpoint."""
        counts: dict[str, dict[str, int]] = {}
        for metric in self.requests.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    counts.setdefault(s.labels["endpoint"], {})[s.labels["code"]] = int(s.value)
        histograms: dict[str, _Histogram] = {}
        for metric in self.latency.collect():
            for s in metric.samples:
                h = histograms.setdefault(s.labels["endpoint"], _Histogram())
                h.add(s.name, s.labels.get("le"), s.value)
        endpoints = sorted(set(counts) | set(histograms))
        per = [_stats(e, [counts.get(e, {})], [histograms[e]] if e in histograms else []) for e in endpoints]
        inference = _stats("inference", [counts.get(e, {}) for e in INFERENCE], [histograms[e] for e in INFERENCE if e in histograms])
        rejections = {s.labels["reason"]: int(s.value) for m in self.rejections.collect() for s in m.samples if s.name.endswith("_total")}
        return RequestStats(inference=inference, endpoints=per, admission_rejections=rejections)


class _Histogram:
    """One endpoint's histogram samples: cumulative bucket counts, sum and count."""

    def __init__(self) -> None:
        self.buckets: dict[float, float] = {}
        self.sum = 0.0
        self.count = 0.0

    def add(self, name: str, le: str | None, value: float) -> None:
        if name.endswith("_bucket") and le is not None:
            self.buckets[float(le)] = value
        elif name.endswith("_sum"):
            self.sum = value
        elif name.endswith("_count"):
            self.count = value


def _stats(endpoint: str, counts: Iterable[dict[str, int]], histograms: Sequence[_Histogram]) -> EndpointStats:
    by_code: dict[str, int] = {}
    for c in counts:
        for code, n in c.items():
            by_code[code] = by_code.get(code, 0) + n
    buckets: dict[float, float] = {}
    for h in histograms:
        for le, n in h.buckets.items():
            buckets[le] = buckets.get(le, 0.0) + n
    count = sum(h.count for h in histograms)
    total_s = sum(h.sum for h in histograms)
    ms = lambda s: None if s is None else round(s * 1000, 3)  # noqa: E731
    return EndpointStats(endpoint=endpoint, total=sum(by_code.values()), by_code=dict(sorted(by_code.items())),
                         mean_ms=ms(total_s / count) if count else None, p50_ms=ms(quantile(0.5, buckets)), p99_ms=ms(quantile(0.99, buckets)))


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: the bucket holding the q-th observation, linear within it; the highest finite
    bound if it falls in +Inf; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        n = buckets[le]
        if n >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
        lower, below = le, n
    return lower


class _ServerState:
    """A custom collector: the served model and the swap counters as they are when Prometheus scrapes."""

    def __init__(self, watcher: ModelWatcher) -> None:
        self.watcher = watcher
        self.admission: Admission | None = None

    def describe(self) -> list[Metric]:
        return []  # nothing to check for name clashes at registration: every name here is this module's own

    def collect(self) -> Iterator[Metric]:
        w, rt = self.watcher, self.watcher.runtime
        ready = GaugeMetricFamily(f"{PREFIX}_model_ready", "1 while a model version is loaded and serving")
        ready.add_metric([], 1.0 if rt is not None else 0.0)
        yield ready
        degraded = GaugeMetricFamily(f"{PREFIX}_model_degraded", "1 while the version serving is not the one the store's pointer names")
        degraded.add_metric([], 1.0 if w.problem else 0.0)
        yield degraded
        if rt is not None:
            m = rt.manifest
            info = InfoMetricFamily(f"{PREFIX}_model", "The model version served and its variant (global, personalised or local)")
            info.add_metric([], {"model": m.model_name, "version": str(m.version), "variant": rt.variant, "sha256": m.sha256, "task": m.task})
            yield info
            version = GaugeMetricFamily(f"{PREFIX}_model_version", "The model version served", labels=["model"])
            version.add_metric([m.model_name], float(m.version))
            yield version
            loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded_timestamp_seconds", "When the served version started serving (Unix time)")
            loaded.add_metric([], rt.loaded_at)
            yield loaded
        swaps = CounterMetricFamily(f"{PREFIX}_model_swaps", "Changes of the served model since start: update (an install or "
                                    "activation), rollback, variant (the plant's own variant of the same version)", labels=["kind"])
        counts = dict(w.swap_counts)
        for kind in SWAP_KINDS:
            swaps.add_metric([kind], float(counts.get(kind, 0)))
        yield swaps
        failures = CounterMetricFamily(f"{PREFIX}_model_load_failures", "Versions that failed to load; the previous one kept serving")
        failures.add_metric([], float(w.load_failures))
        yield failures
        if self.admission is not None:
            for name, value, doc in (("requests_in_model", self.admission.running, "Inference requests on a model thread now"),
                                     ("requests_waiting", self.admission.waiting, "Admitted inference requests waiting for a model thread")):
                gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
                gauge.add_metric([], float(value))
                yield gauge


class RequestMetrics:
    """ASGI middleware: every HTTP request's status and duration, labelled with the route it matched."""

    def __init__(self, app: Any, metrics: EdgeMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _endpoint(self, scope: dict[str, Any]) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", OTHER))
        return OTHER

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, started, status = self._endpoint(scope), time.perf_counter(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(endpoint, status[0], time.perf_counter() - started)
