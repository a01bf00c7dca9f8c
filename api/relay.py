"""A request's events from Redis pub/sub, in sequence order."""

import asyncio
import contextlib
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from contract.events import WorkerEvent, parse_event
from contract.keys import events_channel


class SequenceGap(Exception):
    """An event went missing between the worker and us."""


class EventHub:
    """One Redis pub/sub connection per API process, subscribed to every open request's channel.

    A reader task routes each message to its request's queue. Per request this costs a
    SUBSCRIBE and an UNSUBSCRIBE on a connection that stays open, where a pub/sub client of its
    own would connect, authenticate, and disconnect again (redis-py's `PubSub.aclose` closes
    the connection). If the connection fails, every open subscription gets the error (its
    request ends with an error event) and the next subscription starts a fresh connection.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._queues: dict[str, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._starting = asyncio.Lock()

    async def subscribe(self, channel: str) -> "asyncio.Queue[dict[str, Any] | BaseException]":
        """Subscribes and waits until Redis confirms, so nothing published later is missed."""
        pubsub = await self._connected()
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        confirmed = asyncio.get_running_loop().create_future()
        self._queues[channel] = queue
        self._confirmations[channel] = confirmed
        try:
            await pubsub.subscribe(channel)
            await asyncio.wait_for(asyncio.shield(confirmed), timeout=5.0)
        except BaseException:
            self._queues.pop(channel, None)
            self._confirmations.pop(channel, None)
            raise
        return queue

    async def _connected(self) -> Any:
        """The live pub/sub connection and its reader, (re)started if there is none."""
        async with self._starting:
            if self._reader is None or self._reader.done():
                pubsub = self._client.pubsub()
                try:
                    await pubsub.connect()  # type: ignore[no-untyped-call]
                except BaseException:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                    raise
                # The reader task is this connection's only reader: the client's periodic health
                # check would PING from `subscribe` and read beside it ("readuntil() called
                # while another coroutine is already waiting"), a 500 after 15 idle seconds. A
                # dead connection still shows: the reader's read fails and the hub restarts.
                pubsub.connection.health_check_interval = 0  # type: ignore[attr-defined]
                self._pubsub = pubsub
                self._reader = asyncio.create_task(self._read(pubsub))
            return self._pubsub

    async def unsubscribe(self, channel: str) -> None:
        self._queues.pop(channel, None)
        self._confirmations.pop(channel, None)
        reader, pubsub = self._reader, self._pubsub
        if reader is not None and not reader.done():
            with contextlib.suppress(Exception):
                await pubsub.unsubscribe(channel)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                # A bounded wait, so the client's periodic health check (a PING) runs and a
                # connection that died silently is found out.
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message["channel"]
                if isinstance(channel, bytes):
                    channel = channel.decode()
                if message["type"] == "message":
                    queue = self._queues.get(channel)
                    if queue is not None:
                        queue.put_nowait(message)
                elif message["type"] == "subscribe":
                    confirmed = self._confirmations.pop(channel, None)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the connection is gone: every open request learns it
            for queue in list(self._queues.values()):
                queue.put_nowait(exc)
            for confirmed in list(self._confirmations.values()):
                if not confirmed.done():
                    confirmed.set_exception(exc)
            self._queues.clear()
            self._confirmations.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class EventSubscription:
    """Subscribe (and wait for Redis to confirm) before the job is enqueued, so nothing is lost."""

    def __init__(self, hub: EventHub, request_id: str) -> None:
        self._hub = hub
        self._channel = events_channel(request_id)
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] | None = None
        self._next_index = 0

    async def __aenter__(self) -> "EventSubscription":
        self._queue = await self._hub.subscribe(self._channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The connection may already be gone; then there is nothing else to release.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._hub.unsubscribe(self._channel))

    async def next(self, timeout: float) -> WorkerEvent | None:
        """The next event, or None if none came within `timeout` seconds."""
        assert self._queue is not None, "use `async with` first"
        try:
            message = await asyncio.wait_for(self._queue.get(), timeout=max(timeout, 0))
        except TimeoutError:
            return None
        if isinstance(message, BaseException):
            self._queue.put_nowait(message)  # every later call fails the same way
            raise message
        event = parse_event(message["data"])
        if event.index != self._next_index:
            raise SequenceGap(f"expected event {self._next_index}, got {event.index}")
        self._next_index += 1
        return event
