"""A request's events from Redis pub/sub, in sequence order."""

import asyncio
import contextlib
import time
from types import TracebackType

import redis.asyncio as aioredis

from workers.protocol import DeltaEvent, DoneEvent, ErrorEvent, events_channel, parse_event

Event = DeltaEvent | DoneEvent | ErrorEvent


class SequenceGap(Exception):
    """An event went missing between the worker and us."""


class EventSubscription:
    """Subscribe (and wait for Redis to confirm) before the job is enqueued, so nothing is lost."""

    def __init__(self, client: aioredis.Redis, request_id: str) -> None:
        self._pubsub = client.pubsub()
        self._channel = events_channel(request_id)
        self._next_seq = 0

    async def __aenter__(self) -> "EventSubscription":
        await self._pubsub.subscribe(self._channel)
        deadline = time.monotonic() + 5.0
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "subscribe":
                return self
            if time.monotonic() > deadline:
                raise TimeoutError("Redis did not confirm the subscription")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The connection may already be gone; then there is nothing else to release.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        await self._pubsub.unsubscribe(self._channel)
        await self._pubsub.aclose()

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is None or message["type"] != "message":
                continue
            event = parse_event(message["data"])
            if event.seq != self._next_seq:
                raise SequenceGap(f"expected event {self._next_seq}, got {event.seq}")
            self._next_seq += 1
            return event
