"""What one measured request looked like, and the percentiles of many."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request's timings, in seconds from when it was sent (perf_counter based)."""

    ok: bool = False
    error: str | None = None
    # Output tokens as the server counted them (usage.output_tokens / the engine's count).
    tokens: int = 0
    # Time to the response's status line (for a stream: once a worker claimed the request), to
    # its message_start event, to the first non-empty text, and to the end of the response.
    status: float | None = None
    message_start: float | None = None
    ttft: float | None = None
    e2e: float | None = None
    # Gaps between successive text events (one per SSE delta; a delta may hold several tokens).
    gaps: list[float] = field(default_factory=list)
    text: str = ""
    request_id: str | None = None
    # Wall-clock time (time.time()) at which the client closed an unfinished stream.
    disconnected_at: float | None = None


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (pct in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value * 1000, digits)


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Latency percentiles (ms) and throughput of one phase that took `wall_s` seconds."""
    done = [r for r in records if r.ok]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    e2es = [r.e2e for r in done if r.e2e is not None]
    gaps = [g for r in done for g in r.gaps]
    # Time per output token after the first, per request (vLLM's TPOT).
    tpots = [
        (r.e2e - r.ttft) / (r.tokens - 1)
        for r in done
        if r.e2e is not None and r.ttft is not None and r.tokens > 1
    ]
    tokens = sum(r.tokens for r in done)
    statuses = [r.status for r in done if r.status is not None]
    # What the API does between the worker's `claimed` event and relaying anything else: the
    # status line, then message_start. The first token can wait for that, never for more.
    starts = [
        r.message_start - r.status
        for r in done
        if r.message_start is not None and r.status is not None
    ]
    after_status = [r.ttft - r.status for r in done if r.ttft is not None and r.status is not None]
    return {
        "requests": len(records),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "requests_per_s": round(len(done) / wall_s, 2) if wall_s > 0 else None,
        "status_ms_p50": _ms(percentile(statuses, 50)),
        "status_to_message_start_ms_p50": _ms(percentile(starts, 50), 3),
        "status_to_first_token_ms_p50": _ms(percentile(after_status, 50)),
        "ttft_ms_p50": _ms(percentile(ttfts, 50)),
        "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "itl_ms_p50": _ms(percentile(gaps, 50), 2),
        "itl_ms_p99": _ms(percentile(gaps, 99), 2),
        "tpot_ms_p50": _ms(percentile(tpots, 50), 2),
        "tpot_ms_p99": _ms(percentile(tpots, 99), 2),
        "e2e_ms_p50": _ms(percentile(e2es, 50)),
        "e2e_ms_p99": _ms(percentile(e2es, 99)),
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of a figure measured once per repeat."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return {"median": None, "min": None, "max": None}
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return {"median": round(median, 2), "min": present[0], "max": present[-1]}
