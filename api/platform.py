"""What the API process holds for its lifetime: settings, catalogue, Redis, the task producer."""

import asyncio
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery

from api.errors import NotFoundError, OverloadedError
from api.prefix_route import PrefixRouter
from api.relay import EventHub
from api.settings import ApiSettings
from api.taskqueue import QueueFull, TaskQueue
from contract.catalog import Catalog, ModelSpec, load_catalog
from contract.jobs import TASK_GENERATE, GenerateJob
from contract.keys import CANCEL_CHANNEL, cancel_key
from contract.rendering import PromptRenderer, get_renderer
from db.ledger import Outcome, settle_request
from db.session import transaction

log = logging.getLogger("abl.api")


@dataclass
class Platform:
    settings: ApiSettings
    catalog: Catalog
    redis: aioredis.Redis
    celery: Celery
    database_url: str
    credit_price: Decimal
    # Set on SIGTERM: open streams end with an error event instead of hanging on.
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    # Models whose tokenizer this process has loaded (api/anthropic/admission.tokenize_async).
    loaded_tokenizers: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tasks = TaskQueue(self.celery, self.redis)
        self.prefix_router = PrefixRouter(self.redis, self.settings.prefix_route_max_queued)
        self.events = EventHub(self.redis)

    @classmethod
    def create(cls, settings: ApiSettings) -> "Platform":
        redis_url = settings.require_redis_url()
        # Only Celery's message factory is used (api/taskqueue.py); the API never connects it.
        celery = Celery("abl-api")
        celery.conf.task_serializer = "json"
        return cls(
            settings=settings,
            catalog=load_catalog(settings.models_file),
            redis=aioredis.Redis.from_url(
                redis_url, max_connections=2000, socket_connect_timeout=2, health_check_interval=15
            ),
            celery=celery,
            database_url=settings.require_database_url(),
            credit_price=Decimal(settings.credit_price_usd),
        )

    async def close(self) -> None:
        for task in list(self._background):
            await task
        await self.events.close()
        await self.redis.aclose()
        self.celery.close()

    async def _cancel_logged(self, request_id: str) -> None:
        try:
            await self.cancel(request_id)
        except Exception:  # Redis or Postgres down: the sweeper settles it later
            log.exception("could not cancel %s", request_id)

    def renderer(self, spec: ModelSpec) -> PromptRenderer:
        folder = Path(spec.path(self.settings.models_dir))
        if not (folder / "tokenizer.json").is_file():
            # In the catalogue, but never prepared here (no worker of this deployment serves it).
            raise NotFoundError(f"model: {spec.id} is not available on this deployment")
        return get_renderer(folder)

    def watch_for_shutdown(self) -> None:
        """Chain onto the server's SIGTERM/SIGINT handlers (installed before startup)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.shutting_down.set)
                if callable(previous):
                    previous(sig, frame)

            signal.signal(signum, handler)

    async def enqueue(self, spec: ModelSpec, job: GenerateJob) -> None:
        """Queue the job on its model's queue, or 529 at once when that queue is full."""
        try:
            await self.tasks.push(
                TASK_GENERATE,
                [job.model_dump(mode="json")],
                queue=spec.queue,
                lanes=self.settings.queue_lanes,
                account_id=job.account_id or "",
                request_id=job.request_id,
                max_waiting=self.settings.max_queued_per_model,
                # A job waiting longer than the queue timeout has been given up on.
                stale_s=2 * self.settings.queue_timeout_s,
                affinity=await self.prefix_router.lane(spec.queue, job),
            )
        except QueueFull as full:
            raise OverloadedError(
                f"{full.backlog} requests are already waiting for {spec.id} and this account"
                " holds its share of them; retry shortly",
                retry_after=2,
            ) from None

    async def cancel(self, request_id: str) -> None:
        """Stop a request whose client is gone.

        Still queued: settle it here as cancelled (nothing produced, nothing charged); a worker
        that picks the task up later finds it settled and skips it. Running: tell every worker
        to drop it; the key also catches a worker that claims it between the two steps.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(cancel_key(request_id), b"1", ex=3600)
            pipe.publish(CANCEL_CHANNEL, request_id)
            await pipe.execute()
        await self.settle_if_queued(request_id, "cancelled", "client went away before it started")

    async def abandon(self, request_id: str, reason: str) -> None:
        """A request that will never run (enqueueing failed): failed, its hold released."""
        await self.settle_if_queued(request_id, "failed", reason)

    async def settle_if_queued(self, request_id: str, status: str, reason: str) -> None:
        def settle() -> None:
            with transaction(self.database_url) as session:
                outcome = Outcome.unbilled(status, reason)
                settle_request(session, request_id, outcome, only_queued=True)

        await anyio.to_thread.run_sync(settle)

    def cancel_soon(self, request_id: str) -> None:
        """Cancel from a place that is itself being cancelled (a client that went away)."""
        self.spawn(self._cancel_logged(request_id))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` to completion even if the caller is being cancelled; close() awaits it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
