"""Prometheus metrics of one server, in its own registry (no process-global state, so
several servers or tests in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, model: str, experts: list[str]):
        self.model = model
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moqe_requests", "Inference requests answered, by HTTP status code.",
                                ["model", "code"], registry=r)
        self.errors = Counter("moqe_request_errors", "Inference requests not served, by reason.",
                              ["model", "reason"], registry=r)
        self.expert_samples = Counter("moqe_expert_samples", "Samples served, by expert.",
                                      ["model", "expert"], registry=r)
        self.latency = Histogram("moqe_request_latency_seconds", "Infer request latency, body read to reply.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("moqe_router_confidence", "Router confidence (max probability) per sample.",
                                    ["model"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.batch_size = Histogram("moqe_batch_size", "Samples per merged (dynamically batched) run.",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("moqe_queue_depth", "Requests waiting for the batcher.", ["model"], registry=r)
        self.router_seconds = Counter("moqe_router_seconds", "Time spent in the router, summed over merged runs.",
                                      ["model"], registry=r)
        self.run_seconds = Counter("moqe_run_seconds", "Time spent in merged runs (router + experts).",
                                   ["model"], registry=r)
        for e in experts:  # exported at 0 from the start, so dashboards see every expert
            self.expert_samples.labels(model, e)
        for reason in ("bad_request", "not_found", "too_large", "overloaded"):
            self.errors.labels(model, reason)

    def observe_batch(self, result, batch_size: int, n_requests: int) -> None:
        """Batcher hook: once per merged run, so timings are not counted once per request."""
        m = self.model
        self.batch_size.labels(m).observe(batch_size)
        self.router_seconds.labels(m).inc(result.timing_ms.get("router", 0.0) / 1e3)
        self.run_seconds.labels(m).inc(result.timing_ms.get("total", 0.0) / 1e3)
        for name in result.experts:
            self.expert_samples.labels(m, name).inc()
        conf = self.confidence.labels(m)
        for c in result.confidence:
            conf.observe(float(c))

    def render(self) -> bytes:
        return generate_latest(self.registry)
