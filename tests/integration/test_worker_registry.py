"""The live-worker registry (contract/worker_registry.py) on the session's stack: readiness and
metrics read it instead of scanning Redis, and a worker whose heartbeat stops drops out."""

import secrets
from collections.abc import Iterator

import httpx
import pytest
import redis

from contract.keys import WORKER_REGISTRY, heartbeat_key
from contract.worker_registry import HEARTBEAT_SCRIPT, heartbeat_call
from infra.launcher.stack import Stack
from tests.support import STACK_MODEL, wait_for

pytestmark = pytest.mark.integration

UNRELATED_KEYS = 20_000


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(stack.redis_url or "")
    try:
        yield connection
    finally:
        connection.close()


def calls(client: redis.Redis) -> dict[str, int]:
    """How often Redis has run each command since its start (INFO commandstats)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


def workers_counted(stack: Stack) -> int:
    response = httpx.get(f"{stack.base_url}/readyz", timeout=10)
    return int(response.json()["checks"]["workers"]["count"])


def test_readiness_and_metrics_never_scan_the_keyspace(stack: Stack, client: redis.Redis) -> None:
    prefix = f"test:unrelated:{secrets.token_hex(4)}:"
    names = [f"{prefix}{i}" for i in range(UNRELATED_KEYS)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.set(name, b"x", ex=600)
        pipe.execute()
    try:
        before = calls(client)
        for _ in range(5):
            ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["workers"]["count"] == len(stack.workers)
            assert httpx.get(f"{stack.base_url}/metrics", timeout=10).status_code == 200
        after = calls(client)
    finally:
        for start in range(0, len(names), 1000):
            client.unlink(*names[start : start + 1000])
    for command in ("scan", "keys"):
        assert after.get(command, 0) == before.get(command, 0), command
    assert after.get("evalsha", 0) >= before.get("evalsha", 0) + 10  # the registry script


def test_a_worker_whose_heartbeat_stops_drops_out(stack: Stack, client: redis.Redis) -> None:
    ghost = f"ghost-{secrets.token_hex(4)}"
    payload = {"name": ghost, "models": [STACK_MODEL], "active": 0, "engines": {}}
    beat = client.register_script(HEARTBEAT_SCRIPT)
    beat(**heartbeat_call(ghost, payload, lifetime_s=3.0))  # one beat, then silence
    assert client.zscore(WORKER_REGISTRY, ghost) is not None
    assert workers_counted(stack) == len(stack.workers) + 1
    wait_for(lambda: workers_counted(stack) == len(stack.workers), timeout=20, what="drop out")
    # The reader pruned it: the registry holds only live workers.
    assert client.zscore(WORKER_REGISTRY, ghost) is None
    assert not client.exists(heartbeat_key(ghost))
    live = {name.decode() for name in client.zrange(WORKER_REGISTRY, 0, -1)}
    assert live == {w.env["ABL_WORKER_NAME"] for w in stack.workers}
