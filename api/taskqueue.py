"""Enqueueing a Celery task from the event loop: one Redis round trip, no thread.

`Celery.send_task` is blocking (kombu's synchronous Redis client), so the API used to run it in a
worker thread: a thread hop plus kombu's publish path cost ~4 ms per request under load
(docs/benchmarks.md). Celery's Redis transport stores a message as one JSON document pushed on
the queue's list, so the API builds that document with Celery's own message factory
(`app.amqp.as_task_v2`, protocol 2, the JSON serializer) and pushes it with the async client,
in a script that also applies the model's queue cap and each account's share of it atomically
(ARCHITECTURE.md, "Queueing": an account's jobs go to one of the model's interactive lanes, which
workers consume round-robin).

The document is the one kombu writes for a publish to the default exchange with the queue's name
as routing key: a worker consumes it, and Redis visibility-timeout restores re-route it, exactly
as a `send_task(..., queue=q, routing_key=q)` message (a unit test compares the two).
"""

import base64
import json
import time
import uuid
from math import ceil
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from contract.queueing import (
    PUSH_FAIR,
    interactive_lanes,
    lane_for,
    queued_accounts_key,
    queued_jobs_key,
)


class QueueFull(Exception):
    def __init__(self, backlog: int) -> None:
        super().__init__(f"{backlog} messages waiting")
        self.backlog = backlog


def task_message(app: Celery, task_name: str, args: list[Any], queue: str) -> str:
    """The JSON document kombu's Redis transport stores for this task on `queue`."""
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = app.amqp.as_task_v2(task_id, task_name, args=args, kwargs={})
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(
        {
            "body": encoded,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,  # persistent
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


class TaskQueue:
    """Pushes tasks onto a model's lanes, each account within its share of what may wait."""

    def __init__(self, app: Celery, client: aioredis.Redis) -> None:
        self._app = app
        self._client = client
        self._push = client.register_script(PUSH_FAIR)

    async def push_many(self, task_name: str, args: list[list[Any]], *, queue: str) -> None:
        """Enqueues one task per `args` on `queue` as it is (no share, no cap: the batch
        lane, whose dispatcher bounds what it holds), in one round trip."""
        messages = [task_message(self._app, task_name, a, queue) for a in args]
        if messages:
            await self._client.lpush(queue, *messages)

    async def push(
        self,
        task_name: str,
        args: list[Any],
        *,
        queue: str,
        lanes: int,
        account_id: str,
        request_id: str,
        max_waiting: int,
        stale_s: float,
        affinity: str | None = None,
    ) -> None:
        """Enqueues on the account's lane of `queue` (or the `affinity` lane of the worker
        holding its prompt prefix), or raises QueueFull (pushing nothing)."""
        lane = affinity or lane_for(queue, account_id, lanes)
        message = task_message(self._app, task_name, args, lane)
        now = time.time()
        keys = [
            lane,
            queued_accounts_key(queue),
            queued_jobs_key(queue, account_id),
            *interactive_lanes(queue, lanes),
            *([affinity] if affinity else []),
        ]
        argv: list[str | int | float] = [
            *(message, max_waiting, account_id, request_id, now, now - stale_s, ceil(stale_s))
        ]
        backlog = int(await self._push(keys=keys, args=argv))
        if backlog < 0:
            raise QueueFull(-1 - backlog)
