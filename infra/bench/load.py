"""The load generator: concurrent streaming clients against `/v1/messages` over HTTP."""

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from infra.bench.stats import RequestRecord

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A running platform: where to send requests, and what else the bench may look at."""

    base_url: str
    api_key: str
    admin_token: str | None = None
    redis_url: str | None = None


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` on uvloop when installed (uvicorn's standard extra): the load generator
    shares the host's cores with the platform, so its own overhead should stay small."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(work)
    return uvloop.run(work)


def message_body(model: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A streaming Messages request; greedy unless `extra` says otherwise."""
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


def client_for(target: Target, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=target.base_url,
        headers={"x-api-key": target.api_key},
        timeout=httpx.Timeout(300.0, connect=10.0),
        limits=limits,
        trust_env=False,
    )


async def stream_once(
    client: httpx.AsyncClient, body: dict[str, Any], disconnect_after: int | None = None
) -> RequestRecord:
    """Sends one streaming request and times its events.

    With `disconnect_after`, the connection is closed after that many text deltas (the client
    goes away); `disconnected_at` then holds the wall-clock time of the close.
    """
    record = RequestRecord()
    start = time.perf_counter()
    last = start
    deltas = 0
    try:
        async with client.stream("POST", "/v1/messages", json=body) as response:
            record.status = time.perf_counter() - start
            record.request_id = response.headers.get("request-id")
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return record
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    continue
                if not line.startswith("data: "):
                    continue
                if event == "content_block_delta":
                    now = time.perf_counter()
                    delta = json.loads(line[6:])["delta"]
                    # Text, or a tool call's arguments (input_json_delta).
                    text = delta.get("text") or delta.get("partial_json") or ""
                    if not text:
                        continue
                    if record.ttft is None:
                        record.ttft = now - start
                    else:
                        record.gaps.append(now - last)
                    last = now
                    record.text += text
                    deltas += 1
                    if disconnect_after is not None and deltas >= disconnect_after:
                        break
                elif event == "message_start":
                    record.message_start = time.perf_counter() - start
                elif event == "message_delta":
                    record.tokens = int(json.loads(line[6:])["usage"]["output_tokens"])
                elif event == "message_stop":
                    record.e2e = time.perf_counter() - start
                    record.ok = True
                elif event == "error":
                    record.error = str(json.loads(line[6:])["error"])
        # Leaving the block above closes the connection of an unfinished response.
        if disconnect_after is not None and not record.ok:
            record.disconnected_at = time.time()
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if not record.ok and record.error is None and record.disconnected_at is None:
        record.error = "the stream ended without message_stop"
    return record


async def run_clients(
    target: Target,
    body: dict[str, Any],
    concurrency: int,
    requests_per_client: int,
    on_done: Callable[[], None] | None = None,
    warmup: bool = True,
) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending `requests_per_client` requests back to back.

    The connections are opened by one short warm-up request per client first, so the measured
    phase does not pay for TCP setup. Returns the records and the phase's wall time.
    """
    records: list[RequestRecord] = []
    async with client_for(target, concurrency) as client:
        if warmup:
            short = {**body, "max_tokens": 4}
            await asyncio.gather(*(stream_once(client, short) for _ in range(concurrency)))

        async def one_client() -> None:
            for _ in range(requests_per_client):
                records.append(await stream_once(client, body))
                if on_done is not None:
                    on_done()

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return records, wall
