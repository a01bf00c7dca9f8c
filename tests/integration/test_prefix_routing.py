"""Cache-aware routing (contract/prefix_routing.py) on real Redis and the real stack: the
scripts' decisions, a dead worker's lane emptied into the shared lane, and a request whose
prefix the stack's worker announced routed to that worker's own lane and served from its cache."""

import time
import uuid

import anthropic
import pytest
import redis

from api.anthropic.convert import conversation_of
from api.anthropic.protocol import MessagesRequest
from contract.keys import WORKER_REGISTRY
from contract.prefix_routing import (
    RESCUE,
    ROUTE,
    affinity_lane,
    affinity_workers_key,
    block_keys,
    prefix_owner_key,
    routable_keys,
)
from contract.rendering import PromptRenderer
from infra.launcher.stack import Stack
from tests.integration.test_prompt_cache import ask, long_system, marked
from tests.scrape import Samples, scrape
from tests.support import STACK_MODEL_SPEC, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client_redis(stack: Stack) -> redis.Redis:
    assert stack.redis_url is not None
    return redis.Redis.from_url(stack.redis_url)


def test_route_prefers_the_live_owner_of_the_longest_prefix(client_redis: redis.Redis) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    route = client_redis.register_script(ROUTE)
    keys = block_keys(list(range(300)), 300)  # 4 blocks of 64
    owners = [prefix_owner_key(queue, k) for k in reversed(keys)]
    live, dead = f"w-live-{queue}", f"w-dead-{queue}"
    client_redis.zadd(WORKER_REGISTRY, {live: time.time() + 60})
    prefix = affinity_lane(queue, "")

    def decide() -> tuple[str, str]:
        reply = route(keys=[WORKER_REGISTRY, *owners], args=[prefix, 2])
        return reply[0].decode(), reply[1].decode()

    try:
        assert decide() == ("none", "")
        client_redis.set(prefix_owner_key(queue, keys[1]), live, ex=60)
        assert decide() == ("taken", live)
        client_redis.set(prefix_owner_key(queue, keys[3]), dead, ex=60)  # longer, owner dead
        assert decide() == ("dead", dead)
        client_redis.delete(prefix_owner_key(queue, keys[3]))
        client_redis.rpush(affinity_lane(queue, live), b"a", b"b")  # its lane holds the bound
        assert decide() == ("busy", live)
    finally:
        client_redis.zrem(WORKER_REGISTRY, live)
        client_redis.delete(affinity_lane(queue, live), *owners)


def test_a_dead_workers_lane_goes_to_the_shared_lane(client_redis: redis.Redis) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    rescue = client_redis.register_script(RESCUE)
    dead = "w-gone"
    client_redis.sadd(affinity_workers_key(queue), dead, "me")
    client_redis.rpush(affinity_lane(queue, dead), b"job1", b"job2")
    try:
        moved = rescue(
            keys=[WORKER_REGISTRY, affinity_workers_key(queue), queue],
            args=[affinity_lane(queue, ""), "me"],
        )
        assert moved == 2
        assert client_redis.lrange(queue, 0, -1) == [b"job1", b"job2"]
        assert client_redis.smembers(affinity_workers_key(queue)) == {b"me"}
    finally:
        client_redis.delete(queue, affinity_workers_key(queue), affinity_lane(queue, dead))


def test_the_second_turn_goes_to_the_worker_holding_the_prefix(
    stack: Stack, client: anthropic.Anthropic, client_redis: redis.Redis
) -> None:
    renderer = PromptRenderer.from_folder(stack.model_dir)
    system = long_system(renderer, 1100, seed=21)
    first = ask(client, marked(system), "First")
    assert first.usage.cache_creation_input_tokens > 1000
    # The worker announced the blocks it stored, under its own name.
    owners = client_redis.keys(f"abl:prefix:{STACK_MODEL_SPEC.queue}:*")
    names = {client_redis.get(k) for k in owners}
    assert len(owners) >= first.usage.cache_creation_input_tokens // 64
    assert names == {stack.workers[0].env["ABL_WORKER_NAME"].encode()}
    before = scrape(f"{stack.base_url}/metrics").get(
        "abl_prefix_routing_total", model=STACK_MODEL_SPEC.id, decision="taken"
    )
    second = ask(client, marked(system), "Second")
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    wait_for(
        lambda: (
            scrape(f"{stack.base_url}/metrics").get(
                "abl_prefix_routing_total", model=STACK_MODEL_SPEC.id, decision="taken"
            )
            == before + 1
        )
    )


def test_the_cache_shows_in_the_metrics(stack: Stack, client: anthropic.Anthropic) -> None:
    renderer = PromptRenderer.from_folder(stack.model_dir)
    system = long_system(renderer, 1100, seed=23)
    env = stack.workers[0].env
    worker_url = f"http://{env['ABL_METRICS_HOST']}:{env['ABL_METRICS_PORT']}/metrics"
    before, api_before = scrape(worker_url), scrape(f"{stack.base_url}/metrics")
    ask(client, marked(system), "First")
    second = ask(client, marked(system), "Second")
    model = STACK_MODEL_SPEC.id

    def grew(samples_before: Samples, samples: Samples, name: str) -> float:
        return samples.get(name, model=model) - samples_before.get(name, model=model)

    def once(url: str, name: str, at_least: float, samples_before: Samples) -> Samples | None:
        samples = scrape(url)
        return samples if grew(samples_before, samples, name) >= at_least else None

    hits = "abl_worker_prefix_cache_hits_total"
    after = wait_for(lambda: once(worker_url, hits, 1, before))
    read = grew(before, after, "abl_worker_prefix_cache_read_tokens_total")
    assert read >= second.usage.cache_read_input_tokens
    assert grew(before, after, "abl_worker_prefix_cache_lookups_total") >= 2
    held = after.get("abl_worker_prefix_cache_bytes", model=model)
    assert 0 < held <= after.get("abl_worker_prefix_cache_budget_bytes", model=model)
    api_read = "abl_cache_read_input_tokens_total"
    api_url = f"{stack.base_url}/metrics"
    api = wait_for(
        lambda: once(api_url, api_read, second.usage.cache_read_input_tokens, api_before)
    )
    assert grew(api_before, api, "abl_cache_creation_input_tokens_total") > 0


def test_a_dead_preferred_worker_falls_back_to_the_shared_lanes(
    stack: Stack, client: anthropic.Anthropic, client_redis: redis.Redis
) -> None:
    """Every block of the prompt announced by a worker that is gone: the request still runs,
    on the shared lanes, and the decision is counted as `dead`."""
    renderer = PromptRenderer.from_folder(stack.model_dir)
    system = long_system(renderer, 1100, seed=31)
    body = {
        "model": STACK_MODEL_SPEC.id,
        "max_tokens": 16,
        "system": system,
        "messages": [{"role": "user", "content": "Ghost"}],
        "cache_control": {"type": "ephemeral"},  # the whole prompt
    }
    ids = renderer.prompt(conversation_of(MessagesRequest.model_validate(body))).ids
    owners = [prefix_owner_key(STACK_MODEL_SPEC.queue, k) for k in routable_keys(ids, len(ids))]
    assert owners
    for owner in owners:
        client_redis.set(owner, "ghost-worker", ex=60)
    metrics_url = f"{stack.base_url}/metrics"
    before = scrape(metrics_url).get(
        "abl_prefix_routing_total", model=STACK_MODEL_SPEC.id, decision="dead"
    )
    try:
        message = client.messages.create(**body, extra_body={"temperature": 0.0})  # type: ignore[call-overload]
        assert message.usage.cache_creation_input_tokens > 1000  # ran, on the live worker
        wait_for(
            lambda: (
                scrape(metrics_url).get(
                    "abl_prefix_routing_total", model=STACK_MODEL_SPEC.id, decision="dead"
                )
                == before + 1
            )
        )
    finally:
        client_redis.delete(*owners)
