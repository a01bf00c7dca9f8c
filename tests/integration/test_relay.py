"""The API's shared pub/sub connection (api.relay.EventHub) on the session's real Redis."""

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.relay import EventHub, EventSubscription, SequenceGap
from contract.events import DeltaEvent
from contract.keys import events_channel
from infra.launcher.stack import Stack

pytestmark = pytest.mark.integration


CLIENT_NAME = "abl-relay-test"


def delta(seq: int, text: str) -> str:
    return DeltaEvent(index=seq, text=text, output_tokens=seq + 1).model_dump_json()


def run(stack: Stack, scenario: object) -> None:
    async def main() -> None:
        # Named, so a test can find (and kill) this client's connections and no one else's.
        client = aioredis.Redis.from_url(stack.redis_url or "", client_name=CLIENT_NAME)
        hub = EventHub(client)
        try:
            await scenario(client, hub)  # type: ignore[operator]
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(main())


async def own_pubsub_connections(client: aioredis.Redis) -> list[dict[str, str]]:
    return [c for c in await client.client_list(_type="pubsub") if c["name"] == CLIENT_NAME]


def test_many_requests_share_one_connection_and_get_only_their_events(stack: Stack) -> None:
    async def scenario(client: aioredis.Redis, hub: EventHub) -> None:
        subs = [EventSubscription(hub, f"relay-{i}") for i in range(20)]
        for sub in subs:
            await sub.__aenter__()
        assert len(await own_pubsub_connections(client)) == 1
        for seq in range(3):
            for i in range(20):
                await client.publish(events_channel(f"relay-{i}"), delta(seq, f"{i}:{seq}"))
        for i, sub in enumerate(subs):
            texts = [(await sub.next(5)).text for _ in range(3)]  # type: ignore[union-attr]
            assert texts == [f"{i}:0", f"{i}:1", f"{i}:2"]
            assert await sub.next(0.05) is None
        for sub in subs:
            await sub.__aexit__(None, None, None)
        await asyncio.sleep(0.1)
        assert await client.pubsub_numsub(*(events_channel(f"relay-{i}") for i in range(20))) == [
            (events_channel(f"relay-{i}").encode(), 0) for i in range(20)
        ]

    run(stack, scenario)


def test_a_missing_event_is_a_sequence_gap(stack: Stack) -> None:
    async def scenario(client: aioredis.Redis, hub: EventHub) -> None:
        async with EventSubscription(hub, "relay-gap") as sub:
            await client.publish(events_channel("relay-gap"), delta(0, "a"))
            await client.publish(events_channel("relay-gap"), delta(2, "c"))
            assert (await sub.next(5)).text == "a"  # type: ignore[union-attr]
            with pytest.raises(SequenceGap):
                await sub.next(5)

    run(stack, scenario)


def test_a_lost_connection_fails_open_subscriptions_and_the_next_one_reconnects(
    stack: Stack,
) -> None:
    async def scenario(client: aioredis.Redis, hub: EventHub) -> None:
        async with EventSubscription(hub, "relay-lost") as sub:
            for connection in await own_pubsub_connections(client):
                await client.client_kill_filter(_id=connection["id"])
            with pytest.raises((RedisError, OSError)):
                await sub.next(10)
            with pytest.raises((RedisError, OSError)):
                await sub.next(1)  # and it stays failed
        async with EventSubscription(hub, "relay-after") as fresh:
            await client.publish(events_channel("relay-after"), delta(0, "back"))
            assert (await fresh.next(5)).text == "back"  # type: ignore[union-attr]

    run(stack, scenario)
