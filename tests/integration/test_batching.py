"""Continuous batching through the whole platform: one worker, many requests, real HTTP.

Engine stats come from the worker's heartbeat in Redis (`abl:worker:<name>`), which the session
stack refreshes every couple of seconds.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from contract.settings import CoreSettings
from db.models import LedgerEntry, Request
from db.pricing import cost_usd, credits_for
from db.session import get_sessionmaker
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory, ApiAccount
from tests.support import STACK_MODEL_SPEC, sse_events

MODEL = STACK_MODEL_SPEC.id
# The stack's children inherit this environment: they price credits the same way.
CREDIT_PRICE = Decimal(CoreSettings().credit_price_usd)
PROMPTS = [
    "Tell me about sorting lists in Python.",
    "What is a file system?",
    "Explain time zones, briefly.",
    "How do HTTP servers work?",
    "Write a haiku about unicode.",
    "Why is the sky blue?",
]


def body(prompt: str, max_tokens: int = 48, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


def stream(http: httpx.Client, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A streamed request's whole text, and its `message_delta` event."""
    text: list[str] = []
    final: dict[str, Any] = {}
    with http.stream("POST", "/v1/messages", json=payload) as response:
        assert response.status_code == 200, response.read()
        for name, data in sse_events(response.iter_lines()):
            assert name != "error", data
            if name == "content_block_delta":
                text.append(data["delta"]["text"])
            elif name == "message_delta":
                final = data
    assert final, "the stream ended without message_delta"
    return "".join(text), final


def engine_stats(stack: Stack, after: float = 0.0, timeout: float = 20.0) -> dict[str, Any]:
    """The engine stats of the only worker, from a heartbeat written after `after` (epoch s)."""
    assert stack.redis_url is not None
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            beats = [json.loads(raw) for raw in client.mget(client.keys("abl:worker:*")) if raw]
            fresh = [b for b in beats if b["at"] > after]
            if fresh:
                assert len(beats) == 1, "these tests expect the session stack's single worker"
                stats: dict[str, Any] = fresh[0]["engines"][MODEL]
                stats["recent_cancels"] = fresh[0].get("recent_cancels", [])
                return stats
            assert time.monotonic() < deadline, "no fresh heartbeat from the worker"
            time.sleep(0.1)
    finally:
        client.close()


@pytest.fixture
def idle_stats(stack: Stack) -> dict[str, Any]:
    """Engine stats once the worker has reported an idle engine (earlier tests are done)."""
    deadline = time.monotonic() + 30
    while True:
        stats = engine_stats(stack, after=time.time())
        if stats["active"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the engine stays busy: {stats}"


def test_concurrent_requests_share_the_batch_and_keep_their_own_text(
    http: httpx.Client, stack: Stack, idle_stats: dict[str, Any]
) -> None:
    alone = [stream(http, body(p))[0] for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "the prompts should lead to different texts"
    before = engine_stats(stack, after=time.time())

    def send(prompt: str) -> str:
        with httpx.Client(
            base_url=stack.base_url, headers=http.headers, timeout=120, trust_env=False
        ) as own:
            return stream(own, body(prompt))[0]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(send, PROMPTS))
    after = engine_stats(stack, after=time.time())

    assert together == alone  # greedy: each gets its own text, the same as when alone
    steps = after["steps"] - before["steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    # Alone, every decode step serves one sequence; batched, steps serve several at once.
    assert tokens > steps + len(PROMPTS)
    assert after["max_batch_seen"] > 1


def test_greedy_output_is_the_same_alone_and_in_a_crowd(http: httpx.Client, stack: Stack) -> None:
    payload = body(PROMPTS[0], max_tokens=40)
    alone = stream(http, payload)[0]
    with ThreadPoolExecutor(8) as pool:
        crowd = list(pool.map(lambda _: stream(http, payload)[0], range(8)))
    assert crowd == [alone] * 8


def boundary_stop(http: httpx.Client, prompt: str) -> tuple[str, str]:
    """A greedy text, and a stop sequence in it spanning the boundary of two generated tokens.

    The text of the first k tokens (max_tokens=k) is a prefix of the longer greedy text, and
    its length is exactly where token k ends.
    """
    full = stream(http, body(prompt, max_tokens=40))[0]
    for k in range(6, 30):
        prefix, final = stream(http, body(prompt, max_tokens=k))
        cut = len(prefix)
        if final["delta"]["stop_reason"] != "max_tokens" or not full.startswith(prefix):
            continue
        stop = full[cut - 2 : cut + 2]
        if len(stop) == 4 and cut >= 2 and full.find(stop) == cut - 2 and stop.strip():
            return full, stop
    raise AssertionError(f"no usable token boundary in {full!r}")


def test_stop_sequence_split_across_tokens_is_matched_and_not_leaked(http: httpx.Client) -> None:
    full, stop = boundary_stop(http, PROMPTS[1])
    text, final = stream(http, body(PROMPTS[1], max_tokens=40, stop_sequences=[stop]))
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert final["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}


def wait_settled(stack: Stack, request_id: str, timeout: float = 30.0) -> Request:
    assert stack.database_url is not None
    deadline = time.monotonic() + timeout
    while True:
        with get_sessionmaker(stack.database_url)() as session:
            row = session.get(Request, request_id)
            if row is not None and row.status not in ("queued", "running"):
                return row
        assert time.monotonic() < deadline, f"{request_id} is still open"
        time.sleep(0.1)


def test_a_client_that_goes_away_frees_its_slot_and_pays_for_what_was_made(
    stack: Stack, make_account: AccountFactory, idle_stats: dict[str, Any]
) -> None:
    account: ApiAccount = make_account(credits=1_000)
    headers = {"x-api-key": account.key}
    deltas = 0
    with (
        httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client,
        client.stream("POST", "/v1/messages", json=body(PROMPTS[2], max_tokens=1000)) as response,
    ):
        request_id = response.headers["request-id"]
        for name, _ in sse_events(response.iter_lines()):
            deltas += name == "content_block_delta"
            if deltas == 3:
                break  # leaving the block closes the connection mid-stream
    row = wait_settled(stack, request_id)
    assert row.status == "cancelled"
    assert 3 <= row.output_tokens < 1000
    cost = cost_usd(
        row.input_tokens,
        row.output_tokens,
        STACK_MODEL_SPEC.input_price_per_mtok,
        STACK_MODEL_SPEC.output_price_per_mtok,
    )
    assert row.cost_usd == cost
    assert row.credits_charged == credits_for(cost, CREDIT_PRICE)
    assert row.credits_charged < row.credits_reserved
    assert stack.database_url is not None
    with get_sessionmaker(stack.database_url)() as session:
        kinds = session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount)
            .where(LedgerEntry.request_id == request_id)
            .order_by(LedgerEntry.id)
        ).all()
    reserved = row.credits_reserved
    assert kinds == [
        ("reserve", reserved),
        ("release", -reserved),
        ("charge", -row.credits_charged),
    ]

    deadline = time.monotonic() + 30
    while True:
        stats = engine_stats(stack, after=time.time())
        if stats["active"] == 0 and stats["waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"the sequence is still in the batch: {stats}"
    assert stats["cancelled"] > idle_stats["cancelled"]
    cancels = {c["request_id"]: c for c in stats["recent_cancels"]}
    assert request_id in cancels
    assert cancels[request_id]["left_batch_at"] >= cancels[request_id]["cancel_seen_at"]


def test_sampling_parameters_shape_the_output(http: httpx.Client) -> None:
    prompt = PROMPTS[3]
    greedy = {stream(http, body(prompt, max_tokens=16))[0] for _ in range(3)}
    assert len(greedy) == 1  # temperature 0: the same text every time
    hot = {stream(http, body(prompt, max_tokens=16, temperature=1.5))[0] for _ in range(5)}
    assert len(hot) >= 3  # temperature 1.5 spreads over many texts
    top1 = stream(http, body(prompt, max_tokens=16, temperature=1.5, top_k=1))[0]
    assert {top1} == greedy  # only the best token survives top_k=1, whatever the temperature
