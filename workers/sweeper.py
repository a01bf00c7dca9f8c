"""The sweeper thread every worker runs: it settles requests stuck queued or running whose
worker died (the rule is in db/stuck_requests.py) and tells any engine still decoding them to stop.

All workers sweep; SKIP LOCKED makes the overlap harmless. A worker counts as dead only once
its heartbeat has been missing for a whole grace period, seen on two passes: a Redis that just
restarted (and lost every key) must not fail the requests that live workers are running.
"""

import logging
import random
import threading
import time
from collections.abc import Callable, Collection

import redis
from sqlalchemy.exc import SQLAlchemyError

from contract.keys import CANCEL_CHANNEL, cancel_key
from contract.worker_registry import LIVE_WORKERS_CALL, LIVE_WORKERS_SCRIPT, live_names
from db.session import transaction
from db.stuck_requests import SWEEP_BATCH, release_orphans, sweep
from workers.settings import WorkerSettings

log = logging.getLogger("abl.worker.sweeper")

# How long a cancel flag outlives the request (a worker that claims the task later sees it).
CANCEL_FLAG_TTL_S = 3600


def registry_reader(client: redis.Redis) -> Callable[[], Collection[str]]:
    """The names in the live-worker registry now (contract/worker_registry.py)."""
    script = client.register_script(LIVE_WORKERS_SCRIPT)
    return lambda: live_names(script(**LIVE_WORKERS_CALL))


class HeartbeatWatch:
    """`is_worker_alive` from the live-worker registry, with a grace period before "dead"."""

    def __init__(
        self,
        live: Callable[[], Collection[str]],
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._live = live
        self._grace_s = grace_s
        self._clock = clock
        # worker -> (first seen without a heartbeat, last seen without one)
        self._missing: dict[str, tuple[float, float]] = {}

    def __call__(self, worker: str) -> bool:
        """Raises RedisError when Redis cannot answer: unknown is not dead."""
        if worker in self._live():
            self._missing.pop(worker, None)
            return True
        now = self._clock()
        first, last = self._missing.get(worker, (now, now))
        if now - last > 2 * self._grace_s:
            first = now  # not looked at for a long while: start counting again
        self._missing[worker] = (first, now)
        return now - first < self._grace_s


class Sweeper:
    """start() / stop() a daemon thread that sweeps every `sweep_interval_s` (jittered)."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis) -> None:
        self.settings = settings
        self._redis = client
        self._database_url = settings.require_database_url()
        # A heartbeat lives three beats; a worker gone that long is dead.
        self._alive = HeartbeatWatch(registry_reader(client), grace_s=3 * settings.heartbeat_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Free what a previous process of this name held, then sweep in the background."""
        if self.settings.sweep_interval_s <= 0:
            log.info("sweeper off (sweep_interval_s=0)")
            return
        try:
            with transaction(self._database_url) as session:
                release_orphans(session, self.settings.worker_name)
        except SQLAlchemyError as exc:
            log.warning("could not release this worker's orphaned requests: %s", exc)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="sweeper")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep_once(self) -> list[str]:
        """One pass: settle batches until none is full; the ids settled."""
        swept: list[str] = []
        while not self._stop.is_set():
            with transaction(self._database_url) as session:
                batch = sweep(
                    session,
                    self._alive,
                    queued_timeout_s=self.settings.queued_timeout_s,
                    running_timeout_s=self.settings.running_timeout_s,
                )
            self._cancel(batch)
            swept += batch
            if len(batch) < SWEEP_BATCH:
                break
        return swept

    def _cancel(self, request_ids: list[str]) -> None:
        """An engine may still be decoding a request swept for running too long: stop it."""
        if not request_ids:
            return
        with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.set(cancel_key(request_id), b"1", ex=CANCEL_FLAG_TTL_S)
                pipe.publish(CANCEL_CHANNEL, request_id)
            pipe.execute()

    def _loop(self) -> None:
        interval = self.settings.sweep_interval_s
        # Jitter: workers started together do not sweep in lockstep.
        while not self._stop.wait(interval * random.uniform(0.75, 1.25)):
            try:
                self.sweep_once()
            except (SQLAlchemyError, redis.RedisError) as exc:
                log.warning("sweep failed, retrying next pass: %s", exc)
