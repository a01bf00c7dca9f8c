"""Cache-aware routing at enqueue (contract/prefix_routing.py, docs/caching.md): the lane of the
worker that holds the longest cached prefix of the request, if it is live and not too busy."""

import logging

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from contract.jobs import GenerateJob
from contract.keys import WORKER_REGISTRY
from contract.prefix_routing import ROUTE, affinity_lane, prefix_owner_key, routable_keys

log = logging.getLogger("abl.routing")

# Decisions: taken (the preferred worker's lane), busy (its lane held the bound), dead (it is
# not live), none (no live announcement covers the prefix), off (no cacheable prefix).
ROUTING = Counter(
    "abl_prefix_routing_total",
    "Requests with a cacheable prefix by routing decision: taken (sent to the worker holding"
    " the prefix), busy, dead, none (shared lanes)",
    ["model", "decision"],
)


class PrefixRouter:
    def __init__(self, client: aioredis.Redis, max_queued: int) -> None:
        self._route = client.register_script(ROUTE)
        self.max_queued = max_queued  # jobs a preferred worker's lane may hold; 0: off

    async def lane(self, queue: str, job: GenerateJob) -> str | None:
        """The affinity lane this job should go to, or None for the shared lanes."""
        if not job.cache_prefix_tokens or self.max_queued <= 0:
            return None
        keys = routable_keys(job.input_ids, job.cache_prefix_tokens)
        if not keys:
            return None
        owners = [prefix_owner_key(queue, key) for key in reversed(keys)]
        try:
            reply = await self._route(
                keys=[WORKER_REGISTRY, *owners], args=[affinity_lane(queue, ""), self.max_queued]
            )
        except RedisError as exc:  # routing is an optimisation: the shared lanes still work
            log.warning("prefix routing unavailable: %s", exc)
            return None
        decision, worker = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
        ROUTING.labels(job.model, decision).inc()
        return affinity_lane(queue, worker) if decision == "taken" else None
