"""Prometheus metrics: jobs by state, job duration, queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from modelsurgery.server import job_table as jt


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("modelsurgery_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.queue_depth = Gauge(
            "modelsurgery_queue_depth", "Jobs waiting to run", registry=self.registry
        )
        self.duration = Histogram(
            "modelsurgery_job_duration_seconds",
            "Wall time of a job on a worker",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )

    def observe_table(self, table: jt.JobTable) -> None:
        counts = table.count_by_state()
        for state, count in counts.items():
            self.jobs.labels(state=state).set(count)
        self.queue_depth.set(counts.get(jt.QUEUED, 0))

    def job_finished(self, seconds: float) -> None:
        self.duration.observe(seconds)

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
