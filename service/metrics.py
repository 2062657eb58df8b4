"""Prometheus metrics, one registry per app instance (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "cprec_requests_total", "HTTP requests", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "cprec_request_seconds", "HTTP latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.errors = Counter("cprec_errors_total", "Error responses by code", ["code"], registry=r)
        self.batch_size = Histogram(
            "cprec_batch_size",
            "Texts per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_requests = Histogram(
            "cprec_batch_requests",
            "Requests per coalesced batch (a batch may run as several forwards)",
            buckets=(1, 2, 4, 8, 16, 24, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_depth = Gauge("cprec_queue_depth", "Encodes waiting for the device", registry=r)
        self.encode_seconds = Histogram(
            "cprec_encode_seconds", "Forward pass time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.cache = Counter(
            "cprec_cache_total", "User-vector cache lookups", ["result"], registry=r
        )  # hit | miss | error (a failed Redis round trip: one per tick's pipeline)
        self.results = Counter(
            "cprec_result_cache_total", "Ranked-list cache lookups", ["result"], registry=r
        )  # hit | miss
        self.index_size = Gauge("cprec_index_items", "Items per domain", ["domain"], registry=r)
        self.reindex_jobs = Counter(
            "cprec_reindex_jobs_total", "Reindex jobs", ["state"], registry=r
        )
        self.model_jobs = Counter(
            "cprec_model_jobs_total", "Model reload, rollback and watch jobs", ["state"], registry=r
        )
        self.ready = Gauge("cprec_ready", "1 when serving", registry=r)
