"""Per-key rate limits on the real stack (and a second API replica), plus the script's math."""

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import redis.asyncio as aioredis

from api.errors import RateLimitError
from api.ratelimit import Budget, Cost, Limits, RateLimiter
from api.settings import ApiSettings
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.integration.api_process import api_process
from tests.support import STACK_MODEL

MODEL = STACK_MODEL
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "Hi"}],
}
FAMILIES = ("requests", "tokens", "input-tokens", "output-tokens")
T0 = 1_800_000_000_000  # a fake clock, in ms (2027)


def send(base_url: str, key: str, **fields: Any) -> httpx.Response:
    """POST a streaming /v1/messages and hang up after the headers: admission, no generation."""
    body = {**BODY, "stream": True, **fields}
    headers = {"x-api-key": key}
    url = f"{base_url}/v1/messages"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        if response.status_code != 200:
            response.read()
        return response


def assert_rate_headers(response: httpx.Response) -> None:
    for family in FAMILIES:
        prefix = f"anthropic-ratelimit-{family}"
        assert int(response.headers[f"{prefix}-limit"]) > 0, family
        assert int(response.headers[f"{prefix}-remaining"]) >= 0, family
        reset = response.headers[f"{prefix}-reset"]
        assert len(reset) == 20 and reset.endswith("Z") and reset[10] == "T", reset


def assert_429(response: httpx.Response, fragment: str) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert fragment in error["message"]
    assert_rate_headers(response)
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


@pytest.fixture(scope="module")
def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the same Postgres and Redis."""
    log = tmp_path_factory.mktemp("replica") / "api-2.log"
    with api_process(stack, log) as base_url:
        yield base_url


# ------------------------------------------------------------------ the script, fake clock


def _run(stack: Stack, work: Any) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(stack.redis_url or "")
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def _budget(limits: Limits) -> list[Budget]:
    """A key's budget under a fresh account (keys of its own in Redis)."""
    return [Budget(f"acct_test{secrets.token_hex(8)}", "key_test", limits)]


def test_gcra_refills_one_unit_per_interval(stack: Stack) -> None:
    now = [T0]
    budget = _budget(Limits(60, 10**6, 10**6, 1000))

    async def work(client: aioredis.Redis) -> None:
        limiter = RateLimiter(client, ApiSettings(), clock_ms=lambda: now[0])
        for i in range(60):
            _, decision = await limiter.acquire(budget, Cost(1, 1, 1), f"r{i}")
        assert decision.states[0].requests.remaining == 0
        with pytest.raises(RateLimitError) as info:
            await limiter.acquire(budget, Cost(1, 1, 1), "late")
        assert info.value.retry_after == 1
        now[0] += 999
        with pytest.raises(RateLimitError):
            await limiter.acquire(budget, Cost(1, 1, 1), "still-late")
        now[0] += 1
        _, decision = await limiter.acquire(budget, Cost(1, 1, 1), "on-time")
        assert decision.states[0].requests.remaining == 0

    _run(stack, work)


def test_all_or_nothing_refunds_and_debt(stack: Stack) -> None:
    now = [T0]
    budget = _budget(Limits(100, 600, 10**6, 1000))

    async def work(client: aioredis.Redis) -> None:
        limiter = RateLimiter(client, ApiSettings(), clock_ms=lambda: now[0])
        ticket, _ = await limiter.acquire(budget, Cost(1, 500, 10), "a")
        with pytest.raises(RateLimitError) as info:
            await limiter.acquire(budget, Cost(1, 200, 10), "b")
        assert "input tokens" in info.value.message
        # Refused on input only, so nothing else was taken.
        (state,) = (await limiter.peek(budget)).states
        assert (state.requests.remaining, state.output_tokens.remaining) == (99, 10**6 - 10)
        after = await limiter.release(ticket, Cost(1, 500, 10))
        (after_state,) = after.states
        assert after_state.input_tokens.remaining == 600 and after_state.requests.remaining == 100
        # Bigger than a whole bucket: admitted from a full bucket, leaving it 600 in debt,
        # so the next token is 601 * 100 ms away.
        await limiter.acquire(budget, Cost(1, 1200, 0), "huge")
        with pytest.raises(RateLimitError) as info:
            await limiter.acquire(budget, Cost(1, 1, 0), "after-huge")
        assert info.value.retry_after == 61

    _run(stack, work)


def test_in_flight_slots_expire_with_their_lease(stack: Stack) -> None:
    now = [T0]
    budget = _budget(Limits(1000, 10**6, 10**6, 1))
    settings = ApiSettings(request_timeout_s=10)

    async def work(client: aioredis.Redis) -> None:
        limiter = RateLimiter(client, settings, clock_ms=lambda: now[0])
        await limiter.acquire(budget, Cost(1, 1, 1), "held")
        with pytest.raises(RateLimitError) as info:
            await limiter.acquire(budget, Cost(1, 1, 1), "second")
        assert "concurrent requests" in info.value.message
        now[0] += (10 + 60) * 1000 + 1  # request timeout + margin: the holder died
        await limiter.acquire(budget, Cost(1, 1, 1), "third")

    _run(stack, work)


# --------------------------------------------------------------------- over HTTP, one API


def test_headers_on_every_messages_response(stack: Stack, make_account: AccountFactory) -> None:
    key = make_account(rate_limits={"requests_per_minute": 50}).key
    ok = send(stack.base_url, key)
    assert ok.status_code == 200
    assert_rate_headers(ok)
    assert ok.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == "49"
    not_found = send(stack.base_url, key, model="no-such-model")
    assert not_found.status_code == 404
    assert_rate_headers(not_found)
    too_long = send(stack.base_url, key, messages=[{"role": "user", "content": "hi " * 70_000}])
    assert too_long.status_code == 400
    assert_rate_headers(too_long)
    # Refusals before the limit is charged do not spend it.
    assert too_long.headers["anthropic-ratelimit-requests-remaining"] == "49"
    malformed = send(stack.base_url, key, max_tokens="many")
    assert malformed.status_code == 400
    assert "max_tokens" in malformed.json()["error"]["message"]
    assert_rate_headers(malformed)
    assert malformed.headers["anthropic-ratelimit-requests-remaining"] == "49"
    plain = httpx.post(
        f"{stack.base_url}/v1/messages",
        json={**BODY, "max_tokens": 1},
        headers={"x-api-key": key},
        timeout=120,
    )
    assert_rate_headers(plain)


def test_requests_per_minute(stack: Stack, make_account: AccountFactory) -> None:
    key = make_account(rate_limits={"requests_per_minute": 3}).key
    statuses = [send(stack.base_url, key).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = send(stack.base_url, key)
    assert assert_429(refused, "requests") <= 20  # one request's worth: 60 s / 3
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    sdk = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk.messages.create(model=MODEL, max_tokens=4, messages=BODY["messages"])
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"].isdigit()


def test_output_tokens_are_counted_as_max_tokens(
    stack: Stack, make_account: AccountFactory
) -> None:
    key = make_account(rate_limits={"output_tokens_per_minute": 100}).key
    first = send(stack.base_url, key, max_tokens=80)
    assert first.status_code == 200
    assert first.headers["anthropic-ratelimit-output-tokens-remaining"] == "20"
    assert_429(send(stack.base_url, key, max_tokens=80), "output tokens")


def test_sdk_retry_succeeds_after_waiting(stack: Stack, make_account: AccountFactory) -> None:
    """Input tokens per minute set so that a second request must wait about one second."""
    prompt = [{"role": "user", "content": "rate limits " * 100}]
    account = make_account()
    counted = httpx.post(
        f"{stack.base_url}/v1/messages/count_tokens",
        json={"model": MODEL, "messages": prompt},
        headers={"x-api-key": account.key},
    )
    tokens = counted.json()["input_tokens"]
    # Two requests need 2 * tokens; the bucket holds 120/61 of one, i.e. ~1 s short of two.
    limit = 120 * tokens // 61
    key = make_account(rate_limits={"input_tokens_per_minute": limit}).key
    assert send(stack.base_url, key, messages=prompt).status_code == 200
    sdk = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=2)
    started = time.monotonic()
    stream = sdk.messages.create(model=MODEL, max_tokens=4, messages=prompt, stream=True)
    waited = time.monotonic() - started
    stream.close()
    assert stream.response.status_code == 200
    assert stream.response.request.headers["x-stainless-retry-count"] == "1"
    assert 0.9 <= waited < 8, waited


def test_sdk_retry_on_requests_per_minute(stack: Stack, make_account: AccountFactory) -> None:
    """60 requests/min refill one per second: drain the bucket, then the SDK waits ~1 s."""
    key = make_account(rate_limits={"requests_per_minute": 60}).key
    sdk = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=2)
    retried = []
    for _ in range(3):  # a refill can land between the drain and the SDK's first attempt
        while send(stack.base_url, key).status_code != 429:
            pass
        stream = sdk.messages.create(
            model=MODEL, max_tokens=4, messages=BODY["messages"], stream=True
        )
        stream.close()
        assert stream.response.status_code == 200
        retried.append(stream.response.request.headers["x-stainless-retry-count"])
        if retried[-1] != "0":
            break
    assert retried[-1] == "1", retried


def test_output_tokens_are_corrected_when_a_request_ends(
    stack: Stack, make_account: AccountFactory
) -> None:
    key = make_account(rate_limits={"output_tokens_per_minute": 1200}).key
    stops = list("etaoinsrhl .,\n")
    done = httpx.post(
        f"{stack.base_url}/v1/messages",
        json={**BODY, "max_tokens": 1000, "stop_sequences": stops},
        headers={"x-api-key": key},
        timeout=120,
    )
    assert done.status_code == 200, done.text
    produced = done.json()["usage"]["output_tokens"]
    assert produced < 900, "the model ignored every stop sequence; the test needs it to stop"
    assert int(done.headers["anthropic-ratelimit-output-tokens-remaining"]) <= 200
    deadline = time.monotonic() + 5
    while True:  # finish() runs just after the response; watch it land via uncharged 404s
        peek = send(stack.base_url, key, model="no-such-model")
        remaining = int(peek.headers["anthropic-ratelimit-output-tokens-remaining"])
        if remaining >= 1200 - produced - 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert remaining >= 1200 - produced - 5


def test_concurrency_slot_is_freed_when_the_client_hangs_up(
    stack: Stack, make_account: AccountFactory
) -> None:
    key = make_account(rate_limits={"concurrent_requests": 1}).key
    with httpx.Client(base_url=stack.base_url, headers={"x-api-key": key}, timeout=30) as client:
        body = {**BODY, "max_tokens": 1000, "stream": True}
        with client.stream("POST", "/v1/messages", json=body) as held:
            assert held.status_code == 200
            assert_429(send(stack.base_url, key), "concurrent requests")
    deadline = time.monotonic() + 10
    while (status := send(stack.base_url, key).status_code) == 429:
        assert time.monotonic() < deadline, "the slot was never released"
        time.sleep(0.2)
    assert status == 200


def test_billing_refusal_gives_the_budget_back(stack: Stack, make_account: AccountFactory) -> None:
    key = make_account(credits=0, rate_limits={"requests_per_minute": 2}).key
    for _ in range(4):
        refused = send(stack.base_url, key)
        assert refused.status_code == 402, refused.text
        assert refused.headers["anthropic-ratelimit-requests-remaining"] == "2"


def test_account_defaults_with_key_overrides(
    stack: Stack, admin: httpx.Client, make_account: AccountFactory
) -> None:
    created = admin.post(
        "/admin/accounts",
        json={"name": "limits", "credits": 1000, "rate_limits": {"requests_per_minute": 2}},
    )
    account_id = created.json()["id"]
    keys = [
        admin.post(f"/admin/accounts/{account_id}/keys", json=fields).json()["key"]
        for fields in ({}, {"rate_limits": {"requests_per_minute": 5}})
    ]
    limits = [send(stack.base_url, k).headers["anthropic-ratelimit-requests-limit"] for k in keys]
    assert limits == ["2", "5"]
    token = admin.post(f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": 60})
    jwt_key = token.json()["token"]
    answers = [send(stack.base_url, jwt_key).status_code for _ in range(3)]
    assert answers == [200, 200, 429]


def test_redis_down_fails_closed(
    stack: Stack, make_account: AccountFactory, tmp_path: Path
) -> None:
    from infra.launcher.services import free_port

    dead = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"
    key = make_account().key
    with api_process(stack, tmp_path / "api.log", {"ABL_REDIS_URL": dead}) as base_url:
        refused = send(base_url, key)
    assert refused.status_code == 529
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert "rate limiter" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"].isdigit()


# --------------------------------------------------------------------- two API replicas


def test_replicas_share_one_budget(
    stack: Stack, replica: str, make_account: AccountFactory
) -> None:
    key = make_account(rate_limits={"requests_per_minute": 4}).key
    assert [send(stack.base_url, key).status_code for _ in range(4)] == [200] * 4
    assert_429(send(replica, key), "requests")
    other = make_account(rate_limits={"concurrent_requests": 2}).key
    with ExitStack() as held:
        for base_url in (stack.base_url, replica):
            client = held.enter_context(httpx.Client(base_url=base_url, timeout=30))
            body = {**BODY, "max_tokens": 1000, "stream": True}
            response = held.enter_context(
                client.stream("POST", "/v1/messages", json=body, headers={"x-api-key": other})
            )
            assert response.status_code == 200
        assert_429(send(replica, other), "concurrent requests")
        assert_429(send(stack.base_url, other), "concurrent requests")


def test_concurrent_burst_across_replicas_never_exceeds_the_limit(
    stack: Stack, replica: str, make_account: AccountFactory
) -> None:
    limit = 10
    key = make_account(rate_limits={"requests_per_minute": limit}).key
    statuses: dict[str, list[int]] = {stack.base_url: [], replica: []}
    lock = threading.Lock()

    def fire(base_url: str) -> None:
        for _ in range(10):
            status = send(base_url, key).status_code
            with lock:
                statuses[base_url].append(status)

    threads = [threading.Thread(target=fire, args=(url,)) for url in statuses for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    every = [s for answers in statuses.values() for s in answers]
    assert set(every) <= {200, 429}, every
    admitted = every.count(200)
    # The bucket starts full (10) and refills one request every 6 s while the burst runs.
    assert limit <= admitted <= limit + int(elapsed / 6), (admitted, elapsed)
    assert all(429 in answers for answers in statuses.values())
