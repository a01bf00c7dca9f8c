"""A worker announces the prompt-cache blocks its engines hold (contract/prefix_routing.py).

Each block a model's engine stores becomes a Redis key naming this worker, with a TTL; an
evicted block's key is deleted (if it still names this worker); every `ttl / 3` all held keys
are written again, so a worker that dies stops attracting requests within the TTL, and the
registry check at routing time stops it at once. The same pass moves the jobs of dead workers'
affinity lanes to the shared lane.
"""

import logging
import threading
from collections.abc import Callable

import redis
from prometheus_client import Counter

from contract.keys import WORKER_REGISTRY
from contract.prefix_routing import (
    FORGET,
    RESCUE,
    affinity_lane,
    affinity_workers_key,
    prefix_owner_key,
)

log = logging.getLogger("abl.worker.prefix")

ANNOUNCED = Counter(
    "abl_worker_prefix_blocks_announced_total",
    "Prompt-cache blocks this worker announced for cache-aware routing, and withdrew",
    ["model", "change"],
)
RESCUED = Counter(
    "abl_worker_affinity_jobs_rescued_total",
    "Jobs moved from a dead worker's affinity lane to the shared lane",
    ["model"],
)


class PrefixAnnouncer:
    def __init__(self, client: redis.Redis, worker: str, ttl_s: float) -> None:
        self._client = client
        self.worker = worker
        self.ttl_s = max(1, round(ttl_s))
        self._held: dict[str, tuple[str, set[bytes]]] = {}  # model -> (queue, block keys)
        self._lock = threading.Lock()
        self._forget = client.register_script(FORGET)
        self._rescue = client.register_script(RESCUE)

    def watch(self, model: str, queue: str) -> Callable[[list[bytes], list[bytes]], None]:
        """The callback for `model`'s engine (EngineProcess.on_prefix_change)."""
        with self._lock:
            self._held[model] = (queue, set())

        def changed(left: list[bytes], arrived: list[bytes]) -> None:
            with self._lock:
                held = self._held[model][1]
                held.difference_update(left)
                held.update(arrived)
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for key in arrived:
                        pipe.set(prefix_owner_key(queue, key), self.worker, ex=self.ttl_s)
                    if left:
                        owners = [prefix_owner_key(queue, key) for key in left]
                        self._forget(keys=owners, args=[self.worker], client=pipe)
                    pipe.execute()
            except redis.RedisError as exc:  # the next refresh writes them again
                log.warning("could not announce prompt-cache blocks: %s", exc)
            ANNOUNCED.labels(model, "stored").inc(len(arrived))
            ANNOUNCED.labels(model, "evicted").inc(len(left))

        return changed

    def refresh(self) -> None:
        """Writes every held key again (new TTL), registers the affinity lanes, and moves the
        jobs of dead workers' lanes to the shared lane."""
        with self._lock:
            held = {model: (queue, list(keys)) for model, (queue, keys) in self._held.items()}
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for queue, keys in held.values():
                    pipe.sadd(affinity_workers_key(queue), self.worker)
                    for key in keys:
                        pipe.set(prefix_owner_key(queue, key), self.worker, ex=self.ttl_s)
                pipe.execute()
            for model, (queue, _) in held.items():
                moved = self._rescue(
                    keys=[WORKER_REGISTRY, affinity_workers_key(queue), queue],
                    args=[affinity_lane(queue, ""), self.worker],
                )
                if moved:
                    log.warning("moved %d jobs of dead workers' affinity lanes to %s", moved, queue)
                    RESCUED.labels(model).inc(int(moved))
        except redis.RedisError as exc:
            log.warning("prompt-cache announcement refresh failed: %s", exc)
