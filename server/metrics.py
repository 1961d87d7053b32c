"""Prometheus metrics, all on one registry served at /metrics.

Job gauges and counters are read from the job table at scrape time, so they are never stale.
gRPC calls are measured by OpenTelemetry's gRPC server interceptor: each server span it opens
becomes one observation of the semantic-convention histogram ``rpc.server.call.duration``,
exported through OpenTelemetry's Prometheus reader onto the same registry. Process, platform
and garbage-collector metrics come from prometheus-client's own collectors.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
    RPC_GRPC_STATUS_CODE,
    RPC_METHOD,
    RPC_RESPONSE_STATUS_CODE,
    RPC_SERVICE,
    RPC_SYSTEM_NAME,
)
from opentelemetry.semconv._incubating.metrics.rpc_metrics import (
    RPC_SERVER_CALL_DURATION,
    create_rpc_server_call_duration,
)
from opentelemetry.trace import SpanKind
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modelsurgery.proto.job_state import JobState
from modelsurgery.server import job_table as jt

_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Call durations are in seconds; OpenTelemetry's default boundaries (0, 5, 10 ... 10000) are
# meant for milliseconds and would put every call in one bucket. These are the semantic
# conventions' advice for durations, extended to the minutes a Generate or download may take.
CALL_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip


class JobTableCollector:
    """Jobs by state and event totals, read from the job table at each scrape.

    Events are never deleted, so the counters add up only the rows stored since the last scrape
    (a rowid range); they count the whole table's history, across server restarts.
    """

    def __init__(self, table: jt.JobTable) -> None:
        self._table = table
        self._lock = threading.Lock()
        self._last_rowid = 0
        self._events: Counter[tuple[str, JobState]] = Counter()

    def describe(self) -> Iterator[Metric]:
        yield from self._families({}, Counter())

    def collect(self) -> Iterator[Metric]:
        counts = self._table.count_by_state()
        with self._lock:
            new, self._last_rowid = self._table.event_counts_after(self._last_rowid)
            self._events.update(new)
            events = self._events.copy()
        yield from self._families(counts, events)

    @staticmethod
    def _families(
        counts: dict[JobState, int], events: Counter[tuple[str, JobState]]
    ) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("modelsurgery_jobs", "Jobs in each state now", labels=["state"])
        transitions = CounterMetricFamily(
            "modelsurgery_job_transitions", "Times a job entered each state", labels=["state"]
        )
        by_kind: Counter[str] = Counter()
        for (kind, _state), n in events.items():
            by_kind[kind] += n
        for state in JobState:
            jobs.add_metric([state], counts.get(state, 0))
            transitions.add_metric([state], events[("state", state)])
        yield jobs
        yield GaugeMetricFamily(
            "modelsurgery_queue_depth",
            "Jobs waiting for a worker",
            value=counts.get(JobState.QUEUED, 0),
        )
        yield transitions
        kinds = CounterMetricFamily(
            "modelsurgery_events", "Job events recorded, by kind", labels=["kind"]
        )
        for kind, n in sorted(by_kind.items()):
            kinds.add_metric([kind], n)
        yield kinds


class _CallDurations(SpanProcessor):
    """One ``rpc.server.call.duration`` observation per server span of the gRPC interceptor;
    the semantic conventions define that metric as the span's duration."""

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter("modelsurgery.server")
        self._duration = create_rpc_server_call_duration(meter)

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind != SpanKind.SERVER or span.start_time is None or span.end_time is None:
            return
        attributes = span.attributes or {}
        self._duration.record(
            (span.end_time - span.start_time) / 1e9,
            {
                RPC_SYSTEM_NAME: "grpc",
                RPC_METHOD: f"{attributes.get(RPC_SERVICE, '')}/{attributes.get(RPC_METHOD, '')}",
                RPC_RESPONSE_STATUS_CODE: _status_name(span),
            },
        )


def _status_name(span: ReadableSpan) -> str:
    """The call's gRPC status: the interceptor records the code set through the context; a
    handler that raised instead ended the call UNKNOWN, or CANCELLED when it was cancelled."""
    code = int((span.attributes or {}).get(RPC_GRPC_STATUS_CODE, 0))
    if code == grpc.StatusCode.OK.value[0]:
        raised = [
            str((event.attributes or {}).get("exception.type", ""))
            for event in span.events
            if event.name == "exception"
        ]
        if any(name.endswith("CancelledError") for name in raised):
            return grpc.StatusCode.CANCELLED.name
        if raised:
            return grpc.StatusCode.UNKNOWN.name
    return _STATUS_NAMES.get(code, grpc.StatusCode.UNKNOWN.name)


class ServerMetrics:
    def __init__(self, table: jt.JobTable) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(JobTableCollector(table))
        self.duration = Histogram(
            "modelsurgery_job_duration_seconds",
            "Wall time of a job on a worker",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        resource = Resource.create({SERVICE_NAME: "modelsurgery"})
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        seconds = View(
            instrument_name=RPC_SERVER_CALL_DURATION,
            aggregation=ExplicitBucketHistogramAggregation(CALL_DURATION_BUCKETS),
        )
        self._meter_provider = MeterProvider(
            metric_readers=[reader], resource=resource, views=[seconds]
        )
        self._tracer_provider = TracerProvider(sampler=ALWAYS_ON, resource=resource)
        self._tracer_provider.add_span_processor(_CallDurations(self._meter_provider))
        self._http: WSGIServer | None = None

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        """OpenTelemetry's aio server interceptor; put it first so that calls rejected by later
        interceptors (auth) are counted too.

        It handles streaming responses only from async generators: a handler that streams with
        ``context.write`` fails under it (open-telemetry/opentelemetry-python-contrib#3066).
        Health's Watch is one, so health is left out (probes would swamp the figures anyway).
        """
        skip_health = filters.negate(filters.service_name(health.SERVICE_NAME))
        return aio_server_interceptor(tracer_provider=self._tracer_provider, filter_=skip_health)

    def job_finished(self, seconds: float) -> None:
        self.duration.observe(seconds)

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving /metrics (before the job table closes) and release the providers."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
