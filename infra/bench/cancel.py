"""Cancellation under load: streams whose clients go away after a few tokens.

In each round, half of `streams` concurrent streams disconnect after 1 to 4 text deltas while
the other half read to the end, keeping the batch busy as real traffic would. Afterwards, per
disconnected request: its settled row from the admin API (status, output tokens charged), and
from the worker's heartbeat (`recent_cancels`) when the cancel reached the worker and when the
sequence left the batch. All three processes run on one host, so wall-clock times compare.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from infra.bench.load import Target, client_for, message_body, run_async, stream_once
from infra.bench.observe import engine_stats, heartbeats, request_rows
from infra.bench.stats import RequestRecord, percentile

# Long enough that a stream nobody stops would run on for seconds: an orphan cannot hide.
CANCEL_MAX_TOKENS = 256


async def _round(
    target: Target, body: dict[str, Any], streams: int, on_done: Callable[[], None] | None
) -> list[RequestRecord]:
    async with client_for(target, streams) as client:

        async def one(i: int) -> RequestRecord:
            record = await stream_once(client, body, 1 + i // 2 % 4 if i % 2 == 0 else None)
            if on_done is not None:
                on_done()
            return record

        return list(await asyncio.gather(*(one(i) for i in range(streams))))


def _cancel_times(redis_url: str, ids: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """The workers' `recent_cancels` entries for `ids`, waiting for the heartbeats to show them."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for beat in heartbeats(redis_url):
            for entry in beat.get("recent_cancels", []):
                if entry.get("request_id") in ids:
                    found[entry["request_id"]] = entry
        if set(found) >= ids or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _idle_engines(redis_url: str, timeout_s: float) -> dict[str, Any]:
    """Waits until no engine has a sequence active or waiting; what the heartbeat said then."""
    started = time.monotonic()
    while True:
        stats = engine_stats(heartbeats(redis_url))
        busy = sum(s.get("active", 0) + s.get("waiting", 0) for s in stats)
        if busy == 0 or time.monotonic() - started > timeout_s:
            return {
                "active": sum(s.get("active", 0) for s in stats),
                "waiting": sum(s.get("waiting", 0) for s in stats),
                "cancelled": sum(s.get("cancelled", 0) for s in stats),
            }
        time.sleep(0.1)


def _ms_summary(values: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "samples": len(values),
        "p50": ms(percentile(values, 50)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values) if values else None),
    }


def measure_cancel(
    target: Target,
    model: str,
    prompt: str,
    streams: int,
    rounds: int,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Runs the rounds and reports latencies, final statuses and orphans (goal: none)."""
    body = message_body(model, prompt, CANCEL_MAX_TOKENS)
    records: list[RequestRecord] = []
    for _ in range(rounds):
        records += run_async(_round(target, body, streams, on_done))
    gone = [r for r in records if r.disconnected_at is not None and r.request_id]
    stayed = [r for r in records if r.disconnected_at is None]
    ids = [r.request_id for r in gone if r.request_id]
    rows = request_rows(target.base_url, target.admin_token, ids) if target.admin_token else {}
    result: dict[str, Any] = {
        "streams_per_round": streams,
        "rounds": rounds,
        "max_tokens": CANCEL_MAX_TOKENS,
        "disconnected": len(gone),
        "completed_normally": sum(r.ok for r in stayed),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }
    if rows:
        statuses = Counter(row["status"] for row in rows.values())
        result["statuses_of_disconnected"] = dict(statuses)
        # A generation that ran to its end although its client had gone: the goal is none.
        result["orphaned"] = statuses.get("succeeded", 0)
        charged = [row["output_tokens"] for row in rows.values() if row["status"] == "cancelled"]
        result["output_tokens_charged_p50"] = percentile(charged, 50)
        result["output_tokens_charged_max"] = max(charged) if charged else None
    if target.redis_url:
        times = _cancel_times(target.redis_url, set(ids), timeout_s=10.0)
        by_id = {r.request_id: r.disconnected_at for r in gone}
        seen = [
            e["cancel_seen_at"] - by_id[i]
            for i, e in times.items()
            if e.get("cancel_seen_at") is not None and by_id.get(i) is not None
        ]
        left = [e["left_batch_at"] - by_id[i] for i, e in times.items() if by_id.get(i) is not None]
        result["disconnect_to_worker_ms"] = _ms_summary(seen)
        result["disconnect_to_left_batch_ms"] = _ms_summary(left)
        result["engines_after"] = _idle_engines(target.redis_url, timeout_s=10.0)
    return result
