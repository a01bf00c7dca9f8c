"""Fair sharing of a model's queue between accounts (api/taskqueue.py), on real Redis: lanes per
account, a work-conserving share of the cap, and the worker counting a job out when it takes it.
No worker consumes these lanes: the model is made up for the test."""

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from api.taskqueue import QueueFull, TaskQueue
from contract.queueing import (
    TAKE,
    interactive_lanes,
    lane_for,
    queued_accounts_key,
    queued_jobs_key,
)
from infra.launcher.stack import Stack

pytestmark = pytest.mark.integration

QUEUE = "abl.test.shares"
LANES = 4
CAP = 6


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    assert stack.redis_url is not None
    sync = redis.Redis.from_url(stack.redis_url)
    keys = [*interactive_lanes(QUEUE, LANES), queued_accounts_key(QUEUE)]
    sync.delete(*keys, *sync.keys(queued_jobs_key(QUEUE, "*")))
    yield sync
    sync.delete(*keys, *sync.keys(queued_jobs_key(QUEUE, "*")))


def push_all(stack: Stack, jobs: list[tuple[str, str]], stale_s: float = 60) -> list[bool]:
    """Enqueues (account, request id) pairs in order; whether each was accepted."""

    async def run() -> list[bool]:
        async with aioredis.Redis.from_url(stack.redis_url or "") as async_client:
            queue = TaskQueue(Celery("test"), async_client)
            accepted = []
            for account, request_id in jobs:
                try:
                    await queue.push(
                        "abl.generate",
                        [{}],
                        queue=QUEUE,
                        lanes=LANES,
                        account_id=account,
                        request_id=request_id,
                        max_waiting=CAP,
                        stale_s=stale_s,
                    )
                    accepted.append(True)
                except QueueFull:
                    accepted.append(False)
            return accepted

    return asyncio.run(run())


def waiting(client: redis.Redis) -> int:
    return sum(int(client.llen(lane)) for lane in interactive_lanes(QUEUE, LANES))


def two_accounts_in_different_lanes() -> tuple[str, str]:
    accounts = [f"acct_{i}" for i in range(50)]
    first = accounts[0]
    other = next(a for a in accounts if lane_for(QUEUE, a, LANES) != lane_for(QUEUE, first, LANES))
    return first, other


def test_an_account_alone_may_fill_the_queue_then_is_refused(
    stack: Stack, client: redis.Redis
) -> None:
    a, _ = two_accounts_in_different_lanes()
    accepted = push_all(stack, [(a, f"req_a{i}") for i in range(CAP + 2)])
    assert accepted == [True] * CAP + [False, False]
    assert client.llen(lane_for(QUEUE, a, LANES)) == CAP == waiting(client)


def test_another_account_still_gets_its_share_of_a_full_queue(
    stack: Stack, client: redis.Redis
) -> None:
    a, b = two_accounts_in_different_lanes()
    assert push_all(stack, [(a, f"req_a{i}") for i in range(CAP)]) == [True] * CAP
    # Two accounts wait now: each may hold half the cap, the total at most twice the cap.
    accepted = push_all(stack, [(b, f"req_b{i}") for i in range(CAP)] + [(a, "req_a_late")])
    assert accepted == [True] * (CAP // 2) + [False] * (CAP // 2) + [False]
    assert client.llen(lane_for(QUEUE, b, LANES)) == CAP // 2
    assert waiting(client) == CAP + CAP // 2


def test_a_taken_job_leaves_its_accounts_share(stack: Stack, client: redis.Redis) -> None:
    """The worker's half (workers/runtime.py `_taken`): the last job of an account leaves the
    set of waiting accounts, so the next account's share is the whole cap again."""
    a, _ = two_accounts_in_different_lanes()
    assert push_all(stack, [(a, "req_a0")]) == [True]
    assert client.zscore(queued_accounts_key(QUEUE), a) is not None
    take = client.register_script(TAKE)
    take(keys=[queued_accounts_key(QUEUE), queued_jobs_key(QUEUE, a)], args=["req_a0", a])
    assert client.zscore(queued_accounts_key(QUEUE), a) is None
    assert client.zcard(queued_jobs_key(QUEUE, a)) == 0


def test_entries_older_than_the_stale_age_do_not_count(stack: Stack, client: redis.Redis) -> None:
    a, _ = two_accounts_in_different_lanes()
    assert push_all(stack, [(a, f"req_a{i}") for i in range(CAP)], stale_s=0.5) == [True] * CAP
    client.delete(*interactive_lanes(QUEUE, LANES))  # taken by a worker that died before counting
    time.sleep(0.6)
    assert push_all(stack, [(a, "req_again")], stale_s=0.5) == [True]
    assert client.zcard(queued_jobs_key(QUEUE, a)) == 1
