"""Prometheus metrics of one worker process, on its own port (`ABL_METRICS_PORT`).

Engine state (batch size, KV-cache use, tokens, generations by outcome) is read from each
engine's stats when Prometheus scrapes; per-request counters are updated as requests settle,
which also writes the request's JSON log line (same `request_id` as the API's line).
"""

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from contract.jobs import GenerateJob
from contract.logs import log_request, request_logger
from db.ledger import Outcome, Settlement

if TYPE_CHECKING:
    from workers.backends.seam import EngineStats
    from workers.settings import WorkerSettings

log = logging.getLogger("abl.worker.metrics")

WORKER_INFO = Gauge("abl_worker_info", "Always 1; names this worker process", ["worker"])
REQUESTS = Counter(
    "abl_worker_requests_total",
    "Requests this worker ran, by the status they settled with",
    ["model", "status"],
)
ORPHANED = Counter(
    "abl_worker_orphaned_generations_total",
    "Generations that ran to their end although nobody was waiting: the client had"
    " cancelled, or the API had already settled the request",
    ["model"],
)
DURATION = Histogram(
    "abl_worker_request_duration_seconds",
    "From claiming a request to settling it",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


class HasStats(Protocol):
    """What the collector reads from an engine."""

    @property
    def stats(self) -> "EngineStats": ...


class EngineCollector(Collector):
    """Reads every engine's stats at scrape time."""

    def __init__(self, engines: Mapping[str, HasStats]) -> None:
        self.engines = engines

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model"])

        batch = gauge("abl_worker_batch_size", "Sequences in the running batch")
        waiting = gauge("abl_worker_waiting_sequences", "Submitted, not yet in the batch")
        kv = gauge("abl_worker_kv_cache_tokens", "Real tokens held in the batch's KV cache")
        allocated = gauge(
            "abl_worker_kv_cache_allocated_tokens",
            "Token slots the KV cache holds for the batch, padding or block rounding included",
        )
        capacity = gauge("abl_worker_kv_cache_capacity_tokens", "Most tokens the KV cache may hold")
        usage = gauge("abl_worker_kv_cache_usage_ratio", "KV cache tokens / capacity")
        tokens = CounterMetricFamily(
            "abl_worker_generated_tokens", "Tokens generated, eos included", labels=["model"]
        )
        steps = CounterMetricFamily(
            "abl_worker_decode_steps", "Batched decode steps run", labels=["model"]
        )
        generations = CounterMetricFamily(
            "abl_worker_generations",
            "Engine generations by how they ended: finished, cancelled or failed",
            labels=["model", "outcome"],
        )

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["model"])

        # The prompt cache (docs/caching.md): hit rate = hits / lookups.
        lookups = counter("abl_worker_prefix_cache_lookups", "Prompt-cache lookups (cacheable)")
        hits = counter("abl_worker_prefix_cache_hits", "Lookups that reused a cached prefix")
        read = counter("abl_worker_prefix_cache_read_tokens", "Prompt tokens whose KV was reused")
        stored = counter(
            "abl_worker_prefix_cache_stored_tokens", "Prompt tokens whose KV was stored"
        )
        evictions = counter("abl_worker_prefix_cache_evictions", "Prompt-cache blocks evicted")
        held = gauge("abl_worker_prefix_cache_bytes", "Bytes the prompt cache holds")
        budget = gauge("abl_worker_prefix_cache_budget_bytes", "Bytes the prompt cache may hold")
        prefix: tuple[CounterMetricFamily | GaugeMetricFamily, ...] = (
            *(lookups, hits, read, stored, evictions),
            *(held, budget),
        )
        fields = (
            "prefix_lookups",
            "prefix_hits",
            "prefix_read_tokens",
            "prefix_stored_tokens",
            "prefix_evictions",
            "prefix_bytes",
            "prefix_budget_bytes",
        )
        for model, engine in self.engines.items():
            stats = engine.stats
            for family, field in zip(prefix, fields, strict=True):
                family.add_metric([model], getattr(stats, field))
            batch.add_metric([model], stats.active)
            waiting.add_metric([model], stats.waiting)
            kv.add_metric([model], stats.kv_tokens)
            allocated.add_metric([model], stats.kv_allocated_tokens)
            capacity.add_metric([model], stats.kv_capacity_tokens)
            usage.add_metric([model], stats.kv_tokens / max(1, stats.kv_capacity_tokens))
            tokens.add_metric([model], stats.tokens_generated)
            steps.add_metric([model], stats.steps)
            for outcome in ("finished", "cancelled", "failed"):
                generations.add_metric([model, outcome], getattr(stats, outcome))
        yield from (batch, waiting, kv, allocated, capacity, usage, tokens, steps, generations)
        yield from prefix


def serve_metrics(settings: "WorkerSettings", collector: EngineCollector) -> int | None:
    """Register the engines' collector and start the metrics server; its port, or None when
    turned off. The caller unregisters the collector when it stops (another runtime in the
    same process, as in tests, registers its own)."""
    WORKER_INFO.labels(settings.worker_name).set(1)
    REGISTRY.register(collector)
    if settings.metrics_port == 0:
        return None
    try:
        server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}):"
            " give each worker on a host its own ABL_METRICS_PORT, or 0 to turn metrics off"
        ) from exc
    port = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return port


class RequestTelemetry:
    """Per-request counters and the JSON log line, from claim to settlement."""

    def __init__(self, worker_name: str) -> None:
        self.worker_name = worker_name
        self._claimed_at: dict[str, float] = {}
        self._lock = threading.Lock()
        request_logger()

    def claimed(self, request_id: str) -> None:
        with self._lock:
            self._claimed_at[request_id] = time.monotonic()

    def settled(
        self, job: GenerateJob, outcome: Outcome, settlement: Settlement, *, orphaned: bool
    ) -> None:
        with self._lock:
            claimed_at = self._claimed_at.pop(job.request_id, None)
        latency = None if claimed_at is None else time.monotonic() - claimed_at
        REQUESTS.labels(job.model, settlement.status).inc()
        if orphaned:
            ORPHANED.labels(job.model).inc()
        if latency is not None:
            DURATION.labels(job.model).observe(latency)
        log_request(
            {
                "request_id": job.request_id,
                "account_id": job.account_id,
                "key_prefix": job.key_prefix,
                "worker": self.worker_name,
                "model": job.model,
                "status": settlement.status,
                "worker_outcome": outcome.status,
                "already_settled": settlement.already_settled,
                "orphaned": orphaned,
                "input_tokens": len(job.input_ids),
                "output_tokens": outcome.output_tokens,
                "credits": settlement.credits_charged,
                "cost_usd": str(settlement.cost_usd),
                "stop_reason": outcome.stop_reason,
                "error": outcome.error,
                "latency_s": None if latency is None else round(latency, 4),
            }
        )
