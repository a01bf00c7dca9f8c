"""Prometheus metrics of the API process, served at `GET /metrics`.

The relay (api/anthropic/routes.py) feeds one `RequestMeter` per Messages request: outcome,
time to first token, inter-token latency, tokens and credits; closing it also writes the
request's JSON log line. Queue depth and live workers per model are read from Redis when
Prometheus scrapes. Model labels are catalogue ids only (a client's unknown model id is
`unknown`), so clients cannot grow the label sets.
"""

import logging
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.credentials import Principal
from api.deps import PlatformDep
from api.errors import ApiError
from api.health import live_workers
from api.platform import Platform
from contract.catalog import Catalog
from contract.events import DeltaEvent, DoneEvent
from contract.logs import log_request
from contract.queueing import interactive_lanes

log = logging.getLogger("abl.metrics")
# The `_created` series double every counter and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN_MODEL = "unknown"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "abl_requests_total",
    "Messages requests by outcome: succeeded, failed, cancelled (client went away), or"
    " rejected (refused before it was queued); error_type is the Anthropic error type",
    ["model", "status", "error_type"],
)
RATE_LIMITED = Counter(
    "abl_rate_limit_rejections_total", "Messages requests refused with a 429", ["model"]
)
CANCELLED = Counter(
    "abl_cancelled_requests_total", "Requests cancelled because their client went away", ["model"]
)
INPUT_TOKENS = Counter(
    "abl_input_tokens_total",
    "Prompt tokens of requests answered to their end, neither read from nor written to the"
    " prompt cache (Anthropic's input_tokens)",
    ["model"],
)
CACHE_READ_TOKENS = Counter(
    "abl_cache_read_input_tokens_total",
    "Prompt tokens read from a worker's prompt cache (requests answered to their end)",
    ["model"],
)
CACHE_CREATION_TOKENS = Counter(
    "abl_cache_creation_input_tokens_total",
    "Prompt tokens written to a worker's prompt cache (requests answered to their end)",
    ["model"],
)
OUTPUT_TOKENS = Counter(
    "abl_output_tokens_total", "Generated tokens of requests answered to their end", ["model"]
)
CREDITS = Counter(
    "abl_credits_charged_total", "Credits charged for requests answered to their end", ["model"]
)
TTFT = Histogram(
    "abl_time_to_first_token_seconds",
    "From the request's arrival to its first generated text",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
ITL = Histogram(
    "abl_inter_token_latency_seconds",
    "Between consecutive generated tokens as the API relays them (one observation per token)",
    ["model"],
    buckets=_ITL_BUCKETS,
)
DURATION = Histogram(
    "abl_request_duration_seconds",
    "From the request's arrival to its end, by outcome",
    ["model", "status"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("abl_queue_depth", "Jobs waiting in the model's queue", ["model"])
LIVE_WORKERS = Gauge(
    "abl_live_workers", "Workers with a live heartbeat serving the model", ["model"]
)
HTTP_RESPONSES = Counter(
    "abl_http_responses_total",
    "HTTP responses by route template and status code",
    ["route", "code"],
)

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(platform: PlatformDep) -> Response:
    await refresh_gauges(platform)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def refresh_gauges(platform: Platform) -> None:
    """Queue depth and live workers per catalogue model, read from Redis now."""
    specs = platform.catalog.all()
    try:
        async with platform.redis.pipeline(transaction=False) as pipe:
            lanes = platform.settings.queue_lanes
            for spec in specs:
                for lane in interactive_lanes(spec.queue, lanes):
                    pipe.llen(lane)
            lengths = await pipe.execute()
            depths = [sum(lengths[i * lanes : (i + 1) * lanes]) for i in range(len(specs))]
        workers = await live_workers(platform.redis)
    except (RedisError, OSError) as exc:  # the scrape still answers; these go stale
        log.warning("metrics: Redis unavailable: %s", exc)
        return
    for spec, depth in zip(specs, depths, strict=True):
        QUEUE_DEPTH.labels(spec.id).set(depth)
        LIVE_WORKERS.labels(spec.id).set(sum(spec.id in w.get("models", []) for w in workers))


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path) and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                HTTP_RESPONSES.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class RequestMeter:
    """One Messages request as the API relayed it; `close()` counts and logs it once."""

    def __init__(
        self, catalog: Catalog, principal: Principal, model: str, request_id: str, stream: bool
    ) -> None:
        spec = catalog.resolve(model)
        self.model = spec.id if spec is not None else UNKNOWN_MODEL
        self.requested_model = model[:256]
        self.principal = principal
        self.request_id = request_id
        self.stream = stream
        self.started = time.monotonic()
        self.was_queued = False
        self.input_tokens = 0
        self.first_token_s: float | None = None
        self._last_delta_at: float | None = None
        self._last_tokens = 0
        self._done: DoneEvent | None = None
        self._error_type: str | None = None
        self._closed = False

    def queued(self, input_tokens: int) -> None:
        """Admitted (limits passed, credits reserved) and enqueued for a worker."""
        self.was_queued = True
        self.input_tokens = input_tokens

    def delta(self, event: DeltaEvent) -> None:
        now = time.monotonic()
        if self._last_delta_at is None:
            self.first_token_s = now - self.started
            TTFT.labels(self.model).observe(self.first_token_s)
        else:
            # Workers coalesce tokens into one delta: spread its wait over the tokens it holds.
            tokens = max(1, event.output_tokens - self._last_tokens)
            gap = (now - self._last_delta_at) / tokens
            histogram = ITL.labels(self.model)
            for _ in range(tokens):
                histogram.observe(gap)
        self._last_delta_at = now
        self._last_tokens = event.output_tokens

    def done(self, event: DoneEvent) -> None:
        self._done = event

    def fail(self, error: ApiError | BaseException | str) -> None:
        """The request ends in an error (the first one recorded wins)."""
        if self._error_type is not None:
            return
        if isinstance(error, str):
            self._error_type = error
        elif isinstance(error, ApiError):
            self._error_type = error.error_type
        elif isinstance(error, Exception):
            self._error_type = "api_error"
        else:
            return  # cancelled, exiting: the client went away, close(cancelled=True) says so
        if self._error_type == "rate_limit_error":
            RATE_LIMITED.labels(self.model).inc()

    @property
    def status(self) -> str:
        if self._error_type is not None:
            return "failed" if self.was_queued else "rejected"
        if self._done is not None:
            return self._done.status
        return "cancelled"

    def close(self, *, cancelled: bool = False) -> None:
        """Count and log the request; `cancelled`: it ended before a terminal event."""
        if self._closed:
            return
        self._closed = True
        if not cancelled and self._done is None and self._error_type is None:
            self._error_type = "api_error"  # ended without an outcome: a bug, show it
        status, model = self.status, self.model
        latency = time.monotonic() - self.started
        REQUESTS.labels(model, status, self._error_type or "").inc()
        DURATION.labels(model, status).observe(latency)
        if status == "cancelled":
            CANCELLED.labels(model).inc()
        done = self._done
        if done is not None:
            INPUT_TOKENS.labels(model).inc(done.input_tokens)
            CACHE_READ_TOKENS.labels(model).inc(done.cache_read_input_tokens)
            CACHE_CREATION_TOKENS.labels(model).inc(done.cache_creation_input_tokens)
            OUTPUT_TOKENS.labels(model).inc(done.output_tokens)
            CREDITS.labels(model).inc(done.credits_charged)
        log_request(
            {
                "request_id": self.request_id,
                "account_id": self.principal.account_id,
                "key_prefix": self.principal.key_prefix,
                "model": self.requested_model,
                "stream": self.stream,
                "status": status,
                "error_type": self._error_type,
                "input_tokens": done.input_tokens if done else self.input_tokens,
                "output_tokens": done.output_tokens if done else self._last_tokens,
                # A client gone before the end: the worker's log line has the charge.
                "credits": done.credits_charged if done else (None if status == "cancelled" else 0),
                "stop_reason": done.stop_reason if done else None,
                "latency_s": round(latency, 4),
                "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            }
        )
