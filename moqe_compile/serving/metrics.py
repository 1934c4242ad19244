"""Prometheus metrics of one server, in its own registry (no process-global state, so
several servers or tests in one process never share counters).

Every series carries ``model`` and ``version`` labels, as Triton's do; the mapping to
Triton's metric names is in docs/serving.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERROR_REASONS = ("bad_request", "not_found", "too_large", "overloaded", "timeout", "client_closed", "internal")


class Metrics:
    def __init__(self, model: str, version: str, experts: list[str]):
        self.model, self.version = model, version
        r = self.registry = CollectorRegistry()
        mv = ["model", "version"]
        self.requests = Counter("moqe_requests", "Inference requests answered, by HTTP status code.",
                                [*mv, "code"], registry=r)
        self.errors = Counter("moqe_request_errors", "Inference requests not served, by reason.",
                              [*mv, "reason"], registry=r)
        self.expert_samples = Counter("moqe_expert_samples", "Samples served, by expert.",
                                      [*mv, "expert"], registry=r)
        self.latency = Histogram("moqe_request_latency_seconds", "Infer request latency, body read to reply.",
                                 mv, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("moqe_queue_wait_seconds", "Time an admitted request waited for its merged "
                                    "run to start.", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("moqe_router_confidence", "Router confidence (max probability) per sample.",
                                    mv, buckets=CONFIDENCE_BUCKETS, registry=r)
        self.batch_size = Histogram("moqe_batch_size", "Samples per merged (dynamically batched) run.",
                                    mv, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("moqe_queue_depth", "Requests waiting for the batcher.", mv, registry=r)
        self.in_flight = Gauge("moqe_requests_in_flight", "Infer requests admitted and not yet answered.",
                               mv, registry=r)
        self.router_seconds = Counter("moqe_router_seconds", "Time spent in the router, summed over merged runs.",
                                      mv, registry=r)
        self.run_seconds = Counter("moqe_run_seconds", "Time spent in merged runs (router + experts).",
                                   mv, registry=r)
        for e in experts:  # exported at 0 from the start, so dashboards see every expert
            self.expert_samples.labels(model, version, e)
        for reason in ERROR_REASONS:
            self.errors.labels(model, version, reason)

    def failed(self, reason: str) -> None:
        self.errors.labels(self.model, self.version, reason).inc()

    def answered(self, code: int) -> None:
        self.requests.labels(self.model, self.version, str(code)).inc()

    def observe_batch(self, result, batch_size: int, n_requests: int) -> None:
        """Batcher hook: once per merged run, so timings are not counted once per request."""
        mv = (self.model, self.version)
        self.batch_size.labels(*mv).observe(batch_size)
        self.router_seconds.labels(*mv).inc(result.timing_ms.get("router", 0.0) / 1e3)
        self.run_seconds.labels(*mv).inc(result.timing_ms.get("total", 0.0) / 1e3)
        for name in result.experts:
            self.expert_samples.labels(*mv, name).inc()
        conf = self.confidence.labels(*mv)
        for c in result.confidence:
            conf.observe(float(c))

    def render(self) -> bytes:
        return generate_latest(self.registry)
